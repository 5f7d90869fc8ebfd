"""spark-submit jobs/preprocess.py --input DIR_OR_MANIFEST [--input ...] --output URL [options]"""
from __future__ import annotations

import argparse
import logging
import sys

from covid_spark.cli import add_overwrite_arg, add_spark_args, build_spark, job_main, setup_logging
from covid_spark.config import load_config, override
from covid_spark.errors import InputError
from covid_spark.stages.append import append
from covid_spark.stages.preprocess import preprocess

logger = logging.getLogger("covid_spark.jobs.preprocess")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Decode X-ray images into a Petastorm dataset with patient-wise splits.")
    parser.add_argument("--input", action="append",
                        help="manifest CSV, folder with manifest.csv, or folder per class; repeat to read several "
                             "(with --append: default the dataset's own inputs)")
    parser.add_argument("--output", required=True, help="dataset path or URL (file://, hdfs://, ...)")
    parser.add_argument("--append", action="store_true",
                        help="update the --output dataset with what changed in the inputs (new, changed and removed "
                             "files), keeping every patient's split; atomic. A dataset that does not exist yet is "
                             "created by a full preprocess (so a scheduler can run the same command every time)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--test-fraction", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-pixels", type=int, help="reject images above this many pixels, before decoding")
    parser.add_argument("--min-row-groups", type=int, help="row groups per split, at least the Horovod ranks")
    parser.add_argument("--skip-unknown-classes", action="store_true", default=None,
                        help="skip folders/labels that name no class instead of failing")
    parser.add_argument("--holdout-source", help="leave-one-source-out: put every image of this source in test")
    parser.add_argument("--views", help="keep these views, e.g. PA,AP (AP variants count as AP); images of "
                                         "unknown view are kept unless -unknown is listed")
    add_overwrite_arg(parser)
    add_spark_args(parser)
    args = parser.parse_args(argv)
    if not args.append and not args.input:
        parser.error("--input is required (only --append may leave it out: the dataset's own inputs)")
    return args


@job_main("preprocess")
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    config = override(load_config(args.config, sets=args.set), "preprocess", {
        "image_size": args.image_size, "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
        "seed": args.seed, "max_pixels": args.max_pixels, "min_row_groups": args.min_row_groups,
        "skip_unknown_classes": args.skip_unknown_classes,
        "holdout_source": args.holdout_source, "views": args.views})
    if args.append and args.overwrite:
        raise InputError("--append and --overwrite exclude each other: --append updates the dataset, "
                         "--overwrite replaces it")
    given = {"image_size": args.image_size, "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
             "seed": args.seed, "max_pixels": args.max_pixels, "skip_unknown_classes": args.skip_unknown_classes,
             "holdout_source": args.holdout_source, "views": args.views}
    spark, owned = build_spark(args, "covid-spark preprocess")
    try:
        if args.append:
            summary = append(spark, args.output, config, args.input, given=given)
        else:
            summary = preprocess(spark, args.input, args.output, config, overwrite=args.overwrite)
    finally:
        if owned:
            spark.stop()
    if args.append:
        last = summary["increments"][-1]
        print(f"preprocess --append ({last['kind']}): {last['added']} added, {last.get('replaced', 0)} replaced, "
              f"{last.get('removed', 0)} removed, {last['rejected']} rejected, {last.get('unchanged', 0)} unchanged; "
              f"{summary['written']} rows, splits {summary['per_split']} → {summary['dataset']}")
        for path in last.get("removed_files", [])[:20]:
            print(f"  removed {path}")
        return 0
    print(f"preprocess: {summary['inputs']} inputs = {summary['written']} written + "
          f"{len(summary['rejected'])} rejected + {len(summary['skipped'])} skipped; "
          f"splits {summary['per_split']}; {len(summary['duplicates'])} duplicate group(s) → {summary['dataset']}")
    per_input = summary.get("per_input") or []
    if len(per_input) > 1:
        for entry in per_input:
            print(f"  input {entry['input']}: " + ", ".join(f"{k} {v}" for k, v in entry.items() if k != "input"))
    for item in summary["rejected"][:20]:
        print(f"  rejected {item['path']}: {item['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
