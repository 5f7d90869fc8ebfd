"""Lung segmentation at inference: prepare images, run the shipped U-Net, return masks at the input's size.

Runs wherever it is called: on the driver, or inside a Spark executor's Python worker. The model is
loaded on the first call in each process and kept in this module (one per weights file), never put in
a closure, so nothing of TensorFlow is pickled; TensorFlow itself is imported only when a model loads.
"""
from __future__ import annotations

import io
import logging
import os
from importlib import resources
import threading

import numpy as np
from PIL import Image

from covid_spark.errors import InputError

log = logging.getLogger(__name__)

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_WEIGHTS = os.path.join(WEIGHTS_DIR, "unet128.npz")

# Contrast is stretched between these percentiles of each image: films from different hospitals (and
# children's films) differ in exposure and windowing far more than lungs differ in shape.
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.0

_models: dict[str, object] = {}
_lock = threading.Lock()


def to_grey(images: np.ndarray) -> np.ndarray:
    """``[N,H,W]``, ``[N,H,W,1]`` or ``[N,H,W,3]`` uint8 as ``[N,H,W]`` uint8 (ITU-R 601 luma for RGB).

    Raises:
        ValueError: if the array is not uint8 in one of those shapes.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8; got {images.dtype}")
    if images.ndim == 3:
        return images
    if images.ndim == 4 and images.shape[3] == 1:
        return images[:, :, :, 0]
    if images.ndim == 4 and images.shape[3] == 3:
        luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    raise ValueError(f"images must be [N,H,W], [N,H,W,1] or [N,H,W,3]; got shape {images.shape}")


def stretch(grey: np.ndarray) -> np.ndarray:
    """One grey image (any dtype, 2-D) as float32 0..255, its 1st..99th percentiles spread over the range."""
    grey = grey.astype(np.float32)
    low, high = np.percentile(grey, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if high - low < 1.0:  # a flat image: nothing to stretch
        return grey
    return np.clip((grey - low) * (255.0 / (high - low)), 0.0, 255.0)


def resize_float(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D float array resized (bilinear) to ``height`` x ``width``, as float32."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))  # float32 gives mode "F"
    return np.asarray(image.resize((width, height), Image.BILINEAR), dtype=np.float32)


def prepare(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 images (see :func:`to_grey`) as the model's input: ``[N,size,size,1]`` float32 0..255."""
    grey = to_grey(images)
    out = np.empty((grey.shape[0], size, size, 1), dtype=np.float32)
    for index, image in enumerate(grey):
        out[index, :, :, 0] = stretch(resize_float(image, size, size))
    return out


def load_model(weights: str | None = None):
    """The segmenter for ``weights`` (the shipped file by default), loaded once per process.

    The shipped weights are read through the package's resources, so they load from an installed
    package, a wheel or the zip shipped to Spark executors with ``--py-files`` alike.

    Raises:
        InputError: if the weights file does not exist (the message names it).
    """
    key = os.path.abspath(weights) if weights else DEFAULT_WEIGHTS
    with _lock:
        if key not in _models:
            source = resources.files("covid_spark.lungs").joinpath("weights", os.path.basename(DEFAULT_WEIGHTS)) \
                if weights is None else None
            if not (source.is_file() if source is not None else os.path.isfile(key)):
                raise InputError(f"lung segmenter weights not found: {key} "
                                 f"(train them with python -m covid_spark.lungs.train)")
            from covid_spark.lungs.model import load_weights_npz  # pulls in TensorFlow (heavy)
            _models[key] = load_weights_npz(io.BytesIO(source.read_bytes()) if source is not None else key)
            log.info("lung segmenter loaded from %s", key)
        return _models[key]


def segment(images: np.ndarray, batch_size: int = 32, weights: str | None = None) -> np.ndarray:
    """Per-pixel lung probability of each image, at the images' own size.

    Args:
        images: uint8 ``[N,H,W]``, ``[N,H,W,1]`` or ``[N,H,W,3]``.
        batch_size: images per forward pass.
        weights: an ``.npz`` written by :func:`covid_spark.lungs.model.save_weights_npz`; the shipped
            ``weights/unet128.npz`` when None.

    Returns:
        float32 ``[N,H,W]`` in 0..1 (lung where >= 0.5).

    Raises:
        ValueError: if ``images`` has the wrong dtype or shape, or ``batch_size`` < 1.
    """
    grey = to_grey(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    count, height, width = grey.shape
    out = np.empty((count, height, width), dtype=np.float32)
    if count == 0:
        return out
    model = load_model(weights)
    size = int(model.input_shape[1])
    for start in range(0, count, batch_size):
        batch = prepare(grey[start:start + batch_size], size)
        probabilities = np.asarray(model(batch, training=False))[:, :, :, 0]
        for offset, probability in enumerate(probabilities):
            out[start + offset] = resize_float(probability, height, width)
    return np.clip(out, 0.0, 1.0)
