"""Experiment tracking in MLflow: optional, off by default, logged from the driver only.

On when the config's ``tracking.mlflow_uri`` is set, or else the ``MLFLOW_TRACKING_URI`` environment
variable; ``local`` is an embedded SQLite store beside the run dir (``<run-dir>/../mlflow.db``, its
artifacts in ``<run-dir>/../mlartifacts``), so the runs of one folder (``runs/``) land in one store
that ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows. MLflow is an extra
(``pip install .[mlflow]``; ``make setup`` installs it): without it, or with tracking off, nothing here
imports it.

One MLflow run per run dir. Its id is kept in the run dir (``RunDir.tracking``, ``mlflow.json``), so
stages run separately (``--stages``, Airflow, the single-stage jobs) attach to the same MLflow run.
Each stage calls :func:`log_stage` when its outputs are written; it logs what the run dir holds that
the MLflow run has not got yet, each item once, keyed by a digest of what it logs:

    train      the config as params (``train.epochs``, …), the run's facts (``run.*``), the dataset
               (digest of its rows, counts, ``_summary.json``) as params, input and artifact, the
               per-epoch history as metrics with their epoch as step, run.json and history.json,
               and the servable SavedModel as the MLflow model ``model``, with its signature;
    evaluate   ``<split>/accuracy``, ``<split>/macro_f1``, ``<split>/loss``, ECE, temperature, each
               class's precision, recall, F1 and support, with ``_ci95_low`` / ``_ci95_high``
               bounds, per-source accuracy and macro-F1, and the metrics file as an artifact;
    report     report.html, model_card.md, the figures and the Grad-CAM gallery as artifacts.

A rerun of a finished stage whose outputs did not change logs nothing; a retrained model (other
training outputs) starts a new MLflow run, since MLflow's params cannot change.

Tracking never fails a stage that succeeded: an unreachable or broken store gives ONE warning per
process naming the URI, and nothing more is tried against it. A server is probed once before
anything is logged (:data:`PROBE_TIMEOUT_S`); MLflow's own HTTP retries are bounded
(:data:`HTTP_LIMITS`), so a server that goes away mid-logging costs at most about 30 s in all.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
from typing import Iterator, Mapping

from covid_spark.data.dataset import summary_url
from covid_spark.data.rundir import RunDir
from covid_spark.data.splits import SPLITS
from covid_spark.data.storage import atomic_write_json
from covid_spark.models.saved import load_model
from covid_spark.tracking.serving import PROBABILITIES, SIGNATURE, servable
from covid_spark.tracking.store import ENV_URI, HTTP_LIMITS, artifact_root, probe, resolve_uri, tracking_config
from covid_spark.tracking.values import (
    dataset_digest,
    evaluation_metrics,
    file_digest,
    history_metrics,
    read_json,
    tensorflow_requirement,
    training_params,
)

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
# MLflow's limits (2.22): 100 params and 1,000 metrics per batch call; metric names of these characters.
_PARAMS_PER_CALL = 100
_METRICS_PER_CALL = 1000

# URIs that failed in this process: warned about once, never tried again.
_FAILED: set[str] = set()


class Tracker:
    """The MLflow run of one run dir in one store, and the record of what it already holds (``mlflow.json``)."""

    def __init__(self, run_dir: str, uri: str, experiment: str):
        import mlflow  # noqa: F401  (ImportError: the caller says how to install it)
        from mlflow.tracking import MlflowClient

        for key, value in HTTP_LIMITS.items():
            os.environ.setdefault(key, value)
        self.run_dir = os.path.abspath(run_dir)
        self.paths = RunDir(self.run_dir)
        self.uri = uri
        self.experiment = experiment
        # MLflow's SQLite store makes ./mlruns (its default artifact root) in the working directory when it
        # first opens (in the client's constructor; MLflow then caches it): open it from the store's own
        # folder, so that an empty mlruns/ lands beside mlflow.db, not wherever the job started.
        folder = os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])) if uri.startswith("sqlite:///") else None
        with _working_directory(folder), _root_logging_kept():
            self.client = MlflowClient(tracking_uri=uri)
        self.state = read_json(self.paths.tracking) if os.path.exists(self.paths.tracking) else {}
        self.entry: dict = self.state.setdefault("runs", {}).setdefault(uri, {})

    @property
    def run_id(self) -> str | None:
        return self.entry.get("run_id")

    def _save(self) -> None:
        atomic_write_json(self.paths.tracking, self.state)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment,
                                                 artifact_location=artifact_root(self.uri))
        except Exception:  # noqa: BLE001 - created meanwhile by another job: use it
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def attach(self, new: bool = False) -> str:
        """The MLflow run of this run dir: the recorded one while it exists in the store, else a new one."""
        if self.run_id and not new:
            try:
                if self.client.get_run(self.run_id).info.lifecycle_stage == "active":
                    return self.run_id
            except Exception as error:  # noqa: BLE001 - MlflowException, imported lazily
                if getattr(error, "error_code", None) != "RESOURCE_DOES_NOT_EXIST":
                    raise  # the store failed: never a second run for a run dir because of it
                logger.info("tracking: MLflow run %s is not in %s; starting a new one", self.run_id, self.uri)
        previous = self.run_id
        run = self.client.create_run(self._experiment_id(), run_name=os.path.basename(self.run_dir),
                                     tags={"covid_spark.run_dir": self.run_dir})
        if previous and new:
            with contextlib.suppress(Exception):
                self.client.set_tag(previous, "covid_spark.superseded_by", run.info.run_id)
        self.entry.clear()
        self.entry.update(run_id=run.info.run_id, experiment_id=run.info.experiment_id, logged={})
        self._save()
        logger.info("tracking: run dir %s → MLflow run %s in %s", self.run_dir, run.info.run_id, self.uri)
        return run.info.run_id

    def logged(self, item: str) -> str | None:
        return (self.entry.get("logged") or {}).get(item)

    def mark(self, item: str, digest: str) -> None:
        self.entry.setdefault("logged", {})[item] = digest
        self._save()

    # ----------------------------------------------------------------------------- items

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[i:i + _PARAMS_PER_CALL])

    def log_metrics(self, values: list[tuple[str, float, int]]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(name, value, now, step) for name, value, step in values]
        for i in range(0, len(items), _METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=items[i:i + _METRICS_PER_CALL])

    def log_training(self) -> bool:
        """Params, dataset, per-epoch history, run records and the servable model; False when already logged."""
        paths = self.paths
        if not os.path.exists(paths.run_json):
            return False
        digest = file_digest(paths.run_json, paths.history)
        if self.logged("train") == digest:
            return False
        if self.logged("train"):  # another training's outputs: MLflow params cannot change, so a new run
            self.attach(new=True)
        run = read_json(paths.run_json)
        history = read_json(paths.history) if os.path.exists(paths.history) else {}
        self.client.update_run(self.run_id, status="RUNNING")
        tags = {"covid_spark.model": str(run.get("model")), "mlflow.source.git.commit": str(run.get("git_commit") or "")}
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        self.log_params(training_params(run))
        self.log_metrics(history_metrics(history)
                         + [("train_wall_seconds", float(run.get("wall_seconds") or 0), 0)])
        for path in (paths.run_json, paths.history):
            if os.path.exists(path):
                self.client.log_artifact(self.run_id, path, "run")
        self._log_dataset(run)
        if os.path.isdir(paths.saved_model):
            self._log_model(run)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.mark("train", digest)
        return True

    def _log_dataset(self, run: Mapping) -> None:
        """The dataset as an MLflow input (name, digest, source URL) and its summary as an artifact."""
        import warnings

        dataset = run.get("dataset")
        if not dataset:
            return
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        digest = dataset_digest(dataset)
        self.client.log_param(self.run_id, "dataset.digest", digest)
        with warnings.catch_warnings():  # it tries every source type it knows, each with a warning
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(dataset)
        meta = MetaDataset(source, name=os.path.basename(dataset.rstrip("/")), digest=digest)
        self.client.log_inputs(self.run_id, [DatasetInput(meta._to_mlflow_entity(),
                                                          [InputTag("mlflow.data.context", "training")])])
        summary = summary_url(dataset)
        if summary.startswith("file://") and os.path.isfile(summary.removeprefix("file://")):
            self.client.log_artifact(self.run_id, summary.removeprefix("file://"), "dataset")

    def _log_model(self, run: Mapping) -> None:
        """The servable model (``serving.servable``, what ``saved_model/`` holds) as the MLflow model
        ``model``, TensorFlow flavour, with its signature: uint8 images in, probabilities out."""
        import mlflow
        import numpy as np
        from mlflow.models import ModelSignature
        from mlflow.types.schema import Schema, TensorSpec

        size, classes = int(run["image_size"]), list(run["classes"])
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(classes)), PROBABILITIES)]))
        # MLflow's TensorFlow flavour saves a tf.Module, not a loaded SavedModel: the same module is built
        # again from model.keras, the model saved_model/ was exported from.
        module = servable(load_model(self.paths), classes, size)
        requirements = [tensorflow_requirement(run.get("versions") or {})]  # given: MLflow's inference runs a subprocess
        with mlflow.start_run(run_id=self.run_id):  # the fluent API: MLflow's model logging needs an active run
            mlflow.tensorflow.log_model(module, MODEL_ARTIFACT, signature=signature, pip_requirements=requirements,
                                        saved_model_kwargs={"signatures": {SIGNATURE: module.serve.get_concrete_function()}},
                                        metadata={"classes": classes, "image_size": size})

    def log_evaluation(self) -> bool:
        """Each metrics file in the run dir (``metrics.json``: ``test/…``; ``metrics_<split>.json``: ``<split>/…``)."""
        done = False
        for split in (*SPLITS, "all"):
            path = self.paths.metrics_path(split)
            if not os.path.exists(path):
                continue
            values = evaluation_metrics(read_json(path), split)
            digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
            item = f"evaluate:{split}"
            if self.logged(item) == digest:
                continue
            self.client.update_run(self.run_id, status="RUNNING")
            self.log_metrics([(k, v, 0) for k, v in values.items()])
            self.client.log_artifact(self.run_id, path, "evaluation")
            self.client.set_terminated(self.run_id, "FINISHED")
            self.mark(item, digest)
            done = True
        return done

    def log_report(self) -> bool:
        """report.html, model_card.md, figures/ and gradcam/ as artifacts under ``report/``."""
        paths = self.paths
        if not os.path.exists(paths.report):
            return False
        images = sorted(glob.glob(os.path.join(paths.figures, "*.png")) + glob.glob(os.path.join(paths.gradcam, "*.png")))
        digest = file_digest(paths.report, paths.model_card, *images)
        if self.logged("report") == digest:
            return False
        self.client.update_run(self.run_id, status="RUNNING")
        for path in (paths.report, paths.model_card):
            if os.path.exists(path):
                self.client.log_artifact(self.run_id, path, "report")
        for folder in (paths.figures, paths.gradcam):
            if os.path.isdir(folder):
                self.client.log_artifacts(self.run_id, folder, f"report/{os.path.basename(folder)}")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.mark("report", digest)
        return True


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to ``uri`` meanwhile: its model logging (fluent API) and its
    artifact uploads to a server that proxies artifacts (``mlflow-artifacts:``) read that one, not the client's."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    # MLflow keeps it in a module global and copies it to MLFLOW_TRACKING_URI (for subprocesses): both are
    # put back as they were, or a later stage with tracking off would find the variable set and log.
    previous, previous_env = utils._tracking_uri, os.environ.get(ENV_URI)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = previous_env


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """The root logger's handlers and level kept: a new SQLite store runs MLflow's schema migrations, whose
    alembic set-up replaces them (``logging.config.fileConfig``: another format) and logs each step at INFO."""
    root = logging.getLogger()
    handlers, level, disabled = root.handlers[:], root.level, logging.root.manager.disable
    logging.disable(max(disabled, logging.INFO))  # and its INFO lines (one per migration step) unsaid
    try:
        yield
    finally:
        logging.disable(disabled)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
        logging.getLogger("alembic").setLevel(logging.WARNING)


@contextlib.contextmanager
def _working_directory(folder: str | None) -> Iterator[None]:
    if folder is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


@contextlib.contextmanager
def _failures_warned(uri: str, what: str) -> Iterator[None]:
    """Turn any failure into one warning naming ``uri``; later calls in this process skip that URI."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - tracking never fails a stage that succeeded
        _FAILED.add(uri)
        logger.warning("tracking: %s failed against the MLflow tracking URI %s (%s: %s); the run's own files "
                       "are complete, and nothing more is sent to MLflow from this job",
                       what, uri, type(error).__name__, " ".join(str(error).split())[:300])


def log_stage(run_dir: str, config: Mapping, stage: str) -> dict[str, bool] | None:
    """Log what ``run_dir`` holds that its MLflow run has not got yet (see the module docstring).

    Called by each stage on the driver once its outputs are written (``stage`` names it in messages).
    Returns what was logged (``{"train": bool, "evaluate": bool, "report": bool}``), or None when
    tracking is off or failed. Never raises.
    """
    try:
        uri = resolve_uri(config, run_dir)
    except Exception as error:  # noqa: BLE001
        logger.warning("tracking: could not resolve the MLflow tracking URI (%s); nothing logged", error)
        return None
    if uri is None or uri in _FAILED:
        return None
    reason = probe(uri)
    if reason:
        _FAILED.add(uri)
        logger.warning("tracking: the MLflow tracking URI %s cannot be reached (%s); the run's own files are "
                       "written as usual and nothing is logged to MLflow", uri, reason)
        return None
    cfg = tracking_config(config)
    result = None
    with _failures_warned(uri, f"logging the {stage} stage of {run_dir}"):
        try:
            tracker = Tracker(run_dir, uri, cfg["experiment"])
        except ImportError:
            _FAILED.add(uri)
            logger.warning("tracking: tracking.mlflow_uri / %s is set (%s) but MLflow is not installed "
                           "(pip install .[mlflow]); nothing logged", ENV_URI, uri)
            return None
        with _global_tracking_uri(uri):
            tracker.attach()
            result = {"train": tracker.log_training(), "evaluate": tracker.log_evaluation(),
                      "report": tracker.log_report()}
        if any(result.values()):
            logger.info("tracking: %s → MLflow run %s at %s (%s)", stage, tracker.run_id, uri,
                        ", ".join(k for k, v in result.items() if v))
    return result


def log_training(run_dir: str, config: Mapping) -> dict[str, bool] | None:
    """The train stage's hook: :func:`log_stage` after model.keras, saved_model/, run.json and history.json."""
    return log_stage(run_dir, config, "train")


def log_evaluation(run_dir: str, config: Mapping) -> dict[str, bool] | None:
    """The evaluate stage's hook: :func:`log_stage` after the metrics file is written."""
    return log_stage(run_dir, config, "evaluate")


def log_report(run_dir: str, config: Mapping) -> dict[str, bool] | None:
    """The report stage's hook: :func:`log_stage` after report.html and model_card.md are written."""
    return log_stage(run_dir, config, "report")
