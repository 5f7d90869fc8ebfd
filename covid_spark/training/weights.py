"""What every way of training shares: the class weights, and the sampling that caps a source's share.

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



def source_keep_probabilities(per_source_class: dict[str, dict[str, int]], cap: float) -> dict[str, float]:
    """Per ``"<class index>/<source>"``, the probability of keeping an image when the train stream is
    thinned so that no source is more than ``cap`` of its class (in expectation, every epoch).

    ``per_source_class`` is a dataset summary's ``{source: {class: images}}``. A class with one source
    keeps everything (no cap can hold); with k sources the cap is at least 1/k. ``cap`` 0 (off) or
    >= 1 keeps everything: an empty mapping.
    """
    if not 0 < cap < 1:
        return {}
    keep = {}
    for index, label in enumerate(CLASSES):
        counts = {s: by_class.get(label, 0) for s, by_class in per_source_class.items() if by_class.get(label, 0)}
        if len(counts) < 2:
            continue
        limit = max(cap, 1.0 / len(counts))
        kept = dict(counts)
        for _ in range(100):  # water-filling: a source over the limit is cut to limit × the class's total
            total = sum(kept.values())
            over = [s for s, n in kept.items() if n > limit * total * (1 + 1e-9)]
            if not over:
                break
            for source in over:
                others = total - kept[source]
                kept[source] = limit / (1 - limit) * others if limit < 1 else kept[source]
        keep.update({f"{index}/{s}": min(1.0, kept[s] / counts[s]) for s in counts})
    return keep
