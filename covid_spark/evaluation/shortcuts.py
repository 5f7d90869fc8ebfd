"""The shortcut audit of a trained classifier: does it read the lungs, or the hospital?

Four measurements on the same test images (DeGrave et al. 2021; Maguolo & Nanni 2021):

- **source probe**: within each class, how well a linear probe on the model's penultimate features
  tells the image's source apart, cross-validated: its balanced accuracy against chance, beside its
  accuracy against guessing the class's main source (``covid_spark.audit.probe``);
- **lungs removed / lungs only**: the model's macro-F1 on the images with the lung fields blacked
  out, and with everything but the lung fields blacked out (masks from ``covid_spark.lungs``);
- **where it looks**: the share of Grad-CAM energy inside the lung fields, per class and per source;
- **held-out source**: the run's leave-one-source-out figures, when the dataset held one out.

:func:`audit_model` works on arrays; the evaluate stage reads the images and writes the result into
the metrics file, from which the report and the model card show it. TensorFlow is imported when a
model is scored, not with this module.
"""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from covid_spark.audit.cam import cam_energy_in_mask, energy_by_group
from covid_spark.audit.masking import keep_only_lungs, remove_lungs
from covid_spark.audit.probe import source_probe
from covid_spark.audit.verdict import CAM_IN_LUNGS_MIN, PROBE_GAP_MAX, lungs_removed_f1_max, verdict
from covid_spark.data.dataset import iter_split_batches
from covid_spark.evaluation.metrics import classification_metrics
from covid_spark.lungs.segment import segment

logger = logging.getLogger(__name__)


def stratified_sample(labels: np.ndarray, sources: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of at most ``limit`` images, drawn in proportion from every (class, source) cell (each
    cell keeps at least one image), sorted; all indices when there are no more than ``limit``."""
    n = len(labels)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    cells: dict[tuple, list[int]] = {}
    for i, cell in enumerate(zip(labels.tolist(), sources.tolist())):
        cells.setdefault(cell, []).append(i)
    chosen = []
    for cell in sorted(cells):
        members = np.array(cells[cell])
        take = max(1, int(round(limit * len(members) / n)))
        chosen.extend(rng.choice(members, size=min(take, len(members)), replace=False).tolist())
    return np.array(sorted(chosen))


def scores_and_features(model, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The model's probabilities and its penultimate activations (the last layer's input), in one pass."""
    import tensorflow as tf

    both = tf.keras.Model(model.inputs, [model.layers[-1].input, model.output])
    features, probs = [], []
    for start in range(0, len(images), batch_size):
        f, p = both(images[start:start + batch_size].astype("float32"), training=False)
        features.append(np.asarray(f).reshape(len(f), -1))
        probs.append(np.asarray(p))
    return np.concatenate(features), np.concatenate(probs)


def _macro_f1(model, images: np.ndarray, y: np.ndarray, classes: Sequence[str], batch_size: int) -> dict:
    """Macro-F1, accuracy and per-class recall of ``model`` on ``images``."""
    _, probs = scores_and_features(model, images, batch_size)
    m = classification_metrics(y, probs, list(classes))
    return {"macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
            "recall": {c: m["per_class"][c]["recall"] for c in classes}}


def _cam_shares(model, images: np.ndarray, masks: np.ndarray, labels: np.ndarray, sources: np.ndarray,
                limit: int, seed: int, batch_size: int) -> dict:
    """Grad-CAM energy inside the lungs for a stratified sample of at most ``limit`` images."""
    from covid_spark.evaluation.explain import grad_cam, pick_gradcam_layer  # imports TensorFlow

    chosen = stratified_sample(labels, sources, limit, seed)
    layer = pick_gradcam_layer(model, min_size=7)
    cams = grad_cam(model, images[chosen], layer_name=layer, batch_size=batch_size)
    shares = cam_energy_in_mask(cams, masks[chosen] >= 0.5)
    grouped = energy_by_group(shares, labels[chosen], sources[chosen])
    return {"layer": layer, "images": int(len(chosen)), **grouped}


def audit_model(model, images: np.ndarray, labels: np.ndarray, sources: np.ndarray, classes: Sequence[str],
                *, patient_ids: np.ndarray | None = None, cam_images: int = 300, folds: int = 5, seed: int = 0,
                batch_size: int = 32, masks: np.ndarray | None = None) -> dict:
    """The four measurements and a verdict, for ``images`` (uint8 ``[N,H,W,3]``) with integer
    ``labels``, ``sources`` and, optionally, ``patient_ids`` (the probe's folds keep a patient together).

    ``masks`` (lung probability ``[N,H,W]``) are made by the shipped segmenter when not given.
    Returns a JSON-ready dict: ``images``, ``probe``, ``lungs_removed``, ``lungs_only``, ``cam``,
    ``verdict`` (``status``, ``text``, ``findings``) and ``seconds`` per part.
    """
    started, seconds = time.time(), {}

    def lap(name: str) -> None:
        seconds[name] = round(time.time() - started - sum(seconds.values()), 1)

    y = np.asarray(labels).astype(int)
    sources = np.array([str(s) or "unknown" for s in sources])
    masks = segment(images, batch_size=batch_size) if masks is None else masks
    lap("segment")
    features, probs = scores_and_features(model, images, batch_size)
    label_names = np.array([classes[i] for i in y])
    probe = source_probe(features, sources, label_names, folds=folds, seed=seed,
                         groups=None if patient_ids is None or not all(map(str, patient_ids))
                         else np.array([str(p) for p in patient_ids]))
    lap("probe")
    lungs = masks >= 0.5
    removed = _macro_f1(model, remove_lungs(images, lungs), y, classes, batch_size)
    only = _macro_f1(model, keep_only_lungs(images, lungs), y, classes, batch_size)
    lap("masked")
    cam = _cam_shares(model, images, masks, label_names, sources, cam_images, seed, batch_size)
    lap("cam")
    judged = verdict(probe["summary"]["balanced_gap"], removed["macro_f1"], cam["overall"]["mean"], len(classes))
    original = classification_metrics(y, probs, list(classes))["macro_f1"]
    return {
        "images": int(len(y)), "macro_f1": original, "probe": probe, "lungs_removed": removed,
        "lungs_only": only, "cam": cam,
        "thresholds": {"probe_gap_max": PROBE_GAP_MAX, "lungs_removed_macro_f1_max": lungs_removed_f1_max(len(classes)),
                       "cam_in_lungs_min": CAM_IN_LUNGS_MIN},
        "verdict": {"status": judged.status, "text": judged.text,
                    "findings": [vars(f) for f in judged.findings]},
        "seconds": seconds,
    }


def held_out_source(metrics: dict, source: str) -> dict | None:
    """The leave-one-source-out figures of a run whose dataset held ``source`` out for test."""
    part = (metrics.get("per_source") or {}).get(source)
    if not part:
        return None
    return {"source": source, "n": part.get("n"), "macro_f1": part.get("macro_f1"),
            "accuracy": part.get("accuracy"),
            "recall": {c: v.get("recall") for c, v in (part.get("per_class") or {}).items()}}


def audit_dataset(model, dataset: str, splits: Sequence[str], scored: dict[str, np.ndarray],
                  classes: Sequence[str], config: dict) -> dict:
    """:func:`audit_model` on the images of ``scored`` (the evaluate stage's path-ordered ``path``,
    ``label``, ``source`` and ``patient_id``), at most ``evaluate.audit_images`` of them drawn per
    (class, source); the images are read back from ``splits`` of ``dataset``."""
    cfg, seed = config["evaluate"], config["train"]["seed"]
    sources = np.array([str(s) or "unknown" for s in scored["source"]])
    chosen = stratified_sample(scored["label"].astype(int), sources, cfg["audit_images"], seed)
    paths = [str(p) for p in scored["path"][chosen]]
    wanted, pixels = set(paths), {}
    for split in splits:
        for batch in iter_split_batches(dataset, split, fields=("image",), paths=wanted):
            pixels.update(zip(batch["path"].astype(str), batch["image"]))
    images = np.stack([pixels.pop(p) for p in paths])
    logger.info("audit: %d image(s) of %s (%s)", len(images), dataset, ", ".join(splits))
    return audit_model(model, images, scored["label"][chosen], sources[chosen], classes,
                       patient_ids=scored["patient_id"][chosen], cam_images=cfg["audit_cam_images"],
                       seed=seed)
