"""The run (model) directory: where every stage writes and reads a run's artefacts, and their provenance.

One object, :class:`RunDir`, names every file of a run, so that no stage spells a file name of its
own (the names are kept stable, so older run dirs and checkpoints still load)::

    <run>/model.keras            jobs/train.py        the trained Keras model (models.saved.load_model)
    <run>/saved_model/           jobs/train.py        the same model as a servable TensorFlow SavedModel
                                                      (uint8 images in, probabilities out; covid_spark.tracking.serving)
    <run>/history.json           jobs/train.py        per-epoch losses and metrics
    <run>/run.json               jobs/train.py        what ran: config, versions, git commit, dataset digest
    <run>/checkpoints/           jobs/train.py        last.weights.h5 and state.json, for --resume
    <run>/metrics.json           jobs/evaluate.py     the test split; metrics_<split>.json for another split
    <run>/report.html            the report stage     with figures/ and gradcam/
    <run>/model_card.md          the report stage
    <run>/pipeline.json          jobs/pipeline.py     stage keys and timings
    <run>/inputs.json            jobs/pipeline.py     content digest of the inputs
    <run>/dataset/               jobs/pipeline.py     the preprocessed dataset (see covid_spark.data.dataset)
    <run>/mlflow.json            any stage, tracking  the MLflow run this run dir logs to, and what it logged
    <run>/../mlflow.db           tracking 'local'     the embedded MLflow store of the runs in that folder
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"  # of the test split; metrics_<split>.json for the others
REPORT_FILE = "report.html"
MODEL_CARD_FILE = "model_card.md"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_STATE = "state.json"  # inside CHECKPOINT_DIR
CHECKPOINT_WEIGHTS = "last.weights.h5"  # inside CHECKPOINT_DIR
FIGURES_DIR = "figures"
GRADCAM_DIR = "gradcam"
PIPELINE_FILE = "pipeline.json"
INPUTS_FILE = "inputs.json"
DATASET_DIR = "dataset"
SAVED_MODEL_DIR = "saved_model"
TRACKING_FILE = "mlflow.json"
LOCAL_TRACKING_DB = "mlflow.db"  # in the run dir's parent folder (tracking.mlflow_uri: local)
LOCAL_TRACKING_ARTIFACTS = "mlartifacts"  # beside it: the artifacts of the runs it holds

# What training's --overwrite deletes from a run dir (with the checkpoints folder): the files of the
# model it replaces, and those computed from that model.
ARTEFACTS = (MODEL_FILE, HISTORY_FILE, RUN_FILE, METRICS_FILE, REPORT_FILE, MODEL_CARD_FILE)


class RunDir:
    """Paths of one run's artefacts under ``path`` (kept as given, so messages show the path the user gave)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def _join(self, *names: str) -> str:
        return os.path.join(self.path, *names)

    @property
    def model(self) -> str:
        return self._join(MODEL_FILE)

    @property
    def saved_model(self) -> str:
        """The servable export of the model (a TensorFlow SavedModel folder; ``covid_spark.tracking.serving``)."""
        return self._join(SAVED_MODEL_DIR)

    @property
    def tracking(self) -> str:
        """The MLflow run(s) this run dir logs to and what each stage logged (``covid_spark.tracking.tracker``)."""
        return self._join(TRACKING_FILE)

    @property
    def local_tracking_db(self) -> str:
        """The embedded MLflow store of ``tracking.mlflow_uri: local``: beside the run dir, shared by its siblings."""
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), LOCAL_TRACKING_DB)

    @property
    def local_tracking_artifacts(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), LOCAL_TRACKING_ARTIFACTS)

    @property
    def history(self) -> str:
        return self._join(HISTORY_FILE)

    @property
    def run_json(self) -> str:
        return self._join(RUN_FILE)

    @property
    def metrics(self) -> str:
        """The test split's metrics file (the one the report reads)."""
        return self.metrics_path("test")

    def metrics_path(self, split: str) -> str:
        """``metrics.json`` for the test split, ``metrics_<split>.json`` for another (``all`` included)."""
        return self._join(METRICS_FILE if split == "test" else f"metrics_{split}.json")

    @property
    def checkpoints(self) -> str:
        return self._join(CHECKPOINT_DIR)

    @property
    def checkpoint_state(self) -> str:
        return self._join(CHECKPOINT_DIR, CHECKPOINT_STATE)

    @property
    def checkpoint_weights(self) -> str:
        return self._join(CHECKPOINT_DIR, CHECKPOINT_WEIGHTS)

    @property
    def report(self) -> str:
        return self._join(REPORT_FILE)

    @property
    def model_card(self) -> str:
        return self._join(MODEL_CARD_FILE)

    @property
    def figures(self) -> str:
        return self._join(FIGURES_DIR)

    @property
    def gradcam(self) -> str:
        return self._join(GRADCAM_DIR)

    @property
    def pipeline_state(self) -> str:
        return self._join(PIPELINE_FILE)

    @property
    def inputs(self) -> str:
        return self._join(INPUTS_FILE)

    @property
    def dataset(self) -> str:
        return self._join(DATASET_DIR)

    def artefacts(self) -> list[str]:
        """Paths of :data:`ARTEFACTS` (what training's --overwrite deletes, besides :attr:`checkpoints`)."""
        return [self._join(name) for name in ARTEFACTS]


def saved_keras_version(model_path: str) -> str | None:
    """The Keras version that saved a ``.keras`` archive (its ``metadata.json``), or None if unreadable."""
    import zipfile

    try:
        with zipfile.ZipFile(model_path) as archive:
            return str(json.loads(archive.read("metadata.json"))["keras_version"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def keras_in_use() -> str:
    """The Keras behind ``tf.keras`` here: ``tf-keras <version>`` (with TF_USE_LEGACY_KERAS) or ``Keras <version>``."""
    import importlib.metadata as md

    if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true"):
        try:
            return f"tf-keras {md.version('tf-keras')}"
        except md.PackageNotFoundError:
            pass
    try:
        return f"Keras {md.version('keras')}"
    except md.PackageNotFoundError:
        return "Keras (version unknown)"


# --------------------------------------------------------------------------------- provenance


def versions() -> dict[str, str]:
    """Versions of the libraries a result depends on (those importable here)."""
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for dist in ("tensorflow-cpu", "tensorflow", "keras", "tf-keras", "horovod", "pyspark", "petastorm",
                 "pyarrow", "numpy", "pillow", "covid-spark"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the code that ran, or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
