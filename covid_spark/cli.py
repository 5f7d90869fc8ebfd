"""What every job shares: its options, its SparkSession, its logging, and how it fails.

A job's ``main(argv)`` is wrapped in :func:`job_main`: a user error (``covid_spark.errors.UserError``:
bad config, dataset, input or argument; or an ``OSError`` about a file, see ``USER_ERRORS``) ends the
job with exit status 2 and ONE line on stderr, ``<job>: <message>``; anything else (a ``ValueError``
from numpy, pyarrow or TensorFlow included) is a bug and keeps its traceback. Set ``COVID_SPARK_TRACEBACK=1``
to see the traceback of a user error too.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback
from typing import Callable, Sequence

from covid_spark.config import PRECEDENCE
from covid_spark.errors import ConfigError, UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(__name__)


# Errors a job reports as ``<job>: <message>`` with exit status 2: the user's config, dataset, input or
# arguments are wrong, or a file is missing, exists already, or cannot be read. argparse's own errors
# already exit 2. Nothing else: an internal error keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)
TRACEBACK_ENV = "COVID_SPARK_TRACEBACK"


def one_line(error: BaseException) -> str:
    """``error``'s message on one line; an OS error from ``open()`` and the like as ``<path>: <reason>``."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(job: str, message: str, error: BaseException | None = None) -> int:
    """Print ``<job>: <message>`` as one line on stderr and return exit status 2.

    ``error``'s traceback goes to the log at DEBUG, and to stderr when ``COVID_SPARK_TRACEBACK`` is set.
    """
    if error is not None:
        logger.debug("%s: %s", job, message, exc_info=error)
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    print(f"{job}: {message}", file=sys.stderr)
    return 2


def job_main(job: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a job's ``main(argv)``: a ``USER_ERRORS`` error becomes :func:`fail` (exit status 2).

    The job's own ``finally`` blocks (stopping its SparkSession) run before the error is reported.
    """
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            try:
                return main(argv)
            except USER_ERRORS as error:
                return fail(job, one_line(error), error)
        return run
    return decorate


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    """Add --config (a YAML job config) and --set KEY=VALUE (repeatable) to ``parser``: pass both to
    ``config.load_config(args.config, sets=args.set)``."""
    parser.add_argument("--config", default=None,
                        help="YAML job config overriding the packaged defaults (covid_spark/defaults.yaml; "
                             "see conf/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set one config key, repeatable: a dotted key of covid_spark/defaults.yaml and a "
                             "YAML value, e.g. --set train.epochs=3 --set train.augment.flip=true --set "
                             "train.per_model.compact.learning_rate=0.002; checked like the --config file. "
                             f"Precedence: {PRECEDENCE}")


def add_overwrite_arg(parser, what: str = "an existing --output"):
    """Add --overwrite (the only way any job replaces an output that exists) to ``parser``."""
    return parser.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def add_spark_args(parser: argparse.ArgumentParser) -> None:
    """Add --master, --conf k=v (repeatable), --config and --set k=v (repeatable) to ``parser``."""
    parser.add_argument("--master", default=None,
                        help="Spark master URL; unset lets spark-submit (or Spark's default) decide")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Spark setting, repeatable; split on the first '='")
    add_config_arg(parser)


def parse_conf(pairs: Sequence[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` strings, splitting on the first ``=`` only."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--conf expects KEY=VALUE, got {pair!r}")
        result[key.strip()] = value
    return result


def setup_logging(*also: str) -> None:
    """Log INFO to stderr in one format for every job (and for the loggers named in ``also``, e.g. "bench")."""
    # Warnings only from libraries (py4j and Horovod log routine retries and rendezvous
    # chatter at INFO on the root logger); INFO from our own code.
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    for ours in ("covid_spark", *also):
        logging.getLogger(ours).setLevel(logging.INFO)


def build_spark(args: argparse.Namespace, app_name: str):
    """Return ``(spark, owned)``: the active session if there is one, else a new one.

    ``owned`` tells the caller whether it must stop the session. Never sets
    ``spark.master`` unless --master was given explicitly. A bad --conf is refused (ValueError)
    even when there is an active session.
    """
    from pyspark.sql import SparkSession

    conf = parse_conf(args.conf)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName(app_name)
    if args.master:
        builder = builder.master(args.master)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = builder.config("spark.ui.showConsoleProgress", "true")
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark, True
