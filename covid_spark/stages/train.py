"""Train stage, on the driver: :func:`run_training` checks the config against the dataset, prepares the
model dir, hands the rank function (``covid_spark.stages.train_rank.train_fn``) and its
:class:`~covid_spark.training.job.TrainJob` to the engine's launcher, and writes the model dir from
what rank 0 returns.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time

from covid_spark.constants import CLASSES
from covid_spark.data.dataset import read_summary
from covid_spark.data.rundir import CHECKPOINT_STATE, RunDir, git_commit, versions
from covid_spark.data.storage import atomic_write_json, exists_error, to_url
from covid_spark.engines.registry import ENGINES, resolve_engine
from covid_spark.errors import ConfigError, DatasetError, InputError
from covid_spark.lungs.framing import Framing
from covid_spark.models.registry import provenance
from covid_spark.stages.train_rank import train_fn
from covid_spark.tracking.serving import export_run
from covid_spark.tracking.tracker import log_training
from covid_spark.training.job import TrainJob
from covid_spark.training.weights import class_weights, source_keep_probabilities

logger = logging.getLogger(__name__)


def _prepare_model_dir(model_dir: str, overwrite: bool, resume: bool) -> dict | None:
    """Check the model dir; return the checkpoint state to resume from, if any.

    With ``overwrite``, the model's artefacts (``rundir.ARTEFACTS``) and its checkpoints are deleted
    first; anything else in the folder (a dataset, other metrics files) is kept.
    """
    run = RunDir(model_dir)
    if os.path.isdir(model_dir) and os.listdir(model_dir):
        if resume:
            if not os.path.exists(run.checkpoint_state):
                raise FileNotFoundError(f"--resume: no checkpoint in {run.checkpoints} ({CHECKPOINT_STATE} missing)")
            with open(run.checkpoint_state, encoding="utf-8") as handle:
                return json.load(handle)
        if not overwrite:
            raise exists_error(model_dir, " or --resume to continue from its last checkpoint")
        for path in run.artefacts():
            if os.path.exists(path):
                os.remove(path)
        shutil.rmtree(run.checkpoints, ignore_errors=True)
        shutil.rmtree(run.saved_model, ignore_errors=True)
    os.makedirs(model_dir, exist_ok=True)
    return None


def make_job(cfg: dict, summary: dict, dataset: str, steps: int, threads: int, checkpoint_dir: str,
             engine: str = "horovod") -> TrainJob:
    """The job each rank's ``train_fn`` receives, from the ``train`` config (as ``config.load_config``
    gives it: checked and typed) and the dataset summary; ``engine`` names the ``engines.registry.ENGINES``
    entry whose launcher starts the ranks."""
    return TrainJob(
        engine=engine, dataset=to_url(dataset), model=cfg["model"], image_size=int(summary["image_size"]),
        epochs=cfg["epochs"], batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
        warmup_epochs=cfg["warmup_epochs"], lr_schedule=cfg["lr_schedule"],
        patience=cfg["early_stopping_patience"], seed=cfg["seed"], threads=threads,
        steps_per_epoch=steps, shuffle_buffer=cfg["shuffle_buffer"], augment=dict(cfg["augment"]),
        class_weight=class_weights(summary["per_split_class"]["train"], cfg["class_weights"]),
        val_rows=summary["per_split"].get("val", 0), val_row_groups=summary["row_groups"].get("val", 0),
        checkpoint_dir=checkpoint_dir, compression=cfg["gradient_compression"], input_norm=cfg["input_norm"],
        source_keep=source_keep_probabilities(summary.get("per_source_class", {}), cfg["source_cap"]),
        adversary=cfg["adversary"], sources=tuple(sorted(summary.get("per_source", {}))) if cfg["adversary"] else ())


def _check_dataset(summary: dict, dataset: str, num_proc: int, batch: int) -> int:
    """The number of train images, once the dataset is known to suit ``num_proc`` ranks of ``batch``."""
    if summary.get("classes") != list(CLASSES):
        raise DatasetError(f"dataset classes {summary.get('classes')} differ from the model's {list(CLASSES)}")
    n_train = summary["per_split"].get("train", 0)
    if n_train == 0:
        raise DatasetError(f"dataset {dataset} has an empty train split")
    groups = summary["row_groups"].get("train", 0)
    if groups < num_proc:
        raise ConfigError(f"train.num_proc is {num_proc} but the train split of {dataset} has only "
                          f"{groups} row group(s); Petastorm shards by row group, so rerun preprocess "
                          f"with a larger preprocess.min_row_groups or use fewer ranks")
    if n_train < batch * num_proc:
        raise ConfigError(f"train.batch_size {batch} × num_proc {num_proc} exceeds the {n_train} train images")
    return n_train


def _write_model(run_dir: RunDir, results: list[dict]) -> tuple[dict, bool]:
    """Write rank 0's model and history into the run dir (the model atomically); return rank 0's result
    and whether every rank ended with the same trainable weights."""
    rank0 = next(r for r in results if r["rank"] == 0)
    in_sync = len({r.get("weights_digest") for r in results}) == 1
    if not in_sync:
        logger.warning("train: the ranks ended with different weights (%s); rank 0's are saved",
                       ", ".join(f"rank {r['rank']}: {r.get('weights_digest')}"
                                 for r in sorted(results, key=lambda r: r["rank"])))
    tmp_model = os.path.join(run_dir.path, f".{os.path.basename(run_dir.model)}.tmp")
    with open(tmp_model, "wb") as handle:
        handle.write(rank0["model_bytes"])
    os.replace(tmp_model, run_dir.model)
    atomic_write_json(run_dir.history, rank0["history"])
    return rank0, in_sync


def run_training(spark, dataset: str, model_dir: str, config: dict,
                 overwrite: bool = False, resume: bool = False) -> dict:
    """Validate, launch ``num_proc`` ranks on the executors (``train.engine``: ``engines.registry.ENGINES``),
    and write the model dir.

    ``config`` is as ``config.load_config`` gives it (every value checked and typed there).

    Raises:
        ConfigError / DatasetError: config and data disagree (names the key, expected and found values); the engine
            cannot run on this stack (checked first, before any Spark work) or the cluster has fewer
            task slots than ranks (tf-distribute).
        FileExistsError / FileNotFoundError: model dir state versus --overwrite / --resume.
    """
    started = time.time()
    commit = git_commit()  # the code that trains, taken before it runs (the tree may move on meanwhile)
    cfg = config["train"]
    engine = resolve_engine(cfg["engine"])  # before any Spark work: fails fast on the wrong stack
    summary = read_summary(spark, dataset)
    num_proc, batch = cfg["num_proc"], cfg["batch_size"]
    n_train = _check_dataset(summary, dataset, num_proc, batch)
    model_dir = os.path.abspath(model_dir)
    run_dir = RunDir(model_dir)
    state = _prepare_model_dir(model_dir, overwrite, resume)
    cores = spark.sparkContext.defaultParallelism
    threads = cfg["threads_per_rank"] or max(1, (os.cpu_count() or cores) // num_proc)
    steps = math.ceil(n_train / (batch * num_proc))
    job = make_job(cfg, summary, dataset, steps, threads, run_dir.checkpoints, engine)
    if state and state.get("model", cfg["model"]) != cfg["model"]:
        raise InputError(f"--resume: {model_dir} holds a checkpoint of model {state['model']!r}, but this run "
                         f"trains {cfg['model']!r}; pass --model {state['model']} to continue it")
    if state:
        job = dataclasses.replace(job, initial_epoch=int(state["epoch"]), resume_history=state.get("history", {}),
                                  resume_weights=run_dir.checkpoint_weights)
        logger.info("resuming from epoch %d of %s", state["epoch"], model_dir)
    logger.info("training %s on %d train images with %d %s rank(s), %d step(s) per epoch, "
                "%d thread(s) per rank", cfg["model"], n_train, num_proc, engine, steps, threads)
    launcher = ENGINES[job.engine].launcher(spark)
    results = launcher.run(train_fn, job, num_proc)
    rank0, in_sync = _write_model(run_dir, results)
    run = {
        "model": cfg["model"], "engine": engine, "num_proc": num_proc, "classes": list(CLASSES),
        "image_size": int(summary["image_size"]), "epochs": cfg["epochs"],
        "epochs_run": len(rank0["history"].get("loss", [])), "best_epoch": rank0["best_epoch"],
        "seed": cfg["seed"], "steps_per_epoch": steps, "threads_per_rank": threads,
        "effective_learning_rate": cfg["learning_rate"] * num_proc,
        "class_weight": dict(job.class_weight), "dataset": to_url(dataset),
        "dataset_summary": {k: summary[k] for k in ("inputs", "written", "per_class", "per_split",
                                                     "per_split_class", "per_source", "image_size")}
        | {"rejected": len(summary["rejected"]), "skipped": len(summary["skipped"]),
           "duplicate_groups": len(summary.get("duplicates", []))},
        "pretrained": provenance(cfg["model"]),
        "framing": Framing.of(summary.get("config", {})).as_dict(),  # predict frames new images the same way
        "config": config, "versions": versions(), "git_commit": commit,
        "resumed_from_epoch": state["epoch"] if state else None,
        "ranks_in_sync": in_sync,  # every rank ended with the same trainable weights (weights_digest)
        "spark_master": spark.sparkContext.master,
        "wall_seconds": round(time.time() - started, 1),
    }
    atomic_write_json(run_dir.run_json, run)
    export_run(model_dir)  # saved_model/: the servable export, from the model.keras just written
    logger.info("train: %s, %d epoch(s) (best %s), %.0f s → %s", cfg["model"], run["epochs_run"],
                run["best_epoch"], run["wall_seconds"], model_dir)
    log_training(model_dir, config)
    return run
