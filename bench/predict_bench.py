"""python -m bench.predict_bench --input DIR_OR_MANIFEST [--input ...] [--model-dir DIR] [--images N]

Batch-prediction throughput: the Spark job (``covid_spark.stages.predict.predict`` on ``--master``,
local[2] by default) against one plain Python process running the same decode and model
(``predict_partition``: batches of 32, one intra-op and one inter-op TensorFlow thread). The
goal (issue 13) is Spark at least 0.8 x (cores x the plain rate).

The plain process is a subprocess whose imports and model load happen before its clock starts,
so its rate is the steady state. The Spark time is the whole ``predict`` call on a session that
is already up: listing the inputs, Python workers starting and importing TensorFlow, one model
load per worker, scoring, and the driver writing the CSV. ``--profile`` adds one more Spark run
that reports where each partition's time went.

Without ``--model-dir`` a model dir is made from ``make_model`` (the ImageNet-pretrained
EfficientNet-Lite0 with an untrained head: the same work per image as a trained one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model_dir(folder: str, model: str = "efficientnet_lite0", image_size: int | None = None) -> str:
    """A model dir as train.py leaves it (``model.keras`` and ``run.json``), with an untrained head;
    ``image_size`` defaults to the library's ``DEFAULT_IMAGE_SIZE``."""
    from covid_spark.constants import CLASSES, DEFAULT_IMAGE_SIZE
    from covid_spark.models.registry import make_model
    from covid_spark.data.rundir import RunDir

    image_size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    os.makedirs(folder, exist_ok=True)
    make_model(model, (image_size, image_size, 3), len(CLASSES)).save(RunDir(folder).model)
    with open(RunDir(folder).run_json, "w", encoding="utf-8") as handle:
        json.dump({"model": model, "image_size": image_size, "classes": list(CLASSES)}, handle)
    return folder


def subset_folder(inputs, folder: str, n_images: int | None) -> tuple[str, int]:
    """A flat folder of symlinks to ``n_images`` readable inputs spread evenly over their path order
    (all of them when ``None``); returns the folder and the number of links. Nothing is copied."""
    from covid_spark.inputs.sources import discover

    paths = sorted(r["path"] for r in discover(inputs, labelled=False).records)
    if n_images is not None and n_images < len(paths):
        step = len(paths) / n_images
        paths = [paths[int(i * step)] for i in range(n_images)]
    os.makedirs(folder, exist_ok=True)
    for i, path in enumerate(paths):
        os.symlink(os.path.abspath(path), os.path.join(folder, f"{i:05d}-{os.path.basename(path)}"))
    return folder, len(paths)


def plain_rate(folder: str, model_dir: str, batch_size: int = 32) -> dict:
    """Images per second of one plain process over ``folder`` (run by ``python -m bench.predict_bench --plain``)."""
    out = subprocess.run([sys.executable, "-m", "bench.predict_bench", "--plain", folder, model_dir,
                          "--batch-size", str(batch_size)], cwd=REPO, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"plain predict process failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plain_main(folder: str, model_dir: str, batch_size: int) -> dict:
    """Body of the plain process: everything but decoding and scoring happens before the clock."""
    import resource

    from covid_spark.config import load_config
    from covid_spark.stages.predict import prediction_records
    from covid_spark.stages.predict_tasks import cached_model, predict_partition, set_tf_threads
    from covid_spark.data.rundir import RunDir
    from covid_spark.inputs.sources import discover

    config = load_config()
    with open(RunDir(model_dir).run_json, encoding="utf-8") as handle:
        size = int(json.load(handle)["image_size"])
    with open(RunDir(model_dir).model, "rb") as handle:
        model_bytes = handle.read()
    inventory = discover(folder, labelled=False)
    records = prediction_records(inventory)
    set_tf_threads(1)
    load_started = time.perf_counter()
    cached_model(model_bytes)
    load_s = time.perf_counter() - load_started
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = sum(1 for _ in predict_partition(records, model_bytes, size, int(config["preprocess"]["max_pixels"]),
                                            batch_size, threads=1))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"images": rows, "seconds": round(seconds, 2), "images_per_s": round(rows / seconds, 2),
            "cpu_s": round(cpu, 2), "core_ms_per_image": round(1000 * cpu / rows, 2), "model_load_s": round(load_s, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def profile_partitions(spark, folder: str, model_dir: str, batch_size: int = 32) -> list[dict]:
    """Run predict's partitions once more, timing each: the worker's TensorFlow import, the model
    load, decoding + scoring, and whether the worker process had run an earlier partition."""
    from covid_spark.config import load_config
    from covid_spark.stages.predict import partition_count
    from covid_spark.data.rundir import RunDir
    from covid_spark.inputs.sources import discover

    with open(RunDir(model_dir).run_json, encoding="utf-8") as handle:
        size = int(json.load(handle)["image_size"])
    with open(RunDir(model_dir).model, "rb") as handle:
        model_bytes = handle.read()
    records = sorted((r["path"], None) for r in discover(folder, labelled=False).records)
    max_pixels = int(load_config()["preprocess"]["max_pixels"])
    sc = spark.sparkContext
    model_bc = sc.broadcast(model_bytes)

    def timed(index, part):
        import sys as _sys

        t0 = time.perf_counter()
        reused = "tensorflow" in _sys.modules
        import tensorflow  # noqa: F401

        from covid_spark.stages import predict_tasks as P

        t1 = time.perf_counter()
        P.set_tf_threads(1)
        cached = bool(P._MODEL_CACHE)
        P.cached_model(model_bc.value)
        t2 = time.perf_counter()
        rows = sum(1 for _ in P.predict_partition(part, model_bc.value, size, max_pixels, batch_size, 1))
        t3 = time.perf_counter()
        yield {"partition": index, "pid": os.getpid(), "rows": rows, "worker_reused": reused, "model_cached": cached,
               "import_tf_s": round(t1 - t0, 2), "model_load_s": round(t2 - t1, 2), "score_s": round(t3 - t2, 2),
               "images_per_s": round(rows / (t3 - t2), 2) if t3 > t2 else None}

    slices = partition_count(len(records), sc.defaultParallelism)
    try:
        return sc.parallelize(records, slices).mapPartitionsWithIndex(timed).collect()
    finally:
        model_bc.unpersist()


def _session(master: str):
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(master).appName("predict bench")
             .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
             .config("spark.driver.memory", "2g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def bench_predict(input_dir_or_list, model_dir: str, n_images: int | None = None, master: str = "local[2]",
                  batch_size: int = 32, profile: bool = False, output_format: str = "csv") -> dict:
    """Spark predict's images/s against one plain process's, and the driver's peak memory.

    Returns ``images``, ``spark`` (seconds, images/s, partitions, result), ``plain`` (the subprocess's
    numbers), ``parallelism``, ``ideal_images_per_s`` (parallelism x plain), ``ratio`` (Spark over
    ideal: the issue's goal is >= 0.8 on local[2]), ``cpu_ratio`` (the plain process's core-ms per image
    over Spark's, driver, JVM and workers together: the same comparison, less moved by other users
    of a shared machine), ``peak_rss_mb`` (driver, JVM, Spark's Python
    workers), ``cpu`` (core-seconds by us and by other users of the machine during the Spark run),
    ``loadavg`` before and after, and with ``profile`` a per-partition time breakdown (from a second
    run on a fresh session, so that it too pays the Python workers' cold start).
    """
    from bench.memory import CpuUse, PeakRss
    from covid_spark.config import load_config
    from covid_spark.stages.predict import predict

    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        folder, n = subset_folder(input_dir_or_list, os.path.join(tmp, "inputs"), n_images)
        result = {"images": n, "master": master, "batch_size": batch_size, "loadavg_before": os.getloadavg()}
        result["plain"] = plain_rate(folder, model_dir, batch_size)
        spark = _session(master)
        try:
            output = os.path.join(tmp, f"predictions.{output_format}")
            with PeakRss(interval=0.2) as rss, CpuUse() as cpu:
                started = time.perf_counter()
                run = predict(spark, folder, model_dir, output, load_config(), batch_size=batch_size)
                seconds = time.perf_counter() - started
            parallelism = spark.sparkContext.defaultParallelism
            result["spark"] = {"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2),
                               "partitions": run["partitions"], "rows": run["rows"], "errors": run["errors"]}
            result["peak_rss_mb"] = {k: rss.peaks[k] for k in ("driver", "jvm", "spark_python_workers", "tree")}
            result["cpu"] = cpu.result
        finally:
            spark.stop()
        if profile:  # on a new session, so its Python workers start cold as predict's did
            spark = _session(master)
            try:
                result["profile"] = profile_partitions(spark, folder, model_dir, batch_size)
            finally:
                spark.stop()
    result["parallelism"] = parallelism
    result["ideal_images_per_s"] = round(parallelism * result["plain"]["images_per_s"], 2)
    result["ratio"] = round(result["spark"]["images_per_s"] / result["ideal_images_per_s"], 3)
    # On a shared machine other users' load moves wall-clock rates; core time per image does not move as much.
    result["spark"]["core_ms_per_image"] = round(1000 * result["cpu"]["ours_core_s"]["total"] / n, 2)
    result["cpu_ratio"] = round(result["plain"]["core_ms_per_image"] / result["spark"]["core_ms_per_image"], 3)
    result["loadavg_after"] = os.getloadavg()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Spark predict throughput against one plain process.")
    parser.add_argument("--input", action="append", help="folder or manifest, repeatable")
    parser.add_argument("--model-dir", help="default: an untrained-head model of --model in a temp dir")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--images", type=int, default=1000, help="inputs spread over the listing (0: all)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="also time each partition's phases")
    parser.add_argument("--output", help="also write the result JSON here")
    parser.add_argument("--plain", nargs=2, metavar=("FOLDER", "MODEL_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--make-model-dir", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make_model_dir:
        make_model_dir(args.make_model_dir, args.model)
        return 0
    if args.plain:
        print(json.dumps(_plain_main(args.plain[0], args.plain[1], args.batch_size)))
        return 0
    if not args.input:
        parser.error("--input is required")
    with tempfile.TemporaryDirectory(prefix="predict-bench-model-") as tmp:
        model_dir = args.model_dir
        if not model_dir:  # in a subprocess, so TensorFlow never loads into this driver
            model_dir = os.path.join(tmp, "model")
            subprocess.run([sys.executable, "-m", "bench.predict_bench", "--make-model-dir", model_dir,
                            "--model", args.model], cwd=REPO, check=True)
        result = bench_predict(args.input if len(args.input) > 1 else args.input[0], model_dir,
                               args.images or None, args.master, args.batch_size, args.profile)
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    print(f"\npredict on {result['master']}, {result['images']} images: "
          f"Spark {result['spark']['images_per_s']:.1f}/s, plain 1 process {result['plain']['images_per_s']:.1f}/s, "
          f"ratio to {result['parallelism']} x plain {result['ratio']:.2f} (core time per image: "
          f"{result['cpu_ratio']:.2f}); driver peak RSS {result['peak_rss_mb']['driver']:.0f} MB; "
          f"other users' share of the machine {result['cpu']['others_share']:.0%}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
