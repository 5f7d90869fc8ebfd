"""Train stage: ranks on the Spark executors (Horovod or tf.distribute), each streaming its Petastorm shard.

The driver side (``run_training``) checks the config against the dataset, prepares the model dir and
hands the rank function (``train_fn``) and its job to a launcher (``covid_spark.launch``); each rank
trains through the training core (``covid_spark.core.fit_model``), which cross-validation uses too.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time

from covid_spark.config import CLASSES
from covid_spark.dataset import read_summary
from covid_spark.launch import DEFAULT_ENGINE, ENGINES, rank_env, resolve_engine  # noqa: F401  (rank_env: bench and tests use it here)
from covid_spark.rundir import CHECKPOINT_STATE, RunDir, git_commit, versions
from covid_spark.serving import export_run
from covid_spark.storage import atomic_write_json, exists_error, to_url
from covid_spark.tracking import log_training
from covid_spark.training import class_weights

logger = logging.getLogger(__name__)


def _val_plan(job: dict, rank: int, size: int, equal_steps: bool) -> tuple[tuple, list[int] | None]:
    """Which shard of val this rank scores, and (with ``equal_steps``) the size of each of its batches.

    The shard is the rank's own by row group, or the whole split when it has fewer row groups than
    ranks. Horovod lets each rank run through its shard (``batch_size`` rows a batch). tf-distribute
    (``equal_steps``) runs validation as one collective step after another, so every rank must run the
    same number of batches, none empty (TensorFlow's padding of a finished rank with empty batches
    breaks batch norm here: "input depth must be evenly divisible by filter depth"): each rank cuts its
    shard into ``steps`` = the largest shard's count of batches, as evenly as it goes. When a shard has
    fewer rows than that, every rank scores the whole split instead (the same mean from each rank).
    Val loss and accuracy are per-image means either way, whatever the batches' sizes.
    """
    from covid_spark.dataset import shard_rows

    shard = (rank, size) if job["val_row_groups"] >= size else (None, None)
    if not equal_steps:
        return shard, None
    rows = shard_rows(job["dataset"], "val", shard[1])
    steps = max(math.ceil(n / job["batch_size"]) for n in rows)
    if min(rows) < steps:
        shard, rows = (None, None), shard_rows(job["dataset"], "val")
        steps = math.ceil(rows[0] / job["batch_size"])
    mine = rows[shard[0] or 0]
    return shard, [mine // steps + (1 if i < mine % steps else 0) for i in range(steps)]


def _val_dataset(job: dict, rank: int, size: int, equal_steps: bool = False):
    """This rank's val batches (see :func:`_val_plan`) as ``(dataset, steps)``, or ``(None, None)``."""
    import numpy as np
    import tensorflow as tf

    from covid_spark.dataset import iter_split_batches

    if not job["val_rows"]:
        return None, None
    shard, sizes = _val_plan(job, rank, size, equal_steps)
    px = job["image_size"]

    # Streamed from the split's row groups each epoch (one batch in memory at a time), not loaded:
    # a whole val shard as float32 is ~0.8 GB per rank at cxr-xl's size.
    def val_batches(dataset=job["dataset"], batch=job["batch_size"], shard=shard, sizes=sizes):
        parts = iter_split_batches(dataset, "val", fields=("image", "label"), batch_size=batch,
                                   shard=shard[0], shard_count=shard[1])
        if sizes is None:
            for rows in parts:
                yield rows["image"], rows["label"].astype("int64")
            return
        images, labels = np.zeros((0, px, px, 3), np.uint8), np.zeros((0,), np.int64)
        for want in sizes:
            while len(labels) < want:
                rows = next(parts)
                images, labels = np.concatenate([images, rows["image"]]), np.concatenate([labels, rows["label"]])
            yield images[:want], labels[:want]
            images, labels = images[want:], labels[want:]

    ds = tf.data.Dataset.from_generator(val_batches, output_signature=(
        tf.TensorSpec((None, px, px, 3), tf.uint8), tf.TensorSpec((None,), tf.int64))
    ).map(lambda image, label: (tf.cast(image, tf.float32), label))
    return ds, None if sizes is None else len(sizes)


def train_fn(job: dict) -> dict:
    """Body of one rank, whatever the engine. Plain dict in, plain dict out (rank 0 adds the model's bytes).

    Joins the ranks through ``job["engine"]``'s rank context (``covid_spark.launch.ENGINES``), builds
    the model and this rank's shards of train and val, and trains through ``covid_spark.core.fit_model``.
    """
    import tensorflow as tf

    from covid_spark.core import fit_model
    from covid_spark.data import make_train_dataset
    from covid_spark.models import make_model

    # Threads first: a tf.distribute rank context starts TensorFlow's runtime, after which they are fixed.
    tf.config.threading.set_intra_op_parallelism_threads(job["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(max(2, job["threads"]))
    dist = ENGINES[job.get("engine", DEFAULT_ENGINE)].rank(job)
    rank, size = dist.rank, dist.size
    every_rank_saves = getattr(dist, "every_rank_saves", False)
    scratch = tempfile.mkdtemp(prefix=f"covid-spark-rank{rank}-") if every_rank_saves and rank else None
    tf.keras.utils.set_random_seed(job["seed"] + rank)
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else None
    with dist.scope():  # where the model is built and compiled: a tf.distribute strategy's; else none
        size_px = job["image_size"]
        model = make_model(job["model"], input_shape=(size_px, size_px, 3), num_classes=len(CLASSES),
                           input_norm=job["input_norm"])
        if job.get("resume_weights"):
            model.load_weights(job["resume_weights"])
        val, val_steps = _val_dataset(job, rank, size, equal_steps=hasattr(dist, "distribute"))
        history = {k: list(v) for k, v in job.get("resume_history", {}).items()}
        reader, train_ds = make_train_dataset(job["dataset"], job["batch_size"], job["augment"],
                                              seed=job["seed"] + rank, shard=rank, shard_count=size,
                                              shuffle_buffer=job["shuffle_buffer"])
        with reader:
            fitted = fit_model(model, train_ds, epochs=job["epochs"], steps_per_epoch=job["steps_per_epoch"],
                               learning_rate=job["learning_rate"] * size, ranks=size,
                               warmup_epochs=job["warmup_epochs"], lr_schedule=job["lr_schedule"], val_ds=val,
                               class_weight=job["class_weight"], patience=job["patience"],
                               initial_epoch=job.get("initial_epoch", 0), history=history, distribution=dist,
                               checkpoint_dir=job["checkpoint_dir"] if rank == 0 else scratch,
                               model_name=job["model"], say=say,
                               validation_steps=val_steps)
    result = {"rank": rank, "size": size, "history": fitted["history"], "best_epoch": fitted["best_epoch"],
              "weights_digest": weights_digest(model)}
    if rank == 0 or every_rank_saves:  # the other ranks' copies (collective saves) are thrown away
        with tempfile.TemporaryDirectory() as tmp:
            path = RunDir(tmp).model  # a .keras name: Keras picks the format by it
            model.save(path)
            if rank == 0:
                with open(path, "rb") as handle:
                    result["model_bytes"] = handle.read()
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def weights_digest(model) -> str:
    """A hash of the trainable weights' bytes: equal on every rank when the ranks trained in step."""
    import hashlib

    digest = hashlib.sha256()
    for weight in model.trainable_weights:
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]


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
             engine: str = DEFAULT_ENGINE) -> dict:
    """The plain dict each rank's ``train_fn`` receives, from the ``train`` config (as ``config.load_config``
    gives it: checked and typed) and the dataset summary; ``engine`` names the ``launch.ENGINES`` entry
    whose launcher starts the ranks."""
    return {
        "engine": engine,
        "dataset": to_url(dataset), "model": cfg["model"], "image_size": int(summary["image_size"]),
        "epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "learning_rate": cfg["learning_rate"],
        "warmup_epochs": cfg["warmup_epochs"], "lr_schedule": cfg["lr_schedule"],
        "patience": cfg["early_stopping_patience"], "seed": cfg["seed"], "threads": threads,
        "steps_per_epoch": steps, "shuffle_buffer": cfg["shuffle_buffer"], "augment": dict(cfg["augment"]),
        "class_weight": class_weights(summary["per_split_class"]["train"], cfg["class_weights"]),
        "val_rows": summary["per_split"].get("val", 0), "val_row_groups": summary["row_groups"].get("val", 0),
        "checkpoint_dir": checkpoint_dir, "compression": cfg["gradient_compression"],
        "input_norm": cfg["input_norm"],
    }


def run_training(spark, dataset: str, model_dir: str, config: dict,
                 overwrite: bool = False, resume: bool = False) -> dict:
    """Validate, launch ``num_proc`` ranks on the executors (``train.engine``: ``launch.ENGINES``), and write the model dir.

    ``config`` is as ``config.load_config`` gives it (every value checked and typed there).

    Raises:
        ValueError: config and data disagree (names the key, expected and found values); the engine
            cannot run on this stack (checked first, before any Spark work) or the cluster has fewer
            task slots than ranks (tf-distribute).
        FileExistsError / FileNotFoundError: model dir state versus --overwrite / --resume.
    """
    from covid_spark.pretrained import provenance

    started = time.time()
    commit = git_commit()  # the code that trains, taken before it runs (the tree may move on meanwhile)
    cfg = config["train"]
    engine = resolve_engine(cfg["engine"])  # before any Spark work: fails fast on the wrong stack
    summary = read_summary(spark, dataset)
    num_proc = cfg["num_proc"]
    if summary.get("classes") != list(CLASSES):
        raise ValueError(f"dataset classes {summary.get('classes')} differ from the model's {list(CLASSES)}")
    n_train = summary["per_split"].get("train", 0)
    if n_train == 0:
        raise ValueError(f"dataset {dataset} has an empty train split")
    groups = summary["row_groups"].get("train", 0)
    if groups < num_proc:
        raise ValueError(f"train.num_proc is {num_proc} but the train split of {dataset} has only "
                         f"{groups} row group(s); Petastorm shards by row group, so rerun preprocess "
                         f"with a larger preprocess.min_row_groups or use fewer ranks")
    batch = cfg["batch_size"]
    if n_train < batch * num_proc:
        raise ValueError(f"train.batch_size {batch} × num_proc {num_proc} exceeds the {n_train} train images")
    model_dir = os.path.abspath(model_dir)
    run_dir = RunDir(model_dir)
    state = _prepare_model_dir(model_dir, overwrite, resume)
    cores = spark.sparkContext.defaultParallelism
    threads = cfg["threads_per_rank"] or max(1, (os.cpu_count() or cores) // num_proc)
    steps = math.ceil(n_train / (batch * num_proc))
    job = make_job(cfg, summary, dataset, steps, threads, run_dir.checkpoints, engine)
    if state and state.get("model", cfg["model"]) != cfg["model"]:
        raise ValueError(f"--resume: {model_dir} holds a checkpoint of model {state['model']!r}, but this run "
                         f"trains {cfg['model']!r}; pass --model {state['model']} to continue it")
    if state:
        job.update(initial_epoch=int(state["epoch"]), resume_history=state.get("history", {}),
                   resume_weights=run_dir.checkpoint_weights)
        logger.info("resuming from epoch %d of %s", state["epoch"], model_dir)
    logger.info("training %s on %d train images with %d %s rank(s), %d step(s) per epoch, "
                "%d thread(s) per rank", cfg["model"], n_train, num_proc, engine, steps, threads)
    launcher = ENGINES[job["engine"]].launcher(spark)
    results = launcher.run(train_fn, job, num_proc)
    rank0 = next(r for r in results if r["rank"] == 0)
    in_sync = len({r.get("weights_digest") for r in results}) == 1
    if not in_sync:
        logger.warning("train: the ranks ended with different weights (%s); rank 0's are saved",
                       ", ".join(f"rank {r['rank']}: {r.get('weights_digest')}" for r in sorted(results, key=lambda r: r["rank"])))
    tmp_model = os.path.join(model_dir, f".{os.path.basename(run_dir.model)}.tmp")
    with open(tmp_model, "wb") as handle:
        handle.write(rank0["model_bytes"])
    os.replace(tmp_model, run_dir.model)
    atomic_write_json(run_dir.history, rank0["history"])
    run = {
        "model": cfg["model"], "engine": engine, "num_proc": num_proc, "classes": list(CLASSES),
        "image_size": int(summary["image_size"]), "epochs": cfg["epochs"],
        "epochs_run": len(rank0["history"].get("loss", [])), "best_epoch": rank0["best_epoch"],
        "seed": cfg["seed"], "steps_per_epoch": steps, "threads_per_rank": threads,
        "effective_learning_rate": cfg["learning_rate"] * num_proc,
        "class_weight": job["class_weight"], "dataset": to_url(dataset),
        "dataset_summary": {k: summary[k] for k in ("inputs", "written", "per_class", "per_split",
                                                     "per_split_class", "per_source", "image_size")}
        | {"rejected": len(summary["rejected"]), "skipped": len(summary["skipped"]),
           "duplicate_groups": len(summary.get("duplicates", []))},
        "pretrained": provenance(cfg["model"]),
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
