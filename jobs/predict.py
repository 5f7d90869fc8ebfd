"""spark-submit jobs/predict.py --input DIR_OR_MANIFEST [--input ...] --model-dir DIR --output FILE.csv|FILE.parquet [--overwrite]"""
from __future__ import annotations

import argparse
import sys

from covid_spark.cli import add_overwrite_arg, add_spark_args, build_spark, job_main, setup_logging
from covid_spark.config import load_config, override
from covid_spark.constants import INFERENCE_BATCH_SIZE
from covid_spark.stages.predict import predict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Batch prediction over new images on Spark.")
    parser.add_argument("--input", action="append", required=True,
                        help="flat folder, folder per class, or manifest CSV; repeat to read several")
    parser.add_argument("--model-dir", required=True, help="model dir written by jobs/train.py")
    parser.add_argument("--output", required=True, help="FILE.csv or FILE.parquet: one row per input file")
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
    return parser.parse_args(argv)


@job_main("predict")
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    config = override(load_config(args.config, sets=args.set), "preprocess", {"views": args.views})
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


if __name__ == "__main__":
    sys.exit(main())
