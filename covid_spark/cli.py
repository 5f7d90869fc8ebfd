"""Options every job takes, and the SparkSession built from them."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_spark_args(parser: argparse.ArgumentParser) -> None:
    """Add --master, --conf k=v (repeatable) and --config to ``parser``."""
    parser.add_argument("--master", default=None,
                        help="Spark master URL; unset lets spark-submit (or Spark's default) decide")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark setting, repeatable; split on the first '='")
    parser.add_argument("--config", default=None,
                        help="YAML job config overriding the packaged defaults (see conf/)")


def parse_conf(pairs: Sequence[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings, splitting on the first ``=`` only."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--conf expects KEY=VALUE, got {pair!r}")
        result[key.strip()] = value
    return result


def setup_logging() -> None:
    """Log INFO to stderr in one format for every job."""
    # Warnings only from libraries (py4j and Horovod log routine retries and rendezvous
    # chatter at INFO on the root logger); INFO from our own code.
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("covid_spark").setLevel(logging.INFO)


def build_spark(args: argparse.Namespace, app_name: str):
    """Return ``(spark, owned)``: the active session if there is one, else a new one.

    ``owned`` tells the caller whether it must stop the session. Never sets
    ``spark.master`` unless --master was given explicitly.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName(app_name)
    if args.master:
        builder = builder.master(args.master)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = builder.config("spark.ui.showConsoleProgress", "true")
    for key, value in parse_conf(args.conf).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark, True
