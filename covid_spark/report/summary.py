"""What a dataset summary (preprocess's ``_summary.json``) says about its data.

Readers shared by the tables and the model card's text: the input locations, the sources with
images, the classes, and per source how many images carry a patient id. Each tolerates older
summaries that lack the per-source keys. :class:`PathNames` turns the local paths a summary holds
into the names a shared document shows (no absolute path: a card mailed to a colleague must not
reveal the folders of the machine it was made on).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence


def inputs_of(summary: Mapping) -> list[str]:
    """The summary's input location(s): a list, or one string in summaries of single-input datasets."""
    value = summary.get("input")
    if value is None:
        return []
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def source_total(summary: Mapping, source: str) -> int | None:
    """Images of ``source``, from ``per_source`` or else ``per_source_class``; None when unknown."""
    if source in (summary.get("per_source") or {}):
        return int(summary["per_source"][source])
    if source in (summary.get("per_source_class") or {}):
        return int(sum(summary["per_source_class"][source].values()))
    return None


def sources_of(summary: Mapping) -> list[str]:
    """Sources present in the data (with at least one image), in the summary's order."""
    names: list[str] = []
    for key in ("per_source", "per_source_class", "patient_ids_per_source"):
        names += [str(s) for s in (summary.get(key) or {}) if str(s) not in names]
    return [s for s in names if source_total(summary, s) != 0]


def summary_classes(summary: Mapping, classes: Sequence[str] = ()) -> list[str]:
    """``classes`` (the model's order), else the summary's; then any other class its counts name."""
    out = list(classes) or [str(c) for c in summary.get("classes") or []]
    for counts in [summary.get("per_class") or {}, *(summary.get("per_source_class") or {}).values()]:
        out += [str(c) for c in counts if str(c) not in out]
    return out


def patient_id_counts(summary: Mapping) -> dict[str, tuple[int, int | None]]:
    """Per source: (images with a patient id, images); empty without ``patient_ids_per_source``."""
    with_ids = summary.get("patient_ids_per_source")
    if not isinstance(with_ids, Mapping):
        return {}
    return {str(s): (int(k), source_total(summary, str(s))) for s, k in with_ids.items()}


def patient_id_status(summary: Mapping) -> dict[str, str]:
    """Per source, whether its images carry patient ids: ``"yes"``, ``"no"`` or ``"partly (k of n)"``.

    Empty when the summary has no ``patient_ids_per_source`` (older datasets). Images without a
    patient id were split per image.
    """
    status = {}
    for source, (k, total) in patient_id_counts(summary).items():
        if k == 0:
            status[source] = "no"
        elif total is None or k >= total:
            status[source] = "yes"
        else:
            status[source] = f"partly ({k:,} of {total:,})"
    return status


# an absolute local path inside a longer text: after "file://", "sqlite:///" and the like, or a "/" that follows
# no word character, dot, colon or slash (so "hdfs://host/x" and "PA/AP" are left alone), then folders
_OTHER_ABSOLUTE = re.compile(r"(?:(?<=:///)/?|(?<![\w.…:/])(?:file://)?/)(?:[^\s/'\"]+/)+[^\s/'\",;:)]*")


def _local(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def input_name(location: str) -> str:
    """An input as reports name it: its folder's name (for a manifest CSV, the folder holding it),
    the rule evaluation's ``per_input`` uses."""
    path = _local(str(location)).rstrip("/")
    return os.path.basename(os.path.dirname(path) if path.endswith(".csv") else path) or path


class PathNames:
    """Local paths as a shared document shows them, never absolute.

    A path below an input's folder becomes ``<input name>/<path inside it>``, a path below ``base``
    (the run directory) becomes relative to it, and any other absolute path its file name after
    ``…/``. URLs of other file systems (``hdfs://``, ``s3://``) are kept as they are.

    Args:
        summary: a preprocess ``_summary.json`` dict (its ``input`` and ``per_input`` locations), or None.
        base: the folder the document is written in (the run directory), or None.
    """

    def __init__(self, summary: Mapping | None, base: str | None = None):
        roots: dict[str, str] = {}
        locations = inputs_of(summary or {}) + [str(r.get("input")) for r in (summary or {}).get("per_input") or []
                                                  if isinstance(r, Mapping) and r.get("input")]
        for location in locations:
            path = _local(location).rstrip("/")
            folder = os.path.dirname(path) if path.endswith(".csv") else path
            for root in {folder, os.path.abspath(folder)}:
                roots.setdefault(root, input_name(location))
            roots.setdefault(path, input_name(location))  # the location itself, as given
        if base:
            roots.setdefault(os.path.abspath(_local(base)).rstrip("/"), ".")
        self._roots = sorted(roots.items(), key=lambda item: -len(item[0]))  # the deepest root first
        self._names = dict(self._roots)

    def path(self, path: str) -> str:
        """One path (or ``file://`` URL) as shown."""
        local = _local(path).rstrip("/") or path
        for root, name in self._roots:
            if local == root:
                return name
            if root and local.startswith(root + "/"):
                inner = local[len(root) + 1:]
                return inner if name == "." else f"{name}/{inner}"
        if os.path.isabs(local):
            return "…/" + os.path.basename(local)
        return path

    def text(self, text: str) -> str:
        """``text`` with every path in it shown as :meth:`path` shows it: a whole path, or known
        folders named inside a longer text (an error message)."""
        if _local(text).startswith("/") or _local(text).rstrip("/") in self._names:
            return self.path(text)
        for root, name in self._roots:
            if root.startswith("/") and root in text:
                text = text.replace("file://" + root, root).replace(root, name)
        return _OTHER_ABSOLUTE.sub(lambda m: "…/" + os.path.basename(m.group(0).rstrip("/")), text)

    def value(self, value: Any) -> Any:
        """A JSON-like value with :meth:`text` applied to every string in it, keys included."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.value(k) if isinstance(k, str) else k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value
