"""All stages under one run id: preprocess → train → evaluate → report, safe to rerun."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence

from covid_spark.constants import EVALUATION_SPLIT
from covid_spark.data.dataset import has_summary
from covid_spark.data.rundir import RunDir
from covid_spark.data.storage import atomic_write_json
from covid_spark.inputs.sources import as_locations, discover
from covid_spark.stages.evaluate import evaluate
from covid_spark.stages.preprocess import preprocess
from covid_spark.stages.report import build_report
from covid_spark.stages.train import run_training

logger = logging.getLogger(__name__)

STAGES = ("preprocess", "train", "evaluate", "report")


class StageFailed(RuntimeError):
    """A pipeline stage raised; ``stage`` names it."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(cause).__name__}: {cause}")
        self.stage = stage


def input_digest(locations: str | Sequence[str], skip_unknown: bool = False) -> dict:
    """Content hashes of every input file (sha256), plus the skipped names and the list of inputs.

    ``input`` records the absolute locations in the order given, so another list (or order)
    of inputs gives another digest; each file maps to ``[label, patient_id, source, sha256]``.
    """
    locations = as_locations(locations)
    inventory = discover(locations, skip_unknown=skip_unknown)
    files = {}
    for record in inventory.records:
        digest = hashlib.sha256()
        try:
            with open(record.path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            content = digest.hexdigest()
        except OSError as exc:
            content = f"unreadable: {exc}"
        files[record.path] = [record.label, record.patient_id, record.source, content]
    return {"input": [os.path.abspath(location.removeprefix("file://")) for location in locations],
            "files": files, "skipped": sorted([s["path"], s["reason"]] for s in inventory.skipped)}


def run_pipeline(spark, input_locations: str | Sequence[str], run_dir: str, config: dict,
                 force: bool = False, stages=STAGES) -> dict:
    """Run ``stages`` into ``run_dir`` (the model dir; the dataset goes to ``run_dir/dataset``).

    ``input_locations`` is one input or a list of them (see :func:`covid_spark.inputs.sources.discover`).

    Preprocessing is skipped when the inputs' content hashes and the preprocess config match
    the last run's; training is skipped when a model exists for the same dataset and config
    (and resumes from the last checkpoint when an earlier run was interrupted). ``force``
    reruns everything.

    Raises:
        StageFailed: names the stage that failed.
    """
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    paths = RunDir(run_dir)
    dataset = paths.dataset
    timings: dict[str, float] = {}
    state_path = paths.pipeline_state
    state = {}
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)

    def stage(name, fn):
        if name not in stages:
            return None
        started = time.time()
        logger.info("pipeline: stage %s starting", name)
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - reported with the stage's name
            raise StageFailed(name, exc) from exc
        timings[name] = round(time.time() - started, 1)
        state.setdefault("timings", {})[name] = timings[name]
        atomic_write_json(state_path, state)
        return result

    def do_preprocess():
        digest = input_digest(input_locations, config["preprocess"]["skip_unknown_classes"])
        key = hashlib.sha256(json.dumps([digest, config["preprocess"]], sort_keys=True).encode()).hexdigest()
        if not force and state.get("preprocess_key") == key and has_summary(None, dataset):
            logger.info("pipeline: inputs unchanged since the last run; preprocessing skipped")
            return "skipped"
        preprocess(spark, as_locations(input_locations), dataset, config, overwrite=True)
        atomic_write_json(paths.inputs, digest)
        state["preprocess_key"] = key
        state.pop("train_key", None)
        return "ran"

    def do_train():
        # train.engine "auto" (the default) is left out, so models trained before the key existed still match.
        train_cfg = {k: v for k, v in config["train"].items() if not (k == "engine" and v == "auto")}
        key = hashlib.sha256(json.dumps([state.get("preprocess_key"), train_cfg],
                                        sort_keys=True).encode()).hexdigest()
        if not force and state.get("train_key") == key and os.path.exists(paths.model):
            logger.info("pipeline: model already trained on this dataset and config; training skipped")
            return "skipped"
        resume = (not force and state.get("train_started_key") == key
                  and os.path.exists(paths.checkpoint_state))
        state["train_started_key"] = key
        atomic_write_json(state_path, state)
        run_training(spark, dataset, run_dir, config, overwrite=not resume, resume=resume)
        state["train_key"] = key
        return "resumed" if resume else "ran"

    results = {
        "preprocess": stage("preprocess", do_preprocess),
        "train": stage("train", do_train),
        "evaluate": stage("evaluate", lambda: evaluate(dataset, run_dir, config, EVALUATION_SPLIT, overwrite=True) and "ran"),
        "report": stage("report", lambda: build_report(run_dir, dataset, config)),
    }
    return {"run_dir": run_dir, "dataset": dataset, "stages": results, "timings": timings}
