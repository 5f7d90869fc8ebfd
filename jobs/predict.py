"""spark-submit jobs/predict.py --input DIR_OR_MANIFEST [--input ...] --model-dir DIR --output FILE.csv|FILE.parquet [--overwrite]
spark-submit jobs/predict.py --watch DIR --model-dir DIR --output OUT_DIR [--once] [--trigger-seconds 10] [--checkpoint DIR]"""
from __future__ import annotations

import argparse
import os
import sys

from covid_spark.cli import add_overwrite_arg, add_spark_args, build_spark, job_main, setup_logging
from covid_spark.config import load_config, override
from covid_spark.constants import INFERENCE_BATCH_SIZE
from covid_spark.errors import InputError
from covid_spark.stages.predict import predict
from covid_spark.stages.watch import WatchOptions, watch


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batch prediction over new images on Spark.")
    parser.add_argument("--input", action="append",
                        help="flat folder, folder per class, or manifest CSV; repeat to read several")
    parser.add_argument("--watch", metavar="DIR",
                        help="instead of --input: a Structured Streaming query that scores each file arriving in DIR "
                             "(recursively) once, across restarts; --output is then a folder of one file per "
                             "micro-batch")
    parser.add_argument("--model-dir", required=True, help="model dir written by jobs/train.py")
    parser.add_argument("--output", required=True, help="FILE.csv or FILE.parquet: one row per input file "
                                                        "(with --watch: a folder)")
    parser.add_argument("--checkpoint", help="with --watch: the query's checkpoint folder (default OUTPUT/_checkpoint); "
                                             "keep it to resume where the query stopped")
    parser.add_argument("--trigger-seconds", type=float, default=10.0,
                        help="with --watch: look for new files this often (default 10)")
    parser.add_argument("--once", action="store_true",
                        help="with --watch: score every file not scored yet, in micro-batches, then stop "
                             "(available-now; for cron or Airflow)")
    parser.add_argument("--max-files-per-batch", type=int, default=1000, help="with --watch: files per micro-batch")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet",
                        help="with --watch: the micro-batch files' format")
    parser.add_argument("--batch-size", type=int, default=INFERENCE_BATCH_SIZE, help="images scored at once")
    parser.add_argument("--explain", metavar="DIR",
                        help="also write one Grad-CAM overlay PNG per readable image into DIR "
                             "(a path every executor can write)")
    parser.add_argument("--views", help="score only these views, e.g. PA,AP (others get a row with the reason "
                                         "in error); unknown views are scored unless -unknown is listed")
    add_overwrite_arg(parser)
    # Refusing is the default now (as in every job); the old flag is accepted and does nothing.
    parser.add_argument("--no-overwrite", action="store_true", help=argparse.SUPPRESS)
    add_spark_args(parser)
    args = parser.parse_args(argv)
    if bool(args.watch) == bool(args.input):
        parser.error("give either --input (score these files once) or --watch DIR (score what arrives)")
    return args


@job_main("predict")
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    config = override(load_config(args.config, sets=args.set), "preprocess", {"views": args.views})
    if args.watch:
        return _watch(args, config)
    spark, owned = build_spark(args, "covid-spark predict")
    try:
        result = predict(spark, args.input, args.model_dir, args.output, config,
                         batch_size=args.batch_size, overwrite=args.overwrite and not args.no_overwrite,
                         explain_dir=args.explain)
    finally:
        if owned:
            spark.stop()
    print(f"predict: {result['inputs']} files → {result['predicted']} predicted, "
          f"{result['errors']} error(s), {result['seconds']:.0f} s → {result['output']}"
          + (f"; Grad-CAM overlays in {result['explain_dir']}" if result["explain_dir"] else ""))
    return 0


def _watch(args, config) -> int:
    if args.explain or args.overwrite:
        raise InputError("--explain and --overwrite are not available with --watch")
    options = WatchOptions(checkpoint=args.checkpoint or os.path.join(args.output, "_checkpoint"),
                           trigger_seconds=args.trigger_seconds, once=args.once,
                           max_files=args.max_files_per_batch, batch_size=args.batch_size,
                           output_format=args.format)
    spark, owned = build_spark(args, "covid-spark predict --watch")
    try:
        result = watch(spark, args.watch, args.model_dir, args.output, config, options)
    finally:
        if owned:
            spark.stop()
    print(f"predict --watch: {result['batches']} micro-batch(es), {result['files']} files → {result['predicted']} "
          f"predicted, {result['errors']} error(s) → {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
