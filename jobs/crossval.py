"""python jobs/crossval.py --dataset URL --output FILE.json [--model NAME] [--transform T] [--compare FILE.json]

Patient-grouped k-fold cross-validation over train + val of a preprocessed dataset (the test split is
never read), to choose a model: see ``covid_spark/stages/crossval.py``. One process, no Spark or Horovod.
"""
from __future__ import annotations

import argparse
import os
import sys

from covid_spark.cli import add_config_arg, add_overwrite_arg, job_main, setup_logging
from covid_spark.config import load_config, override
from covid_spark.errors import InputError
from covid_spark.models.registry import MODELS
from covid_spark.stages.crossval import TRANSFORMS, cross_validate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Patient-grouped k-fold cross-validation over train + val, "
                                                 "for choosing a model without the test split.")
    parser.add_argument("--dataset", required=True, help="dataset written by jobs/preprocess.py")
    parser.add_argument("--output", required=True, help="JSON file to write (atomically, after every fold)")
    parser.add_argument("--model", choices=sorted(MODELS), help="architecture (overrides the config's train.model)")
    parser.add_argument("--epochs", type=int, help="overrides the config's train.epochs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--transform", choices=TRANSFORMS, default="none", help="input variant to compare")
    parser.add_argument("--compare", metavar="FILE.json",
                        help="another output of this job on the same dataset: adds the paired difference of macro-F1")
    add_overwrite_arg(parser)
    add_config_arg(parser)
    return parser.parse_args(argv)


@job_main("crossval")
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    if args.folds < 2:
        raise InputError(f"--folds must be at least 2, found {args.folds}")
    config = override(load_config(args.config, model=args.model, sets=args.set), "train",
                      {"model": args.model, "epochs": args.epochs})
    result = cross_validate(args.dataset, config, args.output, args.folds, args.transform, args.compare,
                            overwrite=args.overwrite)

    def two(x):
        return "n/a" if x is None else f"{x:.2f}"

    per_class = ", ".join(f"{c} P {two(v['precision'])} R {two(v['recall'])}" for c, v in result["per_class"].items())
    print(f"{result['label_of_run']}: {args.folds}-fold macro-F1 {result['macro_f1']:.3f} "
          f"{[round(x, 3) for x in result['ci95']['macro_f1']]}, accuracy {result['accuracy']:.3f}; {per_class}")
    if "compare" in result:
        c = result["compare"]
        print(f"difference against {c['against']}: {c['macro_f1_difference']:+.3f} {[round(x, 3) for x in c['ci95']]}")
    print(f"written: {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
