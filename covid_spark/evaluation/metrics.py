"""Classification metrics, ROC/PR curves, bootstrap confidence intervals and calibration.

Counting is numpy; where a library already does the maths it is used: scikit-learn for the ROC and
precision-recall curves, SciPy for the softmax and the temperature search.

Everything returned is JSON-ready: Python ints/floats/lists/dicts, and ``None`` (never NaN)
where a value is undefined, e.g. the precision of a class the model never predicts.

Conventions (the same in the point estimates and in the bootstrap):

* precision = TP / (TP + FP); ``None`` when the class is never predicted.
* recall    = TP / (TP + FN); ``None`` when the class has no true samples (support 0).
* F1        = 2 TP / (2 TP + FP + FN), which equals 2PR / (P + R) whenever both are defined.
  It is ``None`` only when the class is absent from both the labels and the predictions.
  A class that is present but never predicted therefore gets F1 = 0, not ``None``: dropping it
  from the macro average would reward a model for ignoring a class (sklearn agrees).
* macro-F1  = mean of the per-class F1 values that are defined (``None`` if none is).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

PROB_CLIP = 1e-7
_ROW_SUM_TOL = 1e-3
_BOOT_CHUNK_ELEMENTS = 2_000_000  # resampled indices held in memory at once


# --------------------------------------------------------------------------- validation


def _check_inputs(y_true: Any, probs: Any, classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (y_true as int64 (n,), probs as float64 (n, k)) or raise ValueError naming the problem."""
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, k); got shape {p.shape}")
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D (n,); got shape {y.shape}")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but probs has {p.shape[0]} rows")
    if y.shape[0] == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if classes is not None and p.shape[1] != len(classes):
        raise ValueError(f"probs has {p.shape[1]} columns but {len(classes)} classes were given: {list(classes)}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"y_true must hold integer class indices; got dtype {y.dtype}")
    y = y.astype(np.int64)
    k = p.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true values must be in [0, {k - 1}]; found range [{y.min()}, {y.max()}]")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > _ROW_SUM_TOL:
        raise ValueError(f"probs rows must sum to 1 (softmax outputs); row {worst} sums to {sums[worst]:.6f}")
    return y, p


def _none_if_nan(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _rates(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 (NaN where undefined) and macro-F1 from confusion matrices.

    ``cm`` is (..., k, k) with rows = true class; leading axes (resamples) are broadcast.
    """
    cm = cm.astype(np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    support = cm.sum(axis=-1)
    predicted = cm.sum(axis=-2)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
        denom = support + predicted  # = 2TP + FP + FN
        f1 = np.where(denom > 0, 2.0 * tp / denom, np.nan)
    defined = ~np.isnan(f1)
    n_defined = defined.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        macro = np.where(n_defined > 0, np.where(defined, f1, 0.0).sum(axis=-1) / n_defined, np.nan)
    return precision, recall, f1, macro


# --------------------------------------------------------------------------- point metrics


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (``scipy.special.softmax``), as float64.

    Raises:
        ValueError: if ``temperature`` is not a positive finite number.
    """
    from scipy.special import softmax as _softmax

    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
    return _softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=-1)


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, cross-entropy, per-class precision/recall/F1, macro-F1 and the confusion matrix.

    Args:
        y_true: integer class indices, shape (n,).
        probs: predicted class probabilities, shape (n, k), rows summing to 1.
        classes: class names in column order.

    Returns:
        ``{"classes", "n", "accuracy", "loss", "macro_f1", "per_class": {name: {"precision",
        "recall", "f1", "support"}}, "confusion_matrix"}``; rows of the confusion matrix are true
        classes, columns predicted ones. ``loss`` is the mean categorical cross-entropy with
        probabilities clipped to [1e-7, 1]. See the module docstring for undefined values.

    Raises:
        ValueError: on mismatched shapes, out-of-range labels or rows that do not sum to 1.
    """
    y, p = _check_inputs(y_true, probs, classes)
    k = p.shape[1]
    pred = p.argmax(axis=1)
    cm = _confusion(y, pred, k)
    precision, recall, f1, macro = _rates(cm)
    support = cm.sum(axis=1)
    per_class = {
        name: {
            "precision": _none_if_nan(precision[i]),
            "recall": _none_if_nan(recall[i]),
            "f1": _none_if_nan(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    true_p = np.clip(p[np.arange(len(y)), y], PROB_CLIP, 1.0)
    return {
        "classes": list(classes),
        "n": int(len(y)),
        "accuracy": float(np.trace(cm) / len(y)),
        "loss": float(-np.log(true_p).mean()),
        "macro_f1": _none_if_nan(macro),
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
    }


def metrics_by_group(y_true: np.ndarray, probs: np.ndarray, groups: np.ndarray, classes: list[str]) -> dict[str, dict]:
    """:func:`classification_metrics` for each distinct value of ``groups`` (e.g. image source).

    Keys are ``str(group)`` in sorted order.
    """
    y, p = _check_inputs(y_true, probs, classes)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError(f"groups must have shape {y.shape} like y_true; got {g.shape}")
    return {str(v): classification_metrics(y[g == v], p[g == v], classes) for v in np.unique(g)}


# --------------------------------------------------------------------------- curves


def roc_pr_curves(labels: Any, scores: Any) -> dict:
    """One-vs-rest ROC and precision-recall curves with ROC AUC and average precision (scikit-learn).

    ROC: ``roc_curve`` (every threshold kept, from (0, 0)) and its trapezoidal ``auc``, so ties in
    ``scores`` give diagonal segments. Precision-recall: ``precision_recall_curve`` in the order of
    decreasing threshold, from (recall 0, precision 1), and ``average_precision_score`` =
    sum_n (R_n - R_{n-1}) P_n, without interpolation. Values that need both positives and
    negatives (ROC) or positives (PR) are ``None`` otherwise.

    Returns:
        ``{"fpr", "tpr", "precision", "recall"}`` (arrays or ``None``) and ``"roc_auc"``,
        ``"pr_auc"`` (floats or ``None``).
    """
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = int(labels.sum()), int((~labels).sum())
    out: dict = {"fpr": None, "tpr": None, "precision": None, "recall": None, "roc_auc": None, "pr_auc": None}
    if pos > 0 and neg > 0:
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        out.update(fpr=fpr, tpr=tpr, roc_auc=float(auc(fpr, tpr)))
    if pos > 0:
        precision, recall, _ = precision_recall_curve(labels, scores)
        out.update(precision=precision[::-1], recall=recall[::-1],
                   pr_auc=float(average_precision_score(labels, scores)))
    return out


# --------------------------------------------------------------------------- bootstrap


def _resampled_statistics(y: np.ndarray, prob_sets: Sequence[np.ndarray], n_boot: int,
                          seed: int) -> list[dict[str, np.ndarray]]:
    """Statistics of each ``probs`` in ``prob_sets`` over the same ``n_boot`` resamples of the images.

    The resamples are rows of ``default_rng(seed).integers(0, n, size=(b, n))`` drawn chunk after
    chunk, shared by every set, so a set's statistics do not depend on the others. Each result
    holds arrays over resamples: ``accuracy``, ``macro_f1``, ``loss`` (n_boot,) and ``precision``,
    ``recall``, ``f1`` (n_boot, k), NaN where undefined.
    """
    n, k = prob_sets[0].shape
    rows = np.arange(n)
    codes = [y * k + p.argmax(axis=1) for p in prob_sets]  # one bincount over (resample, true, pred)
    sample_losses = [-np.log(np.clip(p[rows, y], PROB_CLIP, 1.0)) for p in prob_sets]
    rng = np.random.default_rng(seed)
    cms: list[list[np.ndarray]] = [[] for _ in prob_sets]
    losses: list[list[np.ndarray]] = [[] for _ in prob_sets]
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // (n * len(prob_sets)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        offset = np.arange(b)[:, None] * (k * k)
        for j, (code, sample_loss) in enumerate(zip(codes, sample_losses)):
            cms[j].append(np.bincount((offset + code[idx]).ravel(), minlength=b * k * k).reshape(b, k, k))
            losses[j].append(sample_loss[idx].mean(axis=1))
    out = []
    for j in range(len(prob_sets)):
        cm = np.concatenate(cms[j])
        precision, recall, f1, macro = _rates(cm)
        out.append({"accuracy": np.trace(cm, axis1=1, axis2=2) / n, "macro_f1": macro,
                    "loss": np.concatenate(losses[j]), "precision": precision, "recall": recall, "f1": f1})
    return out


def bootstrap_ci(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    n_boot: int,
    seed: int = 0,
    alpha: float = 0.05,
    paired_with: np.ndarray | None = None,
) -> dict:
    """Percentile-bootstrap confidence intervals, resampling images with replacement.

    Args:
        n_boot: resamples (a job passes the config's ``evaluate.bootstrap``).
        paired_with: probabilities of a second model on the same images, shape like ``probs``.
            Given, every interval is of the difference (``probs``'s statistic minus this one's)
            over the same resamples: a paired bootstrap, which cancels the variation both models
            share because they are scored on the same images.

    Returns:
        ``{"accuracy": [lo, hi], "macro_f1": [lo, hi], "loss": [lo, hi], "per_class": {name:
        {"precision": [lo, hi], "recall": [lo, hi], "f1": [lo, hi]}}, "n_boot", "alpha"}``, with
        ``"paired": true`` added in the paired mode. An interval is taken over the resamples where
        the statistic (or, paired, both statistics) is defined; it is ``None`` when that fails in
        more than a fraction ``alpha`` of the resamples, since the interval could then not hold
        its nominal coverage.

    Raises:
        ValueError: on bad inputs (``paired_with`` included), ``n_boot < 1`` or ``alpha`` outside (0, 1).
    """
    y, p = _check_inputs(y_true, probs, classes)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    prob_sets = [p]
    if paired_with is not None:
        prob_sets.append(_check_inputs(y_true, paired_with, classes)[1])
    stats = _resampled_statistics(y, prob_sets, int(n_boot), seed)
    s = stats[0] if paired_with is None else {key: stats[0][key] - stats[1][key] for key in stats[0]}

    def interval(values: np.ndarray) -> list[float] | None:
        ok = values[~np.isnan(values)]
        if ok.size == 0 or (values.size - ok.size) > alpha * values.size:
            return None
        lo, hi = np.percentile(ok, [100 * alpha / 2, 100 * (1 - alpha / 2)])
        return [float(lo), float(hi)]

    out = {
        "accuracy": interval(s["accuracy"]),
        "macro_f1": interval(s["macro_f1"]),
        "loss": interval(s["loss"]),
        "per_class": {
            name: {
                "precision": interval(s["precision"][:, i]),
                "recall": interval(s["recall"][:, i]),
                "f1": interval(s["f1"][:, i]),
            }
            for i, name in enumerate(classes)
        },
        "n_boot": int(n_boot),
        "alpha": float(alpha),
    }
    if paired_with is not None:
        out["paired"] = True
    return out


# --------------------------------------------------------------------------- calibration


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width confidence bins.

    ECE = sum over bins of (bin size / n) * |accuracy in bin - mean confidence in bin|, where the
    confidence is the top probability and bin b holds confidences in (b/n_bins, (b+1)/n_bins].
    """
    y, p = _check_inputs(y_true, probs)
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    # per bin, |sum(correct) - sum(conf)| = bin size * |accuracy - mean confidence|
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=conf, minlength=n_bins)
    return float(np.abs(gap).sum() / len(y))


def _nll(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    from scipy.special import log_softmax

    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(
    logits: np.ndarray,
    y_true: np.ndarray,
    log_t_bounds: tuple[float, float] = (-3.0, 3.0),
    tol: float = 1e-6,
) -> float:
    """Temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (temperature scaling).

    A bounded scalar minimisation (``scipy.optimize.minimize_scalar``, Brent's method) of the NLL
    over log T within ``log_t_bounds``, to ``tol`` in log T: the NLL is convex in 1/T, hence
    unimodal in log T, so it finds the minimum (or the nearer bound, with a warning).

    Raises:
        ValueError: on mismatched shapes, out-of-range labels or non-finite logits.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or not np.all(np.isfinite(z)):
        raise ValueError(f"logits must be a finite 2-D array (n, k); got shape {z.shape}")
    y, _ = _check_inputs(y_true, softmax(z))
    lo, hi = (float(b) for b in log_t_bounds)
    if not lo < hi:
        raise ValueError(f"log_t_bounds must be (low, high) with low < high; got {log_t_bounds}")
    found = minimize_scalar(lambda log_t: _nll(z, y, math.exp(log_t)), bounds=(lo, hi), method="bounded",
                            options={"xatol": tol})
    log_t = float(found.x)
    if min(log_t - lo, hi - log_t) < 1e-3:
        log.warning("fit_temperature: optimum at the search bound (T=%.4g); bounds log T in %s",
                    math.exp(log_t), log_t_bounds)
    return float(math.exp(log_t))


# --------------------------------------------------------------------------- text table


def _fmt(value: Any, ci: Sequence[float] | None = None, digits: int = 3) -> str:
    if value is None:
        text = "n/a"
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        text = str(int(value))
    else:
        text = f"{float(value):.{digits}f}"
    if ci is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def format_table(metrics: dict) -> str:
    """Fixed-width text table of a :func:`classification_metrics` result.

    Per-class precision/recall/F1/support rows, then accuracy, macro-F1 and loss. When
    ``metrics["ci95"]`` holds a :func:`bootstrap_ci` result, each value is followed by its
    interval in brackets. Undefined values are shown as ``n/a``.
    """
    ci = metrics.get("ci95") or {}
    ci_cls = ci.get("per_class") or {}
    classes = list(metrics.get("classes") or metrics["per_class"].keys())
    header = ["class", "precision", "recall", "f1", "support"]
    rows = []
    for name in classes:
        pc = metrics["per_class"][name]
        cc = ci_cls.get(name) or {}
        rows.append([name, _fmt(pc["precision"], cc.get("precision")), _fmt(pc["recall"], cc.get("recall")),
                     _fmt(pc["f1"], cc.get("f1")), _fmt(pc["support"])])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines.append("")
    summary = [
        ("accuracy", _fmt(metrics.get("accuracy"), ci.get("accuracy"))),
        ("macro-F1", _fmt(metrics.get("macro_f1"), ci.get("macro_f1"))),
        ("loss", _fmt(metrics.get("loss"), ci.get("loss"))),
    ]
    if "n" in metrics:
        summary.append(("n", _fmt(metrics["n"])))
    lw = max(len(k) for k, _ in summary)
    lines += [f"{k.ljust(lw)}  {v}" for k, v in summary]
    if ci:
        lines.append(f"(brackets: {100 * (1 - ci.get('alpha', 0.05)):.0f}% bootstrap CI over images)")
    return "\n".join(lines)
