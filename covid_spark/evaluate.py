"""Evaluate stage: a trained model on one split → metrics.json and a printed table."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from covid_spark.config import CLASSES
from covid_spark.storage import atomic_write_json

logger = logging.getLogger(__name__)


def load_model(model_dir: str):
    """Load ``<model_dir>/model.keras``.

    Raises:
        FileNotFoundError: no model there (names the path).
    """
    import tensorflow as tf

    path = os.path.join(model_dir, "model.keras")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: train a model into {model_dir} first (jobs/train.py)")
    return tf.keras.models.load_model(path, compile=False)


def predict_probs(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Class probabilities for uint8 images, in batches, inference mode."""
    out = [model(images[i:i + batch_size].astype("float32"), training=False).numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), dtype="float32")


def score_split(model, dataset: str, split: str, fields: Sequence[str] = ("label",),
                batch_size: int = 32) -> dict[str, np.ndarray]:
    """Stream ``split`` through ``model`` batch by batch; ``probs`` and ``fields`` (no images), sorted by path.

    Only one batch of images is in memory at a time (see ``data.iter_split_batches``); what is
    kept per image is its probabilities and the requested fields, in the stable path order of
    ``data.load_split``.
    """
    from covid_spark.data import iter_split_batches

    wanted = list(dict.fromkeys([f for f in fields if f != "image"] + ["path"]))
    kept: dict[str, list] = {f: [] for f in wanted + ["probs"]}
    for batch in iter_split_batches(dataset, split, fields=["image"] + wanted, batch_size=batch_size):
        kept["probs"].append(predict_probs(model, batch["image"], batch_size))
        for f in wanted:
            kept[f].append(batch[f])
    if not kept["probs"]:
        raise ValueError(f"split {split!r} of {dataset} holds no rows")
    out = {f: np.concatenate(parts) for f, parts in kept.items()}
    order = np.argsort(out["path"].astype(str), kind="stable")
    return {f: values[order] for f, values in out.items()}


def metrics_path(model_dir: str, split: str) -> str:
    return os.path.join(model_dir, "metrics.json" if split == "test" else f"metrics_{split}.json")


def evaluate(dataset: str, model_dir: str, config: dict, split: str = "test") -> dict:
    """Score ``split`` of ``dataset`` with the model in ``model_dir``; write and return the metrics.

    The split (and val, for the temperature) is streamed batch by batch: memory holds one batch of
    images, and per image only its probabilities, label, source and path.

    Besides accuracy, loss, macro-F1, per-class precision/recall/F1 and the confusion matrix
    (from ``metrics.classification_metrics``), the file holds: ``ci95`` (percentile bootstrap
    over images), ``ece`` (top-label expected calibration error, 15 bins), ``per_source``
    (the same metrics for each image source), and, when the val split exists, ``temperature``
    fitted on val with ``ece_temperature_scaled``.

    Raises:
        ValueError: the split is empty or missing, or image size and model disagree.
    """
    from covid_spark.metrics import (bootstrap_ci, classification_metrics, expected_calibration_error,
                                     fit_temperature, metrics_by_group, softmax)
    from covid_spark.preprocess import read_summary

    summary = read_summary(None, dataset)
    if summary["per_split"].get(split, 0) == 0:
        raise ValueError(f"split {split!r} of {dataset} is empty; nothing to evaluate")
    model = load_model(model_dir)
    expected = tuple(model.input_shape[1:3])
    if expected != (summary["image_size"], summary["image_size"]):
        raise ValueError(f"model input is {expected} but {dataset} holds {summary['image_size']}px images")
    data = score_split(model, dataset, split, fields=("label", "source"))
    probs = data["probs"]
    y = data["label"].astype(int)
    metrics = classification_metrics(y, probs, list(CLASSES))
    metrics["split"] = split
    metrics["ci95"] = bootstrap_ci(y, probs, list(CLASSES), n_boot=int(config["evaluate"]["bootstrap"]),
                                   seed=int(config["train"]["seed"]))
    metrics["ece"] = expected_calibration_error(y, probs)
    sources = np.array([s or "unknown" for s in data["source"]])
    metrics["per_source"] = metrics_by_group(y, probs, sources, list(CLASSES))
    if split != "val" and summary["per_split"].get("val", 0):
        val = score_split(model, dataset, "val", fields=("label",))
        logits = np.log(np.clip(val["probs"], 1e-7, 1.0))
        temperature = fit_temperature(logits, val["label"].astype(int))
        metrics["temperature"] = temperature
        metrics["ece_temperature_scaled"] = expected_calibration_error(
            y, softmax(np.log(np.clip(probs, 1e-7, 1.0)), temperature))
    metrics["predictions"] = {
        "path": [str(p) for p in data["path"]], "label": y.tolist(),
        "probs": np.round(probs, 6).tolist(), "source": sources.tolist(),
    }
    atomic_write_json(metrics_path(model_dir, split), metrics)
    return metrics
