"""Evaluation figures, a self-contained HTML report and a markdown model card.

The HTML report is one file: figures are embedded as base64 ``data:`` URIs, styles are inline,
there is no script and no external link, so it can be mailed or archived as is.
All text taken from inputs is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from covid_spark.storage import atomic_write_text  # noqa: E402

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_LIST_SHOWN = 200  # rejected/skipped inputs, duplicate groups
_DPI = 100


# --------------------------------------------------------------------------- helpers


def _save_figure(fig: "plt.Figure", path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, dpi=_DPI, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if np.isfinite(value) else "n/a"
    return str(value)


def _fmt_ci(value: Any, ci: Sequence[float] | None, digits: int = 3) -> str:
    text = _fmt(value, digits)
    if ci is not None and value is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def _classes_of(metrics: Mapping) -> list[str]:
    return list(metrics.get("classes") or metrics.get("per_class", {}).keys())


# --------------------------------------------------------------------------- curves (numpy)


def _binary_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (fps, tps, thresholds) at each distinct score, from the highest down."""
    order = np.argsort(-scores, kind="mergesort")
    s, l = scores[order], labels[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(l)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return fps, tps, s[last_of_tie]


def roc_pr_curves(labels: np.ndarray, scores: np.ndarray) -> dict:
    """One-vs-rest ROC and precision-recall curves with ROC AUC and average precision.

    ROC AUC is the trapezoidal area (ties in ``scores`` give diagonal segments); average
    precision is sum_n (R_n - R_{n-1}) P_n over distinct thresholds, without interpolation.
    Values that need both positives and negatives (ROC) or positives (PR) are ``None`` otherwise.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = int(labels.sum()), int((~labels).sum())
    fps, tps, _ = _binary_curve(labels, scores)
    out: dict = {"fpr": None, "tpr": None, "precision": None, "recall": None, "roc_auc": None, "pr_auc": None}
    if pos > 0 and neg > 0:
        fpr = np.r_[0.0, fps / neg]
        tpr = np.r_[0.0, tps / pos]
        out.update(fpr=fpr, tpr=tpr, roc_auc=float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)))
    if pos > 0:
        precision = tps / (tps + fps)
        recall = tps / pos
        out.update(precision=np.r_[1.0, precision], recall=np.r_[0.0, recall],
                   pr_auc=float(np.sum(np.diff(np.r_[0.0, recall]) * precision)))
    return out


# --------------------------------------------------------------------------- figures


def plot_history(history: Mapping[str, Sequence[float]], path: str) -> None:
    """Two panels, loss and accuracy per epoch, training vs validation, saved as PNG.

    Args:
        history: like Keras ``History.history``: ``{"loss", "val_loss", "accuracy", "val_accuracy"}``;
            any of them may be missing (a missing panel says so).

    Raises:
        ValueError: if ``history`` has neither "loss" nor "accuracy".
    """
    if not any(history.get(k) for k in ("loss", "accuracy", "val_loss", "val_accuracy")):
        raise ValueError(f"history has no loss or accuracy series; keys found: {sorted(history)}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
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
    _save_figure(fig, path)


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: str) -> None:
    """Confusion matrix as two annotated heatmaps: counts, and rows normalised to recall.

    Rows are true classes, columns predicted ones, both in ``classes`` order.
    """
    counts = np.asarray(cm, dtype=np.int64)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix must be {k}x{k} for classes {list(classes)}; got shape {counts.shape}")
    row_sums = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(row_sums > 0, counts / np.maximum(row_sums, 1), np.nan)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
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
    _save_figure(fig, path)


def plot_roc_pr(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: str) -> dict:
    """One-vs-rest ROC and precision-recall curves for every class in one figure.

    Returns:
        ``{"roc_auc": {cls: float | None}, "pr_auc": {cls: float | None}}``; ``pr_auc`` is the
        average precision. ``None`` where a class has no positives (or, for ROC, no negatives).
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(classes) or y.shape != (p.shape[0],):
        raise ValueError(f"need y_true (n,) and probs (n, {len(classes)}); got {y.shape} and {p.shape}")
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.6))
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
            prevalence = float(np.mean(y == c))
            ax_pr.axhline(prevalence, color=color, linestyle=":", linewidth=0.8)
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
    _save_figure(fig, path)
    return result


# --------------------------------------------------------------------------- HTML pieces


def _png_data_uri(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: PNG file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{what}: {path} is not a PNG file (bad signature)")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None) -> str:
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{_e(caption)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _per_class_rows(metrics: Mapping) -> tuple[list[str], list[list[str]]]:
    classes = _classes_of(metrics)
    ci = (metrics.get("ci95") or {}).get("per_class") or {}
    roc, pr = metrics.get("roc_auc"), metrics.get("pr_auc")
    header = ["class", "precision", "recall", "F1", "support"]
    if isinstance(roc, Mapping):
        header.append("ROC AUC")
    if isinstance(pr, Mapping):
        header.append("average precision")
    rows = []
    for name in classes:
        pc = metrics["per_class"][name]
        cc = ci.get(name) or {}
        row = [name, _fmt_ci(pc.get("precision"), cc.get("precision")), _fmt_ci(pc.get("recall"), cc.get("recall")),
               _fmt_ci(pc.get("f1"), cc.get("f1")), _fmt(pc.get("support"))]
        if isinstance(roc, Mapping):
            row.append(_fmt(roc.get(name)))
        if isinstance(pr, Mapping):
            row.append(_fmt(pr.get(name)))
        rows.append(row)
    return header, rows


def _overall_rows(metrics: Mapping) -> list[list[str]]:
    ci = metrics.get("ci95") or {}
    rows = [["images", _fmt(metrics.get("n"))],
            ["accuracy", _fmt_ci(metrics.get("accuracy"), ci.get("accuracy"))],
            ["macro-F1", _fmt_ci(metrics.get("macro_f1"), ci.get("macro_f1"))],
            ["cross-entropy loss", _fmt_ci(metrics.get("loss"), ci.get("loss"))]]
    known = {"n", "accuracy", "macro_f1", "loss", "classes", "per_class", "confusion_matrix", "ci95",
             "per_source", "roc_auc", "pr_auc"}
    for key, value in metrics.items():  # e.g. ece, temperature
        if key not in known and (value is None or isinstance(value, (int, float, str, np.number))):
            rows.append([key, _fmt(value)])
    return rows


def _per_source_table(per_source: Mapping[str, Mapping], classes: Sequence[str]) -> str:
    header = ["source", "images", "accuracy", "macro-F1"] + [f"{c} recall (support)" for c in classes]
    rows = []
    for source, m in per_source.items():
        row = [source, _fmt(m.get("n")), _fmt(m.get("accuracy")), _fmt(m.get("macro_f1"))]
        for c in classes:
            pc = (m.get("per_class") or {}).get(c) or {}
            row.append(f"{_fmt(pc.get('recall'))} ({_fmt(pc.get('support'))})")
        rows.append(row)
    return _html_table(header, rows)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, np.number))


def _ordered_columns(rows: Mapping[str, Mapping], preferred: Sequence[str]) -> list[str]:
    cols: list[str] = [c for c in preferred if any(c in r for r in rows.values())]
    for r in rows.values():
        cols += [c for c in r if c not in cols]
    return cols


def _path_reason_items(value: Sequence[Any]) -> list[list[str]] | None:
    """``[[path, reason], ...]`` when every entry is a ``{"path", "reason"}`` dict, else None."""
    if not all(isinstance(entry, Mapping) and "path" in entry for entry in value):
        return None
    return [[str(e["path"]), str(e.get("reason", e.get("error", "")))] for e in value]


def _truncated(title: str, rows: list, noun: str) -> tuple[str, list]:
    shown = rows[:MAX_LIST_SHOWN]
    note = f"{len(rows)} {noun}"
    if len(rows) > len(shown):
        note += f"; first {len(shown)} shown, {len(rows) - len(shown)} more not listed"
    return f"{title} ({note})", shown


def _summary_sections(summary: Mapping[str, Any], classes: Sequence[str]) -> list[tuple[str, list[str] | None, Any]]:
    """Interpret a dataset summary generically, as blocks shared by the HTML report and the model card.

    Returns a list of ``(title, header, rows)`` triples; ``header`` is ``None`` when ``rows`` is a
    JSON string for a value that fits no table. Nested ``{row: {col: number}}`` mappings (counts
    per split and class) become matrices with class columns first and a total column; flat
    mappings become two-column tables; lists of ``{"path", "reason"}`` (rejected or skipped
    inputs), lists of groups (duplicates) and lists of flat records (``per_input``, one row per
    input location) become tables truncated to the first 200 entries. ``input`` may be one
    location (older datasets) or a list of them; both show as one row of the totals.
    """
    blocks: list = []
    scalars = []
    for key, value in summary.items():
        title = str(key).replace("_", " ")
        if _is_scalar(value):
            scalars.append([title, _fmt(value)])
        elif isinstance(value, (list, tuple)):
            pairs = _path_reason_items(value) if value else None
            if not value:
                scalars.append([title, "none"])
            elif pairs is not None:
                head, shown = _truncated(title, pairs, "input(s)")
                blocks.append((head, ["path", "reason"], shown))
            elif all(_is_scalar(v) for v in value) and len(value) <= 20:
                scalars.append([title, ", ".join(_fmt(v) for v in value)])
            elif all(_is_scalar(v) for v in value):
                head, shown = _truncated(title, [[_fmt(v)] for v in value], "item(s)")
                blocks.append((head, ["value"], shown))
            elif all(isinstance(v, (list, tuple)) and all(_is_scalar(x) for x in v) for v in value):
                head, shown = _truncated(title, [[str(i + 1), ", ".join(_fmt(x) for x in v)]
                                                 for i, v in enumerate(value)], "group(s)")
                blocks.append((head, ["#", "members"], shown))
            elif all(isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()) for v in value):
                # e.g. per_input: one row per input location with its counts
                cols = []
                for v in value:
                    cols += [str(c) for c in v if str(c) not in cols]
                head, shown = _truncated(title, [[_fmt(v.get(c)) for c in cols] for v in value], "row(s)")
                blocks.append((head, cols, shown))
            else:
                head, shown = _truncated(title, list(value), "item(s)")
                blocks.append((head, None, json.dumps(shown, indent=2, sort_keys=True, default=str)))
        elif isinstance(value, Mapping) and not value:
            scalars.append([title, "none"])
        elif isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values()) \
                and all(_is_scalar(x) for v in value.values() for x in v.values()):
            cols = _ordered_columns(value, classes)
            numeric = all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
                          for v in value.values() for x in v.values())
            header = [""] + cols + (["total"] if numeric else [])
            rows = []
            for rkey, r in value.items():
                row = [str(rkey)] + [_fmt(r.get(c, 0 if numeric else None)) for c in cols]
                if numeric:
                    row.append(_fmt(sum(r.values())))
                rows.append(row)
            blocks.append((title, header, rows))
        elif isinstance(value, Mapping) and all(_is_scalar(v) for v in value.values()):
            keys = _ordered_columns({"_": value}, classes)
            rows = [[str(k), _fmt(value[k])] for k in keys]
            numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value.values())
            if numeric and len(rows) > 1:
                rows.append(["total", _fmt(sum(value.values()))])
            blocks.append((title, ["", "count" if numeric else "value"], rows))
        else:
            blocks.append((title, None, json.dumps(value, indent=2, sort_keys=True, default=str)))
    if scalars:
        blocks.insert(0, ("totals", ["", "value"], scalars))
    return blocks


_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 1.6em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em 0; }
th, td { border: 1px solid #ccc; padding: 3px 9px; text-align: right; font-size: 0.92em; }
th:first-child, td:first-child { text-align: left; }
caption { text-align: left; font-weight: bold; padding: 3px 0; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
.gallery figure { width: 260px; } .gallery img { width: 256px; }
.note { color: #555; font-size: 0.9em; }
"""


def write_html_report(
    path: str,
    *,
    title: str,
    metrics: dict,
    figures: dict[str, str],
    dataset_summary: dict | None,
    config: dict,
    versions: dict,
    gradcam: list[dict] | None = None,
    gradcam_layer: str | None = None,
    extra_sections: dict[str, str] | None = None,
) -> None:
    """Write one self-contained HTML evaluation report.

    Args:
        path: output file; written to ``path + ".tmp"`` first and renamed into place.
        title: page title.
        metrics: a :func:`covid_spark.metrics.classification_metrics` result, optionally with
            ``"ci95"`` (a bootstrap_ci result), ``"per_source"`` (metrics_by_group result),
            ``"roc_auc"`` / ``"pr_auc"`` (per-class dicts) and extra scalars such as ``"ece"``.
        figures: caption -> PNG path, embedded as base64 data URIs.
        dataset_summary: counts per class / split / source and a ``"rejected"`` list of
            ``{"path", "reason"}``; any other keys are shown generically. ``None`` to omit.
        config: the run configuration, shown as pretty JSON.
        versions: library name -> version.
        gradcam: items ``{"png": path, "caption": str}`` for the Grad-CAM gallery.
        gradcam_layer: the convolution layer the Grad-CAM maps come from.
        extra_sections: title -> plain text, each shown in its own section.

    Raises:
        FileNotFoundError: if a figure or Grad-CAM PNG is missing.
        ValueError: if one of them is not a PNG.
    """
    classes = _classes_of(metrics)
    body: list[str] = [f"<h1>{_e(title)}</h1>"]

    body.append("<h2>Metrics</h2>")
    header, rows = _per_class_rows(metrics)
    body.append(_html_table(header, rows, caption="Per class"))
    body.append(_html_table(["", "value"], _overall_rows(metrics), caption="Overall"))
    ci = metrics.get("ci95")
    if ci:
        level = 100 * (1 - float(ci.get("alpha", 0.05)))
        body.append(f'<p class="note">Brackets: {level:.0f}% percentile-bootstrap confidence intervals over test '
                    f'images ({_e(ci.get("n_boot", "?"))} resamples); n/a where undefined.</p>')
    cm = metrics.get("confusion_matrix")
    if cm is not None:
        body.append(_html_table(["true \\ predicted"] + classes,
                                [[c] + [str(v) for v in r] for c, r in zip(classes, cm)], caption="Confusion matrix"))
    if metrics.get("per_source"):
        body.append("<h3>Per source</h3>")
        body.append('<p class="note">Sources are confounded with labels: compare recall within each source.</p>')
        body.append(_per_source_table(metrics["per_source"], classes))

    if figures:
        body.append("<h2>Figures</h2>")
        for caption, png in figures.items():
            uri = _png_data_uri(png, f"figure {caption!r}")
            body.append(f'<figure><img src="{uri}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>')

    if dataset_summary:
        body.append("<h2>Dataset</h2>")
        for block_title, block_header, content in _summary_sections(dataset_summary, classes):
            if block_header is None:
                body.append(f"<h3>{_e(block_title)}</h3><pre>{_e(content)}</pre>")
            else:
                body.append(_html_table(block_header, content, caption=block_title))

    if gradcam:
        body.append("<h2>Grad-CAM</h2>")
        body.append(f'<p class="note">Heatmaps of the gradient-weighted activations of layer '
                    f'<code>{_e(gradcam_layer or "unknown")}</code>, for the predicted class unless a caption says '
                    f'otherwise. They show where the model looked, not why, and can reveal shortcuts such as '
                    f'text markers or borders.</p>')
        body.append('<div class="gallery">')
        for i, item in enumerate(gradcam):
            uri = _png_data_uri(item["png"], f"Grad-CAM item {i}")
            cap = item.get("caption", "")
            body.append(f'<figure><img src="{uri}" alt="{_e(cap)}"><figcaption>{_e(cap)}</figcaption></figure>')
        body.append("</div>")

    for sec_title, text in (extra_sections or {}).items():
        body.append(f"<h2>{_e(sec_title)}</h2><pre>{_e(text)}</pre>")

    body.append("<h2>Configuration</h2>")
    body.append(f"<pre>{_e(json.dumps(config, indent=2, sort_keys=True, default=str))}</pre>")
    body.append("<h2>Library versions</h2>")
    body.append(_html_table(["library", "version"], [[k, v] for k, v in sorted(versions.items())]))

    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    atomic_write_text(path, page)
    log.info("wrote HTML report %s (%d bytes)", path, len(page))


# --------------------------------------------------------------------------- model card


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines + [""]


DEFAULT_LIMITATIONS = [
    "**Source/label confounding.** Most COVID-19 images come from one collection (ieee8023) and most "
    "normal and pneumonia images from another (kaggle3way). The model can score well by recognising "
    "the source (scanner, resolution, text markers) rather than disease; compare the per-source metrics.",
    "**Pediatric normals.** The kaggle3way normal and pneumonia images are of children, while COVID-19 "
    "images are of adults, so age is another shortcut between classes.",
    "**Small test set.** A few hundred images from a few hundred patients: confidence intervals are wide, "
    "and a difference of a few points between runs is mostly noise.",
    "**Class imbalance.** COVID-19 images outnumber normal and pneumonia ones several times; accuracy "
    "hides poor recall on the small classes, so read per-class recall and macro-F1.",
    "**Not externally validated.** All images come from public collections assembled in 2020; "
    "performance on another hospital's images is unknown.",
]


def write_model_card(path: str, *, run: dict, metrics: dict, dataset_summary: dict | None,
                     licenses: list[str] | None) -> None:
    """Write a markdown model card (model, data, metrics, intended use, limitations, licences).

    Args:
        path: output ``.md`` file, written atomically.
        run: run id, model and training configuration; scalars become a list, nested values JSON.
        metrics: as for :func:`write_html_report` (``ci95`` and ``per_source`` used when present).
        dataset_summary: as for :func:`write_html_report`, or ``None``.
        licenses: licence statements of the training data, or ``None``.
    """
    classes = _classes_of(metrics)
    title = run.get("run_id") or run.get("name") or "unnamed run"
    out = [f"# Model card: covid-spark chest X-ray classifier ({_md(title)})", ""]

    out += ["## Model and training", ""]
    nested = {}
    for key, value in run.items():
        if _is_scalar(value) or (isinstance(value, (list, tuple)) and all(_is_scalar(v) for v in value)):
            out.append(f"- **{_md(key)}**: {_md(value if _is_scalar(value) else ', '.join(map(str, value)))}")
        else:
            nested[key] = value
    out.append(f"- **classes** (output order): {', '.join(classes)}")
    out.append("")
    for key, value in nested.items():
        out += [f"**{_md(key)}**", "", "```json", json.dumps(value, indent=2, sort_keys=True, default=str), "```", ""]

    out += ["## Data and splits", ""]
    if dataset_summary:
        for block_title, header, content in _summary_sections(dataset_summary, classes):
            out += [f"**{_md(block_title)}**", ""]
            if header is None:
                out += ["```json", content, "```", ""]
            else:
                out += _md_table([h or " " for h in header], content)
    else:
        out += ["No dataset summary was recorded for this run.", ""]

    out += ["## Metrics (test split)", ""]
    header, rows = _per_class_rows(metrics)
    out += _md_table(header, rows)
    out += _md_table(["overall", "value"], _overall_rows(metrics))
    ci = metrics.get("ci95")
    if ci:
        out += [f"Brackets: {100 * (1 - float(ci.get('alpha', 0.05))):.0f}% percentile-bootstrap confidence "
                f"intervals over test images ({ci.get('n_boot', '?')} resamples).", ""]
    if metrics.get("per_source"):
        out += ["### Per source", ""]
        src_header = ["source", "images", "accuracy", "macro-F1"] + [f"{c} recall (support)" for c in classes]
        src_rows = []
        for source, m in metrics["per_source"].items():
            pcs = m.get("per_class") or {}
            src_rows.append([source, _fmt(m.get("n")), _fmt(m.get("accuracy")), _fmt(m.get("macro_f1"))]
                            + [f"{_fmt((pcs.get(c) or {}).get('recall'))} ({_fmt((pcs.get(c) or {}).get('support'))})"
                               for c in classes])
        out += _md_table(src_header, src_rows)

    out += ["## Intended use", "",
            "**Research only — not a diagnostic device.** This model is for studying distributed training "
            "and evaluation of chest X-ray classifiers. It must not be used to diagnose, triage or "
            "treat patients, or in any clinical decision.", ""]

    out += ["## Known limitations", ""]
    out += [f"- {item}" for item in DEFAULT_LIMITATIONS] + [""]

    out += ["## Data licences", ""]
    out += [f"- {_md(item)}" for item in (licenses or ["(no licence list was recorded)"])]
    out += ["", "Note: many images in cxr3 (notably from the covid-chestxray-dataset) are licensed "
            "CC BY-NC-SA — non-commercial use only, share-alike. The images, and arguably models trained "
            "on them, are fine for research but not for a commercial product; check each image's licence "
            "in the manifest before any redistribution.", ""]
    atomic_write_text(path, "\n".join(out))
    log.info("wrote model card %s", path)
