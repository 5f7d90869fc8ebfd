"""Train stage, inside each rank (pickled to the executors by an engine's launcher): :func:`train_fn`.

Each rank joins the others through its engine's rank context, builds the model, streams its shard of
the train split (Petastorm) and of val, and trains through ``covid_spark.training.core.fit_model``.
TensorFlow is imported inside the functions: the driver imports this module to hand ``train_fn`` to a
launcher and must not start TensorFlow itself.
"""
from __future__ import annotations

import hashlib
import math
import shutil
import tempfile

import numpy as np

from covid_spark.constants import CLASSES
from covid_spark.data.dataset import iter_split_batches, shard_rows
from covid_spark.data.rundir import RunDir
from covid_spark.engines.registry import ENGINES
from covid_spark.models.registry import make_model
from covid_spark.training.job import TrainJob
from covid_spark.training.tfdata import make_train_dataset


def _val_plan(job: TrainJob, rank: int, size: int, equal_steps: bool) -> tuple[tuple, list[int] | None]:
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
    shard = (rank, size) if job.val_row_groups >= size else (None, None)
    if not equal_steps:
        return shard, None
    rows = shard_rows(job.dataset, "val", shard[1])
    steps = max(math.ceil(n / job.batch_size) for n in rows)
    if min(rows) < steps:
        shard, rows = (None, None), shard_rows(job.dataset, "val")
        steps = math.ceil(rows[0] / job.batch_size)
    mine = rows[shard[0] or 0]
    return shard, [mine // steps + (1 if i < mine % steps else 0) for i in range(steps)]


def _val_dataset(job: TrainJob, rank: int, size: int, equal_steps: bool = False):
    """This rank's val batches (see :func:`_val_plan`) as ``(dataset, steps)``, or ``(None, None)``."""
    import tensorflow as tf

    if not job.val_rows:
        return None, None
    shard, sizes = _val_plan(job, rank, size, equal_steps)
    px = job.image_size

    # Streamed from the split's row groups each epoch (one batch in memory at a time), not loaded:
    # a whole val shard as float32 is ~0.8 GB per rank at cxr-xl's size.
    def val_batches(dataset=job.dataset, batch=job.batch_size, shard=shard, sizes=sizes):
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


def train_fn(job: TrainJob) -> dict:
    """Body of one rank, whatever the engine: a :class:`TrainJob` in, a plain dict out (rank 0 adds the
    model's bytes).

    Joins the ranks through ``job.engine``'s rank context (``covid_spark.engines.registry.ENGINES``), builds
    the model and this rank's shards of train and val, and trains through ``covid_spark.training.core.fit_model``.
    """
    import tensorflow as tf

    from covid_spark.training.core import fit_model  # imports TensorFlow: only inside a rank

    job.check_version()
    # Threads first: a tf.distribute rank context starts TensorFlow's runtime, after which they are fixed.
    tf.config.threading.set_intra_op_parallelism_threads(job.threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, job.threads))
    dist = ENGINES[job.engine].rank(job)
    rank, size = dist.rank, dist.size
    every_rank_saves = dist.every_rank_saves
    scratch = tempfile.mkdtemp(prefix=f"covid-spark-rank{rank}-") if every_rank_saves and rank else None
    tf.keras.utils.set_random_seed(job.seed + rank)
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else None
    with dist.scope():  # where the model is built and compiled: a tf.distribute strategy's; else none
        size_px = job.image_size
        model = make_model(job.model, input_shape=(size_px, size_px, 3), num_classes=len(CLASSES),
                           input_norm=job.input_norm)
        trained = model  # what is fitted: the classifier, or the classifier with the adversarial source head
        if job.adversary:
            from covid_spark.training.adversary import AdversarialTrainer  # imports TensorFlow: only when this runs

            trained = AdversarialTrainer(model, len(job.sources), job.adversary)
        if job.resume_weights:
            trained.load_weights(job.resume_weights)
        val, val_steps = _val_dataset(job, rank, size, equal_steps=dist.distributes_datasets)
        history = {k: list(v) for k, v in job.resume_history.items()}
        reader, train_ds = make_train_dataset(job.dataset, job.batch_size, job.augment,
                                              seed=job.seed + rank, shard=rank, shard_count=size,
                                              shuffle_buffer=job.shuffle_buffer, source_keep=job.source_keep,
                                              source_names=job.sources)
        with reader:
            fitted = fit_model(trained, train_ds, epochs=job.epochs, steps_per_epoch=job.steps_per_epoch,
                               learning_rate=job.learning_rate * size, ranks=size,
                               warmup_epochs=job.warmup_epochs, lr_schedule=job.lr_schedule, val_ds=val,
                               class_weight=job.class_weight, patience=job.patience,
                               initial_epoch=job.initial_epoch, history=history, distribution=dist,
                               checkpoint_dir=job.checkpoint_dir if rank == 0 else scratch,
                               model_name=job.model, say=say,
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
    digest = hashlib.sha256()
    for weight in model.trainable_weights:
        digest.update(weight.numpy().tobytes())
    return digest.hexdigest()[:16]
