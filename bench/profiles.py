"""python -m bench.profiles [spark-preprocess] [augment] [--images N]

Profiles behind the goals that `make bench` reports as missed; not part of `make bench` (profiling slows
what it watches).

* ``spark-preprocess``: the preprocess job with Spark's Python worker profiler on (``spark.python.profile``),
  merged over all workers: where the executors' Python time goes.
* ``augment``: ``covid_spark.training.tfdata.augment_batch`` (one composed resampling) against Keras's random
  preprocessing layers (one resampling each), layer by layer, on one intra-op thread as a rank has.
"""
from __future__ import annotations

import argparse
import glob
import io
import logging
import os
import pstats
import shutil
import sys
import tempfile
import time
import timeit

from bench.harness import DATA, SCRATCH, local_settings, start_spark


def _stats_text(stats: pstats.Stats, sort: str, limit: int) -> str:
    stream = io.StringIO()
    stats.stream = stream
    stats.sort_stats(sort).print_stats(limit)
    return "\n".join(line for line in stream.getvalue().splitlines() if ".pstats" not in line) + "\n"


def profile_spark_preprocess(source: str, images: int, workdir: str, limit: int = 25) -> str:
    """Run the preprocess job once with the Python worker profiler; the merged top functions."""
    from bench.inputs import sized_input
    from covid_spark.config import load_config
    from covid_spark.stages.preprocess import preprocess

    location = sized_input(source, os.path.join(workdir, f"input-{images}"), images)
    spark = start_spark("local[2]", dict(local_settings("local[2]"), **{"spark.python.profile": "true"}),
                        "covid-spark profile")
    try:
        started = time.perf_counter()
        preprocess(spark, location, os.path.join(workdir, "dataset"), load_config(), overwrite=True)
        wall = time.perf_counter() - started
        dump = os.path.join(workdir, "profiles")
        spark.sparkContext.dump_profiles(dump)
    finally:
        spark.stop()
    files = sorted(glob.glob(os.path.join(dump, "*.pstats")))
    stats = pstats.Stats(files[0], stream=io.StringIO())
    for path in files[1:]:
        stats.add(path)
    header = (f"preprocess of {images} images in {wall:.1f} s with the worker profiler on; "
              f"{len(files)} profiled RDD(s); Python worker time, all workers summed\n")
    return header + _stats_text(stats, "tottime", limit) + _stats_text(stats, "cumulative", limit)


def profile_augment(batch_size: int = 32, size: int | None = None, repeats: int = 5) -> str:
    """Milliseconds per image (best of ``repeats``, one intra-op thread) of ``augment_batch`` (one composed
    resampling) and of Keras's random rotation, translation and zoom layers (one resampling each), layer by
    layer; ``size`` defaults to ``preprocess.image_size``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    from tensorflow.keras import layers

    from covid_spark.config import default_config
    from covid_spark.training.tfdata import augment_batch

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    config = default_config()
    aug, size = config["train"]["augment"], size or int(config["preprocess"]["image_size"])
    stack = tf.keras.Sequential(
        ([layers.RandomRotation(float(aug["rotation_deg"]) / 360.0, fill_mode="constant", seed=1)]
         if aug.get("rotation_deg") else []) +
        ([layers.RandomTranslation(aug["shift"], aug["shift"], fill_mode="constant", seed=2)] if aug.get("shift")
         else []) +
        ([layers.RandomZoom((-aug["zoom"], aug["zoom"]), fill_mode="constant", seed=3)] if aug.get("zoom") else []))
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch_size, size, size, 3)), tf.float32)

    def best_ms(fn) -> float:
        fn(images)  # trace / warm up
        return 1000 * min(timeit.repeat(lambda: fn(images).numpy(), number=1, repeat=repeats)) / batch_size

    lines = [f"augmentation of a {batch_size}×{size}×{size}×3 float batch, 1 intra-op thread (ms per image, best of "
             f"{repeats}), config {aug}"]
    for layer in stack.layers:
        lines.append(f"  Keras: {layer.name:<20} {best_ms(tf.function(lambda x, la=layer: la(x, training=True))):6.2f}")
    whole = best_ms(tf.function(lambda x: tf.clip_by_value(stack(x, training=True), 0.0, 255.0)))
    now = best_ms(tf.function(lambda x: augment_batch(x, tf.constant([0, 0], tf.int64), aug)))
    lines += [f"  Keras: {'whole stack + clip':<20} {whole:6.2f}  → {1000 / whole:.0f} images/s",
              f"  {'augment_batch':<27} {now:6.2f}  → {1000 / now:.0f} images/s ({whole / now:.1f}× faster)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Profiles of the stages that miss a benchmark goal.")
    parser.add_argument("what", nargs="*", help="spark-preprocess and/or augment (default: both)")
    parser.add_argument("--input", default=os.path.join(DATA, "cxr3"))
    parser.add_argument("--images", type=int, default=671, help="images for the Spark profile")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.what) - {"spark-preprocess", "augment"})
    if unknown:
        parser.error(f"unknown profile(s) {', '.join(unknown)}; choose spark-preprocess and/or augment")
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(SCRATCH, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="profile-", dir=SCRATCH)
    try:
        for what in args.what or ["spark-preprocess", "augment"]:
            if what == "spark-preprocess":
                print(profile_spark_preprocess(args.input, args.images, workdir))
            elif what == "augment":
                print(profile_augment())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
