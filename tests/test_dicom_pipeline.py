"""End to end over DICOM: cxr3 JPEGs wrapped as DICOM (PatientID and PatientName set) through the pipeline
and predict; every output is decoded and searched for the raw identifiers and the salt."""
from __future__ import annotations

import csv
import hashlib
import hmac
import json
import os
import zipfile

import numpy as np
import pytest

from tests.conftest import CXR3, cxr3_rows
from tests.dicoms import as_dicom, dataset, encoded

pytest.importorskip("pydicom")

SALT = "test-salt-Zq8v1"
PER_CLASS = 10


def _raw_ids(number: int) -> tuple[str, str]:
    """PatientID and PatientName of the test's patient ``number`` (two images each)."""
    return f"RAWPID{number:04d}X", f"Rawname^Doe{number:04d}"


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory) -> dict:
    """A folder per class of DICOM files (every third without extension), one lateral, one without pixels."""
    root = tmp_path_factory.mktemp("pacs") / "pacs-export"
    rows = cxr3_rows()
    ids, number = {}, 0
    for label in ("covid", "normal", "pneumonia"):
        os.makedirs(root / label)
        chosen = [r for r in rows if r["label"] == label][:PER_CLASS]
        for i, row in enumerate(chosen):
            patient, name = _raw_ids(number // 2)
            number += 1
            file = root / label / (f"IM{i:04d}" if i % 3 == 2 else f"img-{i:04d}.dcm")
            file.write_bytes(as_dicom(os.path.join(CXR3, row["path"]), PatientID=patient, PatientName=name,
                                       ViewPosition="AP SUPINE" if i % 2 else "PA"))
            ids[str(file)] = patient
    lateral = root / "covid" / "lateral.dcm"
    patient, name = _raw_ids(900)
    lateral.write_bytes(as_dicom(os.path.join(CXR3, rows[0]["path"]), PatientID=patient, PatientName=name,
                                  ViewPosition="LL"))
    empty = dataset(None, PatientID=_raw_ids(901)[0], PatientName=_raw_ids(901)[1], ViewPosition="PA")
    empty.Rows, empty.Columns = 64, 64
    (root / "normal" / "nopixels.dcm").write_bytes(encoded(empty))
    return {"root": str(root), "ids": ids, "lateral": str(lateral), "empty": str(root / "normal" / "nopixels.dcm")}


@pytest.fixture(scope="module")
def dicom_run(spark, dicom_folder, tmp_path_factory):
    import importlib

    os.environ["COVID_SPARK_ID_SALT"] = SALT
    try:
        run_dir = str(tmp_path_factory.mktemp("dicom-run") / "run")
        pipeline = importlib.import_module("jobs.pipeline")
        assert pipeline.main(["--input", dicom_folder["root"], "--run-dir", run_dir, "--model", "compact",
                              "--epochs", "1", "--set", "preprocess.views=PA,AP", "--set", "train.batch_size=4",
                              "--set", "preprocess.min_row_groups=2"]) == 0
        predictions = os.path.join(os.path.dirname(run_dir), "predictions.csv")
        predict = importlib.import_module("jobs.predict")
        assert predict.main(["--input", dicom_folder["root"], "--model-dir", run_dir, "--output", predictions,
                             "--views", "PA,AP"]) == 0
    finally:
        del os.environ["COVID_SPARK_ID_SALT"]
    return {"run_dir": run_dir, "predictions": predictions}


def _summary(run) -> dict:
    with open(os.path.join(run["run_dir"], "dataset", "_summary.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_every_dicom_input_is_accounted_for(dicom_run, dicom_folder):
    summary = _summary(dicom_run)
    assert summary["written"] == 3 * PER_CLASS
    assert summary["rejected"] == [{"path": dicom_folder["empty"],
                                    "reason": "no pixel data: the DICOM file has no Pixel Data element"}]
    assert [s for s in summary["skipped"] if s["path"] == dicom_folder["lateral"]] == [
        {"path": dicom_folder["lateral"], "reason": "view LATERAL not in views PA,AP", "input": 0}]
    assert summary["inputs"] == 3 * PER_CLASS + 2
    assert summary["per_view"] == {"AP": 3 * PER_CLASS // 2, "PA": 3 * PER_CLASS // 2}


def test_patient_ids_are_keyed_pseudonyms_and_splits_follow_them(dicom_run, dicom_folder):
    import pyarrow.parquet as pq

    rows = []
    for split in ("train", "val", "test"):
        folder = os.path.join(dicom_run["run_dir"], "dataset", split)
        if os.path.isdir(folder):
            table = pq.read_table(folder, columns=["path", "patient_id", "view"])
            rows += [(p, i, v, split) for p, i, v in zip(*(table[c].to_pylist() for c in table.column_names))]
    assert len(rows) == 3 * PER_CLASS
    split_of = {}
    for path, patient, view, split in rows:
        raw = dicom_folder["ids"][path]
        assert patient == "pacs-export:" + hmac.new(SALT.encode(), raw.encode(), hashlib.sha256).hexdigest()[:16]
        assert view in ("AP", "PA")
        assert split_of.setdefault(patient, split) == split  # both images of a patient in one split


def _texts_of(path: str):
    """Every readable form of one output file: its bytes as text, Parquet values, zip members."""
    with open(path, "rb") as handle:
        data = handle.read()
    yield data.decode("utf-8", errors="replace")
    yield data.decode("latin-1")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for column in table.column_names:
            if column != "image":
                yield json.dumps(table[column].to_pylist(), default=str)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                yield archive.read(member).decode("latin-1")


def test_no_output_holds_a_raw_identifier_or_the_salt(dicom_run, dicom_folder, capsys):
    # Every raw PatientID and PatientName starts with one of these (distinctive: base64 data in the
    # report's images cannot plausibly spell them); the salt whole.
    forbidden = ["RAWPID", "Rawname^", SALT]
    outputs = [dicom_run["predictions"]]
    for folder, _, files in os.walk(os.path.dirname(dicom_run["run_dir"])):
        outputs += [os.path.join(folder, f) for f in files]
    kinds = {os.path.splitext(p)[1] for p in outputs}
    assert {".parquet", ".json", ".csv", ".html", ".keras"} <= kinds, kinds
    for path in outputs:
        for text in _texts_of(path):
            for word in forbidden:
                assert word.lower() not in text.lower(), f"{word!r} found in {path}"
    with open(dicom_run["predictions"], newline="", encoding="utf-8") as handle:
        predicted = {row["path"]: row for row in csv.DictReader(handle)}
    assert predicted[dicom_folder["lateral"]]["error"] == "view LATERAL not in views PA,AP"
    assert predicted[dicom_folder["empty"]]["error"].startswith("no pixel data")
    assert sum(1 for row in predicted.values() if row["predicted"]) == 3 * PER_CLASS
    captured = capsys.readouterr()
    for word in forbidden:
        assert word.lower() not in (captured.out + captured.err).lower()
