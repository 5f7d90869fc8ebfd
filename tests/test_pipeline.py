"""Integration: the real jobs on ~40 real X-rays, 2 Horovod ranks, built once per session."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CLASSES = ["covid", "normal", "pneumonia"]


def _summary(run):
    with open(os.path.join(run["dataset"], "_summary.json")) as handle:
        return json.load(handle)


def test_dataset_rows_equal_readable_inputs(pipeline_run):
    from covid_spark.data.dataset import load_split

    summary = _summary(pipeline_run)
    # 40 real images + 1 corrupt (rejected) + 1 hidden file (skipped by name)
    assert summary["inputs"] == 42
    assert summary["written"] == 40
    assert [r["path"].endswith("broken.jpg") for r in summary["rejected"]] == [True]
    assert [s["path"].endswith(".DS_Store") for s in summary["skipped"]] == [True]
    rows = {split: load_split(pipeline_run["dataset"], split, fields=("label", "patient_id", "split"))
            for split in ("train", "val", "test")}
    assert sum(len(r["label"]) for r in rows.values()) == 40
    for split, r in rows.items():
        assert set(r["split"]) <= {split}
        assert len(r["label"]) == summary["per_split"][split]
    patients = [set(r["patient_id"]) for r in rows.values()]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    for split in ("train", "val", "test"):
        assert summary["row_groups"][split] >= 2


def test_run_json_and_history(pipeline_run):
    with open(os.path.join(pipeline_run["model_dir"], "run.json")) as handle:
        run = json.load(handle)
    for key in ("num_proc", "classes", "image_size", "model", "epochs", "seed", "config", "versions",
                "git_commit", "dataset", "dataset_summary", "wall_seconds"):
        assert key in run, key
    assert run["num_proc"] == 2 and run["classes"] == CLASSES and run["image_size"] == 224
    with open(os.path.join(pipeline_run["model_dir"], "history.json")) as handle:
        history = json.load(handle)
    assert len(history["loss"]) == 2 and len(history["val_loss"]) == 2
    assert all(np.isfinite(history["loss"]))


def test_metrics_match_recomputation_from_predict_csv(pipeline_run, tmp_path):
    """Predict the test split's files, recompute metrics from the CSV and the true labels."""
    from covid_spark.data.dataset import load_split

    test = load_split(pipeline_run["dataset"], "test", fields=("label", "path"))
    manifest = tmp_path / "manifest.csv"
    # A manifest in the subset folder, so paths stay inside its tree.
    subset = pipeline_run["subset"]
    manifest = os.path.join(subset, "test_manifest.csv")
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for path, label in zip(test["path"], test["label"]):
            writer.writerow([os.path.relpath(path, subset), CLASSES[int(label)]])
    out = str(tmp_path / "pred.csv")
    assert pipeline_run["jobs"]["predict"].main(["--input", manifest, "--model-dir", pipeline_run["model_dir"],
                                                 "--output", out]) == 0
    with open(out, newline="") as handle:
        rows = {r["path"]: r for r in csv.DictReader(handle)}
    assert len(rows) == len(test["path"])
    truth = {str(p): int(l) for p, l in zip(test["path"], test["label"])}
    y = np.array([truth[p] for p in sorted(truth)])
    probs = np.array([[float(rows[p][f"p_{c}"]) for c in CLASSES] for p in sorted(truth)])
    pred = probs.argmax(1)
    with open(os.path.join(pipeline_run["model_dir"], "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics["classes"] == CLASSES and metrics["split"] == "test"
    assert metrics["accuracy"] == pytest.approx(float((pred == y).mean()), abs=1e-9)
    cm = np.zeros((3, 3), int)
    for t, p in zip(y, pred):
        cm[t, p] += 1
    assert metrics["confusion_matrix"] == cm.tolist()
    for k, name in enumerate(CLASSES):
        tp, fp, fn = cm[k, k], cm[:, k].sum() - cm[k, k], cm[k, :].sum() - cm[k, k]
        expected_p = tp / (tp + fp) if tp + fp else None
        expected_r = tp / (tp + fn) if tp + fn else None
        got = metrics["per_class"][name]
        assert got["support"] == int(cm[k].sum())
        assert (got["precision"] is None) == (expected_p is None)
        if expected_p is not None:
            assert got["precision"] == pytest.approx(expected_p)
        if expected_r is not None:
            assert got["recall"] == pytest.approx(expected_r)
    loss = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)))
    assert metrics["loss"] == pytest.approx(loss, abs=1e-4)
    # predict and evaluate give the same probabilities for the same image (shared decode code)
    eval_probs = dict(zip(metrics["predictions"]["path"], metrics["predictions"]["probs"]))
    for p in truth:
        np.testing.assert_allclose([float(rows[p][f"p_{c}"]) for c in CLASSES], eval_probs[p], atol=1e-4)
    for key in ("ci95", "ece", "per_source", "macro_f1"):
        assert key in metrics


def test_predict_one_row_per_input_including_bad(pipeline_run, tmp_path):
    import shutil

    folder = tmp_path / "new"
    folder.mkdir()
    subset = pipeline_run["subset"]
    real = sorted(os.path.join(subset, "normal", f) for f in os.listdir(os.path.join(subset, "normal")))[:3]
    for i, path in enumerate(real):
        shutil.copy(path, folder / f"img{i}.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "page.jpg").write_text("<html><body>404</body></html>")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.parquet"
    explain = tmp_path / "explain"
    assert pipeline_run["jobs"]["predict"].main(["--input", str(folder), "--model-dir", pipeline_run["model_dir"],
                                                 "--output", str(out), "--explain", str(explain)]) == 0
    overlays = sorted(os.listdir(explain))
    assert len(overlays) == 3 and all(name.startswith("img") for name in overlays)
    from PIL import Image

    for name in overlays:
        with Image.open(explain / name) as im:
            assert im.format == "PNG" and im.size == (224, 224)
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    by_name = {os.path.basename(r["path"]): r for r in table}
    assert sorted(by_name) == ["empty.png", "img0.jpg", "img1.jpg", "img2.jpg", "notes.txt", "page.jpg"]
    for name in ("img0.jpg", "img1.jpg", "img2.jpg"):
        r = by_name[name]
        assert r["error"] == "" and r["predicted"] in CLASSES
        assert r["p_covid"] + r["p_normal"] + r["p_pneumonia"] == pytest.approx(1.0, abs=1e-4)
    for name in ("empty.png", "page.jpg", "notes.txt"):
        assert by_name[name]["error"] and by_name[name]["predicted"] is None
    assert "HTML" in by_name["page.jpg"]["error"]


def test_resume_continues_from_checkpoint(pipeline_run, tmp_path, capsys):
    import re
    import shutil

    model_dir = str(tmp_path / "resumed")
    shutil.copytree(pipeline_run["model_dir"], model_dir)
    assert pipeline_run["jobs"]["train"].main(["--dataset", pipeline_run["dataset"], "--model-dir", model_dir,
                                               "--epochs", "3", "--batch-size", "4"]) == 2
    assert capsys.readouterr().err == (f"train: {model_dir} already exists: pass --overwrite to replace it "
                                       f"or --resume to continue from its last checkpoint\n")
    assert pipeline_run["jobs"]["train"].main(["--dataset", pipeline_run["dataset"], "--model-dir", model_dir,
                                               "--epochs", "3", "--batch-size", "4", "--resume",
                                               "--model", "original"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train: --resume: ") and err.count("\n") == 1
    assert re.search("checkpoint of model 'compact'.*--model compact", err)
    assert pipeline_run["jobs"]["train"].main(["--dataset", pipeline_run["dataset"], "--model-dir", model_dir,
                                               "--epochs", "3", "--batch-size", "4", "--resume",
                                               "--model", "compact"]) == 0
    with open(os.path.join(model_dir, "run.json")) as handle:
        run = json.load(handle)
    with open(os.path.join(model_dir, "history.json")) as handle:
        history = json.load(handle)
    assert run["resumed_from_epoch"] == 2
    assert len(history["loss"]) == 3  # two epochs from the first run, one more after resuming


def test_run_report_is_self_contained(pipeline_run):
    import base64
    import re

    from PIL import Image

    from covid_spark.config import load_config
    from covid_spark.stages.report import build_report

    report = build_report(pipeline_run["model_dir"], pipeline_run["dataset"], load_config())
    with open(report, encoding="utf-8") as handle:
        page = handle.read()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    sources = re.findall(r'<img[^>]+src="([^"]+)"', page)
    assert len(sources) >= 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "stage4_conv2" in page  # the Grad-CAM layer is named
    for name in ("history.png", "confusion.png", "roc_pr.png"):
        with Image.open(os.path.join(pipeline_run["model_dir"], "figures", name)) as im:
            assert im.size[0] >= 300 and im.size[1] >= 200
    with open(os.path.join(pipeline_run["model_dir"], "model_card.md"), encoding="utf-8") as handle:
        card = handle.read()
    assert "not a diagnostic device" in card
    assert os.listdir(os.path.join(pipeline_run["model_dir"], "gradcam"))


def test_data_licenses_of_one_input_or_several(tmp_path):
    from covid_spark.stages.report import data_licenses

    for name, licenses in (("a", ["CC BY 4.0", "", "CC0"]), ("b", ["CC BY 4.0", "Apache-2.0"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.csv").write_text(
            "path,label,license\n" + "".join(f"x{i}.png,covid,{lic}\n" for i, lic in enumerate(licenses)))
    (tmp_path / "plain.csv").write_text("path,label\nx.png,covid\n")
    assert data_licenses({"input": str(tmp_path / "a")}) == ["CC BY 4.0", "CC0"]
    assert data_licenses({"input": [f"file://{tmp_path / 'a'}", str(tmp_path / "b" / "manifest.csv"),
                                    str(tmp_path / "plain.csv"), str(tmp_path / "missing")]}) == [
        "Apache-2.0", "CC BY 4.0", "CC0"]
    assert data_licenses({}) == []
