"""The report's figures: training history, confusion matrix, ROC and precision-recall curves.

Each figure is built by a pure function returning a :class:`matplotlib.figure.Figure` (no pyplot
state, so nothing to close and no backend to choose), which tests can inspect, and saved as PNG
by a ``plot_*`` function that writes atomically.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from covid_spark.evaluation.metrics import roc_pr_curves

DPI = 100


def save_png(fig: Figure, path: str) -> None:
    """Write ``fig`` to ``path`` as PNG through a temporary file renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, dpi=DPI, format="png")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- history


def history_figure(history: Mapping[str, Sequence[float]]) -> Figure:
    """Two panels, loss and accuracy per epoch, training (solid) vs validation (dashed).

    Args:
        history: like Keras ``History.history``: ``{"loss", "val_loss", "accuracy", "val_accuracy"}``;
            any of them may be missing (a missing panel says so).

    Raises:
        ValueError: if ``history`` has none of those four series.
    """
    if not any(history.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy")):
        raise ValueError(f"history has no loss or accuracy series; keys found: {sorted(history)}")
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        plotted = False
        for key, label, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "--s")):
            values = history.get(key)
            if values:
                epochs = np.arange(1, len(values) + 1)
                ax.plot(epochs, np.asarray(values, dtype=float), style, label=label, markersize=3)
                plotted = True
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.text(0.5, 0.5, f"no {metric} recorded", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_history(history: Mapping[str, Sequence[float]], path: str) -> None:
    """:func:`history_figure` saved as PNG at ``path``."""
    save_png(history_figure(history), path)


# --------------------------------------------------------------------------- confusion matrix


def confusion_figure(cm: Sequence[Sequence[int]], classes: Sequence[str]) -> Figure:
    """Confusion matrix as two annotated heatmaps: counts, and rows normalised to recall.

    Rows are true classes, columns predicted ones, both in ``classes`` order; every cell is
    labelled with its count (left) or its share of the row to 2 places (right; ``n/a`` for a
    class with no images).

    Raises:
        ValueError: if ``cm`` is not k × k for the k ``classes``.
    """
    counts = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k}x{k} for classes {list(classes)}; got shape {counts.shape}")
    row_sums = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(row_sums > 0, counts / np.maximum(row_sums, 1), np.nan)
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2)
    panels = ((axes[0], counts, "counts", counts.max() if counts.size else 1),
              (axes[1], norm, "row-normalised (recall on the diagonal)", 1.0))
    for ax, data, title, vmax in panels:
        shown = np.nan_to_num(data.astype(float), nan=0.0)
        im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=max(float(vmax), 1e-12))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        for i in range(k):
            for j in range(k):
                v = data[i, j]
                if data is counts:
                    text = str(int(v))
                else:
                    text = "n/a" if np.isnan(v) else f"{v:.2f}"
                dark = shown[i, j] > 0.6 * vmax
                ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=11)
        ax.set_xticks(range(k), labels=list(classes))
        ax.set_yticks(range(k), labels=list(classes))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str) -> None:
    """:func:`confusion_figure` saved as PNG at ``path``."""
    save_png(confusion_figure(cm, classes), path)


# --------------------------------------------------------------------------- ROC and precision-recall


def roc_pr_figure(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> tuple[Figure, dict]:
    """One-vs-rest ROC and precision-recall curves for every class in one figure.

    The curves and areas are :func:`covid_spark.evaluation.metrics.roc_pr_curves` (scikit-learn); the PR
    panel marks each class's prevalence with a dotted line.

    Returns:
        The figure, and ``{"roc_auc": {cls: float | None}, "pr_auc": {cls: float | None}}``;
        ``pr_auc`` is the average precision. ``None`` where a class has no positives (or, for
        ROC, no negatives).

    Raises:
        ValueError: unless ``y_true`` is (n,) and ``probs`` (n, len(classes)).
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(classes) or y.shape != (p.shape[0],):
        raise ValueError(f"need y_true (n,) and probs (n, {len(classes)}); got {y.shape} and {p.shape}")
    fig = Figure(figsize=(11, 4.6))
    ax_roc, ax_pr = fig.subplots(1, 2)
    result: dict = {"roc_auc": {}, "pr_auc": {}}
    for c, name in enumerate(classes):
        curve = roc_pr_curves(y == c, p[:, c])
        result["roc_auc"][name] = curve["roc_auc"]
        result["pr_auc"][name] = curve["pr_auc"]
        color = f"C{c}"
        if curve["fpr"] is not None:
            ax_roc.plot(curve["fpr"], curve["tpr"], color=color, label=f"{name} (AUC {curve['roc_auc']:.3f})")
        else:
            ax_roc.plot([], [], color=color, label=f"{name} (AUC n/a)")
        if curve["recall"] is not None:
            ax_pr.step(curve["recall"], curve["precision"], where="pre", color=color,
                       label=f"{name} (AP {curve['pr_auc']:.3f})")
            ax_pr.axhline(float(np.mean(y == c)), color=color, linestyle=":", linewidth=0.8)
        else:
            ax_pr.plot([], [], color=color, label=f"{name} (AP n/a)")
    ax_roc.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax_roc.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="false positive rate", ylabel="true positive rate",
               title="ROC, one vs rest")
    ax_pr.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
              title="precision-recall, one vs rest (dotted: prevalence)")
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=9)
    fig.tight_layout()
    return fig, result


def plot_roc_pr(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str) -> dict:
    """:func:`roc_pr_figure` saved as PNG at ``path``; returns its areas."""
    fig, result = roc_pr_figure(y_true, probs, classes)
    save_png(fig, path)
    return result
