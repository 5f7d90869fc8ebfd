"""Training options against shortcuts, on small data: the border trim and the lung crop (one framing
for preprocess and predict), and source-capped sampling of the train stream."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from PIL import Image

from covid_spark.lungs import framing as F
from covid_spark.training.weights import source_keep_probabilities


def test_no_framing_reads_at_the_stored_size_and_changes_nothing():
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert F.read_size(32, F.Framing()) == 32
    out, notes = F.frame_images([image], 32, F.Framing())
    assert out[0] is image and notes == [""]


def test_the_border_trim_keeps_the_middle_of_the_film():
    # A 40×40 film read at twice the stored 20: a 4-pixel frame (0.1 of each side) of 255 around a
    # middle of 100; trimmed and resized to 20, nothing of the frame is left.
    film = np.full((40, 40, 3), 100, np.uint8)
    film[:4], film[-4:], film[:, :4], film[:, -4:] = 255, 255, 255, 255
    framing = F.Framing(border=0.1)
    assert F.read_size(20, framing) == 40
    (out,), (note,) = F.frame_images([film], 20, framing)
    assert out.shape == (20, 20, 3) and note == ""
    assert (out == 100).all()


def test_the_lung_crop_cuts_to_the_masks_box_plus_margin(monkeypatch):
    # Sizes in 128ths, exact in binary floating point: lungs x 16..56 and 72..112, y 32..96; a margin
    # of 8/128 makes the box x 8..120, y 24..104.
    film = np.zeros((128, 128, 3), np.uint8)
    film[32:96, 16:56] = 200
    film[32:96, 72:112] = 200
    film[0:8, 0:8] = 255       # a marker in the corner, outside the box
    mask = (film[:, :, 0] == 200).astype(np.float32)
    monkeypatch.setattr(F, "segment", lambda images: mask[None].repeat(len(images), 0))
    (out,), (note,) = F.frame_images([film], 56, F.Framing(lung_crop=True, margin=8 / 128))
    expected = np.asarray(Image.fromarray(film[24:104, 8:120]).resize((56, 56), Image.BILINEAR))
    assert out.shape == (56, 56, 3) and (out == expected).all() and out.max() == 200
    summary = json.loads(note)
    assert (summary["box_x0"], summary["box_y0"], summary["box_x1"], summary["box_y1"]) == (0.0625, 0.1875, 0.9375, 0.8125)
    assert summary["lung_fraction"] == pytest.approx(2 * 40 * 64 / 128 ** 2, abs=1e-4) and summary["reason"] == ""


def test_an_untrusted_mask_keeps_the_whole_film_and_says_why(monkeypatch):
    film = np.full((64, 64, 3), 90, np.uint8)
    monkeypatch.setattr(F, "segment", lambda images: np.zeros((len(images), 64, 64), np.float32))
    (out,), (note,) = F.frame_images([film], 32, F.Framing(lung_crop=True))
    assert out.shape == (32, 32, 3) and (out == 90).all()
    assert json.loads(note)["box_fallback"] == 1.0 and json.loads(note)["reason"]


def test_the_framing_of_a_config_and_of_an_older_summary():
    assert F.Framing.of({"border_crop": 0.05, "lung_crop": True, "lung_crop_margin": 0.1}) == F.Framing(0.05, True, 0.1)
    assert F.Framing.of({}) == F.Framing() and not F.Framing().active


# ------------------------------------------------------------------------------- source cap


def test_the_source_cap_thins_only_the_dominant_source_of_each_class():
    counts = {"kermany": {"pneumonia": 900, "normal": 100}, "nih": {"pneumonia": 100, "normal": 400},
              "radiography": {"covid": 300}}
    keep = source_keep_probabilities(counts, 0.5)
    # pneumonia is class 2: kermany cut to nih's 100 (half of 200); normal (1): nih cut to 100.
    assert keep == {"2/kermany": pytest.approx(100 / 900), "2/nih": 1.0, "1/nih": pytest.approx(100 / 400),
                    "1/kermany": 1.0}
    assert source_keep_probabilities(counts, 0.0) == {} and source_keep_probabilities(counts, 1.0) == {}


def test_the_cap_holds_with_three_sources_and_is_never_below_one_over_their_number():
    counts = {"a": {"covid": 600}, "b": {"covid": 300}, "c": {"covid": 100}}
    keep = source_keep_probabilities(counts, 0.4)
    kept = {s: counts[s]["covid"] * keep[f"0/{s}"] for s in counts}
    total = sum(kept.values())
    assert max(kept.values()) / total == pytest.approx(0.4, abs=1e-6) and kept["c"] == 100
    equal = source_keep_probabilities(counts, 0.1)   # below 1/3: every source ends at a third
    kept = [counts[s]["covid"] * equal[f"0/{s}"] for s in counts]
    assert kept == pytest.approx([100, 100, 100])


def test_the_sampler_keeps_each_class_and_source_at_its_rate():
    tf = pytest.importorskip("tensorflow")
    from covid_spark.training.tfdata import source_sampler

    Row = collections.namedtuple("Row", "label source")  # what a Petastorm reader yields

    labels = tf.constant([2] * 3000 + [1] * 3000, tf.int32)
    sources = tf.constant(["kermany"] * 3000 + ["nih"] * 3000)
    ds = tf.data.Dataset.from_tensor_slices((labels, sources)).map(lambda l, s: Row(l, s))
    kept = list(ds.filter(source_sampler({"2/kermany": 0.2}, seed=3)).map(lambda r: r.label).as_numpy_iterator())
    per_label = np.bincount(np.array(kept), minlength=3)
    assert per_label[1] == 3000                          # not named: all kept
    assert abs(per_label[2] - 600) < 4 * np.sqrt(3000 * 0.2 * 0.8)


@pytest.mark.slow
def test_preprocess_stores_the_lung_crop_it_describes(spark, tmp_path):
    """Real X-rays cropped by the shipped segmenter in the executors: each stored image is the crop
    of the whole film (decoded independently here) to the box its ``lungs`` column records."""
    from tests.conftest import make_subset

    from covid_spark.config import load_config, override
    from covid_spark.data.dataset import iter_split_batches
    from covid_spark.inputs.images import read_image
    from covid_spark.lungs.masks import LungBox, crop_to_box
    from covid_spark.stages.preprocess import preprocess

    make_subset(str(tmp_path / "in"), {"covid": 3, "normal": 3, "pneumonia": 3})
    config = override(load_config(), "preprocess", {"image_size": 64, "min_row_groups": 1, "lung_crop": True,
                                                    "val_fraction": 0.2, "test_fraction": 0.2})
    summary = preprocess(spark, str(tmp_path / "in"), str(tmp_path / "ds"), config)
    assert summary["written"] == 9 and summary["config"]["lung_crop"] is True
    rows = [row for split in ("train", "val", "test") if summary["per_split"][split]
            for batch in iter_split_batches(str(tmp_path / "ds"), split, fields=("image", "lungs"))
            for row in zip(batch["path"], batch["image"], batch["lungs"])]
    assert len(rows) == 9
    for path, image, lungs in rows:
        note = json.loads(lungs)
        box = LungBox(note["box_x0"], note["box_y0"], note["box_x1"], note["box_y1"])
        whole = read_image(str(path), 128, 50_000_000).image
        assert image.shape == (64, 64, 3)
        assert np.abs(image.astype(int) - crop_to_box(whole, box, 64).astype(int)).max() <= 1
        assert 0.1 < note["lung_fraction"] < 0.7
