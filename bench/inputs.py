"""Benchmark inputs: manifests of N images drawn from a source (symlinks, a sample, or copies), or synthetic JPEGs.

``sized_input`` copies nothing: larger inputs list the source images several times through
symlinks under a temporary folder, so the bytes read and decoded are exactly the real X-rays.
``sampled_input`` lists N distinct images of a source by absolute path (no links, no copies);
``copied_input`` makes N files out of byte copies of the source's images, for sizes beyond it.
"""
from __future__ import annotations

import csv
import os
import shutil

from covid_spark.inputs.sources import discover

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
    rows = _rows_for(location, images)
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


def _rows_for(location: str, images: int) -> list[dict]:
    """The source's readable records, for an input of ``images`` images.

    Raises:
        ValueError: ``images`` < 1 or the source has no readable records.
    """
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    rows = source_rows(location)
    if not rows:
        raise ValueError(f"no readable images at {location}")
    return rows


def _allocate(counts: dict[str, int], images: int) -> dict[str, int]:
    """``images`` shared among labels in proportion to ``counts`` (largest remainders), none above its count."""
    total = sum(counts.values())
    exact = {k: images * v / total for k, v in counts.items()}
    out = {k: min(counts[k], int(x)) for k, x in exact.items()}
    for key in sorted(counts, key=lambda k: (-(exact[k] - int(exact[k])), k)):
        if sum(out.values()) >= images:
            break
        if out[key] < counts[key]:
            out[key] += 1
    while sum(out.values()) < images:  # only when rounding met a full label
        key = next(k for k in sorted(counts) if out[k] < counts[k])
        out[key] += 1
    return out


def sampled_input(location: str, folder: str, images: int, seed: int = 0) -> str:
    """A manifest of ``images`` distinct images of ``location``, stratified by label, by absolute path.

    Each label gets its share of the source's images (largest remainders), drawn with a seeded
    generator; the rows keep their source and patient id and are listed in path order. Nothing
    is linked or copied: the manifest names the source's files. ``images`` at least the
    source's size lists all of it.

    Returns the folder (it holds ``manifest.csv``).

    Raises:
        ValueError: ``images`` < 1 or the source has no readable records.
    """
    import numpy as np

    rows = _rows_for(location, images)
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    wanted = _allocate({k: len(v) for k, v in by_label.items()}, min(images, len(rows)))
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(by_label):
        pool = by_label[label]
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), wanted[label], replace=False))]
    chosen.sort(key=lambda r: r["path"])
    os.makedirs(folder, exist_ok=True)
    _write_manifest(folder, [dict(r, path=os.path.abspath(r["path"])) for r in chosen])
    return folder


def copied_input(location: str, folder: str, images: int, seed: int = 0) -> str:
    """A folder of ``images`` files that are byte copies of the source's images, with a manifest.

    The source's images are taken in a seeded random order, repeated as needed: copy ``k`` of an
    image is ``copy<k>/<label>/<n>-<name>`` (``n`` its place in the order, so that two source files
    of one name never collide) and keeps its source and patient id, so the preprocess job
    finds the copies of one image as duplicates (same perceptual hash) and keeps them in one split.
    The files are real, so every one is read from its own inode (no link resolves to a file
    already in the page cache under another name).

    Returns the folder (it holds ``manifest.csv``; delete the folder when done).

    Raises:
        ValueError: ``images`` < 1 or the source has no readable records.
    """
    import numpy as np

    rows = _rows_for(location, images)
    order = np.random.default_rng(seed).permutation(len(rows))
    out = []
    made = set()
    for index in range(images):
        copy, position = divmod(index, len(rows))
        src = rows[order[position]]
        rel = os.path.join(f"copy{copy}", src["label"], f"{position:06d}-{os.path.basename(src['path'])}")
        target = os.path.join(folder, rel)
        parent = os.path.dirname(target)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        if not os.path.exists(target):
            shutil.copyfile(src["path"], target)
        out.append(dict(src, path=rel))
    _write_manifest(folder, out)
    return folder


def synthetic_input(folder: str, images: int, side: int = 96, seed: int = 0) -> str:
    """``images`` small random greyscale JPEGs, one patient each, classes in turn (for tests).

    Returns the folder (it holds ``manifest.csv``).
    """
    import numpy as np
    from PIL import Image

    from covid_spark.constants import CLASSES

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
