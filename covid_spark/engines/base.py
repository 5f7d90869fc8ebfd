"""What every engine shares: the launcher and rank-context protocols, and the ranks' environment.

An engine is two small pieces, kept apart from the training function (as Spark's
``pyspark.ml.torch.distributor`` keeps its launcher apart from the function it runs):

- a :class:`Launcher`, on the driver: checks the resources, starts ``num_proc`` ranks that each call
  ``fn(job)`` with the same job (a ``covid_spark.training.job.TrainJob``), and returns their results;
- a rank context, inside each rank (``covid_spark.training.core.Distribution``): joins the ranks
  together and says what the training core must add for them.

The engines are ``covid_spark.engines.horovod`` and ``covid_spark.engines.tfdistribute``; which one
runs is chosen in ``covid_spark.engines.registry``. Nothing here imports Spark, Horovod or TensorFlow.
"""
from __future__ import annotations

from typing import Callable, Protocol

from covid_spark.training.job import TrainJob

START_TIMEOUT_S = 600  # how long the ranks may wait for free Spark task slots


class Launcher(Protocol):
    """Starts ranks on the cluster and collects their results; knows nothing of training."""

    def run(self, fn: Callable[[TrainJob], dict], job: TrainJob, num_proc: int) -> list[dict]:
        """Run ``fn(job)`` in ``num_proc`` ranks; return each rank's result (in any order)."""


def rank_settings(threads: int) -> dict[str, str]:
    """What every rank's environment sets, whatever the engine: its threads, quiet TensorFlow, no GPU,
    unbuffered output (its progress lines reach the log as they are printed)."""
    return {"TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": ""}
