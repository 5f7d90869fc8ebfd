"""Side-by-side table of evaluations: ``python -m covid_spark.evaluation.compare NAME=metrics.json [NAME=...]``.

Each column is one metrics file written by the evaluate stage (``jobs/evaluate.py``); ``--part``
picks what of it to show: the whole evaluation (``all``), the images with a patient id
(``patient_wise``), one input of a several-input dataset (``input:<name>``) or one source
(``source:<name>``). Rows: images, accuracy, macro-F1, the share of images called the first class
(COVID-19: what a source without COVID-19 images gets wrong), then per class precision and recall; a
value is followed by its 95 % bootstrap interval where the file holds one. Markdown, as in docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Mapping, Sequence

from covid_spark.errors import InputError
from covid_spark.evaluation.metrics import bootstrap_ci, classification_metrics

ROWS = ("n", "accuracy", "macro_f1")


def select_part(metrics: Mapping, part: str) -> Mapping | None:
    """The metrics of ``part`` (see the module docstring), or None when the file has no such part.

    Raises:
        ValueError: ``part`` is not one of the known forms.
    """
    if part == "all":
        return metrics
    if part == "patient_wise":
        return metrics.get("patient_wise")
    kind, _, name = part.partition(":")
    if kind == "input" and name:
        return (metrics.get("per_input") or {}).get(name)
    if kind == "source" and name:
        return (metrics.get("per_source") or {}).get(name)
    raise InputError(f"unknown part {part!r}: use all, patient_wise, input:<name> or source:<name>")


def _cell(value, interval=None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    text = f"{value:.3f}"
    if interval and None not in interval:
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def comparison_rows(columns: Sequence[tuple[str, Mapping | None]], classes: Sequence[str]) -> list[list[str]]:
    """One row per figure, one cell per column (``–`` where a column lacks the figure)."""
    rows = []
    for key in ROWS:
        label = {"n": "images", "accuracy": "accuracy", "macro_f1": "macro-F1"}[key]
        rows.append([label] + [_cell(m.get(key), (m.get("ci95") or {}).get(key)) if m else "–" for _, m in columns])
    called = []
    for _, m in columns:
        cm = (m or {}).get("confusion_matrix")
        total = sum(map(sum, cm)) if cm else 0
        called.append(_cell(sum(row[0] for row in cm) / total) if total else "–")
    rows.append([f"called {classes[0]} (share of images)"] + called)
    for cls in classes:
        for key in ("precision", "recall"):
            cells = []
            for _, m in columns:
                values = ((m or {}).get("per_class") or {}).get(cls) or {}
                ci = (((m or {}).get("ci95") or {}).get("per_class") or {}).get(cls) or {}
                cells.append(_cell(values.get(key), ci.get(key)) if m else "–")
            rows.append([f"{cls} {key}"] + cells)
    return rows


def markdown_table(columns: Sequence[tuple[str, Mapping | None]], classes: Sequence[str]) -> str:
    header = ["", *[name for name, _ in columns]]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * len(columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(columns, classes)]
    return "\n".join(lines)


def part_mask(predictions: Mapping, part: str):
    """Which of a metrics file's per-image ``predictions`` belong to ``part`` (see :func:`select_part`).

    Raises:
        ValueError: the file does not record which images belong to the part (written before it did).
    """
    import numpy as np

    n = len(predictions["path"])
    if part == "all":
        return np.ones(n, dtype=bool)
    kind, _, name = part.partition(":")
    column = {"patient_wise": "with_patient_id", "input": "input", "source": "source"}.get(kind)
    if column is None:
        select_part({}, part)  # raises the message for an unknown part
    if column not in predictions:
        raise InputError(f"the file does not record each image's {column} (evaluate it again)")
    values = np.array(predictions[column])
    return values.astype(bool) if kind == "patient_wise" else values == name


def paired_differences(columns: Sequence[tuple[str, Mapping]], classes: Sequence[str], part: str = "all",
                       n_boot: int = 1000, seed: int = 42) -> list[list[str]]:
    """Rows "first − other": the difference in accuracy and macro-F1 between the first column and each
    other one on ``part``, with a paired-bootstrap 95 % interval over the same resampled images
    (``metrics.bootstrap_ci(paired_with=...)``). ``columns`` hold whole metrics files, which must hold
    predictions for the same images.

    Raises:
        ValueError: a file has no per-image predictions, or not for the same images as the first.
    """
    import numpy as np

    def predictions(name, m):
        pred = (m or {}).get("predictions")
        if not pred:
            raise InputError(f"column {name!r} holds no per-image predictions")
        try:
            keep = part_mask(pred, part)
        except ValueError as err:
            raise InputError(f"column {name!r}: {err}") from None
        paths = np.array(pred["path"], dtype=str)[keep]
        order = np.argsort(paths, kind="stable")
        return paths[order], np.array(pred["label"])[keep][order], np.array(pred["probs"], dtype=float)[keep][order]

    first_name, first = columns[0]
    paths, y, probs = predictions(first_name, first)
    rows = []
    for name, m in columns[1:]:
        other_paths, other_y, other_probs = predictions(name, m)
        if not np.array_equal(paths, other_paths) or not np.array_equal(y, other_y):
            raise InputError(f"columns {first_name!r} and {name!r} are not scored on the same images")
        a, b = (classification_metrics(y, p, list(classes)) for p in (probs, other_probs))
        ci = bootstrap_ci(y, probs, list(classes), n_boot=n_boot, seed=seed, paired_with=other_probs)
        for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
            rows.append([f"{label}: {first_name} − {name}", _cell(a[key] - b[key], ci[key])])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Side-by-side table of metrics files (markdown).")
    parser.add_argument("columns", nargs="+", metavar="NAME=FILE", help="column title and a metrics.json")
    parser.add_argument("--part", default="all", help="all | patient_wise | input:<name> | source:<name>")
    parser.add_argument("--paired", action="store_true",
                        help="also the difference first − each other column in accuracy and macro-F1, with a "
                             "paired-bootstrap 95%% interval (the files must score the same images)")
    args = parser.parse_args(argv)
    columns = []
    whole = []
    classes: list[str] = []
    for spec in args.columns:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            print(f"compare: {spec!r} is not NAME=FILE", file=sys.stderr)
            return 2
        try:
            with open(path, encoding="utf-8") as handle:
                metrics = json.load(handle)
            part = select_part(metrics, args.part)
        except (OSError, ValueError) as err:
            print(f"compare: {path}: {err}", file=sys.stderr)
            return 2
        classes = classes or list(metrics.get("classes") or (metrics.get("per_class") or {}))
        columns.append((name, part))
        whole.append((name, metrics))
    print(markdown_table(columns, classes))
    if args.paired:
        try:
            rows = paired_differences(whole, classes, part=args.part)
        except ValueError as err:
            print(f"compare: {err}", file=sys.stderr)
            return 2
        print("\n| paired difference | value [95% paired bootstrap] |\n|---|---:|")
        print("\n".join(f"| {a} | {b} |" for a, b in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
