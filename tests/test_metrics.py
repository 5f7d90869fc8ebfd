"""Tests for covid_spark.evaluation.metrics against hand-computed values and scikit-learn."""

import json
import math
import time

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

from covid_spark.evaluation import metrics as M

CLASSES = ["covid", "normal", "pneumonia"]


def _probs_for(pred, k=3, top=0.6):
    """Probabilities whose argmax is ``pred``: ``top`` there, the rest spread evenly."""
    p = np.full((len(pred), k), (1.0 - top) / (k - 1))
    p[np.arange(len(pred)), pred] = top
    return p


def _random_case(n, seed, k=3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    return y, M.softmax(logits)


# --------------------------------------------------------------------------- classification_metrics


def test_hand_computed_six_samples():
    # y    = 0 0 1 1 2 2
    # pred = 0 1 1 1 0 2
    # confusion (rows true): [[1,1,0],[0,2,0],[1,0,1]]
    # covid:     TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2
    # normal:    TP 2, FP 1, FN 0 -> P 2/3, R 1,   F1 2*(2/3)/(5/3) = 4/5
    # pneumonia: TP 1, FP 0, FN 1 -> P 1,   R 1/2, F1 2*(1/2)/(3/2) = 2/3
    # macro-F1 = (1/2 + 4/5 + 2/3) / 3 = 59/90; accuracy 4/6
    # true-class probability: 0.6 where correct, 0.2 where wrong -> loss -(4 ln .6 + 2 ln .2)/6
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = _probs_for(np.array([0, 1, 1, 1, 0, 2]))
    m = M.classification_metrics(y, probs, CLASSES)
    assert m["classes"] == CLASSES and m["n"] == 6
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["macro_f1"] == pytest.approx(59 / 90)
    assert m["loss"] == pytest.approx(-(4 * math.log(0.6) + 2 * math.log(0.2)) / 6)
    expected = {"covid": (1 / 2, 1 / 2, 1 / 2, 2), "normal": (2 / 3, 1.0, 4 / 5, 2), "pneumonia": (1.0, 1 / 2, 2 / 3, 2)}
    for name, (p, r, f, s) in expected.items():
        pc = m["per_class"][name]
        assert pc["precision"] == pytest.approx(p)
        assert pc["recall"] == pytest.approx(r)
        assert pc["f1"] == pytest.approx(f)
        assert pc["support"] == s
    json.dumps(m)  # JSON-ready


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_data(seed):
    y, probs = _random_case(300, seed)
    pred = probs.argmax(axis=1)
    m = M.classification_metrics(y, probs, CLASSES)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    for i, name in enumerate(CLASSES):
        assert m["per_class"][name]["precision"] == pytest.approx(p[i])
        assert m["per_class"][name]["recall"] == pytest.approx(r[i])
        assert m["per_class"][name]["f1"] == pytest.approx(f[i])
        assert m["per_class"][name]["support"] == s[i]
    assert m["macro_f1"] == pytest.approx(f.mean())
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    assert m["loss"] == pytest.approx(log_loss(y, probs, labels=[0, 1, 2]), rel=1e-9)
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))


def test_class_never_predicted_has_no_precision():
    # pneumonia (2) is present once but never predicted: precision undefined, recall 0, F1 0
    y = np.array([0, 1, 2, 0])
    probs = _probs_for(np.array([0, 1, 0, 1]))
    m = M.classification_metrics(y, probs, CLASSES)
    pn = m["per_class"]["pneumonia"]
    assert pn["precision"] is None
    assert pn["recall"] == 0.0 and pn["f1"] == 0.0 and pn["support"] == 1
    # sklearn agrees on F1 for a present-but-never-predicted class
    f_sk = precision_recall_fscore_support(y, probs.argmax(1), labels=[0, 1, 2], zero_division=np.nan)[2]
    assert pn["f1"] == pytest.approx(f_sk[2])
    assert "NaN" not in json.dumps(m)


def test_class_absent_everywhere_is_none_and_left_out_of_macro():
    # covid: TP1 FN1 FP0 -> F1 2/3; normal: TP2 FP1 -> F1 4/5; pneumonia absent -> all None
    y = np.array([0, 0, 1, 1])
    probs = _probs_for(np.array([0, 1, 1, 1]))
    m = M.classification_metrics(y, probs, CLASSES)
    pn = m["per_class"]["pneumonia"]
    assert pn == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_loss_clips_zero_probability():
    y = np.array([0])
    probs = np.array([[0.0, 1.0, 0.0]])
    assert M.classification_metrics(y, probs, CLASSES)["loss"] == pytest.approx(-math.log(1e-7))


@pytest.mark.parametrize(
    "y, probs, match",
    [
        (np.array([0, 1]), np.full((2, 2), 0.5), "2 columns but 3 classes"),
        (np.array([0, 3]), np.full((2, 3), 1 / 3), r"y_true values must be in \[0, 2\]"),
        (np.array([0]), np.array([[0.5, 0.5, 0.5]]), "sum to 1"),
        (np.array([0, 1, 2]), np.full((2, 3), 1 / 3), "3 samples but probs has 2 rows"),
        (np.array([], dtype=int), np.zeros((0, 3)), "zero samples"),
    ],
)
def test_bad_inputs_raise(y, probs, match):
    with pytest.raises(ValueError, match=match):
        M.classification_metrics(y, probs, CLASSES)


def test_metrics_by_group_splits_by_value():
    y, probs = _random_case(200, 5)
    groups = np.array(["ieee8023", "kaggle3way"] * 100)
    by = M.metrics_by_group(y, probs, groups, CLASSES)
    assert list(by) == ["ieee8023", "kaggle3way"]
    for name in by:
        sel = groups == name
        assert by[name]["n"] == int(sel.sum())
        assert by[name]["accuracy"] == pytest.approx(np.mean(probs[sel].argmax(1) == y[sel]))
        assert by[name]["loss"] == pytest.approx(log_loss(y[sel], probs[sel], labels=[0, 1, 2]))


# --------------------------------------------------------------------------- curves


def test_roc_pr_hand_computed_and_undefined():
    # scores .9 (pos) .8 (neg) .7 (pos) .1 (neg): of the 4 pos/neg pairs, 3 are ranked right -> AUC 3/4
    # AP: recall steps 1/2 at precision 1 (after .9) and 1/2 at precision 2/3 (after .7) -> 5/6
    c = M.roc_pr_curves(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert c["roc_auc"] == pytest.approx(0.75)
    assert c["pr_auc"] == pytest.approx(5 / 6)
    np.testing.assert_allclose(c["fpr"], [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(c["tpr"], [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(c["recall"], [0, 0.5, 0.5, 1, 1])  # from the highest threshold down
    np.testing.assert_allclose(c["precision"], [1, 1, 0.5, 2 / 3, 0.5])
    none = M.roc_pr_curves(np.array([0, 0, 0]), np.array([0.2, 0.5, 0.1]))
    assert none["roc_auc"] is None and none["pr_auc"] is None and none["fpr"] is None
    only_pos = M.roc_pr_curves(np.array([1, 1]), np.array([0.2, 0.5]))
    assert only_pos["roc_auc"] is None and only_pos["pr_auc"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_matches_naive_loop_with_same_draws():
    # The implementation draws one (n_boot, n) index matrix from default_rng(seed) when it fits
    # one chunk; recompute each resample independently with sklearn and compare percentiles.
    y, probs = _random_case(80, 3)
    n_boot, seed = 200, 7
    ci = M.bootstrap_ci(y, probs, CLASSES, n_boot=n_boot, seed=seed)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    acc, macro, rec0 = [], [], []
    for row in idx:
        yt, pr = y[row], probs[row].argmax(1)
        acc.append(np.mean(yt == pr))
        present = np.union1d(yt, pr)
        macro.append(precision_recall_fscore_support(yt, pr, labels=present, zero_division=0)[2].mean())
        rec0.append(np.mean(pr[yt == 0] == 0))
    assert ci["accuracy"] == pytest.approx(list(np.percentile(acc, [2.5, 97.5])))
    assert ci["macro_f1"] == pytest.approx(list(np.percentile(macro, [2.5, 97.5])))
    assert ci["per_class"]["covid"]["recall"] == pytest.approx(list(np.percentile(rec0, [2.5, 97.5])))


def test_bootstrap_contains_point_and_narrows_with_more_data():
    widths = []
    for n in (100, 2000):
        y, probs = _random_case(n, 11)
        m = M.classification_metrics(y, probs, CLASSES)
        ci = M.bootstrap_ci(y, probs, CLASSES, n_boot=500, seed=1)
        assert ci["accuracy"][0] <= m["accuracy"] <= ci["accuracy"][1]
        assert ci["macro_f1"][0] <= m["macro_f1"] <= ci["macro_f1"][1]
        assert ci["loss"][0] <= m["loss"] <= ci["loss"][1]
        for name in CLASSES:
            for key in ("precision", "recall", "f1"):
                lo, hi = ci["per_class"][name][key]
                assert lo <= m["per_class"][name][key] <= hi
        widths.append(ci["accuracy"][1] - ci["accuracy"][0])
    # the width shrinks like 1/sqrt(n): 20x the data, about 4.5x narrower
    assert widths[1] < widths[0] / 3


def test_bootstrap_is_reproducible_and_none_when_mostly_undefined():
    y, probs = _random_case(50, 2)
    y[:] = np.where(y == 2, 0, y)
    y[0] = 2  # one pneumonia image: absent from about 36% of resamples
    a = M.bootstrap_ci(y, probs, CLASSES, n_boot=300, seed=4)
    b = M.bootstrap_ci(y, probs, CLASSES, n_boot=300, seed=4)
    assert a == b
    assert a["per_class"]["pneumonia"]["recall"] is None
    assert a["accuracy"] is not None
    json.dumps(a)


def test_paired_bootstrap_is_the_difference_over_the_same_draws():
    y, probs_a = _random_case(90, 5)
    _, probs_b = _random_case(90, 6)
    n_boot, seed = 300, 3
    ci = M.bootstrap_ci(y, probs_a, CLASSES, n_boot=n_boot, seed=seed, paired_with=probs_b)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_boot, len(y)))
    acc, macro, loss = [], [], []
    for row in idx:
        yt = y[row]
        pa, pb = probs_a[row].argmax(1), probs_b[row].argmax(1)
        acc.append(np.mean(yt == pa) - np.mean(yt == pb))
        macro.append(precision_recall_fscore_support(yt, pa, labels=np.union1d(yt, pa), zero_division=0)[2].mean()
                     - precision_recall_fscore_support(yt, pb, labels=np.union1d(yt, pb), zero_division=0)[2].mean())
        loss.append(log_loss(yt, probs_a[row], labels=[0, 1, 2]) - log_loss(yt, probs_b[row], labels=[0, 1, 2]))
    assert ci["paired"] is True
    assert ci["accuracy"] == pytest.approx(list(np.percentile(acc, [2.5, 97.5])))
    assert ci["macro_f1"] == pytest.approx(list(np.percentile(macro, [2.5, 97.5])))
    assert ci["loss"] == pytest.approx(list(np.percentile(loss, [2.5, 97.5])))
    # against itself every difference is exactly zero; unpaired results carry no "paired" key
    same = M.bootstrap_ci(y, probs_a, CLASSES, n_boot=50, paired_with=probs_a)
    assert same["macro_f1"] == [0.0, 0.0] and same["per_class"]["covid"]["recall"] == [0.0, 0.0]
    assert "paired" not in M.bootstrap_ci(y, probs_a, CLASSES, n_boot=50)
    with pytest.raises(ValueError, match="y_true has 90 samples but probs has 89 rows"):
        M.bootstrap_ci(y, probs_a, CLASSES, n_boot=50, paired_with=probs_b[:-1])


def test_bootstrap_is_fast():
    y, probs = _random_case(1000, 9)
    start = time.perf_counter()
    M.bootstrap_ci(y, probs, CLASSES, n_boot=1000)
    # well under a second on an idle core; a generous bound for a shared machine
    assert time.perf_counter() - start < 2.0


# --------------------------------------------------------------------------- calibration


def test_ece_zero_for_confident_correct_predictions():
    y = np.array([0, 1, 2, 1])
    assert M.expected_calibration_error(y, np.eye(3)[y]) == 0.0


def test_ece_hand_computed():
    # 5 bins: (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]
    # conf .90 correct -> bin 4: |1 - .9| * 1                         = 0.10
    # conf .70 wrong, .65 correct -> bin 3: |1/2 - .675| * 2           = 0.35
    # conf .50 wrong -> bin 2: |0 - .5| * 1                            = 0.50
    # ECE = (0.10 + 0.35 + 0.50) / 4 = 0.2375
    probs = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.25, 0.65, 0.10], [0.5, 0.3, 0.2]])
    y = np.array([0, 1, 1, 2])
    assert M.expected_calibration_error(y, probs, n_bins=5) == pytest.approx(0.2375)


def test_softmax_and_temperature():
    z = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    e = np.exp(np.array([1.0, 2.0, 3.0]) / 2)
    np.testing.assert_allclose(M.softmax(z, 2.0)[0], e / e.sum())
    np.testing.assert_allclose(M.softmax(z)[1], [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="temperature must be a positive"):
        M.softmax(z, 0.0)


def test_fit_temperature_recovers_two():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(scale=1.5, size=(5000, 3))
    p = M.softmax(true_logits)
    y = (rng.random(5000)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)  # one draw per row from p
    assert M.fit_temperature(2.0 * true_logits, y) == pytest.approx(2.0, abs=0.2)
    assert M.fit_temperature(true_logits, y) == pytest.approx(1.0, abs=0.1)


# --------------------------------------------------------------------------- text table


def test_format_table_shows_values_ci_and_na():
    y = np.array([0, 1, 2, 0])
    probs = _probs_for(np.array([0, 1, 0, 1]))
    m = M.classification_metrics(y, probs, CLASSES)
    text = M.format_table(m)
    lines = text.splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    covid = next(line for line in lines if line.startswith("covid"))
    assert covid.split() == ["covid", "0.500", "0.500", "0.500", "2"]  # TP1 FP1 FN1
    pneu = next(line for line in lines if line.startswith("pneumonia"))
    assert pneu.split()[1] == "n/a"
    assert any(line.split() == ["accuracy", "0.500"] for line in lines)

    m["ci95"] = M.bootstrap_ci(y, probs, CLASSES, n_boot=50)
    lo, hi = m["ci95"]["accuracy"]
    assert f"0.500 [{lo:.3f}, {hi:.3f}]" in M.format_table(m)
