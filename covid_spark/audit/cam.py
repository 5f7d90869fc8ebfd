"""Where the Grad-CAM maps point: the share of each map's energy that falls inside the lungs.

Grad-CAM maps (Selvaraju et al., 2017) are non-negative after their ReLU; a map's energy is the sum
of its values. A map is upsampled (bilinear, pixel centres aligned, as images are resized) to its
mask's size before the sum, so a coarse 7 x 7 map and a full-size mask can be compared.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from covid_spark.lungs.masks import lung_pixels


def _axis_weights(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each target index along one axis: the two source indices and the weight of the second."""
    position = (np.arange(target) + 0.5) * (source / target) - 0.5
    position = np.clip(position, 0.0, source - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, source - 1)
    return low, high, position - low


def resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D array resized to ``height`` x ``width`` by bilinear interpolation (half-pixel centres,
    edges clamped), as float64."""
    array = np.asarray(array, dtype=np.float64)
    rows_low, rows_high, row_weight = _axis_weights(array.shape[0], height)
    cols_low, cols_high, col_weight = _axis_weights(array.shape[1], width)
    top = array[rows_low] * (1 - row_weight)[:, None] + array[rows_high] * row_weight[:, None]
    return top[:, cols_low] * (1 - col_weight) + top[:, cols_high] * col_weight


def cam_energy_in_mask(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's energy inside its image's lung mask.

    Args:
        cams: ``[N,h,w]`` Grad-CAM maps; negative values (if any survive) are clipped to 0.
        masks: ``[N,H,W]`` lung masks (encodings as :func:`covid_spark.lungs.masks.lung_pixels`).

    Returns:
        float64 ``[N]`` in 0..1; NaN for a map with no energy at all (nothing to attribute).

    Raises:
        ValueError: if the arrays are not 3-D or their N differ.
    """
    cams, lung = np.asarray(cams), lung_pixels(masks)
    if cams.ndim != 3 or lung.ndim != 3 or cams.shape[0] != lung.shape[0]:
        raise ValueError(f"cams must be [N,h,w] and masks [N,H,W] with one N; got {cams.shape} and {lung.shape}")
    shares = np.empty(cams.shape[0], dtype=np.float64)
    for index in range(cams.shape[0]):
        cam = np.clip(resize_bilinear(cams[index], *lung.shape[1:]), 0.0, None)
        total = cam.sum()
        shares[index] = cam[lung[index]].sum() / total if total > 0 else np.nan
    return shares


def energy_by_group(shares: np.ndarray, labels, sources) -> dict:
    """Mean in-lung share per class, per source and per (class, source), skipping NaN maps.

    Returns:
        ``{"overall": {...}, "by_class": {label: {...}}, "by_source": {source: {...}},
        "by_class_source": {"label/source": {...}}}``, each ``{...}`` being ``{"mean": float or None,
        "images": int}`` where ``images`` counts the maps with energy.

    Raises:
        ValueError: if the three arrays differ in length.
    """
    shares = np.asarray(shares, dtype=np.float64)
    labels, sources = np.asarray(labels).astype(str), np.asarray(sources).astype(str)
    if not (shares.shape == labels.shape == sources.shape) or shares.ndim != 1:
        raise ValueError(f"shares, labels and sources must be [N] of one N; got {shares.shape}, "
                         f"{labels.shape}, {sources.shape}")
    groups: dict[str, dict[str, list[float]]] = {"by_class": defaultdict(list), "by_source": defaultdict(list),
                                                 "by_class_source": defaultdict(list)}
    for share, label, source in zip(shares.tolist(), labels.tolist(), sources.tolist()):
        groups["by_class"][label].append(share)
        groups["by_source"][source].append(share)
        groups["by_class_source"][f"{label}/{source}"].append(share)

    def stats(values) -> dict:
        finite = [value for value in values if not np.isnan(value)]
        return {"mean": float(np.mean(finite)) if finite else None, "images": len(finite)}

    result = {"overall": stats(shares.tolist())}
    for name, group in groups.items():
        result[name] = {key: stats(values) for key, values in sorted(group.items())}
    return result
