"""python -m bench.grow_bench --input ../shared/data/cxr-xl --out runs/grow-bench [--fraction 0.01]: a growing
collection, appending against a full preprocess and streaming against batch predict, in one SparkSession
(docs/performance.md, "A growing collection")."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

from bench.harness import CXR_XL, arguments, loadavg, save, start_spark, timed
from bench.inputs import manifest_rows, write_manifest
from bench.monitors import PeakRss

logger = logging.getLogger("bench")


def bench_append(spark, args, config) -> dict:
    """Appending a seeded ``args.fraction`` of the collection to a dataset of the rest, against a full preprocess."""
    import numpy as np

    from covid_spark.config import override
    from covid_spark.stages.append import append
    from covid_spark.stages.preprocess import preprocess

    rows = manifest_rows(args.input, absolute=True)
    held = set(np.random.default_rng(args.seed).choice(len(rows), max(1, round(len(rows) * args.fraction)),
                                                       replace=False).tolist())
    # named as the collection's folder, so that its images keep the same default source
    folder = os.path.join(args.out, "inputs", os.path.basename(os.path.abspath(args.input)))
    write_manifest(folder, [r for i, r in enumerate(rows) if i not in held], list(rows[0]))  # all but the held back
    warm = write_manifest(os.path.join(args.out, "inputs", "warm"), rows[:64], list(rows[0]))
    tiny = override(config, "preprocess", {"min_row_groups": 1})
    preprocess(spark, warm, os.path.join(args.out, "warm-dataset"), tiny)
    base_s, base = timed(preprocess, spark, folder, os.path.join(args.out, "dataset"), config)
    write_manifest(folder, rows, list(rows[0]))  # the 1 % arrives
    append_s, grown = timed(append, spark, os.path.join(args.out, "dataset"), config)
    full_s, full = timed(preprocess, spark, folder, os.path.join(args.out, "full"), config)
    last = grown["increments"][-1]
    return {"images": len(rows), "appended": len(held), "base_rows": base["written"], "base_s": round(base_s, 2),
            "append_s": round(append_s, 2), "full_s": round(full_s, 2), "ratio": round(append_s / full_s, 3),
            "append_added": last["added"], "rows_equal": grown["written"] == full["written"],
            "per_class_equal": grown["per_class"] == full["per_class"],
            "split_fractions": {s: round(n / grown["written"], 4) for s, n in grown["per_split"].items()},
            "added_per_split": last["added_per_split"], "full_phase_s": full.get("phase_seconds")}


def bench_stream(spark, args, config) -> dict:
    from bench.predict_bench import untrained_model_dir
    from covid_spark.stages.predict import predict
    from covid_spark.stages.watch import WatchOptions, watch

    rows = manifest_rows(args.input, args.stream_files)
    incoming = os.path.join(args.out, "incoming")
    for i, row in enumerate(rows):
        target = os.path.join(incoming, f"{i // 500:03d}", os.path.basename(row["path"]))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(args.input, row["path"]), target)
    model = args.model_dir or untrained_model_dir(args.model, int(config["preprocess"]["image_size"]),
                                                  os.path.join(args.out, "model"))["model_dir"]
    predict(spark, incoming, model, os.path.join(args.out, "batch-warm.parquet"), config)
    batch_s, _ = timed(predict, spark, incoming, model, os.path.join(args.out, "batch.parquet"), config)
    options = WatchOptions(checkpoint=os.path.join(args.out, "scored", "_checkpoint"), once=True,
                           max_files=-(-len(rows) // args.batches))
    with PeakRss(interval=0.25) as memory:
        stream_s, result = timed(watch, spark, incoming, model, os.path.join(args.out, "scored"), config, options)
    per_batch = result["per_batch"]
    warm = per_batch[1:]
    stream_rate = sum(b["files"] for b in warm) / sum(b["seconds"] for b in warm)
    return {"files": len(rows), "batch_predict_s": round(batch_s, 2), "batch_rate": round(len(rows) / batch_s, 1),
            "stream_s": round(stream_s, 2), "micro_batches": len(per_batch), "stream_rate_warm": round(stream_rate, 1),
            "stream_to_batch": round(stream_rate / (len(rows) / batch_s), 3),
            "batch_seconds": [b["seconds"] for b in per_batch], "driver_rss_mib": [b["rss_mb"] for b in per_batch],
            "tree_rss_mib": [memory.at(b["ended"]) for b in per_batch], "rows": result["files"],
            "errors": result["errors"]}


def main(argv=None) -> int:
    from covid_spark.cli import setup_logging
    from covid_spark.config import load_config

    parser = arguments(__doc__, input=CXR_XL, master="local[2]", config=None, model="compact",
                       out=(f"runs/grow-bench-{time.strftime('%Y%m%d-%H%M%S')}", "folder for grow_bench.json and data"),
                       fraction=(0.01, "share of the collection appended"), seed=(0, "random seed"),
                       stream_files=(2000, "files streamed"), batches=(20, "micro-batches they arrive in"),
                       model_dir=(None, "a trained model dir (default: an untrained --model, same cost)"))
    parser.add_argument("--skip", choices=("append", "stream"), action="append", default=[])
    args = parser.parse_args(argv)
    setup_logging("bench")
    config = load_config(args.config)
    os.makedirs(args.out, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": vars(args),
              "load_average_at_start": loadavg()}
    with start_spark(args.master, {"spark.ui.enabled": "false", "spark.driver.memory": "4g"}, "grow bench") as spark:
        for part, bench in (("append", bench_append), ("stream", bench_stream)):
            if part not in args.skip:
                report[part] = bench(spark, args, config)
                logger.info("%s: %s", part, json.dumps(report[part]))
    report["load_average_at_end"] = loadavg()
    save(report, os.path.join(args.out, "grow_bench.json"))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
