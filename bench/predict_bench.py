"""The Spark predict job against one plain process running the same decode and model (`python -m bench.run --xl
--parts predict`; docs/performance.md, "Real data at scale", 4)."""
from __future__ import annotations

import os
import tempfile
import time

from bench.harness import in_process, ratio, read_json, start_spark, timed
from bench.monitors import CpuUse, PeakRss, maxrss_mb


def save_untrained(model: str, image_size: int, model_dir: str) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from covid_spark.constants import CLASSES
    from covid_spark.data.rundir import RunDir, versions
    from covid_spark.data.storage import atomic_write_json
    from covid_spark.models.registry import make_model

    net = make_model(model, input_shape=(image_size, image_size, 3), num_classes=len(CLASSES))
    net.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    os.makedirs(model_dir, exist_ok=True)
    run_dir = RunDir(model_dir)
    tmp = os.path.join(model_dir, f".{os.path.basename(run_dir.model)}.tmp.keras")
    net.save(tmp)
    os.replace(tmp, run_dir.model)
    atomic_write_json(run_dir.run_json, {
        "model": model, "num_proc": 0, "classes": list(CLASSES), "image_size": image_size, "epochs": 0,
        "epochs_run": 0, "best_epoch": None, "untrained": True, "versions": versions(),
        "note": "untrained (fresh head; ImageNet weights where the model has them): for throughput only"})
    return {"parameters": int(net.count_params())}


def untrained_model_dir(model: str, image_size: int, model_dir: str) -> dict:
    """A model dir as training leaves one, with an untrained ``model``, made in a spawned process."""
    return dict(in_process(save_untrained, model, image_size, model_dir, timeout=600), model=model, model_dir=model_dir)


def plain_predict(folder: str, model_dir: str, batch_size: int) -> dict:
    """The plain process: everything but decoding and scoring happens before the clock."""
    from covid_spark.config import load_config
    from covid_spark.data.rundir import RunDir
    from covid_spark.inputs.sources import discover
    from covid_spark.stages.predict import prediction_records
    from covid_spark.stages.predict_tasks import cached_model, predict_partition, set_tf_threads

    max_pixels = int(load_config()["preprocess"]["max_pixels"])
    size = int(read_json(RunDir(model_dir).run_json)["image_size"])
    with open(RunDir(model_dir).model, "rb") as handle:
        model_bytes = handle.read()
    records = prediction_records(discover(folder, labelled=False))
    set_tf_threads(1)
    load_s, _ = timed(cached_model, model_bytes)
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = sum(1 for _ in predict_partition(records, model_bytes, size, max_pixels, batch_size, threads=1))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"images": rows, "seconds": round(seconds, 2), "images_per_s": round(rows / seconds, 2),
               "cpu_s": round(cpu, 2), "core_ms_per_image": round(1000 * cpu / rows, 2),
               "model_load_s": round(load_s, 2), "peak_rss_mb": maxrss_mb()}


def bench_predict(inputs: str, model_dir: str, master: str = "local[2]", batch_size: int = 32) -> dict:
    """Spark predict's images/s and core-ms per image against one plain process's, both reading one folder of
    symlinks to ``inputs`` (a folder or manifest)."""
    from covid_spark.config import load_config
    from covid_spark.inputs.sources import discover
    from covid_spark.stages.predict import predict

    session = {"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false", "spark.driver.memory": "2g"}
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        folder = os.path.join(tmp, "inputs")
        os.makedirs(folder)
        paths = sorted(r.path for r in discover(inputs, labelled=False).records)
        for i, path in enumerate(paths):
            os.symlink(os.path.abspath(path), os.path.join(folder, f"{i:05d}-{os.path.basename(path)}"))
        n = len(paths)
        result = {"images": n, "master": master, "batch_size": batch_size, "loadavg_before": os.getloadavg()}
        result["plain"] = in_process(plain_predict, folder, model_dir, batch_size)
        with start_spark(master, session, "predict bench") as spark, PeakRss(interval=0.2) as rss, CpuUse() as cpu:
            seconds, run = timed(predict, spark, folder, model_dir, os.path.join(tmp, "predictions.csv"),
                                 load_config(), batch_size=batch_size)
            parallelism = spark.sparkContext.defaultParallelism
    core_ms = round(1000 * cpu.result["ours_core_s"]["total"] / n, 2)
    result.update(
        spark={"seconds": round(seconds, 2), "images_per_s": round(n / seconds, 2), "partitions": run["partitions"],
               "rows": run["rows"], "errors": run["errors"], "core_ms_per_image": core_ms},
        peak_rss_mb={k: rss.peaks[k] for k in ("driver", "jvm", "spark_python_workers", "tree")}, cpu=cpu.result,
        parallelism=parallelism, ideal_images_per_s=round(parallelism * result["plain"]["images_per_s"], 2),
        cpu_ratio=ratio(result["plain"]["core_ms_per_image"], core_ms), loadavg_after=os.getloadavg())
    result["ratio"] = ratio(result["spark"]["images_per_s"], result["ideal_images_per_s"])
    return result

