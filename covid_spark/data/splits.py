"""Patient-wise, label-stratified train/val/test assignment (pure, deterministic for a seed)."""
from __future__ import annotations

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
