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
import re
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


def _group_rows(groups: Mapping[str, Mapping], classes: Sequence[str],
                first: str = "source") -> tuple[list[str], list[list[str]]]:
    """Header and rows of a table with one row per group of test images (source, input, ...)."""
    header = [first, "images", "accuracy", "macro-F1"] + [f"{c} recall (support)" for c in classes]
    rows = []
    for group, m in groups.items():
        row = [group, _fmt(m.get("n")), _fmt(m.get("accuracy")), _fmt_ci(m.get("macro_f1"), (m.get("ci95") or {}).get("macro_f1"))]
        for c in classes:
            pc = (m.get("per_class") or {}).get(c) or {}
            row.append(f"{_fmt(pc.get('recall'))} ({_fmt(pc.get('support'))})")
        rows.append(row)
    return header, rows


def _parts(metrics: Mapping) -> dict[str, Mapping]:
    """The evaluation's parts beside the sources: each input of a several-input dataset, and the
    images with a patient id (split per patient) where only some have one."""
    parts = {f"input {name}": m for name, m in (metrics.get("per_input") or {}).items()}
    if metrics.get("patient_wise"):
        wise = metrics["patient_wise"]
        parts[f"images with a patient id ({', '.join(wise.get('sources') or [])})"] = wise
    return parts


def _per_source_table(per_source: Mapping[str, Mapping], classes: Sequence[str]) -> str:
    return _html_table(*_group_rows(per_source, classes))


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
        body.append(f'<p class="note">{_md_bold_to_html(source_confounding(dataset_summary, classes))}</p>')
        body.append(_per_source_table(metrics["per_source"], classes))
    if _parts(metrics):
        body.append("<h3>Per input, and the part split per patient</h3>")
        body.append(_html_table(*_group_rows(_parts(metrics), classes, first="part")))

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

    body.append("<h2>Known limitations</h2>")
    body.append("<ul>" + "".join(f"<li>{_md_bold_to_html(item)}</li>"
                                 for item in data_limitations(dataset_summary, metrics)) + "</ul>")

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


#: One sentence each about public collections we know; shown only for sources present in the data.
KNOWN_SOURCES = {
    "kaggle3way": "Pediatric patients (Guangzhou); where the other classes are adults, age is a shortcut "
                  "between classes.",
    "kermany": "Pediatric patients (Guangzhou); where the other classes are adults, age is a shortcut "
               "between classes.",
    "ieee8023": "COVID-19 images collected from publications and websites, of mixed quality.",
    "radiography2021": "Kaggle COVID-19 Radiography Database (2021), without patient ids; its COVID-19 images "
                       "come mostly from BIMCV/PadChest (Spain) and its normals mostly from RSNA (USA).",
    "nih": "NIH ChestX-ray14, adults; labels were mined from radiology reports and are noisy.",
    "hannover": "Hannover Medical School; COVID-19 images only.",
}

CONFOUND_SHARE = 0.5    # a class is confounded when at least this share of it comes from one source ...
CONFOUND_PURITY = 0.9   # ... of which at least this share is that class (it holds almost nothing else)
SMALL_TEST_CLASS = 100  # fewer test images than this in some class: the test set is called small

_NC = re.compile(r"(?<![A-Za-z])NC(?![A-Za-z])|(?i:non-?commercial)")


def _n(value: Any) -> str:
    """An image count with thousands separators."""
    return f"{int(value):,}"


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%"


def _cap(text: str) -> str:
    """``text`` with its first letter upper-cased (unlike str.capitalize, the rest is kept)."""
    return text[:1].upper() + text[1:]


def _inputs_of(summary: Mapping) -> list[str]:
    """The summary's input location(s): a list, or one string in summaries of single-input datasets."""
    value = summary.get("input")
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def _sources_of(summary: Mapping) -> list[str]:
    """Sources present in the data (with at least one image), in the summary's order."""
    names: list[str] = []
    for key in ("per_source", "per_source_class", "patient_ids_per_source"):
        names += [str(s) for s in (summary.get(key) or {}) if str(s) not in names]
    return [s for s in names if _source_total(summary, s) != 0]


def _source_total(summary: Mapping, source: str) -> int | None:
    """Images of ``source``, from ``per_source`` or else ``per_source_class``; None when unknown."""
    if source in (summary.get("per_source") or {}):
        return int(summary["per_source"][source])
    if source in (summary.get("per_source_class") or {}):
        return int(sum(summary["per_source_class"][source].values()))
    return None


def _summary_classes(summary: Mapping, metrics: Mapping) -> list[str]:
    classes = list(_classes_of(metrics)) or [str(c) for c in summary.get("classes") or []]
    for counts in [summary.get("per_class") or {}, *(summary.get("per_source_class") or {}).values()]:
        classes += [str(c) for c in counts if str(c) not in classes]
    return classes


def _patient_id_counts(summary: Mapping) -> dict[str, tuple[int, int | None]]:
    """Per source: (images with a patient id, images); empty without ``patient_ids_per_source``."""
    with_ids = summary.get("patient_ids_per_source")
    if not isinstance(with_ids, Mapping):
        return {}
    return {str(s): (int(k), _source_total(summary, str(s))) for s, k in with_ids.items()}


def patient_id_status(summary: Mapping) -> dict[str, str]:
    """Per source, whether its images carry patient ids: ``"yes"``, ``"no"`` or ``"partly (k of n)"``.

    Empty when the summary has no ``patient_ids_per_source`` (older datasets). Images without a
    patient id were split per image.
    """
    status = {}
    for source, (k, total) in _patient_id_counts(summary).items():
        if k == 0:
            status[source] = "no"
        elif total is None or k >= total:
            status[source] = "yes"
        else:
            status[source] = f"partly ({_n(k)} of {_n(total)})"
    return status


def source_confounding(summary: Mapping | None, classes: Sequence[str] = ()) -> str:
    """One sentence (or a few) on source/label confounding, computed from ``per_source_class``.

    For each class: the source holding the largest share of its images. A class is called
    confounded with a source when at least half of its images come from it and at least 90% of
    that source's images are of that class; sources that hold one class only are named. Without
    ``per_source_class`` the sentence says confounding could not be checked.
    """
    table = (summary or {}).get("per_source_class")
    if not isinstance(table, Mapping) or not table:
        return ("**Source/label confounding not checked.** Class counts per source were not recorded for this "
                "dataset, so whether a class comes mostly from one collection is unknown; a model can score well "
                "by recognising the source (scanner, resolution, text markers) rather than disease, so compare "
                "the per-source metrics.")
    classes = list(classes) or []
    for counts in table.values():
        classes += [str(c) for c in counts if str(c) not in classes]
    source_total = {s: sum(int(v) for v in counts.values()) for s, counts in table.items()}
    largest, confounded = [], []
    for c in classes:
        per_source = {s: int(counts.get(c, 0)) for s, counts in table.items()}
        total = sum(per_source.values())
        if total == 0:
            largest.append(f"{c} has no images")
            continue
        top = max(per_source, key=lambda s: per_source[s])
        largest.append(f"{c} {_pct(per_source[top], total)} from {top}")
        purity = per_source[top] / source_total[top]
        if per_source[top] >= CONFOUND_SHARE * total and purity >= CONFOUND_PURITY:
            confounded.append(f"{_pct(per_source[top], total)} of {c} images come from {top}, "
                              f"and {_pct(per_source[top], source_total[top])} of {top}'s images are {c}")
    single = [f"{s} ({next(c for c, v in counts.items() if int(v) > 0)})" for s, counts in table.items()
              if sum(1 for v in counts.values() if int(v) > 0) == 1]
    text = "Largest source per class: " + ", ".join(largest) + "."
    if confounded:
        text = ("**Source/label confounding.** " + text + " " + _cap("; ".join(confounded))
                + ": the model can score well by recognising the source (scanner, resolution, text markers) "
                  "rather than disease.")
    else:
        text = ("**Sources mixed across classes.** " + text + " No class has half or more of its images from a "
                "source that holds almost no other class.")
    if single:
        text += " Sources holding only one class: " + ", ".join(single) + "."
    return text + " Compare the per-source metrics."


def data_limitations(summary: Mapping | None, metrics: Mapping) -> list[str]:
    """The model card's "Known limitations" bullets (markdown), computed from a dataset summary.

    Args:
        summary: a preprocess ``_summary.json`` dict, or ``None`` (a short generic list then).
            Uses ``per_source_class``, ``patient_ids_per_source`` (both optional), ``per_source``,
            ``per_class``, ``per_split``, ``per_split_class`` and ``config.holdout_source``.
        metrics: the test metrics; only their class order is used.
    """
    not_validated = ("**Not externally validated.** All images come from public collections{}; performance "
                     "on another hospital's images is unknown.")
    if not summary:
        return ["**Source/label confounding unknown.** No dataset summary was recorded, so where each class's "
                "images come from is unknown; a model can learn the source rather than the disease.",
                not_validated.format("")]
    classes = _summary_classes(summary, metrics)
    sources = _sources_of(summary)
    out = [source_confounding(summary, classes)]

    out += [f"**Source {s}.** {KNOWN_SOURCES[s.lower()]}" for s in sources if s.lower() in KNOWN_SOURCES]

    counts = _patient_id_counts(summary)
    if counts:
        missing = [src for src in sources if src in counts and counts[src][0] == 0]
        partly = [src for src in sources if src in counts and 0 < counts[src][0] < (counts[src][1] or 0)]
        parts = [f"images of {', '.join(missing)} carry no patient id"] if missing else []
        parts += [f"only {_n(counts[src][0])} of {_n(counts[src][1])} images of {src} carry one" for src in partly]
        if parts:
            out.append("**Per-image split where patient ids are missing.** " + _cap("; ".join(parts))
                       + ". Those images were split per image: near-identical images of one patient may sit in "
                         "both train and test, so figures on "
                       + ("these sources" if len(missing) + len(partly) > 1 else "that source") + " are optimistic.")
        else:
            out.append("**Patient-level split.** Every image carries a patient id, so no patient's images are "
                       "in more than one split.")
    else:
        out.append("**Patient ids not recorded per source.** Images without a patient id are split per image, "
                   "so near-identical images of one patient may sit in both train and test.")

    test_total = (summary.get("per_split") or {}).get("test")
    test_class = (summary.get("per_split_class") or {}).get("test") or {}
    if test_total is not None:
        text = f"{_n(test_total)} test images"
        if test_class:
            text += " (" + ", ".join(f"{c} {_n(test_class.get(c, 0))}" for c in classes) + ")"
            smallest = min(int(test_class.get(c, 0)) for c in classes)
            small = smallest < SMALL_TEST_CLASS
        else:
            small = int(test_total) < SMALL_TEST_CLASS * max(len(classes), 1)
        if small:
            out.append(f"**Small test set.** {text}: confidence intervals are wide, and a difference of a few "
                       f"points between runs is mostly noise.")
        else:
            out.append(f"**Test set.** {text}; read the confidence intervals before comparing runs.")

    per_class = {c: int((summary.get("per_class") or {}).get(c, 0)) for c in classes}
    if len(per_class) > 1 and max(per_class.values()) > 0:
        big = max(per_class, key=lambda c: per_class[c])
        low = min(per_class, key=lambda c: per_class[c])
        if per_class[low] == 0:
            out.append(f"**Class imbalance.** There are no {low} images; the model cannot have learned that class.")
        else:
            ratio = per_class[big] / per_class[low]
            head = "**Class imbalance.**" if ratio >= 1.5 else "**Class balance.**"
            out.append(f"{head} {big} {_n(per_class[big])} images vs {low} {_n(per_class[low])} "
                       f"({ratio:.1f}×); accuracy can hide poor recall on the smaller classes, so read "
                       f"per-class recall and macro-F1.")

    holdout = (summary.get("config") or {}).get("holdout_source")
    if holdout:
        out.append(f"**Leave-one-source-out.** Every test image comes from source {holdout}, which training and "
                   f"validation never saw; the test set covers only the classes that source holds.")

    out.append(not_validated.format(f" ({', '.join(sources)})" if sources else ""))
    return out


def licence_note(licenses: Sequence[str] | None) -> str:
    """The model card's note under the licence list, derived from the licence strings found.

    Names the non-commercial licences (an ``NC`` element, as in "CC BY-NC-SA 4.0", or the word
    non-commercial) when there are any; always asks to check each image's licence.
    """
    if not licenses:
        return ("No licence column was found in the input manifests: check each source's terms of use yourself "
                "before using or redistributing the images or models trained on them.")
    nc = [str(x) for x in licenses if _NC.search(str(x))]
    text = ""
    if nc:
        text = ("Some training images are licensed non-commercial (" + "; ".join(nc) + "): the images, and "
                "arguably models trained on them, are fine for research but not for a commercial product. ")
    return text + "Check each image's licence in the manifest before any redistribution."


def training_data_lines(summary: Mapping, classes: Sequence[str] = ()) -> list[str]:
    """Markdown for the "Training data" paragraph: inputs with images written, source × class counts.

    The source × class table (with a "patient ids" column: yes / no / partly) needs
    ``per_source_class`` (and ``patient_ids_per_source``); older summaries get the inputs only.
    """
    total = sum(int(v) for v in (summary.get("per_class") or {}).values()) or summary.get("written")
    inputs = _inputs_of(summary)
    out = ["**Training data**", ""]
    head = f"{_n(total)} images" if total is not None else "Images"
    out += [f"{head} from {len(inputs)} input location(s)." if inputs else f"{head}; input locations not recorded.",
            ""]
    per_input = [r for r in summary.get("per_input") or [] if isinstance(r, Mapping)]
    if per_input:
        rows = [[r.get("input", "?"), _n(r["written"]) if isinstance(r.get("written"), int) else _fmt(r.get("written"))]
                for r in per_input]
        out += _md_table(["input", "images written"], rows)
    elif inputs:
        out += [f"- {_md(loc)}" for loc in inputs] + [""]
    table = summary.get("per_source_class")
    if isinstance(table, Mapping) and table:
        classes = _summary_classes(summary, {"classes": list(classes)})
        status = patient_id_status(summary)
        header = ["source"] + classes + ["total"] + (["patient ids"] if status else [])
        rows = []
        for source, counts in table.items():
            row = [source] + [_n(counts.get(c, 0)) for c in classes] + [_n(sum(counts.values()))]
            rows.append(row + ([status.get(str(source), "n/a")] if status else []))
        out += _md_table(header, rows)
    return out


# summary keys the "Training data" table of the model card shows in full
_IN_TRAINING_DATA = ("per_source_class", "patient_ids_per_source")


def _md_bold_to_html(text: str) -> str:
    """Escape ``text`` and turn markdown ``**bold**`` into ``<strong>``."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", _e(text))


def write_model_card(path: str, *, run: dict, metrics: dict, dataset_summary: dict | None,
                     licenses: list[str] | None) -> None:
    """Write a markdown model card (model, data, metrics, intended use, limitations, licences).

    The training-data description, the known limitations (:func:`data_limitations`) and the
    licence note (:func:`licence_note`) are derived from ``dataset_summary`` and ``licenses``,
    so the card describes whichever collection the model was trained on.

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
        out += training_data_lines(dataset_summary, classes)
        shown = {k: v for k, v in dataset_summary.items() if k not in _IN_TRAINING_DATA}  # not twice
        for block_title, header, content in _summary_sections(shown, classes):
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
        out += _md_table(*_group_rows(metrics["per_source"], classes))
    if _parts(metrics):
        out += ["### Per input, and the part split per patient", ""]
        out += _md_table(*_group_rows(_parts(metrics), classes, first="part"))

    out += ["## Intended use", "",
            "**Research only — not a diagnostic device.** This model is for studying distributed training "
            "and evaluation of chest X-ray classifiers. It must not be used to diagnose, triage or "
            "treat patients, or in any clinical decision.", ""]

    out += ["## Known limitations", ""]
    out += [f"- {item}" for item in data_limitations(dataset_summary, metrics)] + [""]

    out += ["## Data licences", ""]
    if licenses:
        out += [f"- {_md(item)}" for item in licenses] + [""]
    out += ["Note: " + licence_note(licenses), ""]
    atomic_write_text(path, "\n".join(out))
    log.info("wrote model card %s", path)
