"""Masking controls: the same images with the lungs blacked out, or with all but the lungs blacked out.

A classifier that still scores well with the lungs removed reads something other than the lungs
(text, markers, borders, the body's size): the source, most likely (Maguolo & Nanni, Information
Fusion 2021, found COVID classifiers well above chance on films whose lungs were blacked out).

Masks: ``[N,H,W]``, the images' height and width, in one of three encodings told apart by dtype
(:func:`covid_spark.lungs.masks.lung_pixels`).
"""
from __future__ import annotations

import numpy as np

from covid_spark.lungs.masks import lung_pixels


def _paint(images: np.ndarray, masks: np.ndarray, where_lung: bool) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 [N,H,W] or [N,H,W,C]; got {images.dtype} {images.shape}")
    lung = lung_pixels(masks)
    if lung.shape != images.shape[:3]:
        raise ValueError(f"masks must be [N,H,W] = {images.shape[:3]} to match the images; got {lung.shape}")
    black = lung if where_lung else ~lung
    out = images.copy()
    out[black] = 0  # on [N,H,W,C] a [N,H,W] index blacks out every channel of the pixel
    return out


def remove_lungs(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """A copy of ``images`` (uint8 ``[N,H,W]`` or ``[N,H,W,C]``) with every lung pixel set to 0.

    Raises:
        ValueError: if the images are not uint8 of those shapes, or the masks' ``[N,H,W]`` differs.
    """
    return _paint(images, masks, where_lung=True)


def keep_only_lungs(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """A copy of ``images`` with every pixel outside the lungs set to 0 (see :func:`remove_lungs`)."""
    return _paint(images, masks, where_lung=False)
