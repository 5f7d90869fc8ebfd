"""Patient-grouped k-fold cross-validation over train + val, for choosing a model without the test split.

The val split of a small dataset is too small to rank models (cxr3: 97 images, 14 normal). This pools
train and val, splits them into ``k`` folds grouped by patient and stratified by label
(scikit-learn's ``StratifiedGroupKFold``), trains a fresh network on ``k - 1`` folds and scores the
held-out fold, so that every pooled image gets one out-of-fold prediction. The test split is never
read.

Training is one process, not Horovod, through the train stage's own core
(``covid_spark.training.core.fit_model``): the global batch is ``batch_size × num_proc`` and the learning rate
``learning_rate × num_proc``, what ``num_proc`` ranks would use, with the same warm-up (from the rate
of one rank, over ``train.warmup_epochs``) and schedule (``train.lr_schedule``: cosine to 2 % or
constant), the configured augmentation, class weights and ``train.shuffle_buffer``, and the final
weights of each fold (early stopping never triggers: there is no val split left to stop on, and the
held-out fold must not choose the epoch it is scored at). Fold ``i`` seeds weight initialisation and
shuffling with ``i``; the augmentation of batch ``b`` with (``train.seed`` + 1000 ``i``, ``b``), so a
rerun gives the same numbers (``covid_spark.training.tfdata.augment_dataset``). (Before the shared core, folds
trained with Keras's ``CosineDecay`` from the peak, no warm-up, a shuffle buffer of 1024: outputs
made then are not comparable number for number with outputs made now.) The folds
themselves are fixed (``StratifiedGroupKFold`` with random state 0), so two models compared by this
command are scored on the same folds.

    python jobs/crossval.py --dataset runs/<run>/dataset --model efficientnet_lite0 \\
        --output runs/cv-efficientnet_lite0.json [--compare runs/cv-compact.json]

(``make cv`` runs it; ``jobs/crossval.py`` is the command line, this module the functions.)

The output holds the out-of-fold probabilities (with path, label, source, patient id and fold of each
image), the pooled metrics (``classification_metrics``), ``per_source`` and ``ci95``, and per-fold
macro-F1. It is rewritten atomically after every fold (``"complete": false`` until the last).
``--compare`` adds the paired bootstrap difference of macro-F1 against another output of the same
images.
"""
from __future__ import annotations

import json
import logging
import math
import time

import numpy as np

from covid_spark.constants import CLASSES
from covid_spark.data.dataset import load_split, read_summary
from covid_spark.data.rundir import git_commit
from covid_spark.data.storage import atomic_write_json, refuse_existing
from covid_spark.errors import DatasetError, InputError
from covid_spark.evaluation.metrics import bootstrap_ci, classification_metrics, metrics_by_group
from covid_spark.models.registry import make_model
from covid_spark.training.tfdata import augment_dataset
from covid_spark.training.weights import class_weights

logger = logging.getLogger(__name__)

TRANSFORMS = ("none", "equalize", "crop10")


def transform_images(images: np.ndarray, name: str) -> np.ndarray:
    """An input variant to compare by cross-validation (grey, 3 channels), or the images unchanged.

    ``equalize``: global histogram equalisation of the grey image (Pillow ``ImageOps.equalize``);
    ``crop10``: 10 % cut off every border, resized back (bilinear).
    """
    from PIL import Image, ImageOps

    if name == "none":
        return images
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; choose from {', '.join(TRANSFORMS)}")
    out = np.empty_like(images)
    for i, image in enumerate(images):
        grey = Image.fromarray(image).convert("L")
        if name == "crop10":
            w, h = grey.size
            mx, my = int(0.1 * w), int(0.1 * h)
            grey = grey.crop((mx, my, w - mx, h - my)).resize((w, h), Image.Resampling.BILINEAR)
        else:
            grey = ImageOps.equalize(grey)
        out[i] = np.asarray(grey)[..., None]
    return out


def grouped_folds(labels: np.ndarray, patients: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index of each image: stratified by label, every image of a patient in the same fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(patients)) < k:
        raise DatasetError(f"{k} folds need at least {k} patients; the pooled splits hold {len(np.unique(patients))}")
    fold = np.full(len(labels), -1, dtype=int)
    for i, (_, held_out) in enumerate(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(labels, labels, patients)):
        fold[held_out] = i
    return fold


def train_fold(images, labels, cfg: dict, seed: int):
    """Train a fresh ``cfg["model"]`` on (images, labels) as described in the module docstring, through
    the train stage's core (``covid_spark.training.core.fit_model``) in one process."""
    import tensorflow as tf
    from tensorflow import keras

    from covid_spark.training.core import fit_model  # imports TensorFlow: only when this runs

    keras.utils.set_random_seed(seed)
    batch = cfg["batch_size"] * cfg["num_proc"]
    model = make_model(cfg["model"], input_shape=images.shape[1:], num_classes=len(CLASSES),
                       input_norm=cfg["input_norm"])
    steps = math.ceil(len(labels) / batch)
    counts = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
    data = tf.data.Dataset.from_tensor_slices((images.astype(np.float32), labels))
    if cfg["shuffle_buffer"] > 1:
        data = data.shuffle(cfg["shuffle_buffer"], seed=seed)
    data = augment_dataset(data.repeat().batch(batch), cfg["augment"], seed=cfg["seed"] + 1000 * seed).prefetch(2)
    fit_model(model, data, epochs=cfg["epochs"], steps_per_epoch=steps,
              learning_rate=cfg["learning_rate"] * cfg["num_proc"], ranks=cfg["num_proc"],
              warmup_epochs=cfg["warmup_epochs"], lr_schedule=cfg["lr_schedule"],
              class_weight=class_weights(counts, cfg["class_weights"]), patience=cfg["early_stopping_patience"])
    return model


def paired_difference(a: dict, b: dict, n_boot: int = 2000, seed: int = 0) -> dict:
    """Macro-F1 of ``a`` minus that of ``b`` over the same images, with a paired percentile bootstrap.

    The interval is :func:`covid_spark.evaluation.metrics.bootstrap_ci`'s paired mode: both models are scored
    on the same resamples of the images.

    Raises:
        ValueError: the two outputs do not hold the same images with the same labels.
    """
    pa, pb = a["predictions"], b["predictions"]
    if pa["path"] != pb["path"] or pa["label"] != pb["label"]:
        raise InputError("--compare: the two cross-validations do not hold the same images and labels")
    ci = bootstrap_ci(np.asarray(pa["label"]), np.asarray(pa["probs"]), list(CLASSES), n_boot=n_boot, seed=seed,
                      paired_with=np.asarray(pb["probs"]))
    return {"against": b.get("label_of_run"), "macro_f1_difference": a["macro_f1"] - b["macro_f1"],
            "ci95": ci["macro_f1"], "n_boot": n_boot}


def cross_validate(dataset: str, config: dict, output: str, folds: int = 5, transform: str = "none",
                   compare: str | None = None, overwrite: bool = False) -> dict:
    """Run the cross-validation described in the module docstring; write and return its results.

    Raises (before any training):
        FileExistsError: ``output`` exists and ``overwrite`` is false.
        FileNotFoundError: no dataset summary, or no ``compare`` file.
        ValueError: fewer than 2 folds, unknown model or transform, unreadable ``compare`` file,
            or fewer patients than folds.
    """
    cfg = config["train"]
    if folds < 2:
        raise InputError(f"--folds must be at least 2, found {folds}")
    if transform not in TRANSFORMS:
        raise InputError(f"unknown transform {transform!r}; choose from {', '.join(TRANSFORMS)}")
    refuse_existing(output, overwrite)
    against = None
    if compare:  # read now, not after hours of training
        with open(compare, encoding="utf-8") as handle:
            try:
                against = json.load(handle)
            except ValueError as err:
                raise InputError(f"--compare {compare} is not JSON: {err}") from err
        if not isinstance(against, dict) or not isinstance(against.get("predictions"), dict):
            raise InputError(f"--compare {compare} is not a complete output of jobs/crossval.py (no 'predictions')")
    read_summary(None, dataset)  # names the dataset when it is not one
    parts = [load_split(dataset, split, fields=("image", "label", "source", "patient_id")) for split in ("train", "val")]
    pooled = {key: np.concatenate([p[key] for p in parts]) for key in ("image", "label", "source", "patient_id", "path")}
    if len(pooled["label"]) == 0:
        raise DatasetError(f"{dataset}: the train and val splits are empty; nothing to cross-validate")
    labels = pooled["label"].astype(int)
    if against is not None and ([str(p) for p in pooled["path"]] != against["predictions"].get("path")
                                or labels.tolist() != against["predictions"].get("label")):
        raise InputError(f"--compare {compare} does not hold the same images and labels as {dataset}'s train + val")
    images = transform_images(pooled["image"], transform)
    fold_of = grouped_folds(labels, pooled["patient_id"], folds)
    probs = np.full((len(labels), len(CLASSES)), np.nan, dtype=np.float32)
    result = {"dataset": dataset, "model": cfg["model"], "folds": folds, "transform": transform,
              "label_of_run": f"{cfg['model']} ({transform})", "train": {k: v for k, v in cfg.items() if k != "per_model"},
              "git_commit": git_commit(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "per_fold": [], "complete": False}
    for fold in range(folds):
        started = time.time()
        held_out = fold_of == fold
        model = train_fold(images[~held_out], labels[~held_out], cfg, seed=fold)
        probs[held_out] = model.predict(images[held_out].astype(np.float32), batch_size=64, verbose=0)
        fold_metrics = classification_metrics(labels[held_out], probs[held_out], list(CLASSES))
        result["per_fold"].append({"fold": fold, "n": int(held_out.sum()), "macro_f1": fold_metrics["macro_f1"],
                                   "accuracy": fold_metrics["accuracy"], "seconds": round(time.time() - started, 1)})
        logger.info("fold %d/%d: macro-F1 %.3f, accuracy %.3f (%d images, %.0f s)", fold + 1, folds,
                    fold_metrics["macro_f1"], fold_metrics["accuracy"], held_out.sum(), time.time() - started)
        atomic_write_json(output, result)
    sources = np.array([s or "unknown" for s in pooled["source"]])
    result.update(classification_metrics(labels, probs, list(CLASSES)))
    result["per_source"] = metrics_by_group(labels, probs, sources, list(CLASSES))
    result["ci95"] = bootstrap_ci(labels, probs, list(CLASSES), n_boot=config["evaluate"]["bootstrap"],
                                  seed=cfg["seed"])
    result["predictions"] = {"path": [str(p) for p in pooled["path"]], "label": labels.tolist(),
                             "source": sources.tolist(), "patient_id": [str(p) for p in pooled["patient_id"]],
                             "fold": fold_of.tolist(), "probs": np.round(probs, 6).tolist()}
    result["complete"] = True
    if against is not None:
        result["compare"] = paired_difference(result, against)
    atomic_write_json(output, result)
    return result


if __name__ == "__main__":  # the command line moved: fail loudly instead of doing nothing
    import sys

    print("covid_spark.stages.crossval: the command line is now jobs/crossval.py (python jobs/crossval.py --help, "
          "or make cv)", file=sys.stderr)
    sys.exit(2)
