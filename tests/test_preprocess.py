"""The preprocess job on a corpus of good, odd and bad files that the test builds itself."""
from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from covid_spark.config import load_config, override
from covid_spark.data.duplicates import dhash
from covid_spark.errors import ConfigError
from covid_spark.inputs.images import decode_image

pytestmark = pytest.mark.slow
SIZE = 32


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    data = bytearray(_png(np.zeros((4, 4), np.uint8)))
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def build_corpus(root) -> dict:
    """Folder-per-class corpus with Kaggle-style names; returns expected outcomes."""
    rng = np.random.default_rng(7)
    dirs = {"covid": root / "COVID-19", "pneumonia": root / "Viral Pneumonia", "normal": root / "NORMAL"}
    for d in dirs.values():
        d.mkdir()
    good = {}

    def put(label, name, data):
        path = dirs[label] / name
        path.write_bytes(data)
        good[str(path)] = label
        return path

    for label in dirs:
        for i in range(5):
            noise = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
            put(label, f"{label}{i}.png", _png(noise))
    gradient16 = (np.arange(64, dtype=np.uint16)[None, :].repeat(16, 0) * 1000)
    put("normal", "gradient16.png", _png(gradient16))  # uint16 → mode I;16
    put("normal", "cmyk.jpg", _jpeg(Image.new("CMYK", (40, 40), (0, 255, 255, 0))))
    palette = Image.new("P", (30, 30), 3)
    palette.putpalette([0, 0, 0, 90, 90, 90, 180, 180, 180, 30, 60, 250] + [0] * (256 * 3 - 12))
    put("pneumonia", "palette.png", _save(palette).getvalue())
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:10, :, 3] = 255
    put("pneumonia", "rgba.png", _png(rgba))
    put("covid", "tiny.png", _png(np.full((5, 7, 3), 200, np.uint8)))
    original = put("covid", "dup_a.png", _png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    shutil.copy(original, dirs["covid"] / "dup_b.png")
    good[str(dirs["covid"] / "dup_b.png")] = "covid"
    bad = {
        "empty.jpg": (b"", "empty"),
        "page.jpg": (b"<!DOCTYPE html><html><body>Not found</body></html>", "HTML"),
        "truncated.jpg": (_jpeg(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))[:300], "truncated"),
        "bomb.png": (_bomb_png(30000, 30000), "exceeds"),
    }
    for name, (data, _) in bad.items():
        (dirs["covid"] / name).write_bytes(data)
    (dirs["normal"] / ".DS_Store").write_bytes(b"\x00")
    (dirs["normal"] / "notes.txt").write_text("not an image")
    return {"good": good, "bad": {str(dirs["covid"] / n): why for n, (_, why) in bad.items()},
            "skipped": {str(dirs["normal"] / ".DS_Store"), str(dirs["normal"] / "notes.txt")}}


def _save(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf


def _config(**pre):
    values = {"image_size": SIZE, "min_row_groups": 2, "val_fraction": 0.2, "test_fraction": 0.2}
    values.update(pre)
    return override(load_config(), "preprocess", values)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def written(spark, corpus, tmp_path_factory):
    from covid_spark.stages.preprocess import preprocess

    root, expected = corpus
    out = str(tmp_path_factory.mktemp("out") / "ds")
    summary = preprocess(spark, str(root), out, _config())
    return out, summary, expected


def test_every_input_is_accounted_for(written):
    out, summary, expected = written
    assert summary["inputs"] == len(expected["good"]) + len(expected["bad"]) + len(expected["skipped"])
    assert summary["inputs"] == summary["written"] + len(summary["rejected"]) + len(summary["skipped"])
    assert summary["written"] == len(expected["good"])
    reasons = {r["path"]: r["reason"] for r in summary["rejected"]}
    assert set(reasons) == set(expected["bad"])
    for path, word in expected["bad"].items():
        assert word.lower() in reasons[path].lower(), (path, reasons[path])
    assert {s["path"] for s in summary["skipped"]} == expected["skipped"]
    assert summary["per_class"] == {"covid": 8, "normal": 7, "pneumonia": 7}
    with open(os.path.join(out, "_summary.json")) as handle:
        assert json.load(handle)["written"] == summary["written"]


def test_stored_pixels_equal_the_shared_decode(written):
    from covid_spark.data.dataset import load_split

    out, summary, expected = written
    seen = 0
    for split in ("train", "val", "test"):
        if not summary["per_split"][split]:
            continue
        data = load_split(out, split, fields=("image", "label", "label_name", "path", "dhash"))
        for image, label, name, path, digest in zip(data["image"], data["label"], data["label_name"],
                                                    data["path"], data["dhash"]):
            with open(path, "rb") as handle:
                decoded = decode_image(handle.read(), SIZE)
            np.testing.assert_array_equal(image, decoded)
            # stored: the library's dHash (HASH_SIZE 16: 256 bits) as 64 hex digits
            assert int(str(digest), 16) == dhash(decoded) and len(str(digest)) == 64
            assert name == expected["good"][path] and ["covid", "normal", "pneumonia"][label] == name
            seen += 1
    assert seen == len(expected["good"])


def test_unusual_formats_keep_their_content(written):
    from covid_spark.data.dataset import load_split

    out, summary, _ = written
    rows = {}
    for split in ("train", "val", "test"):
        if summary["per_split"][split]:
            data = load_split(out, split, fields=("image", "path"))
            rows.update({os.path.basename(p): img for p, img in zip(data["path"], data["image"])})
    grad = rows["gradient16.png"][SIZE // 2, :, 0].astype(int)
    assert np.all(np.diff(grad) >= 0) and grad[0] < 20 and grad[-1] > 235  # order kept, not clipped
    assert rows["tiny.png"].shape == (SIZE, SIZE, 3) and np.all(rows["tiny.png"] == 200)
    assert np.abs(rows["palette.png"].reshape(-1, 3).mean(0) - [30, 60, 250]).max() < 2
    cmyk = rows["cmyk.jpg"].reshape(-1, 3).mean(0)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0, M=Y=255 is red
    rgba = rows["rgba.png"]
    assert rgba[2, SIZE // 2, 0] > 240 and rgba[-3, SIZE // 2, 0] < 15  # transparent half over black


def test_duplicates_are_reported_and_share_a_split(written):
    from covid_spark.data.dataset import load_split

    out, summary, _ = written
    groups = [sorted(os.path.basename(p) for p in g) for g in summary["duplicates"]]
    assert ["dup_a.png", "dup_b.png"] in groups
    split_of = {}
    for split in ("train", "val", "test"):
        if summary["per_split"][split]:
            for p in load_split(out, split, fields=("path",))["path"]:
                split_of[os.path.basename(p)] = split
    assert split_of["dup_a.png"] == split_of["dup_b.png"]


def test_existing_output_is_refused_and_kept(spark, written):
    from covid_spark.stages.preprocess import preprocess

    out, summary, _ = written
    before = sorted(os.listdir(out))
    with pytest.raises(FileExistsError, match="--overwrite"):
        preprocess(spark, os.path.dirname(next(iter(written[2]["good"]))), out, _config())
    assert sorted(os.listdir(out)) == before


def test_failure_mid_write_leaves_no_output(spark, corpus, tmp_path, monkeypatch):
    import covid_spark.stages.preprocess as pre

    root, _ = corpus
    calls = []
    real = pre._num_row_groups

    def fail_on_second_split(*args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("injected failure while writing the val split")
        return real(*args)

    monkeypatch.setattr(pre, "_num_row_groups", fail_on_second_split)
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="injected"):
        pre.preprocess(spark, str(root), str(out), _config())
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary directory left behind either
    # with an existing output and --overwrite, a failure leaves the old output as it was
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(RuntimeError, match="injected"):
        pre.preprocess(spark, str(root), str(out), _config(), overwrite=True)
    assert os.listdir(out) == ["keep.txt"]


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("unknown_folder", r"folder\(s\) Lung_Opacity .* name no class; accepted"),
    ("no_images", "holds no images"),
    ("manifest_no_label", "lacks column.*label"),
    ("manifest_bad_label", "line 2: unknown label 'flu'"),
    ("manifest_outside", "lies outside"),
])
def test_bad_inputs_fail_before_any_work(spark, tmp_path, layout, message):
    from covid_spark.stages.preprocess import preprocess

    src = tmp_path / "in"
    if layout != "missing":
        src.mkdir()
    if layout == "unknown_folder":
        (src / "COVID").mkdir()
        (src / "Lung_Opacity").mkdir()
    if layout == "no_images":
        (src / "normal").mkdir()
        (src / "normal" / "readme.txt").write_text("x")
    if layout.startswith("manifest"):
        header = "path,source\n" if layout == "manifest_no_label" else "path,label\n"
        row = {"manifest_no_label": "a.png,x\n", "manifest_bad_label": "a.png,flu\n",
               "manifest_outside": "../a.png,covid\n"}[layout]
        (src / "manifest.csv").write_text(header + row)
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        preprocess(spark, str(src), str(out), _config())
    assert not out.exists()


def test_unknown_folder_can_be_skipped_explicitly(spark, tmp_path):
    from covid_spark.stages.preprocess import preprocess

    src = tmp_path / "in"
    for name in ("covid", "normal", "Lung_Opacity"):
        (src / name).mkdir(parents=True)
        for i in range(3):
            (src / name / f"{i}.png").write_bytes(_png(np.full((8, 8, 3), 10 * i + len(name), np.uint8)))
    summary = preprocess(spark, str(src), str(tmp_path / "out"), _config(skip_unknown_classes=True))
    assert summary["written"] == 6 and len(summary["skipped"]) == 3
    assert all("names no class" in s["reason"] for s in summary["skipped"])


def test_task_retry_loses_and_duplicates_nothing(corpus, tmp_path):
    """A Python worker dies once; with local[2,2] Spark retries and the dataset is exact."""
    root, expected = corpus
    marker = tmp_path / "failed-once"
    out = tmp_path / "ds"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, COVID_SPARK_FAIL_ONCE=str(marker), PYSPARK_PYTHON=sys.executable)
    proc = subprocess.run(
        [sys.executable, os.path.join(repo, "jobs", "preprocess.py"), "--master", "local[2,2]",
         "--input", str(root), "--output", str(out), "--image-size", str(SIZE), "--min-row-groups", "2",
         "--conf", "spark.ui.enabled=false"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the fault really happened
    from covid_spark.data.dataset import load_split

    with open(out / "_summary.json") as handle:
        summary = json.load(handle)
    paths = []
    for split in ("train", "val", "test"):
        if summary["per_split"][split]:
            paths += [str(p) for p in load_split(str(out), split, fields=("path",))["path"]]
    assert sorted(paths) == sorted(expected["good"])  # no row missing, none twice


def test_several_inputs_in_one_run(spark, tmp_path):
    """Two collections in one run: sources, namespaced patients, per-input counts, cross-input
    duplicates in one split, a file listed twice written once, data below a hidden directory."""
    from covid_spark.data.dataset import load_split
    from covid_spark.stages.preprocess import preprocess

    rng = np.random.default_rng(3)
    hidden = tmp_path / ".snapshots"
    folders = hidden / "site_a"                      # folder per class, no manifest: source = "site_a"
    for label in ("covid", "normal"):
        (folders / label).mkdir(parents=True)
        for i in range(4):
            (folders / label / f"{i}.png").write_bytes(_png(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
    store = tmp_path / "store"                       # images kept apart from their manifest
    store.mkdir()
    names = []
    for i in range(6):
        name = f"p{i}.png"
        (store / name).write_bytes(_png(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)))
        names.append(name)
    copy = store / "copy_of_site_a.png"              # same content as an image of the other input
    shutil.copy(folders / "covid" / "0.png", copy)
    manifest_dir = tmp_path / "lists"
    manifest_dir.mkdir()
    lines = ["path,label,patient_id,source"]
    lines += [f"{store / n},pneumonia,{'p1' if i < 2 else f'q{i}'},{'' if i == 5 else 'hospital'}"
              for i, n in enumerate(names)]
    lines += [f"{store / names[0]},pneumonia,p1,hospital",      # listed twice
              f"{copy},covid,,hospital"]
    (manifest_dir / "manifest.csv").write_text("\n".join(lines) + "\n")

    out = tmp_path / "ds"
    summary = preprocess(spark, [str(folders), str(manifest_dir / "manifest.csv")], str(out), _config())

    assert summary["input"] == [str(folders), str(manifest_dir / "manifest.csv")]
    assert summary["inputs"] == 8 + 8 and summary["written"] == 8 + 7
    assert summary["skipped"] == [{"path": str(store / names[0]), "reason": "listed twice", "input": 1}]
    assert [(p["written"], p["rejected"], p["skipped"]) for p in summary["per_input"]] == [(8, 0, 0), (7, 0, 1)]
    # the row without a source cell takes its input folder's name ("lists")
    assert summary["per_source"] == {"hospital": 6, "lists": 1, "site_a": 8}
    assert summary["per_source_class"] == {"hospital": {"covid": 1, "pneumonia": 5}, "lists": {"pneumonia": 1},
                                           "site_a": {"covid": 4, "normal": 4}}
    assert summary["per_input_source"] == [{"site_a": 8}, {"hospital": 6, "lists": 1}]
    assert summary["patient_ids_per_source"] == {"hospital": 5, "lists": 1, "site_a": 0}  # the copy has no id
    assert sorted(map(sorted, summary["duplicates"])) == [sorted([str(folders / "covid" / "0.png"), str(copy)])]
    rows = {}
    for split in ("train", "val", "test"):
        if summary["per_split"][split]:
            data = load_split(str(out), split, fields=("path", "patient_id", "source"))
            for path, pid, source in zip(data["path"], data["patient_id"], data["source"]):
                rows[str(path)] = (split, str(pid), str(source))
    assert len(rows) == 15                           # written once each
    assert rows[str(store / names[0])][1:] == ("hospital:p1", "hospital")
    assert rows[str(store / names[0])][0] == rows[str(store / names[1])][0]   # one patient, one split
    assert rows[str(copy)][0] == rows[str(folders / "covid" / "0.png")][0]    # duplicates, one split


def test_grey_images_are_stored_with_one_channel_and_read_with_three(written):
    """A third of the bytes for grey X-rays; every reader still gets (size, size, 3)."""
    import glob

    import pyarrow.parquet as pq

    from covid_spark.data.dataset import load_split
    from covid_spark.data.schema import XraySchema

    out, summary, _ = written
    field = XraySchema.fields["image"]
    stored = {}
    for name in glob.glob(os.path.join(out, "*", "*.parquet")):
        table = pq.read_table(name, columns=["image", "path"])
        for blob, path in zip(table.column("image").to_pylist(), table.column("path").to_pylist()):
            stored[os.path.basename(path)] = field.codec.decode(field, blob)
    assert stored["tiny.png"].shape == (SIZE, SIZE, 1)           # grey (200, 200, 200)
    assert stored["gradient16.png"].shape == (SIZE, SIZE, 1)     # 16-bit grey
    assert stored["covid0.png"].shape == (SIZE, SIZE, 3)         # colour noise
    for split in ("train", "val", "test"):
        if summary["per_split"][split]:
            assert load_split(out, split, fields=("image",))["image"].shape[1:] == (SIZE, SIZE, 3)


def _staged_examples() -> list:
    """Staged tuples of every kind: written, rejected (no hash, no digest), excluded by view; full-width values."""
    import random

    from covid_spark.stages.preprocess_tasks import Staged

    rng = random.Random(3)
    out = []
    for i in range(23):
        written, excluded = i % 5 != 2, i % 7 == 4
        out.append(Staged(f"/in/{rng.randrange(10**6):06d}-{i}.png", ["covid", "normal", "pneumonia"][i % 3],
                          f"p{i // 2}" if i % 4 else "", f"source-{i % 2}", i % 3,
                          rng.getrandbits(256) | (1 << 255) if written else None,
                          None if written else ("excluded: view LATERAL" if excluded else "cannot decode"),
                          f"stage-{i % 2}.parquet" if written else None, i // 2 if written else -1,
                          ["PA", "AP", ""][i % 3], excluded and not written, rng.randrange(1 << 40),
                          1_700_000_000_123_456_789 + i, "" if i % 6 == 5 else f"{rng.getrandbits(256):064x}",
                          f"listed-{i % 3}", "PA" if i % 2 else ""))
    return out


def test_staged_files_give_back_the_tuples_they_were_made_of():
    import pickle

    from covid_spark.stages.preprocess_tasks import StagedFiles

    staged = _staged_examples()
    parts = [StagedFiles.of(staged[:10]), StagedFiles.of(staged[10:])]
    table = pickle.loads(pickle.dumps(StagedFiles.concat(parts)))  # as the tasks' results reach the driver
    assert parts == []  # emptied as they were copied
    table.BLOCK = 4  # tuples made across several blocks
    assert list(table) == staged and len(table) == len(staged)
    assert table[0] == staged[0] and table[-1] == staged[-1] and table[13] == staged[13]
    assert table.column("dhash") == [m.dhash for m in staged]
    assert table.column("digest") == [m.digest for m in staged]
    by_path = table.sorted_by_path()
    assert list(by_path) == sorted(staged)  # the path is the first field and every path differs
    written = by_path.where([m.error is None for m in by_path])
    assert list(written) == [m for m in sorted(staged) if m.error is None]
    assert written.column("path") == [m.path for m in sorted(staged) if m.error is None]
    assert written[-2] == [m for m in sorted(staged) if m.error is None][-2]
    words = written.hashes()
    assert [int.from_bytes(row.astype("<u8").tobytes(), "little") for row in words] == written.column("dhash")
    with pytest.raises(IndexError):
        written[len(written)]
    assert list(StagedFiles.concat([])) == []


def test_a_held_out_source_and_its_near_copies_go_to_test_only():
    from covid_spark.stages.preprocess import split_images

    staged = [m for m in _staged_examples() if m.error is None]
    held = {m.path for m in staged if m.source == "source-1"}
    copy = next(m.path for m in staged if m.source == "source-0")  # a near-copy of a held-out image
    duplicates = [sorted([copy, min(held)])]
    cfg = override(load_config(), "preprocess", {"holdout_source": "source-1"})["preprocess"]
    splits = dict(zip((m.path for m in staged), split_images(staged, cfg, duplicates)))
    assert {p for p, s in splits.items() if s == "test"} == held | {copy}
    assert {s for p, s in splits.items() if p not in held | {copy}} <= {"train", "val"}
    with pytest.raises(ConfigError, match="matches no image"):
        split_images(staged, override(load_config(), "preprocess", {"holdout_source": "nowhere"})["preprocess"], [])


def test_returning_freed_memory_calls_malloc_trim_and_is_a_no_op_without_it(monkeypatch):
    """glibc's malloc_trim(0) is what the driver calls between steps; a C library without it is left alone."""
    import ctypes

    from covid_spark.stages import preprocess as stage

    calls = []

    class Glibc:
        def malloc_trim(self, pad):
            calls.append(pad)
            return 1

    class Musl:  # no malloc_trim: ctypes raises AttributeError for a missing symbol
        def __getattr__(self, name):
            raise AttributeError(name)

    for library in (Glibc(), Musl()):
        monkeypatch.setattr(ctypes, "CDLL", lambda name, library=library: library)
        assert stage.return_freed_memory() is None
    assert calls == [0]
