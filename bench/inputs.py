"""Benchmark inputs: manifests of N images drawn from a source (links, a sample, copies, a prefix); each maker
returns the folder holding ``manifest.csv`` and raises ``ValueError`` when N < 1 or the source has no readable
records."""
from __future__ import annotations

import csv
import io
import itertools
import os
import shutil

FIELDS = ("path", "label", "source", "patient_id")


def source_rows(location: str) -> list[dict]:
    """The readable records of ``location`` (manifest or class folders), as manifest rows."""
    from covid_spark.inputs.sources import discover

    return [{k: getattr(r, k) for k in FIELDS} for r in discover(location).records]


def manifest_rows(folder: str, limit: int | None = None, absolute: bool = False) -> list[dict]:
    """The first ``limit`` rows (all: None) of ``folder``'s manifest.csv as written, paths made absolute if asked."""
    with open(os.path.join(folder, "manifest.csv"), newline="", encoding="utf-8") as handle:
        rows = list(itertools.islice(csv.DictReader(handle), limit))
    root = os.path.abspath(folder)
    return [dict(r, path=os.path.join(root, r["path"])) for r in rows] if absolute else rows


def write_manifest(folder: str, rows: list[dict], fields=FIELDS, name: str = "manifest.csv") -> str:
    """``rows`` written atomically to ``folder``/``name`` (``fields``: the columns); returns ``folder``."""
    from covid_spark.data.storage import atomic_write_text

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(os.path.join(folder, name), text.getvalue())
    return folder


def _rows_for(location: str, images: int) -> list[dict]:
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    rows = source_rows(location)
    if not rows:
        raise ValueError(f"no readable images at {location}")
    return rows


def repeated_input(location: str, folder: str, images: int, seed: int | None = None) -> str:
    """``images`` entries of the source's images, repeated as needed: with ``seed`` None symlinks in the source's
    order (nothing copied), else byte copies in a seeded order."""
    import numpy as np

    rows = _rows_for(location, images)
    order = range(len(rows)) if seed is None else np.random.default_rng(seed).permutation(len(rows))
    out = []
    for index in range(images):
        copy, position = divmod(index, len(rows))
        src = rows[order[position]]
        name = os.path.basename(src["path"]) if seed is None else f"{position:06d}-{os.path.basename(src['path'])}"
        rel = os.path.join(f"copy{copy}", src["label"], name)
        target = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            if seed is None:
                os.symlink(os.path.abspath(src["path"]), target)
            else:
                shutil.copyfile(src["path"], target)
        out.append(dict(src, path=rel))
    return write_manifest(folder, out)


def sampled_input(location: str, folder: str, images: int, seed: int = 0) -> str:
    """A manifest of ``images`` distinct images by absolute path, a seeded sample stratified by label: each
    label's images in a seeded order, ranked by their position in it as a share of the label's count."""
    import numpy as np

    rows, rng = _rows_for(location, images), np.random.default_rng(seed)
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    ranked = [((rank + 0.5) / len(pool), label, pool[index]) for label, pool in sorted(by_label.items())
              for rank, index in enumerate(rng.permutation(len(pool)))]
    chosen = sorted((row for *_, row in sorted(ranked, key=lambda r: r[:2])[:images]), key=lambda r: r["path"])
    return write_manifest(folder, [dict(r, path=os.path.abspath(r["path"])) for r in chosen])


def input_of_kind(source: str, workdir: str, images: int, kind: str) -> str:
    """An input of ``images`` made from ``source`` as ``kind`` says, in ``workdir``: "all" (the source itself),
    "links" or "copies" (:func:`repeated_input`), or "sample" (:func:`sampled_input`)."""
    folder = os.path.join(workdir, f"input-{kind}-{images}")
    if kind == "all":
        return source
    if kind == "sample":
        return sampled_input(source, folder, images, seed=0)
    return repeated_input(source, folder, images, seed=0 if kind == "copies" else None)
