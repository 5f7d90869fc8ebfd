"""The job description every training rank receives: one frozen, typed, versioned value.

The driver (``covid_spark.stages.train``) makes it from the checked config and the dataset summary;
a launcher (``covid_spark.engines``) pickles it to each rank unchanged; the rank function
(``covid_spark.stages.train_rank.train_fn``) reads its fields. A rank refuses a job of another
:data:`JOB_VERSION` (a driver and executors running different versions of the package).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

JOB_VERSION = 1


@dataclass(frozen=True)
class TrainJob:
    """What one training run asks of each rank."""

    engine: str                          # an ``engines.registry.ENGINES`` name
    dataset: str                         # the dataset's URL
    model: str                           # a ``models.registry.REGISTRY`` name
    image_size: int
    epochs: int
    batch_size: int                      # per rank
    learning_rate: float                 # per rank; the ranks' effective rate is this × their number
    warmup_epochs: int
    lr_schedule: str
    patience: int                        # early stopping, in epochs (0: off)
    seed: int
    threads: int                         # TensorFlow threads per rank
    steps_per_epoch: int
    shuffle_buffer: int
    augment: Mapping[str, Any]
    class_weight: Mapping[int, float]
    val_rows: int
    val_row_groups: int
    checkpoint_dir: str
    compression: str                     # Horovod's gradient compression: none or fp16
    input_norm: str
    source_keep: Mapping[str, float] = field(default_factory=dict)  # "<class>/<source>" → keep probability
    adversary: float = 0.0               # strength of the adversarial source head (0: none)
    sources: tuple[str, ...] = ()        # the train split's sources, the head's classes
    initial_epoch: int = 0               # > 0 when resuming from a checkpoint
    resume_history: Mapping[str, list] = field(default_factory=dict)
    resume_weights: str | None = None
    version: int = JOB_VERSION

    def check_version(self) -> None:
        """Raise when this job was made by a driver with another :data:`JOB_VERSION`."""
        if self.version != JOB_VERSION:
            raise RuntimeError(f"training job version {self.version} from the driver, {JOB_VERSION} in this rank: "
                               f"the driver and the executors run different versions of covid_spark")
