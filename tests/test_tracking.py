"""MLflow tracking (covid_spark.tracking.tracker): off by default, one MLflow run per run dir, each item logged
once, and a store that cannot be reached costs one warning and a bounded wait, never the run."""
from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import sys
import threading

import numpy as np
import pytest

from covid_spark.tracking import store, values
from covid_spark.tracking import tracker as tracking
from covid_spark.constants import CLASSES
from covid_spark.config import load_config
from covid_spark.data.rundir import RunDir

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed (pip install .[mlflow]; make setup installs it)")


@pytest.fixture(autouse=True)
def fresh_failures(monkeypatch):
    """Each test starts with no URI marked as failed, and with MLflow's HTTP settings of its own."""
    monkeypatch.setattr(tracking, "_FAILED", set())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in store.HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)


def client_of(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def recorded(run_dir: str) -> dict:
    with open(RunDir(run_dir).tracking, encoding="utf-8") as handle:
        return json.load(handle)["runs"]


# ----------------------------------------------------------------------------- pure parts


def test_tracking_is_off_by_default_and_on_by_config_or_environment(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "runs" / "r1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store.resolve_uri(load_config(), run_dir) is None
    assert store.resolve_uri({}, run_dir) is None  # a config written before the section existed
    local = store.resolve_uri(load_config(sets=["tracking.mlflow_uri=local"]), run_dir)
    assert local == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert store.artifact_root(local) == f"file://{tmp_path / 'runs' / 'mlartifacts'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999/")
    assert store.resolve_uri(load_config(), run_dir) == "http://127.0.0.1:5999"
    assert store.artifact_root("http://127.0.0.1:5999") is None  # the server decides
    # The config wins over the environment.
    assert store.resolve_uri(load_config(sets=["tracking.mlflow_uri=local"]), run_dir) == local


@pytest.mark.parametrize("value", ["ftp://host/x", "mlruns", "localhost:5000"])
def test_a_bad_tracking_uri_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r"config key 'tracking.mlflow_uri' must be empty, 'local', or an "
                                         r"http://, https://, sqlite:/// or file:// URI, found"):
        load_config(sets=[f"tracking.mlflow_uri={value}"])
    with pytest.raises(ValueError, match="config key 'tracking.experiment' must be a non-empty string"):
        load_config(sets=["tracking.experiment="])


def test_evaluation_metrics_name_each_class_and_its_interval():
    metrics = {"n": 10, "accuracy": 0.7, "macro_f1": 0.5, "loss": 0.9, "ece": 0.1, "temperature": None,
               "per_class": {"covid": {"precision": 1.0, "recall": 0.5, "f1": None, "support": 4}},
               "ci95": {"accuracy": [0.4, 0.9], "macro_f1": None,
                        "per_class": {"covid": {"precision": [0.8, 1.0], "recall": None, "f1": None}}},
               "per_source": {"kaggle 3/way": {"n": 3, "accuracy": 2 / 3, "macro_f1": float("nan")}}}
    assert values.evaluation_metrics(metrics, "test") == {
        "test/n": 10.0, "test/accuracy": 0.7, "test/accuracy_ci95_low": 0.4, "test/accuracy_ci95_high": 0.9,
        "test/macro_f1": 0.5, "test/loss": 0.9, "test/ece": 0.1,
        "test/covid/precision": 1.0, "test/covid/precision_ci95_low": 0.8, "test/covid/precision_ci95_high": 1.0,
        "test/covid/recall": 0.5, "test/covid/support": 4.0,
        "test/source/kaggle 3/way/n": 3.0, "test/source/kaggle 3/way/accuracy": 2 / 3,
    }
    assert values.metric_name("test", "source", "a+b(c)") == "test/source/a_b_c_"


def test_params_are_the_config_less_tracking_and_the_run_facts():
    config = load_config(sets=["tracking.mlflow_uri=local", "train.epochs=3"])
    params = values.training_params({"config": config, "model": "compact", "num_proc": 2, "best_epoch": None,
                                       "dataset_summary": {"written": 40, "per_split": {"train": 20}}})
    assert params["train.epochs"] == "3" and params["train.augment.flip"] == "False"
    assert params["train.per_model.compact.learning_rate"] == str(config["train"]["per_model"]["compact"]["learning_rate"])
    assert params["run.model"] == "compact" and params["run.best_epoch"] == "None"
    assert params["dataset.images"] == "40" and params["dataset.split.train"] == "20"
    assert not [k for k in params if k.startswith("tracking.")]


# ----------------------------------------------------------------------------- stores that fail


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "covid_spark.tracking.tracker" and r.levelno >= logging.WARNING]


def test_an_unreachable_server_costs_one_warning_naming_it(tmp_path, caplog):
    uri = f"http://127.0.0.1:{closed_port()}"
    config = load_config(sets=[f"tracking.mlflow_uri={uri}"])
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    with caplog.at_level(logging.INFO, logger="covid_spark.tracking.tracker"):
        assert tracking.log_training(run_dir, config) is None
        assert tracking.log_evaluation(run_dir, config) is None  # a later stage of the same job: silent
    (warning,) = tracking_warnings(caplog)
    assert uri in warning and "cannot be reached" in warning and "written as usual" in warning
    assert os.listdir(run_dir) == []  # nothing recorded: there is no MLflow run


def test_a_server_that_never_answers_is_given_up_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(store, "PROBE_TIMEOUT_S", 1)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with caplog.at_level(logging.WARNING, logger="covid_spark.tracking.tracker"):
            assert tracking.log_stage(str(tmp_path), load_config(sets=[f"tracking.mlflow_uri={uri}"]), "train") is None
    (warning,) = tracking_warnings(caplog)
    assert uri in warning and "no answer within 1 s" in warning


class FailingServer(http.server.BaseHTTPRequestHandler):
    """Answers the probe, then fails every MLflow call with 503 (which MLflow retries)."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        FailingServer.requests.append(self.path)
        if self.path.startswith("/api/2.0/mlflow/experiments/search"):
            body = b'{"experiments": []}'
            self.send_response(200)
        else:
            body = b'{"error_code": "TEMPORARILY_UNAVAILABLE"}'
            self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_a_server_failing_mid_logging_is_retried_a_bounded_number_of_times(tmp_path, caplog):
    FailingServer.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FailingServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with caplog.at_level(logging.WARNING, logger="covid_spark.tracking.tracker"):
            assert tracking.log_stage(str(tmp_path), load_config(sets=[f"tracking.mlflow_uri={uri}"]), "train") is None
            assert tracking.log_stage(str(tmp_path), load_config(sets=[f"tracking.mlflow_uri={uri}"]), "report") is None
    finally:
        server.shutdown()
        server.server_close()
    (warning,) = tracking_warnings(caplog)
    assert uri in warning and "the run's own files are complete" in warning
    retries = int(store.HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    probes = [p for p in FailingServer.requests if p.startswith("/api/2.0/mlflow/experiments/search")]
    calls = [p for p in FailingServer.requests if p not in probes]
    # One probe, then the first MLflow call tried 1 + retries times; nothing after it, nor in the next stage.
    assert len(probes) == 1 and len(calls) == 1 + retries and len(set(calls)) == 1


def test_tracking_without_mlflow_installed_warns_how_to_install_it(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with caplog.at_level(logging.WARNING, logger="covid_spark.tracking.tracker"):
        assert tracking.log_stage(str(tmp_path / "r"), load_config(sets=["tracking.mlflow_uri=local"]), "train") is None
    (warning,) = tracking_warnings(caplog)
    assert "pip install .[mlflow]" in warning and "mlflow.db" in warning


# ----------------------------------------------------------------------------- a run dir, logged


def write_run_dir(run_dir: str, history: dict, config: dict, size: int = 32) -> None:
    """A small run dir as train and evaluate leave it: model.keras, saved_model/, run.json, history.json,
    metrics.json (no dataset: that part is covered by the pipeline test)."""
    from covid_spark.evaluation.metrics import bootstrap_ci, classification_metrics
    from covid_spark.models.registry import make_model
    from covid_spark.tracking.serving import export_saved_model
    from covid_spark.data.storage import atomic_write_json

    run = RunDir(run_dir)
    os.makedirs(run.path, exist_ok=True)
    model = make_model("compact", input_shape=(size, size, 3), num_classes=len(CLASSES))
    model.save(run.model)
    export_saved_model(model, run.saved_model, list(CLASSES), size)
    atomic_write_json(run.run_json, {"model": "compact", "classes": list(CLASSES), "image_size": size,
                                     "config": config, "num_proc": 2, "best_epoch": 2, "wall_seconds": 1.5})
    atomic_write_json(run.history, history)
    rng = np.random.RandomState(0)
    y, p = rng.randint(0, 3, 30), rng.dirichlet([1, 1, 1], 30)
    metrics = classification_metrics(y, p, list(CLASSES))
    metrics["ci95"] = bootstrap_ci(y, p, list(CLASSES), n_boot=50, seed=0)
    atomic_write_json(run.metrics, metrics)


def test_a_run_dir_is_logged_once_per_item_and_a_retrained_model_gets_a_new_run(tmp_path, monkeypatch):
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # where a job starts: MLflow must leave nothing there
    config = load_config(sets=["tracking.mlflow_uri=local"])
    run_dir = str(tmp_path / "runs" / "r1")
    history = {"loss": [1.0, 0.8, 0.7], "val_loss": [1.1, 0.9, None]}  # null: not finite
    write_run_dir(run_dir, history, config)
    assert tracking.log_training(run_dir, config) == {"train": True, "evaluate": True, "report": False}
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow sets it meanwhile: a later stage must not find it
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (entry,) = recorded(run_dir).values()
    client = client_of(uri)
    first = entry["run_id"]
    run = client.get_run(first)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["train.epochs"] == str(config["train"]["epochs"]) and run.data.params["run.model"] == "compact"
    assert [(m.step, m.value) for m in client.get_metric_history(first, "loss")] == [(1, 1.0), (2, 0.8), (3, 0.7)]
    assert [(m.step, m.value) for m in client.get_metric_history(first, "val_loss")] == [(1, 1.1), (2, 0.9)]
    with open(RunDir(run_dir).metrics, encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.metrics["test/normal/recall_ci95_high"] == pytest.approx(metrics["ci95"]["per_class"]["normal"]["recall"][1])
    # Artifacts land beside the store, not in the working directory.
    assert os.path.isdir(tmp_path / "runs" / "mlartifacts" / first)
    assert os.listdir(workdir) == []
    # The MLflow model scores as saved_model/ does, uint8 in.
    import tensorflow as tf

    images = np.random.RandomState(1).randint(0, 256, (3, 32, 32, 3)).astype("uint8")
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model(f"runs:/{first}/model").predict(images)
    np.testing.assert_allclose(served, tf.saved_model.load(RunDir(run_dir).saved_model)(images).numpy(), atol=1e-6)

    # A rerun of the stages logs nothing: the same values, once.
    assert tracking.log_evaluation(run_dir, config) == {"train": False, "evaluate": False, "report": False}
    assert len(client.get_metric_history(first, "loss")) == 3 and len(client.get_metric_history(first, "test/accuracy")) == 1

    # A retrained model (other history) is another MLflow run; the first one says which.
    history["loss"] = [0.5, 0.4, 0.3]
    write_run_dir(run_dir, history, config)
    assert tracking.log_training(run_dir, config)["train"] is True
    (entry,) = recorded(run_dir).values()
    assert entry["run_id"] != first
    assert client.get_run(first).data.tags["covid_spark.superseded_by"] == entry["run_id"]
    assert [m.value for m in client.get_metric_history(entry["run_id"], "loss")] == [0.5, 0.4, 0.3]
    assert [m.value for m in client.get_metric_history(first, "loss")] == [1.0, 0.8, 0.7]


# ----------------------------------------------------------------------------- `make demo` with tracking on

slow = pytest.mark.slow


def tracked_client(tracked_run):
    uri = f"sqlite:///{os.path.join(tracked_run['root'], 'mlflow.db')}"
    (entry,) = recorded(tracked_run["run_dir"]).values()
    return client_of(uri), entry["run_id"], uri


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


@slow
def test_demo_with_tracking_shows_params_epochs_test_metrics_and_artefacts(tracked_run):
    client, run_id, uri = tracked_client(tracked_run)
    run = client.get_run(run_id)
    paths = RunDir(tracked_run["run_dir"])
    with open(paths.history, encoding="utf-8") as handle:
        history = json.load(handle)
    with open(paths.metrics, encoding="utf-8") as handle:
        metrics = json.load(handle)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo"
    params = run.data.params
    assert params["train.model"] == "compact" and params["train.epochs"] == "2" and params["train.batch_size"] == "4"
    assert params["preprocess.min_row_groups"] == "2" and params["run.num_proc"] == "2"
    assert params["dataset.images"] == "40"
    for name in ("loss", "val_loss", "accuracy", "val_accuracy"):
        steps = [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
        assert steps == [(epoch, pytest.approx(v)) for epoch, v in enumerate(history[name], start=1)], name
    assert run.data.metrics["test/accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.metrics["test/macro_f1"] == pytest.approx(metrics["macro_f1"])
    for name in CLASSES:
        for key in ("precision", "recall", "f1"):
            value, bounds = metrics["per_class"][name][key], metrics["ci95"]["per_class"][name][key]
            if value is not None:
                assert run.data.metrics[f"test/{name}/{key}"] == pytest.approx(value)
            if bounds is not None:
                assert run.data.metrics[f"test/{name}/{key}_ci95_low"] == pytest.approx(bounds[0])
                assert run.data.metrics[f"test/{name}/{key}_ci95_high"] == pytest.approx(bounds[1])
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "dataset" and dataset_input.dataset.digest == params["dataset.digest"]
    artifacts = artifact_paths(client, run_id)
    expected = {"run/run.json", "run/history.json", "dataset/_summary.json", "evaluation/metrics.json",
                "report/report.html", "report/model_card.md", "report/figures/history.png",
                "report/figures/confusion.png", "report/figures/roc_pr.png", "model/MLmodel"}
    assert expected <= artifacts
    assert {f"report/gradcam/{name}" for name in os.listdir(paths.gradcam)} <= artifacts
    mlflow.set_tracking_uri(uri)
    signature = mlflow.models.get_model_info(f"runs:/{run_id}/model").signature.to_dict()
    assert json.loads(signature["inputs"]) == [{"type": "tensor", "tensor-spec": {"dtype": "uint8",
                                                                                  "shape": [-1, 224, 224, 3]}}]
    assert json.loads(signature["outputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 3]}


@slow
def test_rerun_and_separate_stages_attach_to_the_same_run_and_log_nothing_twice(tracked_run):
    client, run_id, _ = tracked_client(tracked_run)
    before = artifact_paths(client, run_id)
    pipeline = tracked_run["pipeline"]
    assert pipeline.main(tracked_run["args"]) == 0  # a rerun: nothing changed
    assert pipeline.main(tracked_run["args"] + ["--stages", "evaluate"]) == 0  # one stage, as Airflow runs it
    (entry,) = recorded(tracked_run["run_dir"]).values()
    assert entry["run_id"] == run_id
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert len(client.get_metric_history(run_id, "loss")) == 2
    assert len(client.get_metric_history(run_id, "test/accuracy")) == 1
    assert artifact_paths(client, run_id) == before


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 (SQLite store, artifacts proxied by the server), stopped afterwards."""
    import subprocess
    import time
    import urllib.request

    port = closed_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                               "--artifacts-destination", str(tmp_path / "server-artifacts")],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"mlflow server exited with status {server.returncode}")
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start within a minute")
        yield uri
    finally:
        os.killpg(server.pid, 15)  # the server and its gunicorn worker: a group this fixture started
        server.wait(timeout=30)


@slow
def test_a_tracking_server_gets_the_same_run(tmp_path, mlflow_server):
    config = load_config(sets=[f"tracking.mlflow_uri={mlflow_server}"])
    run_dir = str(tmp_path / "runs" / "r1")
    write_run_dir(run_dir, {"loss": [0.9, 0.6]}, config)
    assert tracking.log_training(run_dir, config) == {"train": True, "evaluate": True, "report": False}
    assert tracking.log_training(run_dir, config) == {"train": False, "evaluate": False, "report": False}
    (uri, entry), = recorded(run_dir).items()
    assert uri == mlflow_server
    client = client_of(mlflow_server)
    run = client.get_run(entry["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["run.model"] == "compact"
    assert [(m.step, m.value) for m in client.get_metric_history(entry["run_id"], "loss")] == [(1, 0.9), (2, 0.6)]
    assert "test/accuracy" in run.data.metrics
    assert {"run/run.json", "evaluation/metrics.json", "model/MLmodel"} <= artifact_paths(client, entry["run_id"])
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing local: all of it went to the server


def test_a_run_id_the_store_does_not_hold_is_replaced_by_a_new_run(tmp_path):
    """mlflow.json copied with a run dir (or a store wiped): the recorded id is not in the store, so a new run."""
    from covid_spark.data.storage import atomic_write_json

    config = load_config(sets=["tracking.mlflow_uri=local"])
    run = RunDir(tmp_path / "runs" / "copied")
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    atomic_write_json(run.tracking, {"runs": {uri: {"run_id": "0" * 32, "experiment_id": "1", "logged": {"report": "x"}}}})
    atomic_write_json(run.metrics, {"n": 2, "accuracy": 0.5, "per_class": {}})
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    assert tracking.log_evaluation(run.path, config) == {"train": False, "evaluate": True, "report": False}
    # A new store's schema migrations reconfigure logging (alembic): the job's own set-up is put back.
    assert (root.handlers, root.level) == (handlers, level)
    entry = recorded(run.path)[uri]
    assert entry["run_id"] != "0" * 32 and entry["logged"].keys() == {"evaluate:test"}
    assert client_of(uri).get_run(entry["run_id"]).data.metrics == {"test/n": 2.0, "test/accuracy": 0.5}


@slow
def test_the_pipeline_with_an_unreachable_server_does_its_work_and_warns_once(tracked_run, caplog, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    paths = RunDir(tracked_run["run_dir"])
    os.remove(paths.report)
    with caplog.at_level(logging.WARNING, logger="covid_spark.tracking.tracker"):
        assert tracked_run["pipeline"].main(tracked_run["args"] + ["--stages", "evaluate,report",
                                                                   "--set", f"tracking.mlflow_uri={uri}"]) == 0
    assert os.path.exists(paths.report) and os.path.exists(paths.metrics)  # the stages did their work
    (warning,) = tracking_warnings(caplog)
    assert uri in warning and "cannot be reached" in warning
    assert uri not in recorded(paths.path)  # no MLflow run was made up for it
