"""Source probe: can a linear model read the image's source out of a classifier's features?

In these data the source goes with the class (most COVID films come from one collection, most
pneumonia films from Chinese children), so a probe across classes would find the source through the
class. The probe therefore runs within each class separately: among the COVID images alone, say, does
a logistic regression on the features tell Hannover from Radiography better than always guessing
the class's most common source? If it does, the features carry the hospital, and a classifier built
on them can use it (DeGrave et al., Nature Machine Intelligence 2021).
"""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)


def _check(features: np.ndarray, sources, labels, groups, folds: int):
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [N,D]; got shape {features.shape}")
    sources, labels = np.asarray(sources).astype(str), np.asarray(labels).astype(str)
    count = features.shape[0]
    for name, array in (("sources", sources), ("labels", labels)):
        if array.shape != (count,):
            raise ValueError(f"{name} must have shape ({count},) to match features; got {array.shape}")
    if groups is not None:
        groups = np.asarray(groups).astype(str)
        if groups.shape != (count,):
            raise ValueError(f"groups must have shape ({count},) to match features; got {groups.shape}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2; got {folds}")
    if not np.all(np.isfinite(features)):
        raise ValueError("features hold NaN or infinite values")
    return features, sources, labels, groups


def _probe_class(features, sources, groups, folds: int, seed: int) -> dict:
    """One class's probe: sources with too few images (or patients) are left out first."""
    counts = Counter(sources.tolist())
    units = counts if groups is None else Counter(s for s, _ in set(zip(sources.tolist(), groups.tolist())))
    unit = "images" if groups is None else "patients"
    dropped = {source: counts[source] for source in counts if units[source] < folds}
    result = {"images": int(len(sources)), "sources": dict(sorted(counts.items())),
              "dropped_sources": dict(sorted(dropped.items())), "group_aware": groups is not None}
    if len(counts) == 1:
        return {**result, "status": "skipped", "reason": f"one source only ({next(iter(counts))})"}
    kept = np.array([source not in dropped for source in sources])
    if len(counts) - len(dropped) < 2:
        return {**result, "status": "skipped",
                "reason": f"fewer than two sources with at least {folds} {unit} (folds={folds}); "
                          f"{unit} per source: {dict(sorted(units.items()))}"}
    x, y = features[kept], sources[kept]
    g = None if groups is None else groups[kept]
    if g is None:
        splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    predicted = cross_val_predict(probe, x, y, groups=g, cv=splitter)
    accuracy = float(np.mean(predicted == y))
    kept_counts = Counter(y.tolist())
    baseline = max(kept_counts.values()) / len(y)
    balanced = float(np.mean([np.mean(predicted[y == source] == source) for source in kept_counts]))
    return {**result, "status": "probed", "reason": "", "probed_images": int(len(y)), "folds": folds,
            "probe_accuracy": accuracy, "baseline": float(baseline), "gap": accuracy - float(baseline),
            "balanced_accuracy": balanced, "balanced_baseline": 1.0 / len(kept_counts),
            "balanced_gap": balanced - 1.0 / len(kept_counts)}


def source_probe(features: np.ndarray, sources, labels, folds: int = 5, seed: int = 0,
                 groups=None) -> dict:
    """Cross-validated accuracy of a linear probe for the source, within each class, against guessing.

    For each class: sources with fewer than ``folds`` images (``folds`` patients when ``groups`` is
    given) are left out of that class's probe and listed; a class left with fewer than two sources is
    skipped, with the reason. The probe (standardized features, logistic regression) is scored on
    out-of-fold predictions, the folds stratified by source and, with ``groups`` (patient ids), keeping
    each patient's images in one fold, so the probe cannot recognise a patient instead of a source.

    Args:
        features: ``[N,D]`` float, e.g. a classifier's penultimate-layer activations.
        sources: ``[N]`` source of each image.
        labels: ``[N]`` class of each image.
        folds: cross-validation folds.
        seed: shuffles the folds.
        groups: optional ``[N]`` patient ids.

    Returns:
        ``{"classes": {label: {...}}, "summary": {...}}``. A probed class has ``probe_accuracy``,
        ``baseline`` (share of its majority source), ``gap`` (the difference), ``balanced_accuracy``
        (mean recall over its sources), ``balanced_baseline`` (1 / sources, what guessing gets) and
        ``balanced_gap`` (the difference: the figure the verdict judges, since a class whose majority
        source holds 93 % of it leaves the plain ``gap`` at most 0.07 however well the probe tells
        the sources apart), ``images``, ``sources`` (counts), ``dropped_sources``; a skipped one has
        ``status == "skipped"`` and ``reason``. The summary averages the probed classes weighted by
        images probed: ``probe_accuracy``, ``baseline``, ``gap``, ``balanced_accuracy``,
        ``balanced_baseline``, ``balanced_gap`` (None when no class was probed), with
        ``classes_probed``, ``classes_skipped`` and ``images``.

    Raises:
        ValueError: on mismatched shapes, non-finite features or ``folds < 2``.
    """
    features, sources, labels, groups = _check(features, sources, labels, groups, folds)
    classes = {}
    for label in sorted(set(labels.tolist())):
        rows = labels == label
        classes[label] = _probe_class(features[rows], sources[rows],
                                      None if groups is None else groups[rows], folds, seed)
        if classes[label]["status"] == "skipped":
            log.info("source probe: class %s skipped: %s", label, classes[label]["reason"])
    probed = [c for c in classes.values() if c["status"] == "probed"]
    weights = np.array([c["probed_images"] for c in probed], dtype=np.float64)

    def weighted(key: str):
        return float(np.average([c[key] for c in probed], weights=weights)) if probed else None

    summary = {key: weighted(key) for key in ("probe_accuracy", "baseline", "gap", "balanced_accuracy",
                                              "balanced_baseline", "balanced_gap")}
    summary.update({"images": int(weights.sum()),
                    "classes_probed": [label for label, c in classes.items() if c["status"] == "probed"],
                    "classes_skipped": [label for label, c in classes.items() if c["status"] == "skipped"]})
    return {"classes": classes, "summary": summary}
