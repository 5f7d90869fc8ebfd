"""The Horovod engine: ``horovod.spark.run`` over Gloo (the pinned stack only).

Driver: :class:`HorovodSparkLauncher`. Rank: :class:`HorovodRank`, the rank context. Horovod is
imported when a launcher runs or a rank starts, never with this module (the current stack has none).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable

from covid_spark.engines.base import START_TIMEOUT_S, rank_settings
from covid_spark.training.job import TrainJob

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- driver


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

    def run(self, fn: Callable[[TrainJob], dict], job: TrainJob, num_proc: int) -> list[dict]:
        import horovod.spark  # looked up at call time: tests/test_cluster.py swaps horovod.spark.run
        # Horovod checks how it was built in forked copies of this process, each importing its TensorFlow
        # extension; imported here first, the copies find it loaded (the stage needs TensorFlow afterwards
        # anyway, to export the model) instead of importing TensorFlow, seconds each, before any rank starts.
        import horovod.tensorflow.keras  # noqa: F401

        sc = self.spark.sparkContext
        slots = sc.defaultParallelism
        if num_proc > slots:  # a warning, not a refusal: executors may still be joining the cluster
            logger.warning("train.num_proc is %d but Spark offers %d task slot(s) now; the ranks wait up to "
                           "%d s for free slots", num_proc, slots, START_TIMEOUT_S)
        return horovod.spark.run(fn, args=(job,), num_proc=num_proc, use_gloo=True, use_mpi=False,
                                 env=rank_env(sc, job.threads), executable=sc.pythonExec,
                                 start_timeout=START_TIMEOUT_S, verbose=1)


# ---------------------------------------------------------------------------------- rank context


class HorovodRank:
    """Inside a Horovod rank: ``hvd.init()``; the optimizer averages gradients over the ranks
    (``hvd.DistributedOptimizer``, fp16 on the wire with ``job.compression == "fp16"``); rank 0's
    initial weights are broadcast and the epoch's metrics averaged over the ranks before the core's
    own callbacks read them."""

    def __init__(self, job: TrainJob):
        import horovod.tensorflow.keras as hvd

        hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()
        self.compression = hvd.Compression.fp16 if job.compression == "fp16" else hvd.Compression.none

    def optimizer(self, optimizer):
        import tensorflow as tf

        wrapped = self.hvd.DistributedOptimizer(optimizer, compression=self.compression)
        # Horovod's gradient averaging (a tf.function of its own, made with AutoGraph on) branches with
        # tf.cond, not Python ifs on tensors, so AutoGraph has nothing to convert in it; left on, each rank
        # transpiles Horovod's helpers (over a thousand functions) while tracing the first train step.
        wrapped._allreduce_grads = tf.function(wrapped._allreduce_grads.python_function, autograph=False)
        return wrapped

    def callbacks(self) -> list:
        return [self.hvd.callbacks.BroadcastGlobalVariablesCallback(0), self.hvd.callbacks.MetricAverageCallback()]

    def scope(self):
        return contextlib.nullcontext()

    # Horovod ranks read their datasets as they are, and only rank 0 saves.
    every_rank_saves = False
    distributes_datasets = False

    def distribute(self, dataset):
        return dataset
