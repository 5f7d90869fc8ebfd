"""What a dataset summary (preprocess's ``_summary.json``) says about its data.

Readers shared by the tables and the model card's text: the input locations, the sources with
images, the classes, and per source how many images carry a patient id. Each tolerates older
summaries that lack the per-source keys.
"""

from __future__ import annotations

from typing import Mapping, Sequence


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
