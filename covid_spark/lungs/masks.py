"""Pure functions on lung masks: binarize, Dice, the box around the lungs, a summary row, a crop.

A mask here is a 2-D array the size of its image, in one of three encodings told apart by dtype
(bool; the drawn masks' 255 / 127 "ignore" / 0, where 127 counts as lung; float probabilities,
lung where >= 0.5), as :func:`lung_pixels` defines them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

# A box is trusted only when the mask looks like lungs: together they cover between MIN and MAX of the
# image. The drawn masks cover 0.365 of the image on average (lung-masks/manifest.csv); a mask under
# 0.05 is a failed segmentation, one over 0.85 has leaked into the body or the background.
MIN_LUNG_FRACTION = 0.05
MAX_LUNG_FRACTION = 0.85
# Components below this share of the image are specks (a marker, a stray pixel run), not a lung.
MIN_COMPONENT_FRACTION = 0.005


def lung_pixels(mask: np.ndarray) -> np.ndarray:
    """The lung pixels of a mask (or a stack of masks) as bool.

    ``bool``: lung where True. Integer, the drawn masks' encoding (255 lung, 127 "ignore", which
    counts as lung, 0 background): lung where > 0. Float, lung probabilities in 0..1 as the
    segmenter returns: lung where >= 0.5.

    Raises:
        ValueError: if the dtype is none of those.
    """
    mask = np.asarray(mask)
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask > 0
    if np.issubdtype(mask.dtype, np.floating):
        return mask >= 0.5
    raise ValueError(f"mask dtype must be bool, integer or float; got {mask.dtype}")


def binarize(mask: np.ndarray) -> np.ndarray:
    """Lung pixels of ``mask`` (``[H,W]`` or a stack ``[N,H,W]``) as a bool array.

    Raises:
        ValueError: if ``mask`` is not 2-D or 3-D, or of an unsupported dtype.
    """
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be [H,W] or [N,H,W]; got shape {mask.shape}")
    return lung_pixels(mask)


def dice(predicted: np.ndarray, target: np.ndarray) -> float:
    """Dice coefficient 2|A∩B| / (|A|+|B|) of two masks of one shape; 1.0 when both are empty.

    Raises:
        ValueError: if the shapes differ.
    """
    a, b = binarize(predicted), binarize(target)
    if a.shape != b.shape:
        raise ValueError(f"masks must have one shape; got {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass(frozen=True)
class LungBox:
    """A box in relative coordinates (0..1 of width and height), x1/y1 exclusive.

    ``fallback`` is True when the mask could not be trusted and the box is the whole image;
    ``reason`` then says why (empty, too small, too large); it is '' otherwise.
    """
    x0: float
    y0: float
    x1: float
    y1: float
    fallback: bool = False
    reason: str = ""

    @property
    def relative(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels of a ``width`` x ``height`` image; never empty, never outside it."""
        x0 = min(int(np.floor(self.x0 * width)), width - 1)
        y0 = min(int(np.floor(self.y0 * height)), height - 1)
        x1 = max(int(np.ceil(self.x1 * width)), x0 + 1)
        y1 = max(int(np.ceil(self.y1 * height)), y0 + 1)
        return (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))


WHOLE_IMAGE = LungBox(0.0, 0.0, 1.0, 1.0)


def _lung_components(lung: np.ndarray) -> list[np.ndarray]:
    """The (at most two) largest connected components above MIN_COMPONENT_FRACTION, left to right."""
    labels, count = ndimage.label(lung)
    if count == 0:
        return []
    areas = np.bincount(labels.ravel())[1:]
    keep = [index + 1 for index in np.argsort(areas)[::-1][:2]
            if areas[index] >= MIN_COMPONENT_FRACTION * lung.size]
    components = [labels == index for index in keep]
    return sorted(components, key=lambda c: float(np.nonzero(c)[1].mean()))


def _trust(lung: np.ndarray) -> str:
    """'' when the mask looks like lungs, else why not."""
    fraction = float(lung.mean())
    if fraction == 0.0:
        return "empty mask"
    if fraction < MIN_LUNG_FRACTION:
        return f"lung fraction {fraction:.3f} below {MIN_LUNG_FRACTION}"
    if fraction > MAX_LUNG_FRACTION:
        return f"lung fraction {fraction:.3f} above {MAX_LUNG_FRACTION}"
    return ""


def lung_box(mask: np.ndarray, margin: float = 0.05) -> LungBox:
    """The box around the lung fields of ``mask``, widened by ``margin`` of the image on every side.

    Only the two largest components count (specks elsewhere do not stretch the box). A mask that
    cannot be trusted (see MIN_/MAX_LUNG_FRACTION) gives the whole image with ``fallback=True``.

    Raises:
        ValueError: if ``mask`` is not 2-D or ``margin`` is negative.
    """
    lung = binarize(mask)
    if lung.ndim != 2:
        raise ValueError(f"lung_box takes one [H,W] mask; got shape {lung.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0; got {margin}")
    reason = _trust(lung)
    components = _lung_components(lung) if not reason else []
    if not reason and not components:
        reason = f"no component above {MIN_COMPONENT_FRACTION} of the image"
    if reason:
        return LungBox(0.0, 0.0, 1.0, 1.0, fallback=True, reason=reason)
    rows, cols = np.nonzero(np.logical_or.reduce(components))
    height, width = lung.shape
    return LungBox(
        x0=max(0.0, cols.min() / width - margin), y0=max(0.0, rows.min() / height - margin),
        x1=min(1.0, (cols.max() + 1) / width + margin), y1=min(1.0, (rows.max() + 1) / height + margin))


def mask_summary(mask: np.ndarray, margin: float = 0.05) -> dict[str, float]:
    """A dataset row's worth of plain floats about one mask.

    Keys: ``lung_fraction`` (share of the image that is lung), ``area_image_left`` and
    ``area_image_right`` (shares of the image taken by the largest component on the image's left and
    on its right; on a PA/AP film the image's left is the patient's right lung; 0.0 when missing),
    ``components`` (how many components above MIN_COMPONENT_FRACTION, capped at 2), ``box_x0``,
    ``box_y0``, ``box_x1``, ``box_y1`` (the :func:`lung_box`, relative), ``box_fallback`` (1.0 when the
    box is the whole image because the mask could not be trusted, else 0.0).
    """
    lung = binarize(mask)
    box = lung_box(lung, margin=margin)
    components = _lung_components(lung)
    half = lung.shape[1] / 2.0
    left = [c for c in components if np.nonzero(c)[1].mean() < half]
    right = [c for c in components if np.nonzero(c)[1].mean() >= half]
    return {
        "lung_fraction": float(lung.mean()),
        "area_image_left": float(left[0].mean()) if left else 0.0,
        "area_image_right": float(right[-1].mean()) if right else 0.0,
        "components": float(len(components)),
        "box_x0": float(box.x0), "box_y0": float(box.y0), "box_x1": float(box.x1), "box_y1": float(box.y1),
        "box_fallback": 1.0 if box.fallback else 0.0,
    }


def crop_to_box(image: np.ndarray, box: LungBox, size: int | tuple[int, int]) -> np.ndarray:
    """``image`` ([H,W] or [H,W,C] uint8) cut to ``box`` and resized (bilinear) to ``size``.

    ``size`` is one side (square output) or (height, width). The crop is stretched to ``size``, not
    padded: lung boxes are near square, and a classifier's input is square.

    Raises:
        ValueError: if ``image`` is not uint8 [H,W] or [H,W,C].
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"image must be uint8 [H,W] or [H,W,C]; got {image.dtype} {image.shape}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x0, y0, x1, y1 = box.pixels(image.shape[1], image.shape[0])
    crop = image[y0:y1, x0:x1]
    if crop.ndim == 3 and crop.shape[2] == 1:
        return np.asarray(Image.fromarray(crop[:, :, 0]).resize((out_w, out_h), Image.BILINEAR))[:, :, None]
    return np.asarray(Image.fromarray(crop).resize((out_w, out_h), Image.BILINEAR))
