"""The report's tables as rows of display strings, built once for the HTML page and the model card.

A :class:`Table` is a caption, a header and rows of already formatted cells; the HTML template
and the markdown card only lay them out (and escape them), so both show the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from covid_spark.report.summary import patient_id_status, summary_classes

MAX_LIST_SHOWN = 200  # rejected/skipped inputs, duplicate groups


@dataclass
class Table:
    """Rows of formatted cells under ``header``; ``text`` (preformatted JSON) instead when ``header`` is None."""

    caption: str | None
    header: list[str] | None
    rows: list[list[str]] = field(default_factory=list)
    text: str | None = None


# --------------------------------------------------------------------------- cell formatting


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: ints as they are, floats to ``digits`` places, ``n/a`` for None, NaN and infinities."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if np.isfinite(value) else "n/a"
    return str(value)


def fmt_ci(value: Any, ci: Sequence[float] | None, digits: int = 3) -> str:
    """:func:`fmt` followed by the interval in brackets, when there is one."""
    text = fmt(value, digits)
    if ci is not None and value is not None:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def count(value: Any) -> str:
    """An image count with thousands separators."""
    return f"{int(value):,}"


def is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, np.number))


def classes_of(metrics: Mapping) -> list[str]:
    """The class names of a metrics dict, in output order."""
    return list(metrics.get("classes") or metrics.get("per_class", {}).keys())


# --------------------------------------------------------------------------- metrics


def per_class_table(metrics: Mapping) -> Table:
    """Precision, recall, F1 (with intervals where ``ci95`` has them), support, and per-class
    ROC AUC and average precision where ``metrics`` holds them."""
    ci = (metrics.get("ci95") or {}).get("per_class") or {}
    roc, pr = metrics.get("roc_auc"), metrics.get("pr_auc")
    header = ["class", "precision", "recall", "F1", "support"]
    if isinstance(roc, Mapping):
        header.append("ROC AUC")
    if isinstance(pr, Mapping):
        header.append("average precision")
    rows = []
    for name in classes_of(metrics):
        pc = metrics["per_class"][name]
        cc = ci.get(name) or {}
        row = [name, fmt_ci(pc.get("precision"), cc.get("precision")), fmt_ci(pc.get("recall"), cc.get("recall")),
               fmt_ci(pc.get("f1"), cc.get("f1")), fmt(pc.get("support"))]
        if isinstance(roc, Mapping):
            row.append(fmt(roc.get(name)))
        if isinstance(pr, Mapping):
            row.append(fmt(pr.get(name)))
        rows.append(row)
    return Table("Per class", header, rows)


# What a reader sees for the other scalars of a metrics file (its own key where none is given here).
OVERALL_LABELS = {"ece": "calibration error (ECE, 15 bins)", "temperature": "temperature (fitted on val)",
                  "ece_temperature_scaled": "ECE after temperature scaling", "split": "split",
                  "dataset": "dataset"}

_NOT_OVERALL = {"n", "accuracy", "macro_f1", "loss", "classes", "per_class", "confusion_matrix", "ci95",
                "per_source", "roc_auc", "pr_auc"}


def overall_table(metrics: Mapping) -> Table:
    """Images, accuracy, macro-F1 and loss (with intervals), then any other scalar (ECE, temperature)."""
    ci = metrics.get("ci95") or {}
    rows = [["images", fmt(metrics.get("n"))],
            ["accuracy", fmt_ci(metrics.get("accuracy"), ci.get("accuracy"))],
            ["macro-F1", fmt_ci(metrics.get("macro_f1"), ci.get("macro_f1"))],
            ["cross-entropy loss", fmt_ci(metrics.get("loss"), ci.get("loss"))]]
    for key, value in metrics.items():
        if key not in _NOT_OVERALL and (value is None or isinstance(value, (int, float, str, np.number))):
            rows.append([OVERALL_LABELS.get(key, key), fmt(value)])
    return Table("Overall", ["", "value"], rows)


def confusion_table(metrics: Mapping) -> Table | None:
    """The confusion matrix, true classes as rows; None when ``metrics`` has none."""
    cm = metrics.get("confusion_matrix")
    if cm is None:
        return None
    classes = classes_of(metrics)
    return Table("Confusion matrix", ["true \\ predicted"] + classes,
                 [[c] + [str(v) for v in r] for c, r in zip(classes, cm)])


def group_table(groups: Mapping[str, Mapping], classes: Sequence[str], first: str = "source") -> Table:
    """One row per group of test images (a source, an input, the part split per patient):
    images, accuracy, macro-F1 (with its interval) and each class's recall (support)."""
    header = [first, "images", "accuracy", "macro-F1"] + [f"{c} recall (support)" for c in classes]
    rows = []
    for group, m in groups.items():
        row = [group, fmt(m.get("n")), fmt(m.get("accuracy")),
               fmt_ci(m.get("macro_f1"), (m.get("ci95") or {}).get("macro_f1"))]
        for c in classes:
            pc = (m.get("per_class") or {}).get(c) or {}
            row.append(f"{fmt(pc.get('recall'))} ({fmt(pc.get('support'))})")
        rows.append(row)
    return Table(None, header, rows)


def parts(metrics: Mapping) -> dict[str, Mapping]:
    """The evaluation's parts beside the sources: each input of a several-input dataset, and the
    images with a patient id (split per patient) where only some have one."""
    out = {f"input {name}": m for name, m in (metrics.get("per_input") or {}).items()}
    if metrics.get("patient_wise"):
        wise = metrics["patient_wise"]
        out[f"images with a patient id ({', '.join(wise.get('sources') or [])})"] = wise
    return out


def versions_table(versions: Mapping[str, str]) -> Table:
    return Table(None, ["library", "version"], [[k, v] for k, v in sorted(versions.items())])


# --------------------------------------------------------------------------- dataset summary


def source_class_table(summary: Mapping, classes: Sequence[str] = ()) -> Table | None:
    """Images per source and class with a total, and whether they carry patient ids where recorded;
    None without ``per_source_class``."""
    table = summary.get("per_source_class")
    if not isinstance(table, Mapping) or not table:
        return None
    classes = summary_classes(summary, classes)
    status = patient_id_status(summary)
    header = ["source"] + classes + ["total"] + (["patient ids"] if status else [])
    rows = []
    for source, counts in table.items():
        row = [source] + [count(counts.get(c, 0)) for c in classes] + [count(sum(counts.values()))]
        rows.append(row + ([status.get(str(source), "n/a")] if status else []))
    return Table(None, header, rows)


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


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def summary_tables(summary: Mapping[str, Any], classes: Sequence[str]) -> list[Table]:
    """Interpret a dataset summary generically, as tables shared by the HTML report and the model card.

    Scalars gather in a first "totals" table. Nested ``{row: {col: number}}`` mappings (counts per
    split and class) become matrices with class columns first and a total column; flat mappings
    become two-column tables; lists of ``{"path", "reason"}`` (rejected or skipped inputs), lists
    of groups (duplicates) and lists of flat records (``per_input``, one row per input location)
    become tables truncated to the first 200 entries. Anything else becomes a table with
    ``header`` None and the value as JSON ``text``.
    """
    tables: list[Table] = []
    scalars = []
    for key, value in summary.items():
        title = str(key).replace("_", " ")
        if is_scalar(value):
            scalars.append([title, fmt(value)])
        elif isinstance(value, (list, tuple)):
            pairs = _path_reason_items(value) if value else None
            if not value:
                scalars.append([title, "none"])
            elif pairs is not None:
                caption, shown = _truncated(title, pairs, "input(s)")
                tables.append(Table(caption, ["path", "reason"], shown))
            elif all(is_scalar(v) for v in value) and len(value) <= 20:
                scalars.append([title, ", ".join(fmt(v) for v in value)])
            elif all(is_scalar(v) for v in value):
                caption, shown = _truncated(title, [[fmt(v)] for v in value], "item(s)")
                tables.append(Table(caption, ["value"], shown))
            elif all(isinstance(v, (list, tuple)) and all(is_scalar(x) for x in v) for v in value):
                caption, shown = _truncated(title, [[str(i + 1), ", ".join(fmt(x) for x in v)]
                                                    for i, v in enumerate(value)], "group(s)")
                tables.append(Table(caption, ["#", "members"], shown))
            elif all(isinstance(v, Mapping) and all(is_scalar(x) for x in v.values()) for v in value):
                # e.g. per_input: one row per input location with its counts
                cols: list[str] = []
                for v in value:
                    cols += [str(c) for c in v if str(c) not in cols]
                caption, shown = _truncated(title, [[fmt(v.get(c)) for c in cols] for v in value], "row(s)")
                tables.append(Table(caption, cols, shown))
            else:
                caption, shown = _truncated(title, list(value), "item(s)")
                tables.append(Table(caption, None, text=_json(shown)))
        elif isinstance(value, Mapping) and not value:
            scalars.append([title, "none"])
        elif isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values()) \
                and all(is_scalar(x) for v in value.values() for x in v.values()):
            cols = _ordered_columns(value, classes)
            numeric = all(isinstance(x, (int, float, np.number)) and not isinstance(x, bool)
                          for v in value.values() for x in v.values())
            rows = []
            for rkey, r in value.items():
                row = [str(rkey)] + [fmt(r.get(c, 0 if numeric else None)) for c in cols]
                if numeric:
                    row.append(fmt(sum(r.values())))
                rows.append(row)
            tables.append(Table(title, [""] + cols + (["total"] if numeric else []), rows))
        elif isinstance(value, Mapping) and all(is_scalar(v) for v in value.values()):
            keys = _ordered_columns({"_": value}, classes)
            rows = [[str(k), fmt(value[k])] for k in keys]
            numeric = all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in value.values())
            if numeric and len(rows) > 1:
                rows.append(["total", fmt(sum(value.values()))])
            tables.append(Table(title, ["", "count" if numeric else "value"], rows))
        else:
            tables.append(Table(title, None, text=_json(value)))
    if scalars:
        tables.insert(0, Table("totals", ["", "value"], scalars))
    return tables
