"""covid_spark.audit on arrays made here: planted and absent source signals, hand-made masks and maps."""
from __future__ import annotations

import math

import numpy as np
import pytest

from covid_spark.audit import (cam_energy_in_mask, energy_by_group, keep_only_lungs, remove_lungs,
                               source_probe, verdict)
from covid_spark.audit.cam import resize_bilinear
from covid_spark.audit.verdict import CAM_IN_LUNGS_MIN, PROBE_GAP_MAX, lungs_removed_f1_max


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


# --- source probe -----------------------------------------------------------------------------------

def _two_source_class(rng, n_a: int, n_b: int, shift: float, dims: int = 5):
    features = rng.normal(size=(n_a + n_b, dims))
    features[n_a:, 0] += shift  # source "b" sits ``shift`` standard deviations away along one axis
    return features, np.array(["a"] * n_a + ["b"] * n_b)


def test_probe_finds_a_planted_source_signal():
    rng = np.random.default_rng(1)
    shift = 4.0
    features, sources = _two_source_class(rng, 60, 40, shift)
    result = source_probe(features, sources, ["covid"] * 100, folds=5, seed=0)
    covid = result["classes"]["covid"]
    assert covid["status"] == "probed"
    assert covid["baseline"] == pytest.approx(0.6)  # 60 of 100 images come from the majority source
    # Two unit-variance Gaussians 4 sd apart: the best possible rule is right Phi(2) = 97.7 % of the time
    # (equal priors; unequal priors only help). A fitted linear probe should come close to it.
    assert covid["probe_accuracy"] >= _normal_cdf(shift / 2) - 0.05
    assert covid["gap"] == pytest.approx(covid["probe_accuracy"] - 0.6)
    assert result["summary"]["gap"] == pytest.approx(covid["gap"])


def test_probe_finds_nothing_in_noise():
    rng = np.random.default_rng(2)
    features, sources = _two_source_class(rng, 90, 60, shift=0.0, dims=10)
    result = source_probe(features, sources, ["normal"] * 150, folds=5, seed=0)
    normal = result["classes"]["normal"]
    assert normal["baseline"] == pytest.approx(0.6)
    # No signal: out-of-fold accuracy cannot honestly beat always guessing "a" (0.6); allow 1.5 standard
    # errors of a proportion over 150 images for luck.
    assert normal["probe_accuracy"] <= 0.6 + 1.5 * math.sqrt(0.6 * 0.4 / 150)
    assert verdict(probe_gap=normal["gap"]).findings[0].passed


def test_probe_works_within_each_class_and_weights_the_summary_by_size():
    rng = np.random.default_rng(3)
    strong, strong_sources = _two_source_class(rng, 50, 50, shift=6.0)   # class x: sources separable
    weak, weak_sources = _two_source_class(rng, 75, 25, shift=0.0)       # class y: no signal
    features = np.vstack([strong, weak])
    sources = np.concatenate([strong_sources, weak_sources])
    labels = ["x"] * 100 + ["y"] * 100
    result = source_probe(features, sources, labels, folds=4, seed=0)
    x, y = result["classes"]["x"], result["classes"]["y"]
    assert x["baseline"] == pytest.approx(0.5) and y["baseline"] == pytest.approx(0.75)
    assert x["gap"] > 0.4 and y["gap"] < 0.1
    summary = result["summary"]
    assert summary["baseline"] == pytest.approx((0.5 * 100 + 0.75 * 100) / 200)
    assert summary["probe_accuracy"] == pytest.approx((x["probe_accuracy"] + y["probe_accuracy"]) / 2)
    assert summary["classes_probed"] == ["x", "y"]


def test_probe_judges_a_lopsided_class_by_balanced_accuracy():
    # 186 images from one source, 14 from another, 8 sd apart: the probe tells them apart almost
    # perfectly, yet guessing the main source already scores 0.93, so plain accuracy can lead it by at
    # most 0.07, under the limit. Balanced accuracy (mean recall over the two sources) is near 1 against
    # chance 0.5, and the verdict must see that.
    rng = np.random.default_rng(5)
    features, sources = _two_source_class(rng, 186, 14, shift=8.0)
    result = source_probe(features, sources, ["normal"] * 200, folds=5, seed=0)
    normal = result["classes"]["normal"]
    assert normal["baseline"] == pytest.approx(0.93)
    assert normal["gap"] <= 0.07 + 1e-9
    assert normal["balanced_baseline"] == pytest.approx(0.5)
    assert normal["balanced_gap"] == pytest.approx(normal["balanced_accuracy"] - 0.5)
    assert normal["balanced_accuracy"] >= _normal_cdf(8.0 / 2) - 0.1
    assert result["summary"]["balanced_gap"] == pytest.approx(normal["balanced_gap"])
    finding = verdict(probe_gap=result["summary"]["balanced_gap"]).findings[0]
    assert not finding.passed and normal["balanced_gap"] > PROBE_GAP_MAX


def test_probe_skips_classes_it_cannot_probe_and_says_why():
    rng = np.random.default_rng(4)
    features = rng.normal(size=(40, 3))
    labels = ["one"] * 20 + ["tiny"] * 20
    sources = ["s1"] * 20 + ["s1"] * 17 + ["s2"] * 3   # class "tiny": s2 has 3 images < 5 folds
    result = source_probe(features, sources, labels, folds=5)
    assert result["classes"]["one"]["status"] == "skipped"
    assert "one source only (s1)" in result["classes"]["one"]["reason"]
    tiny = result["classes"]["tiny"]
    assert tiny["status"] == "skipped" and "fewer than two sources with at least 5 images" in tiny["reason"]
    assert tiny["dropped_sources"] == {"s2": 3}
    assert result["summary"]["gap"] is None and result["summary"]["classes_skipped"] == ["one", "tiny"]


def test_patient_groups_stop_the_probe_recognising_patients():
    # No source signal, but each patient's images share a fingerprint: split by image, the probe learns
    # the patients (and through them their source); split by patient, it is back at guessing.
    rng = np.random.default_rng(5)
    patients, per_patient, dims = 40, 5, 30
    fingerprints = rng.normal(size=(patients, dims))
    patient_source = np.array(["a"] * 24 + ["b"] * 16)
    groups = np.repeat([f"p{i}" for i in range(patients)], per_patient)
    features = np.repeat(fingerprints, per_patient, axis=0) + 0.05 * rng.normal(size=(patients * per_patient, dims))
    sources = np.repeat(patient_source, per_patient)
    labels = ["covid"] * len(sources)
    leaky = source_probe(features, sources, labels, folds=5, seed=0)["classes"]["covid"]
    grouped = source_probe(features, sources, labels, folds=5, seed=0, groups=groups)["classes"]["covid"]
    assert grouped["group_aware"] and not leaky["group_aware"]
    assert leaky["probe_accuracy"] > 0.9
    assert grouped["probe_accuracy"] < 0.6 + 0.15


def test_probe_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"sources must have shape \(4,\)"):
        source_probe(np.zeros((4, 2)), ["a"] * 3, ["x"] * 4)
    with pytest.raises(ValueError, match="folds must be >= 2"):
        source_probe(np.zeros((4, 2)), ["a"] * 4, ["x"] * 4, folds=1)


# --- masking ----------------------------------------------------------------------------------------

def test_remove_and_keep_lungs_on_a_hand_made_array():
    images = np.array([[[10, 20], [30, 40]]], dtype=np.uint8)
    masks = np.array([[[255, 127], [0, 0]]], dtype=np.uint8)   # 127 ("ignore") counts as lung
    np.testing.assert_array_equal(remove_lungs(images, masks), [[[0, 0], [30, 40]]])
    np.testing.assert_array_equal(keep_only_lungs(images, masks), [[[10, 20], [0, 0]]])
    np.testing.assert_array_equal(images, [[[10, 20], [30, 40]]])  # the input is left alone


def test_masking_blacks_out_every_channel_and_reads_probabilities():
    images = np.full((2, 2, 3, 3), 200, dtype=np.uint8)
    probabilities = np.zeros((2, 2, 3), dtype=np.float32)
    probabilities[0, 0, 0] = 0.5   # lung (>= 0.5)
    probabilities[1, 1, 2] = 0.49  # not lung
    removed = remove_lungs(images, probabilities)
    assert removed[0, 0, 0].tolist() == [0, 0, 0]
    assert int((removed == 0).sum()) == 3
    kept = keep_only_lungs(images, probabilities)
    assert kept[0, 0, 0].tolist() == [200, 200, 200] and int((kept > 0).sum()) == 3


def test_masking_rejects_a_mask_of_another_size():
    with pytest.raises(ValueError, match=r"masks must be \[N,H,W\] = \(1, 2, 2\)"):
        remove_lungs(np.zeros((1, 2, 2), np.uint8), np.zeros((1, 3, 2), np.uint8))
    with pytest.raises(ValueError, match="images must be uint8"):
        keep_only_lungs(np.zeros((1, 2, 2), np.float32), np.zeros((1, 2, 2), np.uint8))


# --- Grad-CAM energy --------------------------------------------------------------------------------

def test_energy_share_at_the_mask_size():
    cams = np.array([[[1.0, 3.0], [0.0, 4.0]]])
    masks = np.array([[[True, False], [False, True]]])
    assert cam_energy_in_mask(cams, masks)[0] == pytest.approx((1 + 4) / 8)


def test_energy_share_after_upsampling_by_hand():
    # A 2x2 map with all its energy in the top-left cell, upsampled to 4x4 (half-pixel centres): along
    # each axis the weights of that cell are 1, 0.75, 0.25, 0, so the 4x4 map is their outer product.
    # Its sum is 2 * 2 = 4; the top-left 2x2 quadrant holds 1.75 * 1.75 = 3.0625.
    cam = np.array([[[1.0, 0.0], [0.0, 0.0]]])
    mask = np.zeros((1, 4, 4), dtype=np.uint8)
    mask[0, :2, :2] = 255
    np.testing.assert_allclose(resize_bilinear(cam[0], 4, 4), np.outer([1, .75, .25, 0], [1, .75, .25, 0]))
    assert cam_energy_in_mask(cam, mask)[0] == pytest.approx(3.0625 / 4)


def test_flat_map_puts_the_mask_fraction_in_the_lungs_and_an_empty_map_gives_nan():
    masks = np.zeros((2, 10, 10), dtype=bool)
    masks[:, 2:6, 1:9] = True  # 32 of 100 pixels
    shares = cam_energy_in_mask(np.stack([np.ones((3, 3)), np.zeros((3, 3))]), masks)
    assert shares[0] == pytest.approx(0.32)
    assert np.isnan(shares[1])


def test_energy_by_group_averages_per_class_and_source():
    shares = np.array([0.2, 0.4, 0.9, np.nan])
    result = energy_by_group(shares, ["covid", "covid", "normal", "normal"], ["h1", "h2", "h2", "h2"])
    assert result["by_class"]["covid"] == {"mean": pytest.approx(0.3), "images": 2}
    assert result["by_class"]["normal"] == {"mean": pytest.approx(0.9), "images": 1}
    assert result["by_source"]["h2"]["mean"] == pytest.approx(0.65)
    assert result["by_class_source"]["covid/h1"]["mean"] == pytest.approx(0.2)
    assert result["overall"] == {"mean": pytest.approx(0.5), "images": 3}


# --- verdict ----------------------------------------------------------------------------------------

def test_verdict_flags_each_failed_check_and_passes_a_clean_model():
    assert lungs_removed_f1_max(3) == pytest.approx(1 / 3 + 0.12)
    clean = verdict(probe_gap=0.02, lungs_removed_macro_f1=0.35, cam_share_in_lungs=0.8)
    assert clean.status == "no shortcut found" and all(f.passed for f in clean.findings)
    shortcut = verdict(probe_gap=PROBE_GAP_MAX + 0.01, lungs_removed_macro_f1=0.80,
                       cam_share_in_lungs=CAM_IN_LUNGS_MIN - 0.01)
    assert shortcut.status == "shortcut suspected"
    assert [f.passed for f in shortcut.findings] == [False, False, False]
    assert "outside the lungs" in shortcut.text and "carry the hospital" in shortcut.text
    only_cam = verdict(cam_share_in_lungs=0.5)
    assert [f.check for f in only_cam.findings] == ["Grad-CAM in lungs"]
    assert verdict().status == "not measured"
    # Two classes: chance is 0.5, so 0.6 is still near chance; with three it is not.
    assert verdict(lungs_removed_macro_f1=0.6, num_classes=2).findings[0].passed
    assert not verdict(lungs_removed_macro_f1=0.6, num_classes=3).findings[0].passed
