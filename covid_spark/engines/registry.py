"""Which engine runs the ranks: :data:`ENGINES` by name, and :func:`resolve_engine` (``auto``, and the
refusal, before any Spark work, of an engine this stack cannot run; read from package metadata,
nothing imported). ``auto`` is Horovod where it is installed, else tf-distribute.
"""
from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import sys
from dataclasses import dataclass
from typing import Any, Callable

from covid_spark.engines.base import Launcher
from covid_spark.engines.horovod import HorovodRank, HorovodSparkLauncher
from covid_spark.engines.tfdistribute import TFDistributeLauncher, TFDistributeRank
from covid_spark.errors import ConfigError
from covid_spark.training.job import TrainJob


@dataclass(frozen=True)
class Engine:
    """A way of running the train stage's ranks: its launcher (from the SparkSession) and its rank
    context (from the job, inside each rank)."""

    launcher: Callable[[Any], Launcher]
    rank: Callable[[TrainJob], Any]


ENGINES: dict[str, Engine] = {
    "horovod": Engine(launcher=HorovodSparkLauncher, rank=HorovodRank),
    "tf-distribute": Engine(launcher=TFDistributeLauncher, rank=TFDistributeRank),
}
AUTO = "auto"

# How each stack is set up (docs/stacks.md): the command a message points a user to.
SETUP_PINNED = "make setup (scripts/setup_env.sh: the pinned stack in .venv, Python 3.11, TensorFlow 2.15, Horovod)"
SETUP_CURRENT = ("make setup STACK=current (scripts/setup_env.sh with STACK=current: the current stack in "
                 ".venv-current, Python 3.12, TensorFlow 2.20 with tf-keras, no Horovod)")


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def describe_stack() -> str:
    """This interpreter's stack in words (read from package metadata; nothing imported)."""
    tf = _version("tensorflow-cpu", "tensorflow")
    keras = _version("tf-keras") or _version("keras")
    hvd = _version("horovod") if importlib.util.find_spec("horovod") is not None else None
    return (f"Python {sys.version.split()[0]} at {sys.prefix}, TensorFlow {tf or 'not installed'}"
            + (f", {'tf-keras' if _version('tf-keras') else 'Keras'} {keras}" if keras else "")
            + (f", Horovod {hvd}" if hvd else ", no Horovod"))


def engine_problem(engine: str) -> str | None:
    """Why ``engine`` cannot run on this stack, or None when it can (checked from package metadata)."""
    tf = _version("tensorflow-cpu", "tensorflow")
    if tf is None:
        return f"train.engine {engine!r} needs TensorFlow, which is not installed"
    if engine == "horovod" and importlib.util.find_spec("horovod") is None:
        return (f"train.engine 'horovod' needs Horovod, which is not installed on this stack ({describe_stack()}); "
                f"use --engine tf-distribute here, or set up the pinned stack with {SETUP_PINNED}")
    if engine == "tf-distribute":
        keras2 = int(tf.split(".")[0]) == 2 and int(tf.split(".")[1]) < 16
        if not keras2 and importlib.util.find_spec("tf_keras") is None:
            return (f"train.engine 'tf-distribute' needs the Keras 2 API (TensorFlow 2.15's tf.keras, or tf-keras "
                    f"with TF_USE_LEGACY_KERAS=1): Keras 3's model.fit fails under MultiWorkerMirroredStrategy "
                    f"(keras-team/keras#20585), and this stack ({describe_stack()}) has no tf-keras; set up the "
                    f"current stack with {SETUP_CURRENT}, or the pinned one with {SETUP_PINNED}")
    return None


def resolve_engine(engine: str) -> str:
    """The engine that will run: ``auto`` is Horovod where it is installed, else tf-distribute.

    Raises:
        ConfigError: an unknown engine, or one this stack cannot run (names the engine, the stack and
            the command that sets up one that can).
    """
    if engine == AUTO:
        engine = "horovod" if importlib.util.find_spec("horovod") is not None else "tf-distribute"
    if engine not in ENGINES:
        raise ConfigError(f"train.engine must be one of {AUTO}, {', '.join(ENGINES)}; found {engine!r}")
    problem = engine_problem(engine)
    if problem:
        raise ConfigError(problem)
    return engine
