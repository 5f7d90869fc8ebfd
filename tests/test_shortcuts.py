"""The shortcut audit end to end on hand-built models whose answer is known before they run.

The images are 32×32 films with a "lung" rectangle in the middle and a marker patch in a corner;
both carry the class, and the corner also carries the source. An *honest* model reads only the
lungs, a *cheating* one only the corner. Without training, their weights are set so that each is
right on every image; what the audit must find follows from the construction:

- cheating: with the lungs blacked out it is still right on every image (macro-F1 1.0); its features
  (the corner's mean) differ between sources within a class, so the probe beats the majority source;
- honest: with the lungs blacked out every image looks the same, so it predicts one class (macro-F1
  = 0.5 / 3 on balanced classes); its features do not depend on the source (probe gap ~ 0); outside
  the lungs the films are black but for the corner, so Grad-CAM energy is inside them in proportion
  to the lit area.
"""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from covid_spark.audit.verdict import lungs_removed_f1_max  # noqa: E402
from covid_spark.evaluation.shortcuts import audit_model, held_out_source, stratified_sample  # noqa: E402

SIZE = 32
LUNGS = (slice(8, 24), slice(6, 26))
CORNER = (slice(0, 4), slice(0, 4))
LEVELS = (50, 128, 200)      # the class's intensity, in the lungs and in the corner
CLASSES = ("covid", "normal", "pneumonia")


def films(per_cell: int = 10, seed: int = 0):
    """(images, labels, sources, lung masks): 3 classes × 2 sources × ``per_cell``."""
    rng = np.random.default_rng(seed)
    images, labels, sources = [], [], []
    for label, level in enumerate(LEVELS):
        for source, offset in (("a", 0), ("b", 12)):
            for _ in range(per_cell):
                image = np.zeros((SIZE, SIZE, 3), np.uint8)
                image[LUNGS] = np.clip(level + rng.integers(-3, 4, size=(16, 20, 1)), 0, 255)
                image[CORNER] = level + offset
                images.append(image)
                labels.append(label)
                sources.append(source)
    masks = np.zeros((len(images), SIZE, SIZE), np.float32)
    masks[(slice(None),) + LUNGS] = 1.0
    return np.stack(images), np.array(labels), np.array(sources), masks


def reader(region) -> "tf.keras.Model":
    """A classifier of the mean intensity x (0..1) inside ``region``: logits (5 - 10x, 1, 10x - 5)."""
    inputs = tf.keras.Input((SIZE, SIZE, 3))
    conv = tf.keras.layers.Conv2D(1, 1, activation="relu", name="conv")(inputs)
    rows, cols = region
    crop = tf.keras.layers.Cropping2D(((rows.start, SIZE - rows.stop), (cols.start, SIZE - cols.stop)))(conv)
    pooled = tf.keras.layers.GlobalAveragePooling2D(name="features")(crop)
    probs = tf.keras.layers.Dense(3, activation="softmax", name="probs")(pooled)
    model = tf.keras.Model(inputs, probs)
    model.get_layer("conv").set_weights([np.full((1, 1, 3, 1), 1 / (3 * 255), np.float32), np.zeros(1, np.float32)])
    model.get_layer("probs").set_weights([np.array([[-10.0, 0.0, 10.0]], np.float32),
                                          np.array([5.0, 1.0, -5.0], np.float32)])
    return model


def test_both_models_are_right_on_every_image_as_built():
    images, labels, _, _ = films()
    for region in (LUNGS, CORNER):
        assert (reader(region)(images.astype("float32")).numpy().argmax(1) == labels).all()


def test_the_audit_catches_the_model_that_reads_the_corner():
    images, labels, sources, masks = films()
    audit = audit_model(reader(CORNER), images, labels, sources, CLASSES, masks=masks, cam_images=30, folds=3)
    assert audit["macro_f1"] == 1.0
    assert audit["lungs_removed"]["macro_f1"] == 1.0          # the corner is untouched
    assert audit["probe"]["summary"]["gap"] > 0.3             # baseline 0.5, the corner tells a from b
    assert audit["verdict"]["status"] == "shortcut suspected"
    failed = {f["check"] for f in audit["verdict"]["findings"] if not f["passed"]}
    assert {"source probe", "lungs removed"} <= failed


def test_the_audit_passes_the_model_that_reads_the_lungs():
    images, labels, sources, masks = films()
    audit = audit_model(reader(LUNGS), images, labels, sources, CLASSES, masks=masks, cam_images=30, folds=3)
    assert audit["macro_f1"] == 1.0
    assert audit["lungs_removed"]["macro_f1"] == pytest.approx(0.5 / 3)   # one class for every image
    assert audit["lungs_removed"]["macro_f1"] <= lungs_removed_f1_max(3)
    assert audit["lungs_only"]["macro_f1"] == 1.0
    assert abs(audit["probe"]["summary"]["gap"]) <= 0.1
    # Grad-CAM weighs the conv map (here the image's intensity) by one weight: outside the lungs only the
    # 4×4 corner, as bright as the lungs, holds energy: 320 of 336 lit pixels are lung.
    assert audit["cam"]["overall"]["mean"] == pytest.approx(320 / 336, abs=0.01)
    assert audit["cam"]["images"] == 30
    assert audit["verdict"]["status"] == "no shortcut found"
    assert set(audit["seconds"]) == {"segment", "probe", "masked", "cam"}


def test_the_sample_keeps_every_class_and_source_in_proportion():
    labels = np.repeat([0, 1, 2], [600, 300, 100])
    sources = np.array(["a", "b"] * 500)
    chosen = stratified_sample(labels, sources, 100, seed=1)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert np.bincount(labels[chosen]).tolist() == [60, 30, 10]
    assert (stratified_sample(labels, sources, 5000, seed=1) == np.arange(1000)).all()


def test_held_out_source_figures_come_from_the_per_source_metrics():
    metrics = {"per_source": {"nih": {"n": 4, "macro_f1": 0.25, "accuracy": 0.5,
                                      "per_class": {"normal": {"recall": 1.0}, "pneumonia": {"recall": 0.0}}}}}
    assert held_out_source(metrics, "nih") == {"source": "nih", "n": 4, "macro_f1": 0.25, "accuracy": 0.5,
                                               "recall": {"normal": 1.0, "pneumonia": 0.0}}
    assert held_out_source(metrics, "kermany") is None
