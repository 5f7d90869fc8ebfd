"""Launchers: start the train stage's ranks on the Spark executors and collect what they return.

An engine is two small pieces, kept apart from the training function (as Spark's
``pyspark.ml.torch.distributor`` keeps its launcher apart from the function it runs):

- a :class:`Launcher`, on the driver: checks the resources, starts ``num_proc`` ranks that each call
  ``fn(job)`` with the same plain dict, and returns their results (one dict per rank);
- a rank context, inside each rank: joins the ranks together and says what the training core
  (``covid_spark.core.fit_model``) must add for them (a ``covid_spark.core.Distribution``).

The rank function (``covid_spark.train.train_fn``) is the same for every engine: it reads
``job["engine"]`` and asks :data:`ENGINES` for the rank context. Only Horovod exists today
(``horovod.spark.run`` over Gloo). A second engine (issue 17: ``tf.distribute`` in Spark barrier
tasks) adds its :class:`Engine` to :data:`ENGINES`: a launcher that runs ``fn(job)`` in a barrier
stage and collects the results, and a rank context whose ``optimizer`` and ``callbacks`` add nothing
(``MultiWorkerMirroredStrategy`` averages the gradients itself) and whose ``scope()`` is its
strategy's, in which the rank function builds and compiles the model.

This module imports neither Spark nor Horovod nor TensorFlow at import time.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600  # how long the ranks may wait for free Spark task slots


class Launcher(Protocol):
    """Starts ranks on the cluster and collects their results; knows nothing of training."""

    def run(self, fn: Callable[[dict], dict], job: dict, num_proc: int) -> list[dict]:
        """Run ``fn(job)`` in ``num_proc`` ranks; return each rank's result (in any order)."""


def rank_env(sc, threads: int) -> dict[str, str]:
    """Environment of the Horovod ranks, which each executor's task service starts in its work dir.

    The driver's environment, with the files shipped by ``--py-files`` put first on PYTHONPATH by
    bare name: spark-submit lists them on the driver's PYTHONPATH by their paths on the driver's
    machine, while every executor holds its own copy in its working directory, which is the
    ranks' working directory too. So a rank imports ``covid_spark`` from the shipped package on
    any host. (Use with ``executable=sc.pythonExec``: the executors' Python, not the driver's.)
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
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


ENGINES: dict[str, Engine] = {
    "horovod": Engine(launcher=HorovodSparkLauncher, rank=HorovodRank),
}
DEFAULT_ENGINE = "horovod"
