"""Read throughput: Petastorm reader → tf.data (``make_train_dataset``), without and with augmentation.

Both variants run, one after the other, in one fresh process with the environment and threads a training
rank gets: what one rank's input pipeline can deliver while nothing else runs in that process.
"""
from __future__ import annotations

import logging
import os
import time

from bench.harness import in_process
from bench.monitors import maxrss_mb
from bench.train_bench import rank_env

logger = logging.getLogger(__name__)


def _read_worker(dataset, batch_size, variants, seed, shuffle_buffer, threads, warmup, batches, env, results):
    os.environ.update(env)
    import tensorflow as tf

    from covid_spark.training.tfdata import make_train_dataset

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    report = {}
    for name, augment in variants:
        reader, ds = make_train_dataset(dataset, batch_size, augment, seed, shuffle_buffer=shuffle_buffer)
        with reader:
            batches_iter = iter(ds)
            for _ in range(warmup):
                next(batches_iter)
            started = time.perf_counter()
            for _ in range(batches):
                images, _labels = next(batches_iter)
            seconds = time.perf_counter() - started
        report[name] = {"images": batches * batch_size, "seconds": round(seconds, 3),
                        "images_per_s": round(batches * batch_size / seconds, 1), "batch_shape": list(images.shape),
                        "maxrss_mb": maxrss_mb()}
    results.put(report)


def run_read(spark, dataset: str, config: dict, threads: int, warmup: int, batches: int,
             batch_size: int | None = None) -> dict:
    """Images/s of one rank's input pipeline over ``dataset``'s train split, without then with the configured
    augmentation, after ``warmup`` batches each. ``maxrss_mb`` is the process's peak so far (the augmented
    run's includes the first run's)."""
    cfg = config["train"]
    batch = int(batch_size or cfg["batch_size"])
    variants = (("no_augment", {}), ("augment", dict(cfg["augment"])))
    logger.info("read bench: %d + %d batches of %d, without and with augmentation", warmup, batches, batch)
    report = in_process(_read_worker, dataset, batch, variants, int(cfg["seed"]), int(cfg["shuffle_buffer"]),
                        threads, warmup, batches, rank_env(spark, threads))
    return dict(report, batch_size=batch, threads=threads)
