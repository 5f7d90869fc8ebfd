"""jobs/preprocess.py --append: new, changed and removed files, atomicity, stable splits, and equality
with a full preprocess of the union. Images are tiny noise PNGs the tests write themselves."""
from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from covid_spark.config import load_config, override

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["covid", "normal", "pneumonia"]
SIZE = 8
FIELDS = ("image", "label", "label_name", "patient_id", "source", "path", "dhash", "view")


def _config(**pre):
    values = {"image_size": SIZE, "min_row_groups": 1, "val_fraction": 0.15, "test_fraction": 0.15}
    values.update(pre)
    return override(load_config(), "preprocess", values)


def _noise(path: str, seed: int, shift: int = 0) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(20, 230, (12, 12), dtype=np.uint8).astype(int) + shift
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def _write_manifest(folder: str, rows: list[dict]) -> None:
    with open(os.path.join(folder, "manifest.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient_id", "source"])
        writer.writeheader()
        writer.writerows(rows)


def _corpus(folder: str, count: int, seed: int = 0) -> list[dict]:
    """``count`` noise images; many patients have two images (2k, 2k+1), every seventh image has no patient id."""
    rows = []
    for i in range(count):
        rel = f"img/{i:04d}.png"
        _noise(os.path.join(folder, rel), seed * 100_000 + i)
        patient = "" if i % 7 == 3 else f"p{i // 2}" if i % 5 < 3 else f"q{i}"
        rows.append({"path": rel, "label": CLASSES[(i // 2) % 3], "patient_id": patient,
                     "source": "a" if i % 4 else "b"})
    return rows


def _rows(dataset: str) -> dict[str, dict]:
    """Every stored row by path, read from the Parquet files (not from the summary)."""
    from covid_spark.data.dataset import load_split
    from covid_spark.data.splits import SPLITS

    rows = {}
    for split in SPLITS:
        if not os.path.isdir(os.path.join(dataset, split)):
            continue
        data = load_split(dataset, split, fields=FIELDS)
        for i, path in enumerate(data["path"]):
            assert str(path) not in rows, f"{path} stored twice"
            rows[str(path)] = {f: data[f][i] for f in FIELDS} | {"split": split}
    return rows


def _tree(folder: str) -> dict[str, str]:
    """Every file under ``folder`` and a digest of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                out[os.path.relpath(os.path.join(root, name), folder)] = hashlib.sha256(handle.read()).hexdigest()
    return out


def _unit_splits(rows: dict[str, dict], groups: list[list[str]]) -> dict[str, str]:
    """Split per patient id and per duplicate group (keyed by its first path), asserting each has one."""
    units: dict[str, set] = {}
    for path, row in rows.items():
        if row["patient_id"]:
            units.setdefault(str(row["patient_id"]), set()).add(row["split"])
    for group in groups:
        units.setdefault("group:" + min(group), set()).update(rows[p]["split"] for p in group if p in rows)
    assert all(len(s) == 1 for s in units.values()), {k: v for k, v in units.items() if len(v) > 1}
    return {k: next(iter(v)) for k, v in units.items()}


def test_new_changed_and_removed_files(spark, tmp_path):
    from covid_spark.inputs.images import decode_image
    from covid_spark.stages.append import append
    from covid_spark.stages.preprocess import preprocess

    folder, dataset = str(tmp_path / "in"), str(tmp_path / "ds")
    rows = _corpus(folder, 40)
    _write_manifest(folder, rows[:30])
    preprocess(spark, folder, dataset, _config())
    before = _rows(dataset)
    # the increment: 10 new files (one of them unreadable), one changed, one relabelled, one touched only, one removed
    with open(os.path.join(folder, "img", "bad.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    rows.append({"path": "img/bad.png", "label": "covid", "patient_id": "p-bad", "source": "a"})
    _noise(os.path.join(folder, rows[5]["path"]), 999)                      # changed content
    rows[6]["label"] = "pneumonia" if rows[6]["label"] != "pneumonia" else "normal"   # relabelled
    touched = os.path.join(folder, rows[7]["path"])
    os.utime(touched, ns=(os.stat(touched).st_atime_ns, os.stat(touched).st_mtime_ns + 10**9))  # same bytes
    removed = rows.pop(8)
    _write_manifest(folder, rows)
    summary = append(spark, dataset, _config())

    after = _rows(dataset)
    full = {os.path.join(folder, r["path"]): r for r in rows}
    good = {p for p in full if not p.endswith("bad.png")}
    assert set(after) == good
    for path, row in after.items():
        with open(path, "rb") as handle:
            np.testing.assert_array_equal(row["image"], decode_image(handle.read(), SIZE))
        assert row["label_name"] == full[path]["label"]
        if path in before:                                                 # existing patients keep their split
            assert row["split"] == before[path]["split"], path
    last = summary["increments"][-1]
    assert (last["added"], last["replaced"], last["removed"], last["rejected"]) == (10, 2, 1, 1)
    assert last["unchanged"] == 30 - 3 and last["restated"] == 1
    assert last["removed_files"] == [os.path.join(folder, removed["path"])]
    assert [r["path"] for r in summary["rejected"]] == [os.path.join(folder, "img", "bad.png")]
    assert summary["written"] == len(good) and summary["inputs"] == len(good) + 1 + len(summary["skipped"])
    assert sum(summary["per_split"].values()) == len(good)
    assert [i["kind"] for i in summary["increments"]] == ["full", "append"]
    again = append(spark, dataset, _config())                              # nothing changed: nothing read
    assert (again["increments"][-1]["added"], again["increments"][-1]["replaced"]) == (0, 0)
    assert _rows(dataset).keys() == after.keys()


@pytest.mark.parametrize("stage_on", ["driver", "executors"])
def test_append_equals_a_full_preprocess_of_the_union(spark, tmp_path, monkeypatch, stage_on):
    from covid_spark.stages import append as append_stage
    from covid_spark.stages.append import append
    from covid_spark.stages.preprocess import preprocess

    if stage_on == "executors":  # more new files than the driver decodes itself
        monkeypatch.setattr(append_stage, "LOCAL_STAGE_FILES", 0)

    folder = str(tmp_path / "in")
    rows = _corpus(folder, 60, seed=1)
    _noise(os.path.join(folder, "img", "copy.png"), 100_000 + 4, shift=2)  # a near-copy of image 4, arriving late
    late = rows[45:] + [{"path": "img/copy.png", "label": rows[4]["label"], "patient_id": "", "source": "b"}]
    _write_manifest(folder, rows[:45])
    grown = str(tmp_path / "grown")
    base = preprocess(spark, folder, grown, _config())
    base_rows = _rows(grown)
    _write_manifest(folder, rows[:45] + late)
    summary = append(spark, grown, _config())
    union = preprocess(spark, folder, str(tmp_path / "union"), _config())

    a, b = _rows(grown), _rows(str(tmp_path / "union"))
    assert a.keys() == b.keys()
    for path in a:
        for f in FIELDS:
            np.testing.assert_array_equal(a[path][f], b[path][f])
    for key in ("inputs", "written", "per_class", "per_source", "per_source_class", "per_view", "duplicates",
                "duplicate_label_conflicts", "patient_ids_per_source", "rejected", "skipped"):
        assert summary[key] == union[key], key
    assert all(a[p]["split"] == row["split"] for p, row in base_rows.items())   # existing patients kept theirs
    copy = os.path.join(folder, "img", "copy.png")
    assert sorted([copy, os.path.join(folder, rows[4]["path"])]) in summary["duplicates"]
    assert a[copy]["split"] == base_rows[os.path.join(folder, rows[4]["path"])]["split"]  # joins its group
    assert base["increments"][0]["added"] == 45 and summary["increments"][-1]["added"] == len(late)


def test_splits_stay_put_over_ten_appends_and_do_not_depend_on_batches(spark, tmp_path):
    """Ten appends of random slices: no patient or duplicate group ever changes split; the new units'
    splits are the same when the same files arrive in other batches; fractions stay near the config."""
    from covid_spark.stages.append import append
    from covid_spark.stages.preprocess import preprocess

    folder = str(tmp_path / "in")
    rows = _corpus(folder, 1200, seed=2)
    for k in range(20):   # near-copies of earlier images (no patient id): each must join its original's split
        _noise(os.path.join(folder, "img", f"copy{k}.png"), 200_000 + 50 * k, shift=1)
        rows.append({"path": f"img/copy{k}.png", "label": rows[50 * k]["label"], "patient_id": "", "source": "a"})
    order = np.random.default_rng(5).permutation(len(rows))
    base = len(rows) // 2
    cuts = np.sort(np.random.default_rng(6).choice(np.arange(1, len(rows) - base), 9, replace=False)) + base
    slices = np.split(order, np.concatenate([[base], cuts]))               # a base of half, then 10 slices
    one, other = str(tmp_path / "one"), str(tmp_path / "other")
    _write_manifest(folder, [rows[i] for i in slices[0]])
    preprocess(spark, folder, one, _config())
    preprocess(spark, folder, other, _config())
    seen: dict[str, str] = {}
    listed = list(slices[0])
    for number, part in enumerate(slices[1:]):
        listed += list(part)
        _write_manifest(folder, [rows[i] for i in listed])
        summary = append(spark, one, _config())
        now = _unit_splits(_rows(one), summary["duplicates"])
        moved = {k: (seen[k], s) for k, s in now.items() if k in seen and seen[k] != s}
        assert moved == {}, f"append {number + 1} moved {moved}"
        seen.update(now)
        if number in (4, 9):                                               # the same files in two batches
            append(spark, other, _config())
    final = _rows(one)
    assert len(final) == len(rows)
    # A unit that arrived whole in one slice must get the same split from the batches of "other";
    # one whose members came in different slices follows the member stored first (stability first).
    arrived = {os.path.join(folder, rows[i]["path"]): n for n, part in enumerate(slices) for i in part}
    unit = _units(final, summary["duplicates"])
    slices_of = {}
    for path, u in unit.items():
        slices_of.setdefault(u, set()).add(arrived[path])
    whole = {p for p, u in unit.items() if len(slices_of[u]) == 1}
    assert len(whole) > 0.75 * len(final)
    theirs = _rows(other)
    assert {p: final[p]["split"] for p in whole} == {p: theirs[p]["split"] for p in whole}
    units = {u: final[u]["split"] for u in set(unit.values())}
    for split, wanted in (("test", 0.15), ("val", 0.15), ("train", 0.70)):
        share = sum(s == split for s in units.values()) / len(units)
        print(f"{split}: {share:.4f} of {len(units)} units (configured {wanted})")
        assert abs(share - wanted) <= 0.02, (split, share, len(units))


def test_killed_or_failed_append_leaves_the_dataset_as_it_was(spark, tmp_path, monkeypatch):
    import covid_spark.stages.append as appending
    from covid_spark.stages.preprocess import preprocess

    folder, dataset = str(tmp_path / "in"), str(tmp_path / "ds")
    rows = _corpus(folder, 24, seed=3)
    _write_manifest(folder, rows[:16])
    preprocess(spark, folder, dataset, _config())
    _write_manifest(folder, rows[:10] + rows[11:])                        # 8 new, 1 removed
    before = _tree(dataset)
    env = dict(os.environ, COVID_SPARK_FAIL_APPEND="write", PYSPARK_PYTHON=sys.executable,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "jobs", "preprocess.py"), "--append", "--output",
                           dataset, "--master", "local[2]", "--conf", "spark.ui.enabled=false"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]                       # died after writing, before the swap
    assert _tree(dataset) == before
    left = _siblings(tmp_path)                                             # a killed run may leave its tmp

    def broken_swap(*args):
        raise RuntimeError("injected failure at the swap")

    monkeypatch.setattr(appending, "swap_directory", broken_swap)
    with pytest.raises(RuntimeError, match="injected"):
        appending.append(spark, dataset, _config())
    assert _tree(dataset) == before
    assert _siblings(tmp_path) == left                                      # no temporary version left
    monkeypatch.undo()
    summary = appending.append(spark, dataset, _config())                  # and the next try succeeds
    assert summary["increments"][-1]["added"] == 8 and summary["increments"][-1]["removed"] == 1


def _units(rows: dict[str, dict], groups: list[list[str]]) -> dict[str, str]:
    """Each path's unit (a representative path): paths joined by a patient id or a duplicate group."""
    parent = {p: p for p in rows}

    def root(p):
        while parent[p] != p:
            p = parent[p]
        return p

    by_patient: dict[str, str] = {}
    links = [(by_patient.setdefault(str(r["patient_id"]), p), p) for p, r in rows.items() if r["patient_id"]]
    links += [(g[0], q) for g in groups for q in g[1:]]
    for a, b in links:
        parent[root(a)] = root(b)
    return {p: root(p) for p in rows}


def _siblings(folder) -> set[str]:
    return {name for name in os.listdir(folder) if name.startswith("ds.tmp-")}


def test_append_refuses_what_it_cannot_do(spark, tmp_path):
    from covid_spark.errors import ConfigError, DatasetError
    import jobs.preprocess as job
    from covid_spark.stages.append import append

    folder, dataset = str(tmp_path / "in"), str(tmp_path / "ds")
    _write_manifest(folder, _corpus(folder, 9, seed=4))
    with pytest.raises(DatasetError, match="no dataset at .* yet: give its inputs"):
        append(spark, dataset, _config())
    created = append(spark, dataset, _config(), folder)                    # a scheduler's first run creates it
    assert created["written"] == 9 and [i["kind"] for i in created["increments"]] == ["full"]
    os.makedirs(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="not found: is .* a dataset written by jobs/preprocess.py"):
        append(spark, str(tmp_path / "empty"), _config())
    with pytest.raises(ConfigError, match="image_size: the dataset was written with 8, --append was given 16"):
        append(spark, dataset, _config(), given={"image_size": 16})
    assert job.main(["--append", "--overwrite", "--output", dataset]) == 2
    os.remove(os.path.join(dataset, "_files.parquet"))
    with pytest.raises(DatasetError, match="has no _files.parquet"):
        append(spark, dataset, _config())


def test_file_index_round_trip_in_several_chunks(tmp_path, monkeypatch):
    """Rows in path order, written a few at a time, read back equal to what went in; rows out of order are
    refused."""
    from covid_spark.data import fileindex

    monkeypatch.setattr(fileindex, "WRITE_ROWS", 3)
    rows = [dict({name: f"{name}-{i}" for name in fileindex.STRING_COLUMNS}, path=f"/data/{(7 * i) % 10}.png",
                 size=i, mtime_ns=1000 + i) for i in range(10)]
    with pytest.raises(RuntimeError, match="out of order"):
        fileindex.write_index(str(tmp_path), rows)
    rows.sort(key=lambda row: row["path"])
    assert fileindex.write_index(str(tmp_path), (row for row in rows)) == 10
    index = fileindex.read_index(str(tmp_path))
    assert list(index) == [f"/data/{n}.png" for n in range(10)]
    assert index == {row["path"]: row for row in rows}
    (tmp_path / "empty").mkdir()
    assert fileindex.write_index(str(tmp_path / "empty"), []) == 0
    assert fileindex.read_index(str(tmp_path / "empty")) == {}
