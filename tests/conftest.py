"""Shared fixtures: one local[2] SparkSession, a small real-X-ray subset, one pipeline run."""
from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXR3 = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "cxr3"))

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
# Tracking is off unless a test turns it on: nothing here logs to a tracking server the shell points at.
os.environ.pop("MLFLOW_TRACKING_URI", None)


def need_cxr3() -> str:
    if not os.path.isfile(os.path.join(CXR3, "manifest.csv")):
        pytest.skip(f"real X-rays not found at {CXR3}")
    return CXR3


def cxr3_rows() -> list[dict]:
    with open(os.path.join(need_cxr3(), "manifest.csv"), newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def make_subset(folder: str, per_class: dict[str, int], seed: int = 0) -> list[dict]:
    """A folder with manifest.csv and class folders of symlinks to real cxr3 images.

    Takes one image per patient (so splits are by patient and each patient counts once),
    ``per_class[label]`` patients per label, chosen with ``seed``; returns the manifest rows.
    """
    import random

    rows = cxr3_rows()
    rng = random.Random(seed)
    chosen = []
    for label, count in per_class.items():
        by_patient = {}
        for row in rows:
            if row["label"] == label:
                by_patient.setdefault(row["patient_id"], row)
        patients = sorted(by_patient)
        rng.shuffle(patients)
        chosen += [by_patient[p] for p in patients[:count]]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in chosen:
            target = os.path.join(folder, row["path"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.path.join(CXR3, row["path"]), target)
            writer.writerow(row)
    return chosen


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole test session (UI off, temp dirs)."""
    from pyspark.sql import SparkSession

    tmp = tempfile.mkdtemp(prefix="covid-spark-tests-")
    session = None
    try:
        session = (SparkSession.builder.master("local[2]").appName("covid-spark tests")
                   .config("spark.ui.enabled", "false")
                   .config("spark.ui.showConsoleProgress", "false")
                   .config("spark.local.dir", tmp)
                   .config("spark.sql.warehouse.dir", os.path.join(tmp, "warehouse"))
                   .config("spark.driver.memory", "2g")
                   .getOrCreate())
        session.sparkContext.setLogLevel("ERROR")
        yield session
    finally:
        if session is not None:
            session.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def subset_dir(tmp_path_factory) -> str:
    """~40 real X-rays, one per patient, plus one corrupt file and one hidden file."""
    folder = str(tmp_path_factory.mktemp("subset"))
    rows = make_subset(folder, {"covid": 16, "pneumonia": 12, "normal": 12})
    with open(os.path.join(folder, "covid", "broken.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    with open(os.path.join(folder, "manifest.csv"), "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow(["covid/broken.jpg", "covid", "test", "broken-patient", "PA", "", ""])
        csv.writer(handle).writerow(["covid/.DS_Store", "covid", "test", "ds-patient", "", "", ""])
    open(os.path.join(folder, "covid", ".DS_Store"), "w").close()
    assert len(rows) == 40
    return folder


@pytest.fixture(scope="session")
def pipeline_run(spark, subset_dir, tmp_path_factory) -> dict:
    """preprocess → train (2 Horovod ranks, 2 epochs) → evaluate → predict, through the jobs' main()."""
    import importlib

    root = tmp_path_factory.mktemp("run")
    dataset, model_dir = str(root / "dataset"), str(root / "model")
    predictions = str(root / "predictions.csv")
    jobs = {name: importlib.import_module(f"jobs.{name}") for name in ("preprocess", "train", "evaluate", "predict")}
    assert jobs["preprocess"].main(["--input", subset_dir, "--output", dataset, "--min-row-groups", "2",
                                    "--val-fraction", "0.2", "--test-fraction", "0.3"]) == 0
    assert jobs["train"].main(["--dataset", dataset, "--model-dir", model_dir, "--epochs", "2",
                               "--batch-size", "4", "--num-proc", "2", "--model", "compact"]) == 0
    assert jobs["evaluate"].main(["--dataset", dataset, "--model-dir", model_dir]) == 0
    test_inputs = str(root / "test_inputs")
    return {"dataset": dataset, "model_dir": model_dir, "predictions": predictions,
            "subset": subset_dir, "root": str(root), "jobs": jobs, "test_inputs": test_inputs}


# `make demo`, shrunk, with tracking on: what tests/test_tracking.py, test_serving.py and test_report_browser.py read.
TRACKED_RUN_ARGS = ["--model", "compact", "--epochs", "2", "--set", "train.batch_size=4",
                    "--set", "preprocess.min_row_groups=2", "--set", "preprocess.val_fraction=0.2",
                    "--set", "preprocess.test_fraction=0.3", "--set", "evaluate.bootstrap=200",
                    "--set", "tracking.mlflow_uri=local"]


@pytest.fixture(scope="session")
def tracked_run(spark, subset_dir, tmp_path_factory) -> dict:
    """jobs/pipeline.py (preprocess → train → evaluate → report, as `make demo` runs it) over the ~40 real
    X-rays with ``tracking.mlflow_uri: local``: compact, 2 epochs, 2 Horovod ranks."""
    import importlib

    root = tmp_path_factory.mktemp("tracked")
    run_dir = str(root / "demo")
    args = ["--input", subset_dir, "--run-dir", run_dir] + TRACKED_RUN_ARGS
    pipeline = importlib.import_module("jobs.pipeline")
    assert pipeline.main(args) == 0
    return {"run_dir": run_dir, "root": str(root), "args": args, "pipeline": pipeline,
            "dataset": os.path.join(run_dir, "dataset"), "subset": subset_dir}
