"""spark-submit jobs/pipeline.py --input DIR_OR_MANIFEST [--input ...] --run-dir runs/<run-id> [options]

Runs preprocess → train → evaluate → report into one run directory. Safe to rerun: unchanged
inputs are not preprocessed again, a finished model is not retrained, an interrupted training
resumes from its checkpoint. Exits 2 naming the stage that failed (with the traceback in the log
when the stage failed on something other than bad input), or naming the bad argument or input.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from covid_spark.cli import USER_ERRORS, add_spark_args, build_spark, fail, job_main, one_line, setup_logging
from covid_spark.config import load_config, override
from covid_spark.data.rundir import RunDir
from covid_spark.engines.registry import resolve_engine
from covid_spark.evaluation.metrics import format_table
from covid_spark.models.registry import MODELS
from covid_spark.stages.pipeline import STAGES, StageFailed, run_pipeline

logger = logging.getLogger("covid_spark.jobs.pipeline")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run every stage under one run id.")
    parser.add_argument("--input", action="append", required=True,
                        help="manifest CSV, folder with manifest.csv, or folder per class; repeat to read several")
    parser.add_argument("--run-dir", required=True, help="e.g. runs/nightly-2026-11-26")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--holdout-source", help="leave-one-source-out check: train without this source, test on it")
    parser.add_argument("--views", help="keep these views, e.g. PA,AP (unknown views kept unless -unknown is listed)")
    parser.add_argument("--model", choices=sorted(MODELS), help="architecture (overrides the config's train.model)")
    parser.add_argument("--epochs", type=int, help="overrides the config's train.epochs")
    parser.add_argument("--engine", choices=["auto", "horovod", "tf-distribute"],
                        help="what runs the training ranks (overrides the config's train.engine)")
    parser.add_argument("--force", action="store_true", help="rerun every stage even if its inputs did not change")
    add_spark_args(parser)
    return parser.parse_args(argv)


@job_main("pipeline")
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"pipeline: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}", file=sys.stderr)
        return 2
    config = load_config(args.config, model=args.model, sets=args.set)  # checked here, not after preprocessing
    config = override(config, "preprocess", {"holdout_source": args.holdout_source, "views": args.views})
    config = override(config, "train", {"model": args.model, "epochs": args.epochs, "engine": args.engine})
    if "train" in stages:
        resolve_engine(config["train"]["engine"])  # a wrong stack fails here, before preprocessing runs
    spark, owned = build_spark(args, "covid-spark pipeline")
    try:
        result = run_pipeline(spark, args.input, args.run_dir, config, force=args.force, stages=stages)
    except StageFailed as exc:
        if not isinstance(exc.__cause__, USER_ERRORS):  # a bug, not bad input: keep its traceback
            logger.error("pipeline: %s", exc, exc_info=exc.__cause__)
        return fail("pipeline", f"FAILED at stage '{exc.stage}': {one_line(exc)}", exc.__cause__)
    finally:
        if owned:
            spark.stop()
    run_dir = result["run_dir"]
    paths = RunDir(run_dir)
    if os.path.exists(paths.metrics):
        with open(paths.metrics, encoding="utf-8") as handle:
            metrics = json.load(handle)
        print(f"\nEvaluation on the test split ({metrics['n']} images):")
        print(format_table(metrics))
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in result["timings"].items()))
    print(f"pipeline: {', '.join(f'{k} {v}' for k, v in result['stages'].items() if v)}")
    print(f"outputs:  {run_dir}")
    if os.path.exists(paths.report):
        print(f"report:   {paths.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
