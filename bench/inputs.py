"""Benchmark inputs: a manifest folder of N images made of symlinks to a source, or synthetic JPEGs.

Nothing is copied: larger inputs list the source images several times through symlinks
under a temporary folder, so the bytes read and decoded are exactly the real X-rays.
"""
from __future__ import annotations

import csv
import os

from covid_spark.sources import discover

FIELDS = ("path", "label", "source", "patient_id")


def source_rows(location: str) -> list[dict]:
    """The readable records of ``location`` (manifest or class folders), as manifest rows."""
    return [{"path": r["path"], "label": r["label"], "source": r["source"], "patient_id": r["patient_id"]}
            for r in discover(location).records]


def _write_manifest(folder: str, rows: list[dict]) -> str:
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def sized_input(location: str, folder: str, images: int) -> str:
    """A folder with ``images`` entries: the source's images in order, repeated as needed.

    Copy ``k`` of an image is a symlink ``copy<k>/<label>/<name>`` and keeps its patient id,
    so the preprocess job sees it as a duplicate of copy 0 (same perceptual hash) and keeps
    all copies in one split. That changes the split assignment, not the work per image.

    Returns the folder (it holds ``manifest.csv``).

    Raises:
        ValueError: ``images`` < 1 or the source has no readable records.
    """
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    rows = source_rows(location)
    if not rows:
        raise ValueError(f"no readable images at {location}")
    os.makedirs(folder, exist_ok=True)
    out = []
    for index in range(images):
        copy, row = divmod(index, len(rows))
        src = rows[row]
        rel = os.path.join(f"copy{copy}", src["label"], os.path.basename(src["path"]))
        target = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.symlink(os.path.abspath(src["path"]), target)
        out.append(dict(src, path=rel))
    _write_manifest(folder, out)
    return folder


def synthetic_input(folder: str, images: int, side: int = 96, seed: int = 0) -> str:
    """``images`` small random greyscale JPEGs, one patient each, classes in turn (for tests).

    Returns the folder (it holds ``manifest.csv``).
    """
    import numpy as np
    from PIL import Image

    from covid_spark.config import CLASSES

    rng = np.random.default_rng(seed)
    rows = []
    for index in range(images):
        label = CLASSES[index % len(CLASSES)]
        ramp = np.linspace(0, 255, side)[None, :] * rng.uniform(0.3, 1.0)
        pixels = np.clip(ramp + rng.normal(0, 40, (side, side)), 0, 255).astype(np.uint8)
        rel = os.path.join(label, f"synthetic-{index:04d}.jpg")
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        Image.fromarray(pixels, "L").save(os.path.join(folder, rel), quality=90)
        rows.append({"path": rel, "label": label, "source": "synthetic", "patient_id": f"p{index}"})
    _write_manifest(folder, rows)
    return folder
