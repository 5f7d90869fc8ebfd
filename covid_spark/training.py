"""What every way of training shares: checks of the ``train`` config and the class weights.

Used by the Horovod train stage (``covid_spark.train``), by cross-validation (``covid_spark.crossval``)
and by the jobs that check a config before any work; it imports no stage, no Spark and no TensorFlow.
"""
from __future__ import annotations

from covid_spark.config import CLASSES


def class_weights(train_counts: dict[str, int], mode: str) -> dict[int, float] | None:
    """``balanced``: n / (k · n_c) per class index (as scikit-learn's); ``none``: None."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise ValueError(f"train.class_weights must be 'balanced' or 'none', found {mode!r}")
    total = sum(train_counts.get(c, 0) for c in CLASSES)
    present = [c for c in CLASSES if train_counts.get(c, 0) > 0]
    return {i: (total / (len(present) * train_counts[c]) if train_counts.get(c, 0) else 0.0)
            for i, c in enumerate(CLASSES)}


def check_model(value: str) -> str:
    """``train.model``, checked on the driver before any work (a flag or a config file may name it).

    Raises:
        ValueError: not one of ``models.MODELS`` (names the key and the value).
    """
    from covid_spark.models import MODELS

    if value not in MODELS:
        raise ValueError(f"config key 'train.model' must be one of {', '.join(sorted(MODELS))}, found {value!r}")
    return value


def check_input_norm(value: str) -> str:
    """``train.input_norm``, checked here on the driver (before any rank starts).

    Raises:
        ValueError: not one of ``models.INPUT_NORMS`` (names the key and the value).
    """
    from covid_spark.models import INPUT_NORMS

    if value not in INPUT_NORMS:
        raise ValueError(f"config key 'train.input_norm' must be one of {', '.join(INPUT_NORMS)}, found {value!r}")
    return value
