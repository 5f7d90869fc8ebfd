"""Assemble a run's figures, Grad-CAM gallery, HTML report and model card from its records.

The I/O edge of :mod:`covid_spark.report`: reads the run's files, the dataset summary, and the input
manifests' licences and data cards.
"""
from __future__ import annotations

import csv
import json
import logging
import os

import numpy as np

from covid_spark.constants import CLASSES, EVALUATION_SPLIT
from covid_spark.data.dataset import iter_split_batches, read_summary
from covid_spark.data.rundir import RunDir
from covid_spark.errors import InputError
from covid_spark.inputs.sources import as_locations, manifest_of
from covid_spark.models.saved import load_model
from covid_spark.tracking.tracker import log_report

logger = logging.getLogger(__name__)


def _load_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def data_licenses(summary: dict) -> list[str]:
    """Distinct values of the input manifests' ``license`` column, where they have one.

    ``summary["input"]`` is one location or, for a dataset made from several inputs, a list.
    """
    licenses: set[str] = set()
    for location in as_locations(summary.get("input")):
        manifest = manifest_of(location) if location else None
        if manifest is not None:
            with open(manifest, newline="", encoding="utf-8-sig") as handle:
                licenses |= {(row.get("license") or "").strip() for row in csv.DictReader(handle)}
    return sorted(licenses - {""})


def data_card_notes(summary: dict) -> dict[str, str]:
    """Per source, its description in the data card (``README.md``) beside each input's manifest.

    Inputs without a manifest or a data card add nothing; where two cards describe one source,
    the first input's wins.
    """
    from covid_spark.report import data_card_sources  # imports matplotlib: only when this runs

    notes: dict[str, str] = {}
    for location in as_locations(summary.get("input")):
        manifest = manifest_of(location) if location else None
        card = os.path.join(os.path.dirname(manifest), "README.md") if manifest else None
        if card and os.path.isfile(card):
            with open(card, encoding="utf-8") as handle:
                for source, text in data_card_sources(handle.read()).items():
                    notes.setdefault(source, text)
    return notes


def pick_examples(y: np.ndarray, pred: np.ndarray, per_kind: int = 2) -> list[int]:
    """Indices of up to ``per_kind`` correct and ``per_kind`` wrong predictions per true class."""
    chosen = []
    for k in range(len(CLASSES)):
        right = np.flatnonzero((y == k) & (pred == k))[:per_kind]
        wrong = np.flatnonzero((y == k) & (pred != k))[:per_kind]
        chosen += right.tolist() + wrong.tolist()
    return chosen


def gradcam_gallery(model, dataset: str, metrics: dict, out_dir: str) -> tuple[list[dict], str]:
    """Grad-CAM overlays for a sample of test images per class, correct and wrong ones.

    The examples are chosen from ``metrics["predictions"]``; only their images are read from the
    dataset (a few, whatever the split's size).
    """
    from PIL import Image

    from covid_spark.evaluation.explain import (  # imports TensorFlow: only when this runs
        grad_cam,
        overlay,
        pick_gradcam_layer,
    )

    layer = pick_gradcam_layer(model, min_size=7)
    paths = [str(p) for p in metrics["predictions"]["path"]]
    probs = np.array(metrics["predictions"]["probs"])
    y, pred = np.array(metrics["predictions"]["label"]), probs.argmax(1)
    index = pick_examples(y, pred)
    if not index:
        return [], layer
    wanted = {paths[i] for i in index}
    images = {}
    for batch in iter_split_batches(dataset, metrics.get("split", EVALUATION_SPLIT), fields=("image",), paths=wanted):
        images.update(zip((str(p) for p in batch["path"]), batch["image"]))
    missing = sorted(wanted - set(images))
    if missing:
        raise InputError(f"{len(missing)} image(s) of metrics.json's predictions are not in the "
                         f"{metrics.get('split', 'test')} split of {dataset}, e.g. {missing[0]}: "
                         f"was the dataset rewritten after evaluation? Rerun jobs/evaluate.py")
    maps = grad_cam(model, np.stack([images[paths[i]] for i in index]), layer_name=layer)
    os.makedirs(out_dir, exist_ok=True)
    items = []
    for n, (i, heat) in enumerate(zip(index, maps)):
        path = os.path.join(out_dir, f"gradcam_{n:02d}_{CLASSES[y[i]]}_as_{CLASSES[pred[i]]}.png")
        Image.fromarray(overlay(images[paths[i]], heat)).save(path)
        verdict = "correct" if y[i] == pred[i] else "WRONG"
        items.append({"png": path, "caption": f"{verdict}: true {CLASSES[y[i]]}, predicted {CLASSES[pred[i]]} "
                                              f"(p={probs[i, pred[i]]:.2f}) — {os.path.basename(paths[i])}"})
    return items, layer


def build_report(run_dir: str, dataset: str, config: dict) -> str:
    """Write figures, ``report.html`` and ``model_card.md`` into ``run_dir``; return the report path."""
    from covid_spark.report import (  # imports matplotlib: only when this runs
        plot_confusion,
        plot_history,
        plot_roc_pr,
        write_html_report,
        write_model_card,
    )

    paths = RunDir(run_dir)
    metrics = _load_json(paths.metrics)
    if metrics is None:
        raise FileNotFoundError(f"{paths.metrics} not found: run jobs/evaluate.py first")
    run = _load_json(paths.run_json) or {}
    history = _load_json(paths.history) or {}
    summary = read_summary(None, dataset)
    figures_dir = paths.figures
    os.makedirs(figures_dir, exist_ok=True)
    figures = {}
    if history.get("loss"):
        figures["Loss and accuracy per epoch (train vs val)"] = os.path.join(figures_dir, "history.png")
        plot_history(history, figures["Loss and accuracy per epoch (train vs val)"])
    figures["Confusion matrix (test)"] = os.path.join(figures_dir, "confusion.png")
    plot_confusion(metrics["confusion_matrix"], CLASSES, figures["Confusion matrix (test)"])
    y = np.array(metrics["predictions"]["label"])
    probs = np.array(metrics["predictions"]["probs"])
    figures["ROC and precision-recall curves (test, one-vs-rest)"] = os.path.join(figures_dir, "roc_pr.png")
    curves = plot_roc_pr(y, probs, CLASSES, figures["ROC and precision-recall curves (test, one-vs-rest)"])
    metrics_for_report = dict(metrics, **curves)
    model = load_model(paths)
    gallery, layer = gradcam_gallery(model, dataset, metrics, paths.gradcam)
    extra = {}
    holdout = summary.get("config", {}).get("holdout_source")
    if holdout:
        extra["Leave-one-source-out"] = (
            f"Every test image comes from source '{holdout}', which training and validation never saw "
            f"(train and val hold the other sources only). Compare with an in-distribution run to see "
            f"how much of the score depends on recognising the source.")
    report = paths.report
    notes = data_card_notes(summary)
    write_html_report(report, title=f"covid-spark run {os.path.basename(run_dir)} — {run.get('model', '')}",
                      metrics=metrics_for_report, figures=figures, dataset_summary=summary,
                      config=run.get("config", config), versions=run.get("versions", {}),
                      gradcam=gallery, gradcam_layer=layer, extra_sections=extra or None, source_notes=notes)
    card_run = {"run_id": os.path.basename(run_dir), **{k: v for k, v in run.items()
                                                        if k not in ("config", "dataset_summary")}}
    write_model_card(paths.model_card, run=card_run, metrics=metrics_for_report,
                     dataset_summary=summary, licenses=data_licenses(summary), source_notes=notes)
    logger.info("report: %s (%d figures, %d Grad-CAM overlays at layer %s)", report, len(figures), len(gallery), layer)
    log_report(run_dir, config)
    return report
