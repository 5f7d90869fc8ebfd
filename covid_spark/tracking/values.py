"""What a run's MLflow record holds, computed from the run dir's files without MLflow: params from the
config and run facts, per-epoch and evaluation metrics with MLflow-safe names, and content digests
that key each logged item (so nothing is logged twice)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any, Mapping

from covid_spark.data.dataset import iter_split_batches, read_summary
from covid_spark.data.splits import SPLITS

_NAME_CHARS = re.compile(r"[^\w.\-/ ]")


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"augment": {"flip": False}}}`` → ``{"train.augment.flip": False}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def metric_name(*parts: str) -> str:
    """An MLflow metric name from ``parts`` joined by ``/``; characters MLflow refuses become ``_``."""
    return _NAME_CHARS.sub("_", "/".join(str(p) for p in parts))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def training_params(run: Mapping) -> dict[str, str]:
    """The config (less ``tracking``) and the run's facts, as MLflow params (strings)."""
    config = {k: v for k, v in (run.get("config") or {}).items() if k != "tracking"}
    facts = {k: run.get(k) for k in ("model", "num_proc", "image_size", "epochs_run", "best_epoch", "seed",
                                     "steps_per_epoch", "threads_per_rank", "effective_learning_rate",
                                     "git_commit", "resumed_from_epoch", "spark_master", "dataset")}
    summary = run.get("dataset_summary") or {}
    dataset = {"images": summary.get("written"), "rejected": summary.get("rejected"),
               **{f"split.{k}": v for k, v in (summary.get("per_split") or {}).items()}}
    params = flatten(config) | flatten(facts, "run.") | flatten(dataset, "dataset.")
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in params.items()}


def history_metrics(history: Mapping[str, list]) -> list[tuple[str, float, int]]:
    """``(name, value, epoch)`` of every finite per-epoch value; epochs count from 1, as ``best_epoch`` does."""
    return [(name, float(v), epoch) for name, values in history.items() if isinstance(values, list)
            for epoch, v in enumerate(values, start=1) if _finite(v) is not None]


def evaluation_metrics(metrics: Mapping, split: str) -> dict[str, float]:
    """The metrics file of ``split`` as MLflow metrics: ``<split>/accuracy``, ``<split>/<class>/recall``,
    ``<split>/<class>/recall_ci95_low`` and ``_high``, ``<split>/source/<source>/accuracy``, …; only finite values."""
    out: dict[str, Any] = {}
    ci = metrics.get("ci95") or {}
    for key in ("n", "accuracy", "macro_f1", "loss", "ece", "temperature", "ece_temperature_scaled"):
        out[metric_name(split, key)] = metrics.get(key)
        bounds = ci.get(key)
        if bounds:
            out[metric_name(split, f"{key}_ci95_low")], out[metric_name(split, f"{key}_ci95_high")] = bounds
    for name, values in (metrics.get("per_class") or {}).items():
        class_ci = (ci.get("per_class") or {}).get(name) or {}
        for key in ("precision", "recall", "f1", "support"):
            out[metric_name(split, name, key)] = values.get(key)
            bounds = class_ci.get(key)
            if bounds:
                out[metric_name(split, name, f"{key}_ci95_low")], out[metric_name(split, name, f"{key}_ci95_high")] = bounds
    groups = {f"source/{k}": v for k, v in (metrics.get("per_source") or {}).items()}
    groups |= {f"input/{k}": v for k, v in (metrics.get("per_input") or {}).items()}
    if metrics.get("patient_wise"):
        groups["patient_wise"] = metrics["patient_wise"]
    for group, values in groups.items():
        for key in ("n", "accuracy", "macro_f1"):
            out[metric_name(split, group, key)] = values.get(key)
    return {k: float(v) for k, v in out.items() if _finite(v) is not None}


def dataset_digest(dataset: str) -> str:
    """A digest of the dataset's rows: every split's (path, label, image hash), in path order.

    Two datasets with the same images, labels and splits have the same digest whatever their folder
    or write time; reading it costs three small columns, no image.
    """
    summary = read_summary(None, dataset)
    digest = hashlib.sha256()
    for split in SPLITS:
        if not summary["per_split"].get(split):
            continue
        rows = []
        try:
            batches = list(iter_split_batches(dataset, split, fields=("label", "dhash"), batch_size=4096))
        except Exception:  # noqa: BLE001 - a dataset written before image hashes were stored
            batches = list(iter_split_batches(dataset, split, fields=("label",), batch_size=4096))
        for batch in batches:
            hashes = batch["dhash"] if "dhash" in batch else [""] * len(batch["path"])
            rows += zip(map(str, batch["path"]), map(int, batch["label"]), map(str, hashes))
        for row in sorted(rows):
            digest.update(f"{split}\t{row[0]}\t{row[1]}\t{row[2]}\n".encode())
    return digest.hexdigest()[:16]


def tensorflow_requirement(versions: Mapping[str, str]) -> str:
    """The TensorFlow the model was trained with (run.json's versions), else the one installed here."""
    import importlib.metadata as md

    for dist in ("tensorflow-cpu", "tensorflow"):
        if dist in versions:
            return f"{dist}=={versions[dist]}"
    for dist in ("tensorflow-cpu", "tensorflow"):
        try:
            return f"{dist}=={md.version(dist)}"
        except md.PackageNotFoundError:
            pass
    return "tensorflow"


def file_digest(*paths: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                digest.update(hashlib.sha256(handle.read()).digest())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------------- the MLflow run
