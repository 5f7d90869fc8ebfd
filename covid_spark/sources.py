"""Where the images come from: a manifest CSV, a folder with manifest.csv, or folders per class."""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass, field

from covid_spark.images import skip_reason

logger = logging.getLogger(__name__)

# Folder or label names accepted for each class, compared after lower-casing and turning
# '_', '-' and runs of spaces into one space.
CLASS_ALIASES: dict[str, str] = {
    "covid": "covid", "covid 19": "covid", "covid19": "covid", "sars cov 2": "covid",
    "covid positive": "covid",
    "normal": "normal", "healthy": "normal", "no finding": "normal", "negative": "normal",
    "pneumonia": "pneumonia", "viral pneumonia": "pneumonia", "bacterial pneumonia": "pneumonia",
    "pneumonia viral": "pneumonia", "pneumonia bacterial": "pneumonia", "other pneumonia": "pneumonia",
}


def class_of(name: str) -> str | None:
    """Map a folder or label name to one of CLASSES, or None when it names no class."""
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()
    return CLASS_ALIASES.get(key)


def accepted_names() -> str:
    return ", ".join(sorted(CLASS_ALIASES))


@dataclass
class Inventory:
    """Every input file found: those to read, and those skipped by name with a reason."""
    records: list[dict] = field(default_factory=list)   # path, label, patient_id, source
    skipped: list[dict] = field(default_factory=list)   # path, reason

    @property
    def inputs(self) -> int:
        return len(self.records) + len(self.skipped)


def _walk_files(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def read_manifest(path: str, skip_unknown: bool = False, labelled: bool = True) -> Inventory:
    """Read a manifest CSV by column name: ``path`` and ``label`` required (``label`` only when ``labelled``).

    Relative paths resolve against the manifest's folder; a path outside that folder
    tree, or an unknown label, is an error naming the row (or, with ``skip_unknown``,
    an unknown label skips the row with a reason).
    """
    base = os.path.dirname(os.path.abspath(path))
    inventory = Inventory()
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in (("path", "label") if labelled else ("path",)) if c not in columns]
        if missing:
            raise ValueError(f"manifest {path} lacks column(s) {', '.join(missing)}; "
                             f"found columns: {', '.join(columns) or 'none'}")
        for line, row in enumerate(reader, start=2):
            rel = (row.get("path") or "").strip()
            if not rel:
                raise ValueError(f"manifest {path} line {line}: empty 'path'")
            full = os.path.normpath(os.path.join(base, rel))
            if os.path.commonpath([base, full]) != base:
                raise ValueError(f"manifest {path} line {line}: path {rel!r} lies outside "
                                 f"the manifest's folder {base}")
            label = class_of(row.get("label") or "")
            if not labelled:
                label = label or ""
            elif label is None:
                message = (f"manifest {path} line {line}: unknown label {row.get('label')!r}; "
                           f"accepted: {accepted_names()}")
                if not skip_unknown:
                    raise ValueError(message)
                inventory.skipped.append({"path": full, "reason": f"unknown label {row.get('label')!r}"})
                continue
            reason = skip_reason(full)
            if reason:
                inventory.skipped.append({"path": full, "reason": reason})
                continue
            inventory.records.append({
                "path": full, "label": label,
                "patient_id": (row.get("patient_id") or "").strip(),
                "source": (row.get("source") or "").strip(),
            })
    return inventory


def read_class_folders(root: str, skip_unknown: bool = False) -> Inventory:
    """Read a folder with one sub-folder per class (any depth below each class folder)."""
    inventory = Inventory()
    entries = sorted(os.listdir(root))
    unknown = []
    for name in entries:
        full = os.path.join(root, name)
        if os.path.isdir(full) and not name.startswith(".") and class_of(name) is None:
            unknown.append(name)
    if unknown and not skip_unknown:
        raise ValueError(f"folder(s) {', '.join(unknown)} in {root} name no class; accepted "
                         f"names (case-insensitive): {accepted_names()}; or pass --skip-unknown-classes")
    for name in entries:
        full = os.path.join(root, name)
        if not os.path.isdir(full):
            inventory.skipped.append({"path": full, "reason": skip_reason(full) or "not inside a class folder"})
            continue
        label = class_of(name)
        for path in _walk_files(full):
            reason = skip_reason(os.path.relpath(path, root))
            if name.startswith("."):
                reason = reason or "inside a hidden folder"
            elif label is None:
                reason = f"inside folder {name!r}, which names no class"
            if reason:
                inventory.skipped.append({"path": path, "reason": reason})
            else:
                inventory.records.append({"path": path, "label": label, "patient_id": "", "source": ""})
    return inventory


def read_flat(root: str) -> Inventory:
    """Read every file under ``root`` without labels (for prediction)."""
    inventory = Inventory()
    for path in _walk_files(root):
        reason = skip_reason(os.path.relpath(path, root))
        if reason:
            inventory.skipped.append({"path": path, "reason": reason})
        else:
            inventory.records.append({"path": path, "label": "", "patient_id": "", "source": ""})
    return inventory


def discover(location: str, skip_unknown: bool = False, labelled: bool = True) -> Inventory:
    """Find the inputs at ``location`` (manifest CSV, folder with manifest.csv, or class folders).

    Raises:
        FileNotFoundError: ``location`` does not exist.
        ValueError: nothing to read there, or a manifest/folder problem (message names it).
    """
    path = os.path.abspath(_local_path(location))
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {location} does not exist")
    if os.path.isfile(path):
        inventory = read_manifest(path, skip_unknown, labelled)
    elif os.path.isfile(os.path.join(path, "manifest.csv")):
        inventory = read_manifest(os.path.join(path, "manifest.csv"), skip_unknown, labelled)
    elif labelled:
        inventory = read_class_folders(path, skip_unknown)
    else:
        subdirs = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")]
        if subdirs and all(class_of(d) for d in subdirs):
            inventory = read_class_folders(path, skip_unknown)
        else:
            inventory = read_flat(path)
    if not inventory.records:
        raise ValueError(f"input {location} holds no images to read "
                         f"({len(inventory.skipped)} file(s) skipped by name)")
    logger.info("found %d image(s) to read and %d skipped by name in %s",
                len(inventory.records), len(inventory.skipped), location)
    return inventory
