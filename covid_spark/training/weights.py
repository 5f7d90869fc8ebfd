"""What every way of training shares: the class weights.

Used by the Horovod train stage (``covid_spark.stages.train``) and by cross-validation (``covid_spark.stages.crossval``);
it imports no stage, no Spark and no TensorFlow. The ``train`` config is checked where it is loaded
(``covid_spark.config``), not here.
"""
from __future__ import annotations

from covid_spark.constants import CLASSES
from covid_spark.errors import ConfigError


def class_weights(train_counts: dict[str, int], mode: str) -> dict[int, float] | None:
    """``balanced``: n / (k · n_c) per class index (as scikit-learn's); ``none``: None."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ConfigError(f"train.class_weights must be 'balanced' or 'none', found {mode!r}")
    total = sum(train_counts.get(c, 0) for c in CLASSES)
    present = [c for c in CLASSES if train_counts.get(c, 0) > 0]
    return {i: (total / (len(present) * train_counts[c]) if train_counts.get(c, 0) else 0.0)
            for i, c in enumerate(CLASSES)}

