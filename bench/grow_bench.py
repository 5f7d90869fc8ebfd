"""python -m bench.grow_bench: the goals of a growing collection, measured in one run (one SparkSession).

1. Appending: the collection minus a seeded 1 % is preprocessed (the existing dataset), then the 1 % is
   appended (``stages.append.append``), then the whole collection is preprocessed from scratch
   (``stages.preprocess.preprocess``), the alternative the append replaces: ratio = append / full wall time,
   both in the same warm session (a tiny preprocess first starts the Python workers).
2. Streaming: ``--stream-files`` images copied into a folder are scored by batch predict twice (the second,
   warm, is the rate) and by ``stages.watch.watch`` with ``once`` in ``--batches`` micro-batches; the
   streaming rate leaves out the first micro-batch (the model's load); the memory of the whole process
   tree (driver, JVM, Python workers) is sampled after each micro-batch.

    python -m bench.grow_bench --input ../shared/data/cxr-xl --out runs/grow-bench [--fraction 0.01]
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import threading
import time

logger = logging.getLogger("bench")


def split_manifest(source: str, out: str, fraction: float, seed: int) -> tuple[str, list[dict], list[dict]]:
    """A folder whose manifest lists the collection minus ``fraction`` (absolute paths); the rows kept and held back."""
    import numpy as np

    with open(os.path.join(source, "manifest.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = os.path.join(os.path.abspath(source), row["path"])
    held = set(np.random.default_rng(seed).choice(len(rows), max(1, round(len(rows) * fraction)), replace=False).tolist())
    folder = os.path.join(out, os.path.basename(os.path.abspath(source)))  # same folder name: same default source
    os.makedirs(folder, exist_ok=True)
    write_manifest(folder, [r for i, r in enumerate(rows) if i not in held])
    return folder, rows, [r for i, r in enumerate(rows) if i in held]


def write_manifest(folder: str, rows: list[dict]) -> None:
    with open(os.path.join(folder, "manifest.csv"), "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


class TreeMemory(threading.Thread):
    """Samples the resident memory of this process and all its descendants every 0.25 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.done.is_set():
            total = 0
            for proc in [me] + me.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append((time.time(), total / 2**20))
            time.sleep(0.25)

    def at(self, moment: float) -> float:
        before = [mib for when, mib in self.samples if when <= moment]
        return round(before[-1] if before else float("nan"), 1)


def bench_append(spark, args, config) -> dict:
    from covid_spark.config import override
    from covid_spark.stages.append import append
    from covid_spark.stages.preprocess import preprocess

    folder, rows, held = split_manifest(args.input, os.path.join(args.out, "inputs"), args.fraction, args.seed)
    warm = os.path.join(args.out, "inputs", "warm")
    os.makedirs(warm, exist_ok=True)
    write_manifest(warm, rows[:64])
    preprocess(spark, warm, os.path.join(args.out, "warm-dataset"), override(config, "preprocess", {"min_row_groups": 1}))
    base_s, base = timed(preprocess, spark, folder, os.path.join(args.out, "dataset"), config)
    write_manifest(folder, rows)  # the 1 % arrives
    append_s, grown = timed(append, spark, os.path.join(args.out, "dataset"), config)
    full_s, full = timed(preprocess, spark, folder, os.path.join(args.out, "full"), config)
    last = grown["increments"][-1]
    return {"images": len(rows), "appended": len(held), "base_rows": base["written"], "base_s": round(base_s, 2),
            "append_s": round(append_s, 2), "full_s": round(full_s, 2), "ratio": round(append_s / full_s, 3),
            "append_added": last["added"], "rows_equal": grown["written"] == full["written"],
            "per_class_equal": grown["per_class"] == full["per_class"],
            "split_fractions": {s: round(n / grown["written"], 4) for s, n in grown["per_split"].items()},
            "added_per_split": last["added_per_split"], "full_phase_s": full.get("phase_seconds")}


def model_dir_for(args, size: int) -> str:
    if args.model_dir:
        return args.model_dir
    from covid_spark.data.rundir import RunDir
    from covid_spark.models.registry import make_model

    folder = os.path.join(args.out, "model")
    os.makedirs(folder, exist_ok=True)
    make_model(args.model, (size, size, 3)).save(RunDir(folder).model)
    with open(RunDir(folder).run_json, "w") as handle:
        json.dump({"model": args.model, "image_size": size, "classes": ["covid", "normal", "pneumonia"]}, handle)
    return folder


def bench_stream(spark, args, config) -> dict:
    from covid_spark.stages.predict import predict
    from covid_spark.stages.watch import WatchOptions, watch

    with open(os.path.join(args.input, "manifest.csv"), newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[: args.stream_files]
    incoming = os.path.join(args.out, "incoming")
    for i, row in enumerate(rows):
        target = os.path.join(incoming, f"{i // 500:03d}", os.path.basename(row["path"]))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(args.input, row["path"]), target)
    model = model_dir_for(args, config["preprocess"]["image_size"])
    predict(spark, incoming, model, os.path.join(args.out, "batch-warm.parquet"), config)
    batch_s, _ = timed(predict, spark, incoming, model, os.path.join(args.out, "batch.parquet"), config)
    memory = TreeMemory()
    memory.start()
    options = WatchOptions(checkpoint=os.path.join(args.out, "scored", "_checkpoint"), once=True,
                           max_files=-(-len(rows) // args.batches))
    stream_s, result = timed(watch, spark, incoming, model, os.path.join(args.out, "scored"), config, options)
    memory.done.set()
    per_batch = result["per_batch"]
    warm = per_batch[1:]
    stream_rate = sum(b["files"] for b in warm) / sum(b["seconds"] for b in warm)
    tree = [memory.at(b["ended"]) for b in per_batch]
    return {"files": len(rows), "batch_predict_s": round(batch_s, 2), "batch_rate": round(len(rows) / batch_s, 1),
            "stream_s": round(stream_s, 2), "micro_batches": len(per_batch), "stream_rate_warm": round(stream_rate, 1),
            "stream_to_batch": round(stream_rate / (len(rows) / batch_s), 3),
            "batch_seconds": [b["seconds"] for b in per_batch], "driver_rss_mib": [b["rss_mb"] for b in per_batch],
            "tree_rss_mib": tree, "rows": result["files"], "errors": result["errors"]}


def main(argv=None) -> int:
    from pyspark.sql import SparkSession

    from covid_spark.cli import setup_logging
    from covid_spark.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="../shared/data/cxr-xl", help="a folder with manifest.csv")
    parser.add_argument("--out", default=f"runs/grow-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--config", help="job config (e.g. conf/xl.yaml)")
    parser.add_argument("--stream-files", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--model", default="compact")
    parser.add_argument("--model-dir", help="a trained model dir (default: an untrained --model, same cost)")
    parser.add_argument("--skip", choices=("append", "stream"), action="append", default=[])
    args = parser.parse_args(argv)
    setup_logging("bench")
    config = load_config(args.config)
    os.makedirs(args.out, exist_ok=True)
    spark = (SparkSession.builder.master(args.master).appName("grow bench").config("spark.ui.enabled", "false")
             .config("spark.driver.memory", "4g").getOrCreate())
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args),
              "load_average_at_start": os.getloadavg()}
    try:
        if "append" not in args.skip:
            report["append"] = bench_append(spark, args, config)
            logger.info("append: %s", json.dumps(report["append"]))
        if "stream" not in args.skip:
            report["stream"] = bench_stream(spark, args, config)
            logger.info("stream: %s", json.dumps(report["stream"]))
    finally:
        spark.stop()
    report["load_average_at_end"] = os.getloadavg()
    with open(os.path.join(args.out, "grow_bench.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
