from collections import Counter

import numpy as np
import pytest

from covid_spark.data.splits import assign_splits, group_units


def _cohort(n_patients=120, seed=1):
    rng = np.random.default_rng(seed)
    paths, labels, pids = [], [], []
    for p in range(n_patients):
        label = ["covid", "normal", "pneumonia"][p % 3] if p < 90 else "covid"
        for k in range(int(rng.integers(1, 4))):
            paths.append(f"img/{p:03d}_{k}.jpg")
            labels.append(label)
            pids.append(f"patient{p}")
    return paths, labels, pids


def test_no_patient_in_two_splits_and_fractions_count_patients():
    paths, labels, pids = _cohort()
    splits = assign_splits(paths, labels, pids, 0.15, 0.15, seed=42)
    split_of_patient = {}
    for pid, split in zip(pids, splits):
        assert split_of_patient.setdefault(pid, split) == split
    per_label = Counter((labels[pids.index(p)], s) for p, s in split_of_patient.items())
    # 60 covid patients, 30 normal, 30 pneumonia: round(n*0.15) each to test and to val
    assert per_label[("covid", "test")] == 9 and per_label[("covid", "val")] == 9
    assert per_label[("normal", "test")] == 4 and per_label[("normal", "val")] == 4  # round(4.5) → 4
    assert per_label[("pneumonia", "train")] == 22


def test_deterministic_for_a_seed_and_varies_with_it():
    paths, labels, pids = _cohort()
    a = assign_splits(paths, labels, pids, 0.2, 0.2, seed=3)
    assert a == assign_splits(paths, labels, pids, 0.2, 0.2, seed=3)
    assert a != assign_splits(paths, labels, pids, 0.2, 0.2, seed=4)
    # input order does not matter
    order = np.random.default_rng(0).permutation(len(paths))
    shuffled = assign_splits([paths[i] for i in order], [labels[i] for i in order], [pids[i] for i in order],
                             0.2, 0.2, seed=3)
    assert [shuffled[list(order).index(i)] for i in range(len(paths))] == a


def test_without_patient_ids_each_image_is_a_unit_and_links_join_units():
    paths = [f"{i}.png" for i in range(6)]
    units = group_units(paths, [""] * 6, linked=[["0.png", "3.png"], ["3.png", "5.png"]])
    assert sorted(sorted(u) for u in units) == [[0, 3, 5], [1], [2], [4]]
    splits = assign_splits(paths * 1, ["covid"] * 6, [""] * 6, 0.3, 0.3, seed=0,
                           linked=[["0.png", "3.png", "5.png"]])
    assert splits[0] == splits[3] == splits[5]


def test_units_join_patients_and_linked_groups_across_them():
    paths = [f"{i}.png" for i in range(8)]
    pids = ["p1", "", "p2", "p1", "", "p2", "p3", ""]
    # 4 is linked to p1's image 3 and to 7; 6 (p3) to 5 (p2); "gone.png" is not among the paths
    units = group_units(paths, pids, linked=[["3.png", "4.png", "gone.png"], ["7.png", "4.png"],
                                             ["6.png", "5.png"], ["1.png"]])
    assert units == [[0, 3, 4, 7], [1], [2, 5, 6]]  # each unit in index order, by its first index
    assert group_units([], [], linked=[["a.png", "b.png"]]) == []


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction must be below 1"):
        assign_splits(["a"], ["covid"], [""], 0.5, 0.5, seed=0)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        assign_splits(["a"], ["covid"], [""], 0.1, -0.1, seed=0)
