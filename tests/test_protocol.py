"""The protocol's tables (covid_spark.evaluation.protocol) from metrics files made here: the variant
chosen on val, the held-out and external scores with paired differences, and the audit columns."""
from __future__ import annotations

import json
import os

import numpy as np

from covid_spark.constants import CLASSES
from covid_spark.evaluation.metrics import classification_metrics
from covid_spark.evaluation.protocol import tables


def _metrics(y, probs, audit=None) -> dict:
    m = classification_metrics(np.array(y), np.array(probs), list(CLASSES))
    m["predictions"] = {"path": [f"img{i}.png" for i in range(len(y))], "label": list(y), "probs": probs}
    if audit:
        m["audit"] = audit
    return m


def _write(root, variant, run, name, metrics):
    folder = os.path.join(root, variant, run)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle)


def test_the_variant_chosen_on_val_and_the_paired_difference_on_the_held_out_source(tmp_path):
    y = [0, 1, 2, 1, 2, 0, 1, 2]
    right = [[1.0 if c == t else 0.0 for c in range(3)] for t in y]
    wrong = [[0.0, 0.0, 1.0] for _ in y]          # pneumonia for everyone
    audit = {"probe": {"summary": {"gap": 0.05, "balanced_gap": 0.25}}, "lungs_removed": {"macro_f1": 0.7},
             "cam": {"overall": {"mean": 0.4}}, "verdict": {"status": "shortcut suspected"}}
    _write(tmp_path, "default", "without-nih", "metrics.json", _metrics(y, wrong, audit))
    _write(tmp_path, "default", "without-nih", "metrics_val.json", _metrics(y, wrong))
    _write(tmp_path, "lungcrop", "without-nih", "metrics.json", _metrics(y, right))
    _write(tmp_path, "lungcrop", "without-nih", "metrics_val.json", _metrics(y, right))
    text = tables(str(tmp_path), ["default", "lungcrop"], ["nih"])
    assert "Chosen on val (the leave-one-source-out runs' val): **lungcrop**." in text
    wrong_f1 = classification_metrics(np.array(y), np.array(wrong), list(CLASSES))["macro_f1"]
    assert f"| default | {wrong_f1:.3f} | 1 of 1 | n/a |" in text        # 3 pneumonias of 8: F1 0.545 / 3
    held_out = text.split("## Held-out source: nih")[1].split("##")[0]
    assert f"| lungcrop | 1.000" in held_out and f"{1 - wrong_f1:.3f} [" in held_out   # paired: 1 − 0.182
    assert "| default | without-nih | 0.250 | 0.700 | 0.400 | shortcut suspected |" in text
    assert "| lungcrop | all | not run |" in text


def test_the_choice_falls_back_on_the_val_split_of_the_runs_on_all_when_leave_one_out_runs_are_missing(tmp_path):
    y = [0, 1, 2, 1, 2, 0, 1, 2]
    right = [[1.0 if c == t else 0.0 for c in range(3)] for t in y]
    wrong = [[0.0, 0.0, 1.0] for _ in y]
    _write(tmp_path, "default", "without-nih", "metrics_val.json", _metrics(y, right))   # only default has one
    _write(tmp_path, "default", "all", "metrics_val.json", _metrics(y, wrong))
    _write(tmp_path, "sourcecap", "all", "metrics_val.json", _metrics(y, right))
    text = tables(str(tmp_path), ["default", "sourcecap"], ["nih"])
    assert "Chosen on val (the val split of the runs on all of cxr-xl): **sourcecap**." in text
    assert "| sourcecap | n/a | 0 of 1 | 1.000 |" in text
