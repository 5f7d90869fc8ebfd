"""One home for the dataset contract (covid_spark.data.dataset) and for the run directory (covid_spark.data.rundir)."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess

import numpy as np
import pytest

from covid_spark.errors import DatasetError
from covid_spark.data.dataset import (SUMMARY_FILE, has_summary, read_summary, split_row_groups,
                                 split_url, summary_url, write_summary)
from covid_spark.data.rundir import ARTEFACTS, RunDir, git_commit, versions
from covid_spark.models.saved import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The names earlier versions wrote: a run dir or checkpoint they left must still load.
EARLIER_NAMES = {
    "model": "model.keras", "history": "history.json", "run_json": "run.json", "metrics": "metrics.json",
    "report": "report.html", "model_card": "model_card.md", "checkpoints": "checkpoints",
    "checkpoint_state": os.path.join("checkpoints", "state.json"),
    "checkpoint_weights": os.path.join("checkpoints", "last.weights.h5"),
    "figures": "figures", "gradcam": "gradcam", "pipeline_state": "pipeline.json", "inputs": "inputs.json",
    "dataset": "dataset",
}


# ----------------------------------------------------------------------------- RunDir


def test_run_dir_names_every_artefact_as_earlier_versions_did(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.path == str(tmp_path / "run")
    for attribute, name in EARLIER_NAMES.items():
        assert getattr(run, attribute) == os.path.join(str(tmp_path / "run"), name), attribute
    assert run.metrics_path("test") == run.metrics
    assert run.metrics_path("val") == os.path.join(run.path, "metrics_val.json")
    assert run.metrics_path("all") == os.path.join(run.path, "metrics_all.json")
    assert ARTEFACTS == ("model.keras", "history.json", "run.json", "metrics.json", "report.html", "model_card.md")
    assert run.artefacts() == [os.path.join(run.path, name) for name in ARTEFACTS]
    assert RunDir("runs/x/").model == "runs/x/model.keras"  # kept as given: messages show the user's path
    # Added since: the servable export, the MLflow record, and the embedded store beside the run dir.
    assert run.saved_model == os.path.join(run.path, "saved_model")
    assert run.tracking == os.path.join(run.path, "mlflow.json")
    assert run.local_tracking_db == str(tmp_path / "mlflow.db")
    assert run.local_tracking_artifacts == str(tmp_path / "mlartifacts")


def test_overwrite_deletes_the_artefacts_and_checkpoints_only(tmp_path):
    from covid_spark.stages.train import _prepare_model_dir

    run = RunDir(tmp_path / "m")
    os.makedirs(run.checkpoints)
    os.makedirs(os.path.join(run.saved_model, "variables"))
    for path in run.artefacts() + [run.checkpoint_state, run.metrics_path("val"), run.pipeline_state, run.tracking]:
        with open(path, "w") as handle:
            handle.write("{}")
    with pytest.raises(FileExistsError, match="already exists: pass --overwrite"):
        _prepare_model_dir(run.path, overwrite=False, resume=False)
    with open(run.checkpoint_state, "w") as handle:
        json.dump({"epoch": 3, "model": "compact"}, handle)
    assert _prepare_model_dir(run.path, overwrite=False, resume=True) == {"epoch": 3, "model": "compact"}
    assert _prepare_model_dir(run.path, overwrite=True, resume=False) is None
    assert sorted(os.listdir(run.path)) == ["metrics_val.json", "mlflow.json", "pipeline.json"]
    with pytest.raises(FileNotFoundError, match=r"--resume: no checkpoint in .*checkpoints \(state.json missing\)"):
        _prepare_model_dir(run.path, overwrite=False, resume=True)


def test_load_model_round_trip_with_our_own_layer(tmp_path):
    import tensorflow as tf

    from covid_spark.models.layers import HistogramEqualization

    inputs = tf.keras.Input((8, 8, 3))
    x = HistogramEqualization()(inputs)
    outputs = tf.keras.layers.Dense(3, activation="softmax")(tf.keras.layers.GlobalAveragePooling2D()(x))
    model = tf.keras.Model(inputs, outputs)
    run = RunDir(tmp_path)
    model.save(run.model)
    batch = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3)).astype("float32")
    again = load_model(run)
    assert [type(layer).__name__ for layer in again.layers][1] == "HistogramEqualization"
    np.testing.assert_allclose(again(batch, training=False).numpy(), model(batch, training=False).numpy(), atol=1e-6)


def test_load_model_names_the_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        load_model(RunDir(tmp_path / "m"))
    assert str(caught.value) == (f"{tmp_path / 'm'}/model.keras not found: "
                                 f"train a model into {tmp_path / 'm'} first (jobs/train.py)")


def test_provenance():
    assert versions()["python"] and "numpy" in versions()
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:
        assert git_commit().split("+")[0] == head


# ----------------------------------------------------------------------------- dataset


def test_summary_round_trip_streams_through_pyarrow(tmp_path):
    dataset = str(tmp_path / "ds")
    os.makedirs(dataset)
    summary = {"classes": ["covid", "normal", "pneumonia"], "image_size": 64, "per_split": {"train": 3},
               "duplicates": [[f"/x/{i}.png", f"/y/{i}.png"] for i in range(2000)], "note": "é"}
    assert not has_summary(None, dataset)
    write_summary(dataset, summary)
    assert has_summary(None, dataset) and has_summary(None, "file://" + dataset)
    assert os.path.exists(os.path.join(dataset, SUMMARY_FILE)) and SUMMARY_FILE == "_summary.json"
    assert read_summary(None, dataset) == summary == read_summary(None, "file://" + dataset + "/")
    with open(os.path.join(dataset, SUMMARY_FILE), encoding="utf-8") as handle:
        assert handle.read().endswith("}\n")  # indented JSON, as jobs/preprocess.py wrote it before


def test_missing_summary_names_the_dataset(tmp_path):
    dataset = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError) as caught:  # existing `except FileNotFoundError` callers still catch it
        read_summary(None, dataset)
    assert isinstance(caught.value, DatasetError) and caught.value.dataset == dataset
    assert str(caught.value) == (f"{dataset}/_summary.json not found: "
                                 f"is {dataset} a dataset written by jobs/preprocess.py?")


def test_split_locations_and_an_empty_split(tmp_path):
    dataset = str(tmp_path / "ds")
    assert split_url(dataset, "val") == f"file://{dataset}/val" == split_url(f"file://{dataset}/", "val")
    assert summary_url("hdfs://nn/d/") == "hdfs://nn/d/_summary.json"
    os.makedirs(os.path.join(dataset, "val", "_common_metadata_dir"))
    message = f"no Parquet files in file://{dataset}/val: is {dataset} a dataset written by jobs/preprocess.py?"
    with pytest.raises(DatasetError, match=re.escape(message)):
        split_row_groups(dataset, "val")


def test_class_weights_balanced_or_none():
    from covid_spark.training.weights import class_weights

    assert class_weights({"covid": 4, "normal": 2, "pneumonia": 2}, "balanced") == {0: 8 / 12, 1: 8 / 6, 2: 8 / 6}
    assert class_weights({"covid": 4, "normal": 0, "pneumonia": 4}, "balanced") == {0: 1.0, 1: 0.0, 2: 1.0}
    assert class_weights({"covid": 4}, "none") is None
    with pytest.raises(ValueError, match="train.class_weights must be 'balanced' or 'none', found 'auto'"):
        class_weights({"covid": 4}, "auto")


# ----------------------------------------------------------------------------- where names and helpers live

FILE_NAMES = {"model.keras", "run.json", "history.json", "metrics.json", "_summary.json", "report.html",
              "model_card.md", "pipeline.json", "inputs.json", "state.json", "checkpoints", "last.weights.h5",
              "saved_model", "mlflow.json", "mlflow.db", "mlartifacts"}


def _sources(*folders: str):
    """(repository-relative path, AST) of every .py file under ``folders``, subpackages included."""
    for folder in folders:
        for root, dirs, files in os.walk(os.path.join(REPO, folder)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as handle:
                        yield os.path.relpath(path, REPO).replace(os.sep, "/"), ast.parse(handle.read())


def test_run_and_dataset_file_names_are_spelled_only_in_their_homes():
    found = [(name, node.lineno, node.value) for name, tree in _sources("covid_spark", "jobs", "bench")
             if name not in ("covid_spark/data/rundir.py", "covid_spark/data/dataset.py")
             for node in ast.walk(tree) if isinstance(node, ast.Constant) and node.value in FILE_NAMES]
    assert found == []
