"""Tests for covid_spark.report: figures (what they draw), the self-contained HTML report and the model card."""

import base64
import html
import os
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_curve

from covid_spark.evaluation import metrics as M
from covid_spark import report as R
from covid_spark.report import figures as F
from covid_spark.report import tables as T

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


def _texts(ax):
    """{(x, y): string} of the texts drawn in data coordinates on ``ax``."""
    return {tuple(t.get_position()): t.get_text() for t in ax.texts}


def test_history_figure_draws_each_series_per_epoch():
    history = {"loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.9, 0.8],
               "accuracy": [0.4, 0.6, 0.7], "val_accuracy": [0.35, 0.5, 0.55]}
    loss_ax, acc_ax = F.history_figure(history).axes
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        assert ax.get_title() == metric
        train, val = ax.get_lines()
        assert (train.get_label(), val.get_label()) == ("train", "validation")
        np.testing.assert_array_equal(train.get_xdata(), [1, 2, 3])  # epochs count from 1
        np.testing.assert_allclose(train.get_ydata(), history[metric])
        np.testing.assert_allclose(val.get_ydata(), history[f"val_{metric}"])
    # a missing series leaves its panel empty, and says so
    loss_ax, acc_ax = F.history_figure({"loss": [0.9, 0.4]}).axes
    assert len(loss_ax.get_lines()) == 1 and not acc_ax.get_lines()
    assert [t.get_text() for t in acc_ax.texts] == ["no accuracy recorded"]


def test_plot_history_writes_png_atomically(tmp_path):
    path = tmp_path / "history.png"
    R.plot_history({"loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.9, 0.8]}, str(path))
    _assert_png(path)
    assert not os.path.exists(str(path) + ".tmp")


def test_plot_history_without_series_raises(tmp_path):
    with pytest.raises(ValueError, match="no loss or accuracy"):
        R.plot_history({"lr": [0.1]}, str(tmp_path / "h.png"))
    assert not (tmp_path / "h.png").exists()


def test_confusion_figure_labels_every_cell():
    cm = [[5, 1, 0], [2, 7, 1], [0, 0, 0]]  # an empty row is allowed
    counts_ax, norm_ax = (ax for ax in F.confusion_figure(cm, CLASSES).axes if ax.get_title())
    assert counts_ax.get_title() == "counts"
    # the text at (column j, row i) is the count of true class i predicted as j
    assert _texts(counts_ax) == {(j, i): str(cm[i][j]) for i in range(3) for j in range(3)}
    # right panel: each row divided by its total (recall on the diagonal), n/a for a class with no images
    expected = {(0, 0): "0.83", (1, 0): "0.17", (2, 0): "0.00", (0, 1): "0.20", (1, 1): "0.70", (2, 1): "0.10",
                (0, 2): "n/a", (1, 2): "n/a", (2, 2): "n/a"}
    assert _texts(norm_ax) == expected
    for ax in (counts_ax, norm_ax):
        assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
        assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")


def test_plot_confusion_writes_png_and_checks_shape(tmp_path):
    path = tmp_path / "sub" / "cm.png"
    R.plot_confusion([[5, 1, 0], [2, 7, 1], [0, 0, 0]], CLASSES, str(path))
    _assert_png(path)
    with pytest.raises(ValueError, match="must be 3x3"):
        R.plot_confusion([[1, 2], [3, 4]], CLASSES, str(path))


def _mann_whitney_auc(labels, scores):
    """P(a positive outscores a negative), ties counted half: the ROC AUC, computed independently."""
    pos, neg = scores[labels], scores[~labels]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_roc_pr_figure_draws_the_curves_and_their_areas(tmp_path):
    y, probs = _case(200, 1)
    probs = np.round(probs, 1)  # create ties, which the curves must handle like sklearn
    fig, aucs = F.roc_pr_figure(y, probs, CLASSES)
    ax_roc, ax_pr = fig.axes
    roc_lines = [line for line in ax_roc.get_lines() if not line.get_label().startswith("_")]
    pr_lines = [line for line in ax_pr.get_lines() if not line.get_label().startswith("_")]
    for c, name in enumerate(CLASSES):
        auc = _mann_whitney_auc(y == c, probs[:, c])
        assert aucs["roc_auc"][name] == pytest.approx(auc)
        assert aucs["pr_auc"][name] == pytest.approx(average_precision_score(y == c, probs[:, c]))
        assert roc_lines[c].get_label() == f"{name} (AUC {auc:.3f})"
        assert pr_lines[c].get_label() == f"{name} (AP {aucs['pr_auc'][name]:.3f})"
        fpr, tpr, _ = roc_curve(y == c, probs[:, c], drop_intermediate=False)
        np.testing.assert_allclose(roc_lines[c].get_xdata(), fpr)
        np.testing.assert_allclose(roc_lines[c].get_ydata(), tpr)
        # the area under the drawn ROC polyline is the AUC reported
        assert np.trapz(roc_lines[c].get_ydata(), roc_lines[c].get_xdata()) == pytest.approx(auc)
    # one dotted prevalence line per class on the PR panel
    prevalence = sorted(float(line.get_ydata()[0]) for line in ax_pr.get_lines() if line.get_linestyle() == ":")
    assert prevalence == pytest.approx(sorted(np.bincount(y, minlength=3) / len(y)))
    path = tmp_path / "roc.png"
    assert R.plot_roc_pr(y, probs, CLASSES, str(path)) == aucs
    _assert_png(path)


def test_plot_roc_pr_absent_class_is_none():
    y, probs = _case(60, 2)
    y = np.where(y == 2, 0, y)
    fig, aucs = F.roc_pr_figure(y, probs, CLASSES)
    assert aucs["roc_auc"]["pneumonia"] is None and aucs["pr_auc"]["pneumonia"] is None
    assert aucs["roc_auc"]["covid"] is not None
    assert "pneumonia (AUC n/a)" in [line.get_label() for line in fig.axes[0].get_lines()]


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
    summary = {  # the shape covid_spark.stages.preprocess writes to _summary.json
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
    assert "Split train 450 / val 0 / test 110," in text
    assert "250 file(s) rejected; 1 group(s) of near-duplicate images" in text  # counted, not listed
    assert "img199" not in text


# --------------------------------------------------------------------------- data-derived card text

XL_SUMMARY = {  # a cxr-xl-like summary, with the per-source keys newer preprocess runs write
    "input": ["/data/radiography2021", "/data/xl-rest"],
    "per_input": [{"input": "/data/radiography2021", "found": 12400, "skipped": 0, "written": 12341, "rejected": 59},
                  {"input": "/data/xl-rest", "found": 5110, "skipped": 0, "written": 5104, "rejected": 6}],
    "per_class": {"covid": 3374, "normal": 9818, "pneumonia": 4253},
    "per_split": {"train": 12000, "val": 2885, "test": 2560},
    "per_split_class": {"train": {"covid": 2300, "normal": 6900, "pneumonia": 2800},
                        "val": {"covid": 579, "normal": 1477, "pneumonia": 829},
                        "test": {"covid": 495, "normal": 1441, "pneumonia": 624}},
    "per_source": {"radiography2021": 12341, "kermany": 4009, "nih": 889, "hannover": 206},
    "per_source_class": {"radiography2021": {"covid": 3168, "normal": 9173},
                         "kermany": {"pneumonia": 3818, "normal": 191},
                         "nih": {"pneumonia": 435, "normal": 454},
                         "hannover": {"covid": 206}},
    "patient_ids_per_source": {"radiography2021": 0, "kermany": 4009, "nih": 889, "hannover": 206},
    "patients_per_split": {"train": 9000, "val": 2000, "test": 1900},
    "config": {"seed": 0, "holdout_source": ""},
}

CXR3_SUMMARY = {
    "input": ["/data/cxr3"],
    "per_class": {"covid": 420, "normal": 98, "pneumonia": 120},
    "per_split": {"train": 500, "val": 48, "test": 90},
    "per_split_class": {"test": {"covid": 60, "normal": 14, "pneumonia": 16}},
    "per_source": {"ieee8023": 400, "actualmed": 20, "kaggle3way": 210, "rsna": 8},
    "per_source_class": {"ieee8023": {"covid": 400}, "actualmed": {"covid": 20},
                         "kaggle3way": {"normal": 90, "pneumonia": 120}, "rsna": {"normal": 8}},
    "config": {"holdout_source": ""},
}


def _card(tmp_path, metrics, summary, licenses=None, name="card.md"):
    out = tmp_path / name
    R.write_model_card(str(out), run={"run_id": "r1", "model": "compact"}, metrics=metrics,
                       dataset_summary=summary, licenses=licenses)
    return out.read_text(encoding="utf-8")


def _xl_metrics():
    y, probs = _case()
    groups = np.array(["radiography2021", "kermany", "nih", "hannover"])[np.arange(len(y)) % 4]
    m = M.classification_metrics(y, probs, CLASSES)
    m["per_source"] = M.metrics_by_group(y, probs, groups, CLASSES)
    return m


def test_model_card_cxr3_like_names_the_confounding_source(tmp_path, report_inputs):
    text = _card(tmp_path, report_inputs["metrics"], CXR3_SUMMARY)
    limitations = text.split("## Known limitations")[1].split("## Data licences")[0]
    # covid: 400 of 400 + 20 = 420 images from ieee8023 = 95.2%; ieee8023 holds covid only
    assert "**Source/label confounding.**" in limitations
    assert "covid 95.2% from ieee8023" in limitations
    assert "95.2% of covid images come from ieee8023, and 100.0% of ieee8023's images are covid" in limitations
    # normal: 90 of 98 from kaggle3way = 91.8%; pneumonia: 120 of 120
    assert "normal 91.8% from kaggle3way" in limitations and "pneumonia 100.0% from kaggle3way" in limitations
    assert "ieee8023 (covid), actualmed (covid), rsna (normal)" in limitations  # single-class sources
    assert "pediatric" in limitations.lower()
    # smallest test class has 14 < 100 images; covid 420 / normal 98 = 4.3x
    assert "**Small test set.** 90 test images (covid 60, normal 14, pneumonia 16)" in limitations
    assert "covid 420 images vs normal 98 (4.3×)" in limitations
    assert "| ieee8023 | 400 | 0 | 0 | 400 |" in text  # training-data source x class table, no id column
    assert "patient ids |" not in text


def test_model_card_cxr_xl_like_describes_its_own_data(tmp_path):
    text = _card(tmp_path, _xl_metrics(), XL_SUMMARY, licenses=["CC BY 4.0"])
    for word in ("cxr3", "ieee8023", "kaggle3way"):
        assert word not in text
    # 3168 + 206 = 3374 covid, 9173 + 191 + 454 = 9818 normal, 3818 + 435 = 4253 pneumonia: 17,445 images
    assert "17,445 images from 2 input(s): radiography2021 (12,341), xl-rest (5,104)." in text
    assert "/data/" not in text  # inputs named by their folder
    assert "| source | covid | normal | pneumonia | total | patient ids |" in text
    assert "| radiography2021 | 3,168 | 9,173 | 0 | 12,341 | no |" in text
    assert "| hannover | 206 | 0 | 0 | 206 | yes |" in text
    limitations = text.split("## Known limitations")[1].split("## Data licences")[0]
    assert "Images of radiography2021 carry no patient id" in limitations
    assert "optimistic" in limitations
    # 2560 test images, smallest class covid 495 >= 100: not called small
    assert "2,560 test images (covid 495, normal 1,441, pneumonia 624)" in limitations
    assert "small test set" not in limitations.lower()
    # covid 3168/3374 = 93.9% and normal 9173/9818 = 93.4% from radiography2021 (74% normal: mixed);
    # pneumonia 3818/4253 = 89.8% from kermany, which is 3818/4009 = 95.2% pneumonia: confounded
    assert "covid 93.9% from radiography2021, normal 93.4% from radiography2021, pneumonia 89.8% from kermany" \
        in limitations
    assert "95.2% of kermany's images are pneumonia" in limitations
    assert "of covid images come from" not in limitations
    assert "Sources holding only one class: hannover (covid)" in limitations
    assert "normal 9,818 images vs covid 3,374 (2.9×)" in limitations  # 9818 / 3374 = 2.91
    for source in ("radiography2021", "kermany", "nih", "hannover"):
        assert f"**Source {source}.**" in limitations
    assert "Leave-one-source-out" not in limitations


def test_model_card_holdout_and_partial_patient_ids(tmp_path):
    summary = dict(XL_SUMMARY, config={"holdout_source": "hannover"},
                   patient_ids_per_source={"radiography2021": 0, "kermany": 120, "nih": 889, "hannover": 206})
    text = _card(tmp_path, _xl_metrics(), summary)
    assert "| kermany | 0 | 191 | 3,818 | 4,009 | partly (120 of 4,009) |" in text
    assert "only 120 of 4,009 images of kermany carry one" in text
    assert "**Leave-one-source-out.** Every test image comes from source hannover" in text


def test_model_card_names_views_and_the_views_filter(tmp_path):
    summary = dict(XL_SUMMARY, per_view={"PA": 30, "unknown": 5, "AP": 12}, config={"views": "PA,AP"},
                   per_input=[{"input": "/x", "excluded_by_view": 3}, {"input": "/y", "excluded_by_view": 4}])
    text = _card(tmp_path, _xl_metrics(), summary)
    assert "Views: PA 30, AP 12, unknown 5. Kept with `--views PA,AP`; 7 image(s) of other views left out." in text
    assert "Views:" not in _card(tmp_path, _xl_metrics(), XL_SUMMARY, name="no-views.md")


def test_model_card_licence_note(tmp_path):
    m = _xl_metrics()
    text = _card(tmp_path, m, XL_SUMMARY, licenses=["CC BY-NC-SA 4.0", "CC BY 4.0"], name="a.md")
    assert "non-commercial (CC BY-NC-SA 4.0)" in text
    assert "check each image's licence in the manifest" in text.lower()
    text = _card(tmp_path, m, XL_SUMMARY, licenses=["CC BY 4.0"], name="b.md")
    assert "non-commercial" not in text.lower() and "NC" not in text.split("## Data licences")[1]
    assert "check each image's licence in the manifest" in text.lower()
    text = _card(tmp_path, m, XL_SUMMARY, licenses=[], name="c.md")
    assert "No licence column was found" in text and "non-commercial" not in text.lower()


def test_model_card_old_summary_and_none(tmp_path, report_inputs):
    old = dict(report_inputs["summary"], input="/data/old-cxr3")  # no per_source_class / patient ids
    text = _card(tmp_path, report_inputs["metrics"], old, name="old.md")
    assert "560 images from 1 input(s): old-cxr3." in text and "/data/" not in text
    assert "Class counts per source were not recorded" in text
    assert "patient ids |" not in text
    text = _card(tmp_path, report_inputs["metrics"], None, name="none.md")
    assert "No dataset summary was recorded" in text
    limitations = text.split("## Known limitations")[1].split("## Data licences")[0]
    assert "confounding unknown" in limitations and "Not externally validated" in limitations


def test_html_report_limitations_follow_the_data(tmp_path):
    out = tmp_path / "xl.html"
    R.write_html_report(str(out), title="xl", metrics=_xl_metrics(), figures={}, dataset_summary=XL_SUMMARY,
                        config={}, versions={})
    text = out.read_text(encoding="utf-8")
    assert "<h2>Known limitations</h2>" in text
    assert "<strong>Source/label confounding.</strong>" in text
    assert "95.2% of kermany's images are pneumonia" in html.unescape(text)
    assert "ieee8023" not in text and "kaggle3way" not in text


def test_card_and_report_give_each_input_and_the_patient_wise_part(tmp_path):
    y, probs = _case()
    metrics = _xl_metrics()
    first = np.arange(len(y)) < 30
    metrics["per_input"] = {"cxr3": M.classification_metrics(y[first], probs[first], CLASSES),
                            "cxr-xl": M.classification_metrics(y[~first], probs[~first], CLASSES)}
    metrics["per_input"]["cxr3"]["ci95"] = {"macro_f1": [0.25, 0.75]}
    metrics["patient_wise"] = dict(M.classification_metrics(y[~first], probs[~first], CLASSES),
                                   sources=["hannover", "kermany", "nih"])
    text = _card(tmp_path, metrics, XL_SUMMARY)
    cxr3 = next(line for line in text.splitlines() if line.startswith("| input cxr3 |"))
    assert cxr3.startswith(f"| input cxr3 | 30 | {metrics['per_input']['cxr3']['accuracy']:.3f} | ")
    assert f"{metrics['per_input']['cxr3']['macro_f1']:.3f} [0.250, 0.750]" in cxr3
    assert f"| images with a patient id (hannover, kermany, nih) | {len(y) - 30} |" in text
    html = tmp_path / "r.html"
    R.write_html_report(str(html), title="t", metrics=metrics, figures={}, dataset_summary=XL_SUMMARY,
                        config={}, versions={})
    assert "Per input, and the part split per patient" in html.read_text(encoding="utf-8")
    assert "Per input" not in _card(tmp_path, _xl_metrics(), XL_SUMMARY, name="plain.md")


def test_per_source_rows_are_built_once_for_the_report_and_the_card(tmp_path, report_inputs):
    m = report_inputs["metrics"]
    y, probs = _case()
    actualmed = np.arange(len(y)) % 3 == 2
    table = T.group_table(m["per_source"], CLASSES)
    row = next(r for r in table.rows if r[0] == "actualmed")
    assert row[:3] == ["actualmed", "40", f"{np.mean(probs[actualmed].argmax(1) == y[actualmed]):.3f}"]
    covid = actualmed & (y == 0)
    assert row[4] == f"{np.mean(probs[covid].argmax(1) == 0):.3f} ({covid.sum()})"  # covid recall (support)
    R.write_html_report(str(tmp_path / "r.html"), title="t", metrics=m, figures={},
                        dataset_summary=report_inputs["summary"], config={}, versions={})
    R.write_model_card(str(tmp_path / "card.md"), run={"run_id": "r"}, metrics=m,
                       dataset_summary=report_inputs["summary"], licenses=None)
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    card = (tmp_path / "card.md").read_text(encoding="utf-8")
    assert "<tr>" + "".join(f"<th>{h}</th>" for h in table.header) + "</tr>" in page
    assert "| " + " | ".join(table.header) + " |" in card
    for r in table.rows:
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" in page
        assert "| " + " | ".join(r) + " |" in card


DATA_CARD = """# tiny: a data card

| source | covid | normal | what it is |
|---|---:|---:|---|
| kermany | 0 | 191 | Kermany et al. pediatric chest X-rays (Guangzhou). |
| nih | 0 | 454 | NIH ChestX-ray14, adults |

| split | images |
|---|---|
| hannover | not a source table |
"""


def test_data_card_sources_reads_the_source_table_only():
    assert R.data_card_sources(DATA_CARD) == {"kermany": "Kermany et al. pediatric chest X-rays (Guangzhou).",
                                              "nih": "NIH ChestX-ray14, adults"}
    assert R.data_card_sources("| source | covid |\n|---|---|\n| nih | 3 |\n") == {}  # no description column


def test_card_describes_sources_from_the_data_card_first(tmp_path):
    from covid_spark.stages.report import data_card_notes

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "manifest.csv").write_text("path,label,source\nx.png,normal,nih\n")
    (tmp_path / "tiny" / "README.md").write_text(DATA_CARD)
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "manifest.csv").write_text("path,label,source\nx.png,covid,hannover\n")
    notes = data_card_notes({"input": [str(tmp_path / "tiny"), str(tmp_path / "bare"), str(tmp_path / "missing")]})
    assert sorted(notes) == ["kermany", "nih"]
    out = tmp_path / "card.md"
    R.write_model_card(str(out), run={"run_id": "r1"}, metrics=_xl_metrics(), dataset_summary=XL_SUMMARY,
                       licenses=None, source_notes=notes)
    limitations = out.read_text(encoding="utf-8").split("## Known limitations")[1]
    assert "**Source kermany** (data card): Kermany et al. pediatric chest X-rays (Guangzhou).\n" in limitations
    assert "**Source nih** (data card): NIH ChestX-ray14" in limitations
    # sources the card does not describe keep the built-in sentence
    assert f"**Source hannover.** {R.KNOWN_SOURCES['hannover']}" in limitations
    assert R.KNOWN_SOURCES["kermany"] not in limitations
    page = R.render_html_report(title="t", metrics=_xl_metrics(), figures={}, dataset_summary=XL_SUMMARY,
                                config={}, versions={}, source_notes=notes)
    assert "<strong>Source kermany</strong> (data card): Kermany et al." in page


def test_data_card_notes_of_the_real_cxr3():
    from covid_spark.stages.report import data_card_notes
    from tests.conftest import CXR3

    if not os.path.isfile(os.path.join(CXR3, "README.md")):
        pytest.skip(f"no data card at {CXR3}")
    notes = data_card_notes({"input": [CXR3]})
    assert sorted(notes) == ["actualmed", "ieee8023", "kaggle3way"]
    assert "pediatric" in notes["kaggle3way"]


# --------------------------------------------------------------------------- documents for their readers

COMBINED_SOURCES = {  # the combined cxr3 + cxr-xl dataset's sources: 7 sources, 18,116 images
    "radiography2021": {"covid": 3168, "normal": 9173}, "kermany": {"pneumonia": 3818, "normal": 191},
    "nih": {"pneumonia": 435, "normal": 454}, "hannover": {"covid": 206},
    "ieee8023": {"covid": 400, "pneumonia": 60, "normal": 10},
    "kaggle3way": {"normal": 90, "pneumonia": 70, "covid": 70}, "actualmed": {"covid": 20, "normal": 10}}


def _combined(root):
    """A summary, metrics and run record shaped like the combined model's, every local path under ``root``:
    two inputs (a folder and a manifest), 214 duplicate groups, 30 rejected and 54 skipped files."""
    inputs = [f"{root}/data/cxr3", f"{root}/data/cxr-xl/manifest.csv"]
    duplicates = [[f"{root}/data/cxr-xl/images/{i}-a.png", f"{root}/data/cxr3/covid/{i}-b.jpg"] for i in range(214)]
    dataset = f"file://{root}/runs/combined/dataset"
    summary = {
        "dataset": dataset, "input": inputs, "classes": CLASSES, "image_size": 224, "inputs": 18200, "written": 18116,
        "rejected": [{"path": f"{root}/data/cxr3/bad{i}.jpg", "reason": f"truncated JPEG: {root}/data/cxr3/bad{i}.jpg"}
                     for i in range(30)],
        "skipped": [{"path": f"{root}/data/cxr-xl/images/.x{i}", "reason": "hidden file", "input": 1}
                    for i in range(54)],
        "per_input": [{"input": "data/cxr3", "found": 671, "skipped": 0, "written": 671, "rejected": 0},
                      {"input": inputs[1], "found": 17529, "skipped": 54, "written": 17445, "rejected": 30}],
        "duplicates": duplicates, "duplicate_label_conflicts": duplicates[:3],
        "per_class": {"covid": 3864, "normal": 9928, "pneumonia": 4324},
        "per_split": {"train": 12744, "val": 2689, "test": 2683},
        "per_split_class": {"train": {"covid": 2700, "normal": 7000, "pneumonia": 3044},
                            "val": {"covid": 592, "normal": 1449, "pneumonia": 648},
                            "test": {"covid": 572, "normal": 1479, "pneumonia": 632}},
        "per_source": {s: sum(c.values()) for s, c in COMBINED_SOURCES.items()}, "per_view": {"unknown": 18116},
        "per_source_class": COMBINED_SOURCES, "per_input_source": [{"ieee8023": 470}, {"nih": 889}],
        "patient_ids_per_source": {"radiography2021": 0, "kermany": 4009, "nih": 889, "hannover": 206,
                                   "ieee8023": 470, "kaggle3way": 0, "actualmed": 30},
        "config": {"seed": 42, "holdout_source": "", "views": ""},
    }
    y, probs = _case(300, 3)
    metrics = M.classification_metrics(y, probs, CLASSES)
    metrics["ci95"] = M.bootstrap_ci(y, probs, CLASSES, n_boot=50)
    metrics["per_source"] = M.metrics_by_group(y, probs, np.array(list(COMBINED_SOURCES))[np.arange(300) % 7],
                                               CLASSES)
    first = np.arange(300) < 30
    metrics["per_input"] = {"cxr3": M.classification_metrics(y[first], probs[first], CLASSES),
                            "cxr-xl": M.classification_metrics(y[~first], probs[~first], CLASSES)}
    metrics["dataset"] = dataset
    run = {"run_id": "combined", "model": "efficientnet_lite0", "engine": "horovod", "num_proc": 2, "epochs": 5,
           "epochs_run": 5, "best_epoch": 4, "seed": 42, "image_size": 224, "dataset": dataset,
           "versions": {"tensorflow": "2.15.1", "python": "3.11.7"}, "git_commit": "abc1234",
           "class_weight": {"covid": 1.5, "normal": 0.6, "pneumonia": 1.4}, "wall_seconds": 1786.0}
    return summary, metrics, run


def test_model_card_is_one_page_whatever_the_data(tmp_path):
    summary, metrics, run = _combined(tmp_path)
    run_dir = tmp_path / "runs" / "combined"
    run_dir.mkdir(parents=True)
    R.write_model_card(str(run_dir / "model_card.md"), run=run, metrics=metrics, dataset_summary=summary,
                       licenses=["CC BY 4.0", "CC BY-NC-SA 4.0"])
    text = (run_dir / "model_card.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Intended use", "## Model", "## Training data", "## Metrics (test split)", "## Known limitations",
        "## Data licences"]
    # the data in one paragraph and one table: inputs named by their folder, lists counted, not listed
    assert "18,116 images from 2 input(s): cxr3 (671), cxr-xl (17,445)." in text
    assert "Split train 12,744 / val 2,689 / test 2,683," in text
    assert "| source | covid | normal | pneumonia | total | patient ids |" in text
    assert "| ieee8023 | 400 | 10 | 60 | 470 | yes |" in text
    assert ("30 file(s) rejected; 54 skipped; 214 group(s) of near-duplicate images, each kept in one split "
            "(3 with conflicting labels)") in text
    assert "0-a.png" not in text and "bad0.jpg" not in text
    assert "| dataset | dataset |" in text  # the run's dataset, relative to the run directory
    # no local path: neither the test's folder nor any other absolute one
    assert str(tmp_path) not in text
    assert not re.search(r"(?<![\w.…:/])/\w", text.replace("N/A", ""))


def test_html_report_folds_the_lists_and_names_no_local_path(tmp_path):
    summary, metrics, _ = _combined(tmp_path)
    run_dir = tmp_path / "runs" / "combined"
    (run_dir / "gradcam").mkdir(parents=True)
    cam = run_dir / "gradcam" / "cam0.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(cam)
    R.write_html_report(str(run_dir / "report.html"), title=f"run {run_dir}", metrics=metrics, figures={},
                        dataset_summary=summary, versions={"tensorflow": "2.15.1"},
                        config={"tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/runs/mlflow.db"},
                                "note": f"data read from {tmp_path}/data/cxr3"},
                        gradcam=[{"png": str(cam), "caption": f"correct: {tmp_path}/data/cxr3/covid/0-b.jpg"}])
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    text = html.unescape(page)
    assert str(tmp_path) not in text
    # files inside an input are shown as <input name>/<path inside it>, inside the run relative to it
    assert "<td>cxr3/bad29.jpg</td>" in page and "truncated JPEG: cxr3/bad29.jpg" in text
    assert "cxr-xl/images/0-a.png, cxr3/covid/0-b.jpg" in text
    assert "correct: cxr3/covid/0-b.jpg" in text and "sqlite:///…/mlflow.db" in text
    # the metrics and the limitations come before the dataset; the long lists are folded, the metrics are not
    assert page.index("<h2>Metrics</h2>") < page.index("<h2>Known limitations</h2>") < page.index("<h2>Dataset</h2>")
    for caption in ("rejected (30 input(s))", "skipped (54 input(s))",
                    "duplicates (214 group(s); first 200 shown, 14 more not listed)"):
        assert f"<details><summary>{caption}</summary>" in page
    folded = "".join(re.findall(r"<details>.*?</details>", page, flags=re.S))
    assert "bad29.jpg" in folded and "Per class" not in folded
    assert "<details><summary>Configuration</summary>" in page


def test_path_names_never_show_a_local_folder():
    names = R.PathNames({"input": ["/srv/x/cxr3", "/srv/y/xl/manifest.csv"], "per_input": [{"input": "../x/cxr3"}]},
                        base="/home/u/runs/r1")
    assert names.path("/srv/x/cxr3/covid/a.jpg") == "cxr3/covid/a.jpg"
    assert names.path("/srv/y/xl/img/b.png") == "xl/img/b.png"          # a manifest's input: its folder's name
    assert names.path("file:///home/u/runs/r1/dataset") == "dataset"     # inside the run: relative to it
    assert names.path("/home/u/private/scan.dcm") == "…/scan.dcm"        # elsewhere: the file's name only
    assert names.text("../x/cxr3") == "cxr3"                            # an input as given: its name
    assert names.text("hdfs://nn/data/x") == "hdfs://nn/data/x"          # not a local path
    assert names.text("cannot read /srv/x/cxr3/c.jpg, or /etc/p/q") == "cannot read cxr3/c.jpg, or …/q"
    assert names.value({"a": ["/srv/x/cxr3/d.jpg", 3]}) == {"a": ["cxr3/d.jpg", 3]}
