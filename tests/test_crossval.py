"""Patient-grouped cross-validation (covid_spark.stages.crossval, jobs/crossval.py): folds, input variants, comparison,
a real run."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from covid_spark.stages import crossval
from jobs import crossval as crossval_job


def test_folds_keep_each_patient_together_and_stratify():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(60), rng.integers(1, 4, size=60))
    labels = np.array([p % 3 for p in patients])  # one label per patient
    fold = crossval.grouped_folds(labels, patients.astype(str), k=5)
    assert set(fold) == set(range(5))
    for p in np.unique(patients):
        assert len(set(fold[patients == p])) == 1, f"patient {p} split across folds"
    for f in range(5):
        assert set(labels[fold == f]) == {0, 1, 2}, f"fold {f} misses a class"


def test_folds_refuse_fewer_patients_than_folds():
    with pytest.raises(ValueError, match="at least 5 patients"):
        crossval.grouped_folds(np.array([0, 1, 2, 0]), np.array(["a", "a", "b", "c"]), k=5)


def test_crop10_removes_the_border():
    image = np.full((50, 50, 3), 255, dtype=np.uint8)
    image[5:45, 5:45] = 0  # a 10 % white frame around a black field
    out = crossval.transform_images(image[None], "crop10")[0]
    assert out.shape == image.shape
    assert out[2:-2, 2:-2].max() == 0  # bilinear resampling may touch the outermost pixels only
    assert (out[..., 0] == out[..., 2]).all()


def test_equalize_spreads_a_narrow_histogram_and_keeps_order():
    ramp = np.tile(np.linspace(100, 140, 64).astype(np.uint8), (64, 1))
    image = np.stack([ramp] * 3, -1)
    out = crossval.transform_images(image[None], "equalize")[0][..., 0]
    assert out.min() < 10 and out.max() > 245
    assert (np.diff(out[0].astype(int)) >= 0).all()  # monotone in the input
    assert crossval.transform_images(image[None], "none") is not None


def test_unknown_transform_is_named():
    with pytest.raises(ValueError, match="unknown transform 'blur'"):
        crossval.transform_images(np.zeros((1, 4, 4, 3), np.uint8), "blur")


def _fake(paths, labels, probs):
    from sklearn.metrics import f1_score
    return {"label_of_run": "x", "macro_f1": f1_score(labels, np.argmax(probs, 1), average="macro"),
            "predictions": {"path": paths, "label": labels, "probs": probs}}


def test_paired_difference_is_zero_against_itself_and_refuses_other_images():
    rng = np.random.default_rng(0)
    labels = list(rng.integers(0, 3, 40))
    probs = rng.dirichlet([1, 1, 1], 40).tolist()
    paths = [f"p{i}" for i in range(40)]
    a = _fake(paths, labels, probs)
    same = crossval.paired_difference(a, a, n_boot=50)
    assert same["macro_f1_difference"] == 0 and same["ci95"] == [0.0, 0.0]
    perfect = _fake(paths, labels, np.eye(3)[labels].tolist())
    better = crossval.paired_difference(perfect, a, n_boot=200)
    assert better["macro_f1_difference"] == pytest.approx(1 - a["macro_f1"])
    assert better["ci95"][0] > 0
    with pytest.raises(ValueError, match="same images"):
        crossval.paired_difference(a, _fake(paths[::-1], labels, probs), n_boot=10)


def test_main_refuses_one_fold(capsys):
    assert crossval_job.main(["--dataset", "x", "--output", "y.json", "--folds", "1"]) == 2
    assert capsys.readouterr().err == "crossval: --folds must be at least 2, found 1\n"


@pytest.mark.slow
def test_cross_validation_on_the_pipeline_dataset(pipeline_run, tmp_path):
    from sklearn.metrics import f1_score

    from covid_spark.data.dataset import load_split

    out = str(tmp_path / "cv.json")
    assert crossval_job.main(["--dataset", pipeline_run["dataset"], "--output", out, "--model", "compact",
                              "--epochs", "1", "--folds", "2"]) == 0
    with open(out, encoding="utf-8") as handle:
        result = json.load(handle)
    pooled = [load_split(pipeline_run["dataset"], s, fields=("label", "patient_id")) for s in ("train", "val")]
    expected_paths = sorted(str(p) for part in pooled for p in part["path"])
    test_paths = {str(p) for p in load_split(pipeline_run["dataset"], "test", fields=("label",))["path"]}
    pred = result["predictions"]
    assert result["complete"] and sorted(pred["path"]) == expected_paths  # every train/val image, once
    assert not test_paths & set(pred["path"])  # the test split is never read
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    assert result["git_commit"].split("+")[0] == head  # "+dirty" when the checkout has changes
    assert sum(f["n"] for f in result["per_fold"]) == len(expected_paths)
    fold_of_patient = {}
    for patient, fold in zip(pred["patient_id"], pred["fold"]):
        assert fold_of_patient.setdefault(patient, fold) == fold
    probs = np.asarray(pred["probs"])
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert result["macro_f1"] == pytest.approx(f1_score(pred["label"], probs.argmax(1), average="macro"), abs=1e-6)
