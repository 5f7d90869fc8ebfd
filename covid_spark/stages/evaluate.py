"""Evaluate stage: a trained model on one split → its metrics file (``RunDir.metrics_path``) and a printed table."""
from __future__ import annotations

import logging
import os
from typing import Collection, Sequence

import numpy as np

from covid_spark.constants import CLASSES, INFERENCE_BATCH_SIZE
from covid_spark.data.dataset import iter_split_batches, read_summary, split_row_groups
from covid_spark.data.duplicates import near_copies
from covid_spark.data.rundir import RunDir
from covid_spark.data.splits import SPLITS
from covid_spark.data.storage import atomic_write_json, refuse_existing
from covid_spark.errors import DatasetError, InputError
from covid_spark.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    metrics_by_group,
    softmax,
)
from covid_spark.evaluation.shortcuts import audit_dataset, held_out_source
from covid_spark.inputs.sources import as_locations
from covid_spark.models.saved import load_model
from covid_spark.tracking.tracker import log_evaluation

logger = logging.getLogger(__name__)


def predict_probs(model, images: np.ndarray, batch_size: int = INFERENCE_BATCH_SIZE) -> np.ndarray:
    """Class probabilities for uint8 images, in batches, inference mode."""
    out = [model(images[i:i + batch_size].astype("float32"), training=False).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), dtype="float32")


def score_split(model, dataset: str, split: str, fields: Sequence[str] = ("label",),
                batch_size: int = INFERENCE_BATCH_SIZE, paths: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Stream ``split`` through ``model`` batch by batch; ``probs`` and ``fields`` (no images), sorted by path.

    Only one batch of images is in memory at a time (see ``dataset.iter_split_batches``); what is
    kept per image is its probabilities and the requested fields, in the stable path order of
    ``dataset.load_split``.
    """
    wanted = list(dict.fromkeys([f for f in fields if f != "image"] + ["path"]))
    kept: dict[str, list] = {f: [] for f in wanted + ["probs"]}
    for batch in iter_split_batches(dataset, split, fields=["image"] + wanted, batch_size=batch_size, paths=paths):
        kept["probs"].append(predict_probs(model, batch["image"], batch_size))
        for f in wanted:
            kept[f].append(batch[f])
    if not kept["probs"]:
        raise DatasetError(f"split {split!r} of {dataset} holds no rows")
    out = {f: np.concatenate(parts) for f, parts in kept.items()}
    order = np.argsort(out["path"].astype(str), kind="stable")
    return {f: values[order] for f, values in out.items()}


def stored_hashes(dataset: str, splits: Sequence[str]) -> dict[str, tuple[int, int, str]]:
    """``{path: (dhash, label, split)}`` of the given splits, read from the stored hash column (no image decoded).

    Raises:
        ValueError: the dataset was written before hashes were stored (names it).
    """
    import pyarrow.parquet as pq

    summary = read_summary(None, dataset)
    out: dict[str, tuple[int, int, str]] = {}
    for split in splits:
        if not summary["per_split"].get(split):
            continue
        fs, groups = split_row_groups(dataset, split)
        with fs.open_input_file(groups[0][0]) as handle:
            if "dhash" not in pq.ParquetFile(handle).schema_arrow.names:
                raise DatasetError(f"{dataset} holds no stored image hashes (written before they were stored): "
                                 f"preprocess it again to find near-copies")
        for batch in iter_split_batches(dataset, split, fields=("dhash", "label"), batch_size=4096):
            out.update((str(p), (int(str(h), 16), int(y), split))
                       for p, h, y in zip(batch["path"], batch["dhash"], batch["label"]))
    return out


def near_copy_exclusion(dataset: str, splits: Sequence[str], reference: str, max_distance: int) -> dict:
    """Which images of ``dataset``'s ``splits`` are near-copies of an image of ``reference``'s train or val.

    Near-copy: 256-bit dHashes within ``max_distance`` bits (``duplicates.near_copies``; not transitive).
    Returns ``kept`` (per split, the paths to evaluate) and a report: per class how many were dropped and kept.
    """
    queries = stored_hashes(dataset, splits)
    seen = stored_hashes(reference, ("train", "val"))
    close = near_copies({p: v[0] for p, v in seen.items()}, {p: v[0] for p, v in queries.items()},
                        max_distance)
    dropped = {c: 0 for c in CLASSES}
    kept_count = {c: 0 for c in CLASSES}
    kept: dict[str, set[str]] = {s: set() for s in splits}
    for path, (_, label, split) in queries.items():
        (dropped if path in close else kept_count)[CLASSES[label]] += 1
        if path not in close:
            kept[split].add(path)
    return {"kept": kept,
            "report": {"reference": reference, "reference_splits": ["train", "val"], "max_distance": max_distance,
                       "dropped": len(close), "kept": len(queries) - len(close),
                       "dropped_per_class": dropped, "kept_per_class": kept_count,
                       "dropped_examples": [[q, close[q]] for q in sorted(close)[:50]]}}


def collection_names(summary: dict) -> dict[str, str] | None:
    """``{source: input name}`` for a dataset made from several inputs, or None (one input, or a source
    that more than one input holds: then images cannot be told apart by collection).

    An input's name is its folder's name (the folder holding a manifest file given directly).
    """
    locations = as_locations(summary.get("input"))
    per_input = summary.get("per_input_source")
    if len(locations) < 2 or not per_input:
        return None
    names = [os.path.basename(os.path.dirname(loc) if loc.endswith(".csv") else loc.rstrip("/")) for loc in locations]
    if len(set(names)) < len(names):
        names = list(locations)
    owner: dict[str, str] = {}
    for name, counts in zip(names, per_input):
        for source in counts:
            if source in owner:
                logger.warning("evaluate: source %r comes from more than one input; no per-input metrics", source)
                return None
            owner[source] = name
    return owner


def subset_metrics(y: np.ndarray, probs: np.ndarray, keep: np.ndarray, config: dict) -> dict:
    """Classification metrics (with bootstrap intervals) of the images where ``keep`` is true."""
    out = classification_metrics(y[keep], probs[keep], list(CLASSES))
    out["ci95"] = bootstrap_ci(y[keep], probs[keep], list(CLASSES), n_boot=config["evaluate"]["bootstrap"],
                               seed=config["train"]["seed"])
    return out


def evaluate(dataset: str, model_dir: str, config: dict, split: str,
             exclude_near_copies_of: str | None = None, output: str | None = None, overwrite: bool = False) -> dict:
    """Score ``split`` of ``dataset`` with the model in ``model_dir``; write and return the metrics.

    The split (and val, for the temperature) is streamed batch by batch: memory holds one batch of
    images, and per image only its probabilities, label, source and path.

    Besides accuracy, loss, macro-F1, per-class precision/recall/F1 and the confusion matrix
    (from ``metrics.classification_metrics``), the file holds: ``ci95`` (percentile bootstrap
    over images), ``ece`` (top-label expected calibration error, 15 bins), ``per_source``
    (the same metrics for each image source), and, when the val split exists, ``temperature``
    fitted on val with ``ece_temperature_scaled``. Where only some images carry a patient id,
    ``patient_wise`` holds the metrics (with intervals) of those alone: the part whose split was
    made per patient, not per image. For a dataset made from several inputs, ``per_input`` holds the
    metrics per input (collection), told apart by source (``collection_names``).

    Across datasets: ``split="all"`` scores every split of ``dataset`` (no temperature: its val is
    not this model's); ``exclude_near_copies_of`` (a dataset, usually the model's own) drops every
    image within ``preprocess.duplicate_distance`` bits of an image of that dataset's train or val
    split, and records per class how many were dropped and kept (``near_copies``). ``output``
    replaces the default file (``RunDir.metrics_path``: ``metrics.json`` for test,
    ``metrics_<split>.json`` otherwise); an existing one is refused unless ``overwrite`` (checked
    before any work).

    Raises:
        DatasetError / InputError: the split is empty or missing, image size and model disagree, or
            every image is a near-copy.
        FileExistsError: the metrics file exists and ``overwrite`` is false.
        FileNotFoundError: no dataset summary or no model.
    """
    in_run_dir = not output or os.path.abspath(output) == os.path.abspath(RunDir(model_dir).metrics_path(split))
    output = output or RunDir(model_dir).metrics_path(split)
    refuse_existing(output, overwrite)
    summary = read_summary(None, dataset)
    splits = [s for s in SPLITS if summary["per_split"].get(s, 0)] if split == "all" else [split]
    if not splits or summary["per_split"].get(splits[0], 0) == 0:
        raise DatasetError(f"split {split!r} of {dataset} is empty; nothing to evaluate")
    model = load_model(RunDir(model_dir))
    expected = tuple(model.input_shape[1:3])
    if expected != (summary["image_size"], summary["image_size"]):
        raise InputError(f"model input is {expected} but {dataset} holds {summary['image_size']}px images")
    kept, exclusion = _near_copies_left_out(dataset, split, splits, exclude_near_copies_of, config)
    data = _scored(model, dataset, splits, kept)
    metrics = _metrics(data, split, dataset, summary, config)
    if exclusion:
        metrics["near_copies"] = exclusion
    if split not in ("val", "all") and summary["per_split"].get("val", 0):
        metrics.update(_calibration(model, dataset, data))
    if config["evaluate"]["audit"]:
        metrics["audit"] = audit_dataset(model, dataset, splits, data, CLASSES, config)
        holdout = summary.get("config", {}).get("holdout_source")
        if holdout:
            metrics["audit"]["held_out_source"] = held_out_source(metrics, holdout)
    metrics["predictions"] = metrics.pop("predictions")  # the long part last
    atomic_write_json(output, metrics)
    if in_run_dir:  # a file written elsewhere (--output: another collection) is not this run's evaluation
        log_evaluation(model_dir, config)
    return metrics


def _near_copies_left_out(dataset: str, split: str, splits: list[str], reference: str | None,
                          config: dict) -> tuple[dict | None, dict | None]:
    """``(kept paths per split, report)`` without the near-copies of ``reference``; ``(None, None)`` without one."""
    if not reference:
        return None, None
    found = near_copy_exclusion(dataset, splits, reference, config["preprocess"]["duplicate_distance"])
    kept, exclusion = found["kept"], found["report"]
    logger.info("evaluate: %d near-copies of %s dropped, %d images kept", exclusion["dropped"], reference,
                exclusion["kept"])
    if not exclusion["kept"]:
        raise InputError(f"every image of {dataset} ({split}) is a near-copy of {reference}")
    return kept, exclusion


def _scored(model, dataset: str, splits: list[str], kept: dict | None) -> dict[str, np.ndarray]:
    """Probabilities, labels, sources, patient ids and paths of the scored images, in path order."""
    parts = [score_split(model, dataset, s, fields=("label", "source", "patient_id"),
                         paths=None if kept is None else kept[s])
             for s in splits if kept is None or kept[s]]
    data = {f: np.concatenate([p[f] for p in parts]) for f in parts[0]}
    order = np.argsort(data["path"].astype(str), kind="stable")
    return {f: values[order] for f, values in data.items()}


def _metrics(data: dict[str, np.ndarray], split: str, dataset: str, summary: dict, config: dict) -> dict:
    """The metrics file's content but for calibration: overall, per source, patient-wise, per input."""
    probs, y = data["probs"], data["label"].astype(int)
    metrics = classification_metrics(y, probs, list(CLASSES))
    metrics["split"] = split
    metrics["dataset"] = dataset
    metrics["ci95"] = bootstrap_ci(y, probs, list(CLASSES), n_boot=config["evaluate"]["bootstrap"],
                                   seed=config["train"]["seed"])
    metrics["ece"] = expected_calibration_error(y, probs)
    sources = np.array([s or "unknown" for s in data["source"]])
    metrics["per_source"] = metrics_by_group(y, probs, sources, list(CLASSES))
    predictions = {"path": [str(p) for p in data["path"]], "label": y.tolist(),
                   "probs": np.round(probs, 6).tolist(), "source": sources.tolist()}
    with_id = np.array([bool(str(p)) for p in data["patient_id"]])
    if with_id.any() and not with_id.all():
        metrics["patient_wise"] = dict(subset_metrics(y, probs, with_id, config),
                                       sources=sorted(set(sources[with_id])))
        predictions["with_patient_id"] = with_id.tolist()
    owner = collection_names(summary)
    if owner:
        collection = np.array([owner.get(s, "unknown") for s in sources])
        metrics["per_input"] = {str(name): subset_metrics(y, probs, collection == name, config)
                                for name in np.unique(collection)}
        predictions["input"] = collection.tolist()
    metrics["predictions"] = predictions
    return metrics


def _calibration(model, dataset: str, data: dict[str, np.ndarray]) -> dict[str, float]:
    """A temperature fitted on val, and the evaluated split's ECE after scaling by it."""
    val = score_split(model, dataset, "val", fields=("label",))
    temperature = fit_temperature(np.log(np.clip(val["probs"], 1e-7, 1.0)), val["label"].astype(int))
    scaled = softmax(np.log(np.clip(data["probs"], 1e-7, 1.0)), temperature)
    return {"temperature": temperature,
            "ece_temperature_scaled": expected_calibration_error(data["label"].astype(int), scaled)}
