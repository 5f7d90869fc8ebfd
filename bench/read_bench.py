"""Read throughput: Petastorm reader → tf.data (``make_train_dataset``), without and with augmentation.

Each variant runs in its own fresh process with the threads a training rank gets, so the
figure is what one rank's input pipeline can deliver while nothing else runs.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time

from bench.memory import maxrss_mb
from bench.procs import collect
from bench.train_bench import rank_env

logger = logging.getLogger(__name__)


def _read_worker(dataset, batch_size, augment, seed, shuffle_buffer, threads, warmup, batches, env, results):
    os.environ.update(env)
    import tensorflow as tf

    from covid_spark.data import make_train_dataset

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    reader, ds = make_train_dataset(dataset, batch_size, augment, seed, shuffle_buffer=shuffle_buffer)
    with reader:
        batches_iter = iter(ds)
        for _ in range(warmup):
            next(batches_iter)
        started = time.perf_counter()
        for _ in range(batches):
            images, _labels = next(batches_iter)
        seconds = time.perf_counter() - started
    results.put({"images": batches * batch_size, "seconds": seconds, "shape": list(images.shape),
                 "maxrss_mb": maxrss_mb()})


def read_rate(dataset: str, batch_size: int, augment: dict, seed: int, shuffle_buffer: int, threads: int,
              warmup: int, batches: int) -> dict:
    """Images/s of one training input pipeline over ``dataset``'s train split, after ``warmup`` batches."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    worker = ctx.Process(target=_read_worker, daemon=True,
                         args=(dataset, batch_size, augment, seed, shuffle_buffer, threads, warmup, batches,
                               rank_env(threads), results))
    worker.start()
    try:
        (report,) = collect(results, [worker])
    finally:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.terminate()
    return {"images": report["images"], "seconds": round(report["seconds"], 3),
            "images_per_s": round(report["images"] / report["seconds"], 1), "batch_shape": report["shape"],
            "maxrss_mb": report["maxrss_mb"]}


def run_read(dataset: str, config: dict, threads: int, warmup: int, batches: int,
             batch_size: int | None = None) -> dict:
    """Read rate without and with the configured augmentation."""
    cfg = config["train"]
    batch = int(batch_size or cfg["batch_size"])
    out = {"batch_size": batch, "threads": threads}
    for name, augment in (("no_augment", {}), ("augment", dict(cfg["augment"]))):
        logger.info("read bench: %s", name)
        out[name] = read_rate(dataset, batch, augment, int(cfg["seed"]), int(cfg["shuffle_buffer"]), threads,
                              warmup, batches)
    return out
