"""Patient-wise, label-stratified train/val/test assignment (pure, deterministic for a seed)."""
from __future__ import annotations

import hashlib
import hmac
from collections import Counter, defaultdict
from typing import Iterable, Sequence

import numpy as np

from covid_spark.data.duplicates import components
from covid_spark.errors import ConfigError

SPLITS: tuple[str, ...] = ("train", "val", "test")


def group_units(paths: Sequence[str], patient_ids: Sequence[str],
                linked: Iterable[Sequence[str]] = ()) -> list[list[int]]:
    """Indices grouped into units that must share a split.

    Images of one patient form a unit; an image without a patient id is its own unit;
    each group in ``linked`` (e.g. duplicate images) joins the units of its members.
    """
    u: list[int] = []  # edges u[k]-v[k] between images that must share a split
    v: list[int] = []
    first_of_patient: dict[str, int] = {}
    for i, pid in enumerate(patient_ids):
        if pid:
            u.append(first_of_patient.setdefault(pid, i))
            v.append(i)
    index = {p: i for i, p in enumerate(paths)}
    for group in linked:
        members = [index[p] for p in group if p in index]
        u.extend(members[:1] * (len(members) - 1))
        v.extend(members[1:])
    units: dict[int, list[int]] = defaultdict(list)
    for i, unit in enumerate(components(len(paths), u, v).tolist()):
        units[unit].append(i)
    return list(units.values())


def assign_splits(paths: Sequence[str], labels: Sequence[str], patient_ids: Sequence[str],
                  val_fraction: float, test_fraction: float, seed: int,
                  linked: Iterable[Sequence[str]] = ()) -> list[str]:
    """Return a split name per image.

    Fractions count units (patients), stratified by each unit's majority label: within
    each label the units are shuffled with ``seed`` and the first ``round(n * test)`` go to
    test, the next ``round(n * val)`` to val, the rest to train.

    Raises:
        ValueError: fractions outside [0, 1) or summing to 1 or more.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ConfigError(f"{name} must be in [0, 1), found {value}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(f"val_fraction + test_fraction must be below 1, found {val_fraction + test_fraction}")
    units = group_units(paths, patient_ids, linked)
    by_label: dict[str, list[list[int]]] = defaultdict(list)
    for unit in units:
        counts = Counter(labels[i] for i in unit)
        top = max(sorted(counts), key=lambda lab: counts[lab])
        by_label[top].append(sorted(unit, key=lambda i: paths[i]))
    rng = np.random.default_rng(seed)
    result = [""] * len(paths)
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda u: paths[u[0]])
        order = rng.permutation(len(group))
        n_test = int(round(len(group) * test_fraction))
        n_val = int(round(len(group) * val_fraction))
        for rank, k in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            for i in group[k]:
                result[i] = split
    return result


def hashed_split(key: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """The split of a new unit, from a keyed hash of its key alone (HMAC-SHA256 keyed by ``seed``).

    The same key gives the same split whatever else arrives, in whatever order or batch: the
    hash, read as a number in [0, 1), falls in test below ``test_fraction``, in val below
    ``test_fraction + val_fraction``, else in train. Fractions therefore hold on average, not
    exactly: over ``n`` units a split of fraction ``f`` gets a binomial share, of standard deviation
    ``sqrt(f (1 - f) / n)``.
    """
    digest = hmac.new(f"covid-spark-split:{seed}".encode(), key.encode("utf-8"), hashlib.sha256).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


# When a new image links units that already sit in different splits (a near-copy of images in
# two splits), existing rows keep theirs and the new ones go to the first of these present.
CONFLICT_ORDER: tuple[str, ...] = ("test", "val", "train")


def extend_splits(paths: Sequence[str], patient_ids: Sequence[str], known: Sequence[str],
                  val_fraction: float, test_fraction: float, seed: int,
                  linked: Iterable[Sequence[str]] = (),
                  remembered: dict[str, str] | None = None) -> tuple[list[str], list[dict]]:
    """Splits for a grown collection: existing images keep theirs, new units are hashed.

    Args:
        known: per image, its existing split, or "" for a new (or re-read) image.
        remembered: split by patient id or path for images that left the dataset in this
            increment (a re-read file, a patient whose every image was replaced): a unit
            without a known member takes its split from there before it is hashed.

    Units are :func:`group_units` (patients joined by duplicate groups). A unit with known
    members gives its new members their split; a unit whose known members disagree (a new
    near-copy bridging two splits) keeps every existing row where it is, gives the new rows the
    first split of :data:`CONFLICT_ORDER` present, and is listed in the returned conflicts.
    A unit with no known member gets :func:`hashed_split` of its smallest patient id (of its
    smallest path when no member has one), so a unit that arrives whole lands in the same split
    whatever increment brings it. A unit whose members arrive in different increments (a late
    near-copy, a patient's later image) follows the members already stored: stability comes first.

    Returns:
        (split per image, conflicts as ``[{"paths": [...], "splits": [...]}]``).
    """
    remembered = remembered or {}
    result = list(known)
    conflicts = []
    for unit in group_units(paths, patient_ids, linked):
        new = [i for i in unit if not known[i]]
        if not new:
            continue
        present = sorted({known[i] for i in unit if known[i]}, key=CONFLICT_ORDER.index)
        if not present:
            present = sorted({remembered[k] for i in unit for k in (patient_ids[i], paths[i])
                              if k and k in remembered}, key=CONFLICT_ORDER.index)
        if len(present) > 1:
            conflicts.append({"paths": sorted(paths[i] for i in unit), "splits": present})
        split = present[0] if present else hashed_split(
            min((not patient_ids[i], patient_ids[i] or paths[i]) for i in unit)[1], val_fraction, test_fraction, seed)
        for i in new:
            result[i] = split
    return result, conflicts
