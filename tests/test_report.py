"""Tests for covid_spark.report: figures, the self-contained HTML report and the model card."""

import base64
import os
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from covid_spark import metrics as M
from covid_spark import report as R

CLASSES = ["covid", "normal", "pneumonia"]
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _case(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    probs = M.softmax(rng.normal(size=(n, 3)) + 1.2 * np.eye(3)[y])
    return y, probs


def _assert_png(path, min_w=300, min_h=200):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIG
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] >= min_w and im.size[1] >= min_h


def test_plot_history(tmp_path):
    path = tmp_path / "history.png"
    R.plot_history({"loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.9, 0.8],
                    "accuracy": [0.4, 0.6, 0.7], "val_accuracy": [0.35, 0.5, 0.55]}, str(path))
    _assert_png(path)
    assert not os.path.exists(str(path) + ".tmp")


def test_plot_history_without_series_raises(tmp_path):
    with pytest.raises(ValueError, match="no loss or accuracy"):
        R.plot_history({"lr": [0.1]}, str(tmp_path / "h.png"))


def test_plot_confusion(tmp_path):
    path = tmp_path / "sub" / "cm.png"
    R.plot_confusion([[5, 1, 0], [2, 7, 1], [0, 0, 0]], CLASSES, str(path))  # an empty row is allowed
    _assert_png(path)
    with pytest.raises(ValueError, match="must be 3x3"):
        R.plot_confusion([[1, 2], [3, 4]], CLASSES, str(path))


def test_plot_roc_pr_matches_sklearn(tmp_path):
    y, probs = _case(200, 1)
    probs = np.round(probs, 1)  # create ties, which the curves must handle like sklearn
    path = tmp_path / "roc.png"
    aucs = R.plot_roc_pr(y, probs, CLASSES, str(path))
    _assert_png(path)
    for c, name in enumerate(CLASSES):
        assert aucs["roc_auc"][name] == pytest.approx(roc_auc_score(y == c, probs[:, c]))
        assert aucs["pr_auc"][name] == pytest.approx(average_precision_score(y == c, probs[:, c]))


def test_roc_pr_hand_computed_and_undefined():
    # scores .9 (pos) .8 (neg) .7 (pos) .1 (neg): of the 4 pos/neg pairs, 3 are ranked right -> AUC 3/4
    # AP: recall steps 1/2 at precision 1 (after .9) and 1/2 at precision 2/3 (after .7) -> 5/6
    c = R.roc_pr_curves(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1]))
    assert c["roc_auc"] == pytest.approx(0.75)
    assert c["pr_auc"] == pytest.approx(5 / 6)
    none = R.roc_pr_curves(np.array([0, 0, 0]), np.array([0.2, 0.5, 0.1]))
    assert none["roc_auc"] is None and none["pr_auc"] is None


def test_plot_roc_pr_absent_class_is_none(tmp_path):
    y, probs = _case(60, 2)
    y = np.where(y == 2, 0, y)
    aucs = R.plot_roc_pr(y, probs, CLASSES, str(tmp_path / "roc.png"))
    assert aucs["roc_auc"]["pneumonia"] is None and aucs["pr_auc"]["pneumonia"] is None
    assert aucs["roc_auc"]["covid"] is not None


@pytest.fixture()
def report_inputs(tmp_path):
    y, probs = _case()
    groups = np.array(["ieee8023", "kaggle3way", "actualmed"])[np.arange(len(y)) % 3]
    m = M.classification_metrics(y, probs, CLASSES)
    m["ci95"] = M.bootstrap_ci(y, probs, CLASSES, n_boot=100)
    m["per_source"] = M.metrics_by_group(y, probs, groups, CLASSES)
    m["ece"] = M.expected_calibration_error(y, probs)
    figs = {"confusion": str(tmp_path / "cm.png"), "roc": str(tmp_path / "roc.png")}
    R.plot_confusion(m["confusion_matrix"], CLASSES, figs["confusion"])
    aucs = R.plot_roc_pr(y, probs, CLASSES, figs["roc"])
    m.update(aucs)
    cam = tmp_path / "cam0.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(cam)
    summary = {  # the shape covid_spark.preprocess writes to _summary.json
        "classes": CLASSES,
        "image_size": 224,
        "inputs": 700,
        "written": 450 + 110,
        "rejected": [{"path": f"bad/<img{i}>.jpg", "reason": "cannot identify image"} for i in range(250)],
        "skipped": [],
        "duplicates": [["covid/a.jpg", "covid/b.jpg"]],
        "per_class": {"covid": 370, "normal": 80, "pneumonia": 110},
        "per_split": {"train": 450, "val": 0, "test": 110},
        "per_split_class": {"train": {"covid": 300, "normal": 60, "pneumonia": 90},
                            "val": {},
                            "test": {"covid": 70, "normal": 20, "pneumonia": 20}},
        "per_source": {"ieee8023": 428, "kaggle3way": 132},
        "config": {"seed": 0, "val_fraction": 0.0},
    }
    return dict(metrics=m, figures=figs, summary=summary, gradcam=[{"png": str(cam), "caption": "covid <b>0.91</b>"}])


def test_html_report_is_self_contained(tmp_path, report_inputs):
    out = tmp_path / "report.html"
    R.write_html_report(
        str(out), title="Run <1> & co", metrics=report_inputs["metrics"], figures=report_inputs["figures"],
        dataset_summary=report_inputs["summary"], config={"model": "compact", "note": "<script>alert(1)</script>"},
        versions={"tensorflow": "2.15.1", "numpy": np.__version__}, gradcam=report_inputs["gradcam"],
        gradcam_layer="stage4_conv2", extra_sections={"Notes": "a < b"},
    )
    text = out.read_text(encoding="utf-8")
    assert not os.path.exists(str(out) + ".tmp")
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Run &lt;1&gt; &amp; co" in text
    assert "<link" not in text.lower() and "@import" not in text
    srcs = re.findall(r'<img\s[^>]*src="([^"]*)"', text)
    assert len(srcs) == 3  # two figures + one Grad-CAM image
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_SIG)
    # metrics, CIs, per-source table, dataset summary, versions, Grad-CAM layer
    m = report_inputs["metrics"]
    lo, hi = m["ci95"]["accuracy"]
    assert f"{m['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    for source in ("ieee8023", "kaggle3way", "actualmed"):
        assert source in text
    assert "stage4_conv2" in text and "2.15.1" in text
    assert "bad/&lt;img199&gt;.jpg" in text and "bad/&lt;img200&gt;.jpg" not in text
    assert "rejected (250 input(s); first 200 shown, 50 more not listed)" in text
    assert "covid &lt;b&gt;0.91&lt;/b&gt;" in text
    assert "<td>450</td>" in text  # train split total


def test_html_report_missing_figure_raises(tmp_path, report_inputs):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        R.write_html_report(str(tmp_path / "r.html"), title="t", metrics=report_inputs["metrics"],
                            figures={"x": str(tmp_path / "missing.png")}, dataset_summary=None, config={}, versions={})
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.html.tmp").exists()


def test_model_card(tmp_path, report_inputs):
    out = tmp_path / "MODEL_CARD.md"
    R.write_model_card(str(out), run={"run_id": "run-42", "model": "compact", "epochs": 3, "config": {"lr": 0.001}},
                       metrics=report_inputs["metrics"], dataset_summary=report_inputs["summary"],
                       licenses=["ieee8023: CC BY-NC-SA 4.0 (most images)", "kaggle3way: see Kaggle page"])
    text = out.read_text(encoding="utf-8")
    assert "not a diagnostic device" in text
    assert "run-42" in text and "compact" in text
    assert "CC BY-NC-SA" in text and "non-commercial" in text
    for phrase in ("confound", "small test set", "pediatric", "imbalance"):
        assert phrase in text.lower()
    m = report_inputs["metrics"]
    lo, hi = m["ci95"]["per_class"]["covid"]["recall"]
    assert f"{m['per_class']['covid']['recall']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    assert "kaggle3way" in text  # per-source table
    assert "| train | 300 | 60 | 90 | 450 |" in text
