"""Launchers: start the train stage's ranks on the Spark executors and collect what they return.

An engine is two small pieces, kept apart from the training function (as Spark's
``pyspark.ml.torch.distributor`` keeps its launcher apart from the function it runs):

- a :class:`Launcher`, on the driver: checks the resources, starts ``num_proc`` ranks that each call
  ``fn(job)`` with the same plain dict, and returns their results (one dict per rank);
- a rank context, inside each rank: joins the ranks together and says what the training core
  (``covid_spark.core.fit_model``) must add for them (a ``covid_spark.core.Distribution``).

The rank function (``covid_spark.train.train_fn``) is the same for every engine: it reads
``job["engine"]`` and asks :data:`ENGINES` for the rank context. Two engines exist: ``horovod``
(``horovod.spark.run`` over Gloo; the pinned stack only) and ``tf-distribute``
(``MultiWorkerMirroredStrategy`` in Spark barrier tasks, ``covid_spark.tfdistribute``; both stacks),
whose rank context adds nothing to the optimizer or the callbacks (the strategy averages the gradients
itself) and whose ``scope()`` is its strategy's, in which the rank function builds and compiles the model.
``train.engine: auto`` is Horovod where it is installed, else tf-distribute (:func:`resolve_engine`,
which also refuses, before any Spark job, an engine this stack cannot run).

This module imports neither Spark nor Horovod nor TensorFlow at import time.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Protocol

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600  # how long the ranks may wait for free Spark task slots


class Launcher(Protocol):
    """Starts ranks on the cluster and collects their results; knows nothing of training."""

    def run(self, fn: Callable[[dict], dict], job: dict, num_proc: int) -> list[dict]:
        """Run ``fn(job)`` in ``num_proc`` ranks; return each rank's result (in any order)."""


def rank_settings(threads: int) -> dict[str, str]:
    """What every rank's environment sets, whatever the engine: its threads, quiet TensorFlow, no GPU,
    unbuffered output (its progress lines reach the log as they are printed)."""
    return {"TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": ""}


def rank_env(sc, threads: int) -> dict[str, str]:
    """Environment of the Horovod ranks, which each executor's task service starts in its work dir.

    The driver's environment, with the files shipped by ``--py-files`` put first on PYTHONPATH by
    bare name: spark-submit lists them on the driver's PYTHONPATH by their paths on the driver's
    machine, while every executor holds its own copy in its working directory, which is the
    ranks' working directory too. So a rank imports ``covid_spark`` from the shipped package on
    any host. (Use with ``executable=sc.pythonExec``: the executors' Python, not the driver's.)
    """
    env = dict(os.environ, **rank_settings(threads))
    shipped = [os.path.basename(p) for p in sc.getConf().get("spark.submit.pyFiles", "").split(",") if p]
    if shipped:
        env["PYTHONPATH"] = os.pathsep.join(shipped + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class HorovodSparkLauncher:
    """``horovod.spark.run`` over Gloo: one rank per Spark task, the executors' Python, :func:`rank_env`."""

    def __init__(self, spark):
        self.spark = spark

    def run(self, fn: Callable[[dict], dict], job: dict, num_proc: int) -> list[dict]:
        import horovod.spark  # looked up at call time: tests/test_cluster.py swaps horovod.spark.run

        sc = self.spark.sparkContext
        slots = sc.defaultParallelism
        if num_proc > slots:  # a warning, not a refusal: executors may still be joining the cluster
            logger.warning("train.num_proc is %d but Spark offers %d task slot(s) now; the ranks wait up to "
                           "%d s for free slots", num_proc, slots, START_TIMEOUT_S)
        return horovod.spark.run(fn, args=(job,), num_proc=num_proc, use_gloo=True, use_mpi=False,
                                 env=rank_env(sc, job["threads"]), executable=sc.pythonExec,
                                 start_timeout=START_TIMEOUT_S, verbose=1)


class HorovodRank:
    """Inside a Horovod rank: ``hvd.init()``; the optimizer averages gradients over the ranks
    (``hvd.DistributedOptimizer``, fp16 on the wire with ``job["compression"] == "fp16"``); rank 0's
    initial weights are broadcast and the epoch's metrics averaged over the ranks before the core's
    own callbacks read them."""

    def __init__(self, job: dict):
        import horovod.tensorflow.keras as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.compression = hvd.Compression.fp16 if job["compression"] == "fp16" else hvd.Compression.none

    def optimizer(self, optimizer):
        return self.hvd.DistributedOptimizer(optimizer, compression=self.compression)

    def callbacks(self) -> list:
        return [self.hvd.callbacks.BroadcastGlobalVariablesCallback(0), self.hvd.callbacks.MetricAverageCallback()]

    def scope(self):
        return contextlib.nullcontext()


@dataclass(frozen=True)
class Engine:
    """A way of running the train stage's ranks: its launcher (from the SparkSession) and its rank
    context (from the job, inside each rank)."""

    launcher: Callable[[Any], Launcher]
    rank: Callable[[dict], Any]


def _tf_distribute_launcher(spark) -> Launcher:
    from covid_spark.tfdistribute import TFDistributeLauncher

    return TFDistributeLauncher(spark)


def _tf_distribute_rank(job: dict):
    from covid_spark.tfdistribute import TFDistributeRank

    return TFDistributeRank(job)


ENGINES: dict[str, Engine] = {
    "horovod": Engine(launcher=HorovodSparkLauncher, rank=HorovodRank),
    "tf-distribute": Engine(launcher=_tf_distribute_launcher, rank=_tf_distribute_rank),
}
DEFAULT_ENGINE = "horovod"  # a job dict without "engine" (made before issue 17) ran Horovod
AUTO = "auto"

# How each stack is set up (README "Two stacks"): the command a message points a user to.
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
        ValueError: an unknown engine, or one this stack cannot run (names the engine, the stack and
            the command that sets up one that can).
    """
    if engine == AUTO:
        engine = "horovod" if importlib.util.find_spec("horovod") is not None else "tf-distribute"
    if engine not in ENGINES:
        raise ValueError(f"train.engine must be one of {AUTO}, {', '.join(ENGINES)}; found {engine!r}")
    problem = engine_problem(engine)
    if problem:
        raise ValueError(problem)
    return engine
