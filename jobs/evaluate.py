"""spark-submit jobs/evaluate.py --dataset URL --model-dir DIR [--split test] [--output FILE] [--overwrite]"""
from __future__ import annotations

import argparse
import sys

from covid_spark.cli import add_overwrite_arg, add_spark_args, build_spark, job_main, setup_logging
from covid_spark.config import load_config
from covid_spark.constants import EVALUATION_SPLIT
from covid_spark.data.rundir import RunDir
from covid_spark.evaluation.metrics import format_table
from covid_spark.stages.evaluate import evaluate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Score a trained model on one split of a dataset.")
    parser.add_argument("--dataset", required=True, help="dataset written by jobs/preprocess.py")
    parser.add_argument("--model-dir", required=True, help="model dir written by jobs/train.py")
    parser.add_argument("--split", default=EVALUATION_SPLIT, choices=["train", "val", "test", "all"],
                        help="the split to score (default: test); all: every split (to score a model on "
                             "another dataset)")
    parser.add_argument("--exclude-near-copies-of", metavar="DATASET",
                        help="drop images within preprocess.duplicate_distance bits of an image of this "
                             "dataset's train or val split (the model's own dataset), and count them per class")
    parser.add_argument("--output", help="metrics file (default: <model-dir>/metrics.json for test, "
                                         "metrics_<split>.json otherwise); use one when scoring another dataset")
    add_overwrite_arg(parser, "an existing metrics file")
    add_spark_args(parser)
    return parser.parse_args(argv)


@job_main("evaluate")
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    config = load_config(args.config, sets=args.set)
    spark, owned = build_spark(args, "covid-spark evaluate")
    try:
        metrics = evaluate(args.dataset, args.model_dir, config, split=args.split,
                           exclude_near_copies_of=args.exclude_near_copies_of, output=args.output,
                           overwrite=args.overwrite)
    finally:
        if owned:
            spark.stop()
    if "near_copies" in metrics:
        near = metrics["near_copies"]
        print(f"near-copies of {near['reference']} dropped: {near['dropped']} {near['dropped_per_class']}; "
              f"kept {near['kept']} {near['kept_per_class']}")
    print(f"\nEvaluation on the {args.split} split ({metrics['n']} images):")
    print(format_table(metrics))
    parts = [(f"images with a patient id ({', '.join(metrics['patient_wise']['sources'])})", metrics["patient_wise"])] \
        if "patient_wise" in metrics else []
    parts += [(f"input {name}", values) for name, values in metrics.get("per_input", {}).items()]
    for title, values in parts:
        print(f"\n{title} ({values['n']} images):")
        print(format_table(values))
    print(f"evaluate: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1'] or float('nan'):.3f}, "
          f"ECE {metrics['ece']:.3f} → {args.output or RunDir(args.model_dir).metrics_path(args.split)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
