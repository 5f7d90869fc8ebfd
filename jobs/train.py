"""spark-submit jobs/train.py --dataset URL --model-dir DIR [options]"""
from __future__ import annotations

import argparse
import sys

from covid_spark.cli import add_overwrite_arg, add_spark_args, build_spark, job_main, setup_logging
from covid_spark.config import load_config, override
from covid_spark.engines.registry import resolve_engine
from covid_spark.models.registry import MODELS
from covid_spark.stages.train import run_training


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the CNN across Spark executors (Horovod or tf.distribute).")
    parser.add_argument("--dataset", required=True, help="dataset written by jobs/preprocess.py")
    parser.add_argument("--model-dir", required=True, help="run directory for the model and its records")
    parser.add_argument("--engine", choices=["auto", "horovod", "tf-distribute"],
                        help="what runs the ranks (train.engine; auto: horovod where installed, else tf-distribute)")
    parser.add_argument("--num-proc", type=int, help="ranks (Spark tasks)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="per rank")
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--learning-rate", type=float, help="per rank; scaled by --num-proc with warm-up")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--patience", type=int, help="early-stopping patience in epochs (0: off)")
    parser.add_argument("--class-weights", choices=["balanced", "none"])
    group = parser.add_mutually_exclusive_group()
    add_overwrite_arg(group, "an existing --model-dir")
    group.add_argument("--resume", action="store_true", help="continue from the model dir's last checkpoint")
    add_spark_args(parser)
    return parser.parse_args(argv)


@job_main("train")
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    config = override(load_config(args.config, model=args.model, sets=args.set), "train", {
        "engine": args.engine, "num_proc": args.num_proc, "epochs": args.epochs, "batch_size": args.batch_size, "model": args.model,
        "learning_rate": args.learning_rate, "seed": args.seed, "early_stopping_patience": args.patience,
        "class_weights": args.class_weights})
    resolve_engine(config["train"]["engine"])  # a wrong stack fails here, before Spark starts
    spark, owned = build_spark(args, "covid-spark train")
    try:
        run = run_training(spark, args.dataset, args.model_dir, config,
                           overwrite=args.overwrite, resume=args.resume)
    finally:
        if owned:
            spark.stop()
    print(f"train: {run['model']} on {run['num_proc']} rank(s), {run['epochs_run']} epoch(s), "
          f"best epoch {run['best_epoch']}, {run['wall_seconds']:.0f} s → {args.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
