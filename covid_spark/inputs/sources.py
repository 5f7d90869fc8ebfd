"""Where the images come from: manifest CSVs, folders with manifest.csv, or folders per class.

One run may read several inputs (``discover([a, b, ...])``). Rules that hold across them:

* Every record carries ``source``: its manifest's ``source`` cell, or, where the column is
  missing or the cell empty, the name of the input's folder (the folder given, or the folder
  holding a manifest file given directly).
* Patient ids never merge across sources: a non-empty id becomes ``"<source>:<id>"``
  (:func:`patient_key`); an empty id stays empty (each image is then its own unit).
* The same file (same ``os.path.normpath(os.path.abspath(path))``) listed again, within one
  manifest or in a later input, is read once: every listing after the first is skipped with the
  reason ``"listed twice"``, whatever became of the first. A symlink or copy under another path is
  not a repeat (the preprocess stage finds such content duplicates by hash).
* The hidden-file rule (:func:`skip_reason`) judges only the part of a path
  below the input's root (the manifest's folder, or the folder given), so a data folder under a
  hidden directory (``~/.local/share/xrays``) is read. An absolute manifest path outside the
  manifest's folder is judged by its file name alone.
"""
from __future__ import annotations

import csv
import functools
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from covid_spark.errors import InputError
from covid_spark.inputs.views import normalise_view

logger = logging.getLogger(__name__)

LISTED_TWICE = "listed twice"

# File extensions read as images (compared lower-cased); any other file is skipped by name.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}
)
# DICOM files: these names, and files with no extension at all (as PACS exports often are), are read
# and must be DICOM by content (covid_spark.inputs.images.read_image); a DICOM file under an image
# extension is read as DICOM too.
DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})

# Folder or label names accepted for each class, compared after lower-casing and turning
# '_', '-' and runs of spaces into one space.
CLASS_ALIASES: dict[str, str] = {
    "covid": "covid", "covid 19": "covid", "covid19": "covid", "sars cov 2": "covid",
    "covid positive": "covid",
    "normal": "normal", "healthy": "normal", "no finding": "normal", "negative": "normal",
    "pneumonia": "pneumonia", "viral pneumonia": "pneumonia", "bacterial pneumonia": "pneumonia",
    "pneumonia viral": "pneumonia", "pneumonia bacterial": "pneumonia", "other pneumonia": "pneumonia",
}


def file_extension(path: str) -> str:
    """The lower-cased extension of a path's file name, or "" when it has none (".bashrc" has none)."""
    name = path.rstrip("/\\").replace("\\", "/").rpartition("/")[2]
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def named_as_dicom(path: str) -> bool:
    """Whether the file's name says DICOM: a DICOM extension, or none at all (it must then be DICOM by content)."""
    extension = file_extension(path)
    return not extension or extension in DICOM_EXTENSIONS


def skip_reason(path: str) -> str | None:
    """Return why a file should be skipped, judging by its path alone, or None to read it."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    if not parts or path.endswith(("/", "\\")):
        return f"not a file name: {path!r}"
    *folders, name = parts
    for folder in folders:
        if folder.startswith("."):
            return f"inside hidden folder {folder}"
    if name.startswith("._"):
        return f"macOS resource-fork file {name}"
    if name.startswith("."):
        return f"hidden file {name}"
    if name.lower() in _SYSTEM_FILES:
        return f"Windows system file {name}"
    extension = file_extension(name)
    if not extension:
        return None  # no extension: read, and judged as DICOM by its content
    if extension not in IMAGE_EXTENSIONS | DICOM_EXTENSIONS:
        return (f"unsupported extension '{extension}'; expected one of "
                f"{', '.join(sorted(IMAGE_EXTENSIONS | DICOM_EXTENSIONS))}, or none (DICOM)")
    return None


@functools.lru_cache(maxsize=1024)  # a manifest repeats a few label names on every line
def class_of(name: str) -> str | None:
    """Map a folder or label name to one of CLASSES, or None when it names no class."""
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower()).strip()
    return CLASS_ALIASES.get(key)


def accepted_names() -> str:
    return ", ".join(sorted(CLASS_ALIASES))


def patient_key(source: str, patient_id: str) -> str:
    """The patient id a record carries: ``"<source>:<patient_id>"``, or ``""`` for an empty id.

    An id that already starts with ``"<source>:"`` is kept as it is, so a manifest written
    from discovered records reads back with the same ids.
    """
    patient_id = (patient_id or "").strip()
    if not patient_id or patient_id.startswith(f"{source}:"):
        return patient_id
    return f"{source}:{patient_id}"


def as_locations(locations: str | os.PathLike | Sequence[str] | None) -> list[str]:
    """One location or a sequence of them (a dataset summary's ``input``, old or new) as a list."""
    if locations is None:
        return []
    if isinstance(locations, (str, os.PathLike)):
        return [os.fspath(locations)]
    return [os.fspath(location) for location in locations]


def manifest_of(location: str) -> str | None:
    """The manifest CSV an input is read through (the file itself, or ``<folder>/manifest.csv``), or None."""
    path = os.path.abspath(_local_path(location))
    if os.path.isfile(path):
        return path
    inside = os.path.join(path, "manifest.csv")
    return inside if os.path.isfile(inside) else None


@dataclass(frozen=True, slots=True)
class Record:
    """One input file to read, as :func:`discover` found it.

    ``patient_id`` as :func:`patient_key` makes it; ``view`` the manifest's ``view`` cell, normalised
    ("" when not listed); ``input`` the index of its location in the list given to :func:`discover`.
    Slotted (no per-object dict): a run of 100,000 files holds 100,000 of these on the driver.
    """
    path: str
    label: str
    patient_id: str
    source: str
    view: str = ""
    input: int = 0


@dataclass
class Inventory:
    """Every input file found: those to read, and those skipped by name with a reason.

    ``records``: one :class:`Record` per file to read, in listing order.
    ``skipped``: ``{"path", "reason", "input"}`` per file skipped by name. ``input`` is the index of the
    location in the list given to :func:`discover`; ``per_input`` has one ``{"input": location, "found": n,
    "skipped": n}`` per location, in that order (later stages add their own counts per index).
    """
    records: list[Record] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    per_input: list[dict] = field(default_factory=list)

    @property
    def inputs(self) -> int:
        return len(self.records) + len(self.skipped)


def count_per_input(per_input: Sequence[dict], **items: Iterable[dict]) -> list[dict]:
    """``per_input`` with one more count per keyword, counting the items' ``input`` indices.

    E.g. ``count_per_input(inventory.per_input, written=good, rejected=rejected)``.
    """
    out = [dict(entry) for entry in per_input]
    for name, entries in items.items():
        for entry in out:
            entry[name] = 0
        for item in entries:
            out[item["input"]][name] += 1
    return out


def _walk_files(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def _path_key(path: str) -> str:
    """The normalised absolute path; ``path`` itself (not an equal copy) when it already is one, so that a
    key held for every listed file costs no second string."""
    key = os.path.normpath(os.path.abspath(path))
    return path if key == path else key


def _below(prefix: str, path: str) -> str | None:
    """``path`` relative to the folder whose ``prefix`` (its path ending in a separator) is given,
    or None when it lies outside; both normalised and absolute (a string test: os.path.relpath
    and commonpath cost more than reading the manifest row itself)."""
    return path[len(prefix):] if path.startswith(prefix) else None


# The readers below yield one entry per file listed, in listing order: path, label,
# patient_id and source as listed (source may be empty), and ``reason`` (None to read it).

def _manifest_entries(path: str, skip_unknown: bool, labelled: bool) -> Iterator[dict]:
    base = os.path.dirname(os.path.abspath(path))
    prefix = base.rstrip(os.sep) + os.sep
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        missing = [c for c in (("path", "label") if labelled else ("path",)) if c not in columns]
        if missing:
            raise InputError(f"manifest {path} lacks column(s) {', '.join(missing)}; "
                             f"found columns: {', '.join(columns) or 'none'}")
        for line, row in enumerate(reader, start=2):
            listed = _local_path((row.get("path") or "").strip())
            if not listed:
                raise InputError(f"manifest {path} line {line}: empty 'path'")
            if os.path.isabs(listed):
                # Absolute paths may point anywhere; outside the manifest's folder only the
                # file name is judged, since the folders above it are not the data's.
                full = os.path.normpath(listed)
                judged = _below(prefix, full) or os.path.basename(full)
            else:
                full = os.path.normpath(os.path.join(base, listed))
                judged = _below(prefix, full)
                if judged is None:
                    raise InputError(f"manifest {path} line {line}: path {listed!r} lies outside "
                                     f"the manifest's folder {base}")
            entry = {"path": full, "label": "", "patient_id": (row.get("patient_id") or "").strip(),
                     "source": (row.get("source") or "").strip(), "view": normalise_view(row.get("view")),
                     "reason": None}
            label = class_of(row.get("label") or "")
            if labelled and label is None:
                if not skip_unknown:
                    raise InputError(f"manifest {path} line {line}: unknown label {row.get('label')!r}; "
                                     f"accepted: {accepted_names()}")
                entry["reason"] = f"unknown label {row.get('label')!r}"
            entry["label"] = label or ""
            entry["reason"] = entry["reason"] or skip_reason(judged)
            yield entry


def _class_folder_entries(root: str, skip_unknown: bool) -> Iterator[dict]:
    entries = sorted(os.listdir(root))
    unknown = [name for name in entries if os.path.isdir(os.path.join(root, name))
               and not name.startswith(".") and class_of(name) is None]
    if unknown and not skip_unknown:
        raise InputError(f"folder(s) {', '.join(unknown)} in {root} name no class; accepted "
                         f"names (case-insensitive): {accepted_names()}; or pass --skip-unknown-classes")
    for name in entries:
        full = os.path.join(root, name)
        if not os.path.isdir(full):
            yield {"path": full, "label": "", "patient_id": "", "source": "",
                   "reason": skip_reason(name) or "not inside a class folder"}
            continue
        label = class_of(name)
        for path in _walk_files(full):
            reason = skip_reason(os.path.relpath(path, root))
            if name.startswith("."):
                reason = reason or "inside a hidden folder"
            elif label is None:
                reason = f"inside folder {name!r}, which names no class"
            yield {"path": path, "label": label or "", "patient_id": "", "source": "", "reason": reason}


def _flat_entries(root: str) -> Iterator[dict]:
    for path in _walk_files(root):
        yield {"path": path, "label": "", "patient_id": "", "source": "",
               "reason": skip_reason(os.path.relpath(path, root))}


def _entries(path: str, skip_unknown: bool, labelled: bool) -> tuple[Iterator[dict], str]:
    """The entries of one input and its root folder (whose name is the default source)."""
    manifest = manifest_of(path)
    if manifest is not None:
        return _manifest_entries(manifest, skip_unknown, labelled), os.path.dirname(manifest)
    if labelled:
        return _class_folder_entries(path, skip_unknown), path
    subdirs = [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")]
    if subdirs and all(class_of(d) for d in subdirs):
        return _class_folder_entries(path, skip_unknown), path
    return _flat_entries(path), path


def discover(locations: str | Sequence[str], skip_unknown: bool = False, labelled: bool = True) -> Inventory:
    """Find the inputs at one location or several (each a manifest CSV, a folder with
    manifest.csv, or class folders; with ``labelled=False`` also a flat folder of images).

    See the module docstring for sources, patient ids, files listed twice and hidden files.
    An input whose every readable file was already listed by an earlier one is accepted
    (its files are all "listed twice") with a warning.

    Raises:
        FileNotFoundError: a location does not exist.
        ValueError: no location given; nothing to read at a location; a manifest or folder
            problem (the message names the manifest or folder).
    """
    locations = as_locations(locations)
    if not locations:
        raise InputError("no input given: pass at least one input location")
    inventory = Inventory()
    first_label: dict[str, str] = {}   # path key -> label of its first listing
    patients: dict[str, str] = {}      # one string per patient id, shared by its images (sources: interned)
    for index, location in enumerate(locations):
        path = os.path.abspath(_local_path(location))
        if not os.path.exists(path):
            raise FileNotFoundError(f"input {location} does not exist")
        entries, root = _entries(path, skip_unknown, labelled)
        default_source = os.path.basename(root) or root
        found = skipped = repeats = 0
        for entry in entries:
            key = _path_key(entry["path"])
            reason = entry["reason"]
            if key in first_label:
                if labelled and entry["label"] and first_label[key] and entry["label"] != first_label[key]:
                    logger.warning("%s is listed twice with different labels (%s, then %s in input %s); "
                                   "the first listing is kept", key, first_label[key], entry["label"], location)
                reason, repeats = LISTED_TWICE, repeats + 1
            else:
                first_label[key] = entry["label"]
            if reason:
                inventory.skipped.append({"path": entry["path"], "reason": reason, "input": index})
                skipped += 1
                continue
            source = sys.intern(entry["source"] or default_source)
            patient = patient_key(source, entry["patient_id"])
            inventory.records.append(Record(entry["path"], entry["label"], patients.setdefault(patient, patient),
                                            source, entry.get("view", ""), index))
            found += 1
        inventory.per_input.append({"input": location, "found": found, "skipped": skipped})
        if not found and not repeats:
            raise InputError(f"input {location} holds no images to read "
                             f"({skipped} file(s) skipped by name)")
        if not found:
            logger.warning("input %s adds no images: its %d file(s) to read were all listed before",
                           location, repeats)
        logger.info("found %d image(s) to read and %d skipped by name in %s", found, skipped, location)
    if not inventory.records:
        raise InputError(f"input(s) {', '.join(locations)} hold no images to read "
                         f"({len(inventory.skipped)} file(s) skipped)")
    return inventory
