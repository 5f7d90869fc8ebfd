"""covid_spark.evaluation.compare: a side-by-side table of metrics files, checked against hand-made metrics."""
import json

import pytest

from covid_spark.evaluation.compare import main, select_part

CLASSES = ["covid", "normal", "pneumonia"]


def _metrics(cm):
    """Hand-computed metrics of a confusion matrix (rows true, columns predicted), as evaluate writes them."""
    n = sum(map(sum, cm))
    per_class = {}
    for i, c in enumerate(CLASSES):
        tp, col, row = cm[i][i], sum(r[i] for r in cm), sum(cm[i])
        per_class[c] = {"precision": tp / col if col else None, "recall": tp / row if row else None, "support": row}
    return {"classes": CLASSES, "n": n, "accuracy": sum(cm[i][i] for i in range(3)) / n, "macro_f1": 0.5,
            "confusion_matrix": cm, "per_class": per_class}


def test_table_of_two_files_and_their_parts(tmp_path, capsys):
    a = dict(_metrics([[8, 2, 0], [1, 9, 0], [0, 0, 10]]), ci95={"accuracy": [0.8, 0.95]})
    a["patient_wise"] = _metrics([[0, 0, 0], [1, 4, 0], [0, 0, 5]])
    a["per_input"] = {"cxr3": _metrics([[8, 2, 0], [0, 0, 0], [0, 0, 1]])}
    b = _metrics([[0, 0, 0], [3, 7, 0], [1, 0, 9]])           # no COVID-19 images, 4 of 20 called COVID-19
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))

    assert main([f"A={tmp_path / 'a.json'}", f"B={tmp_path / 'b.json'}"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["images"] == "| images | 30 | 20 |"
    assert rows["accuracy"] == "| accuracy | 0.900 [0.800, 0.950] | 0.800 |"
    assert rows["called covid (share of images)"] == "| called covid (share of images) | 0.300 | 0.200 |"
    assert rows["covid precision"] == "| covid precision | 0.889 | 0.000 |"
    assert rows["covid recall"].endswith("| 0.800 | – |")            # B has no COVID-19 image: recall undefined
    assert rows["normal recall"] == "| normal recall | 0.900 | 0.700 |"

    assert main(["--part", "patient_wise", f"A={tmp_path / 'a.json'}", f"B={tmp_path / 'b.json'}"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["images"] == "| images | 10 | – |"                   # B has no patient-wise part
    assert select_part(a, "input:cxr3")["n"] == 11 and select_part(a, "input:other") is None


def test_bad_arguments_exit_2_naming_them(tmp_path, capsys):
    assert main(["no-equals-sign"]) == 2
    assert "'no-equals-sign' is not NAME=FILE" in capsys.readouterr().err
    assert main([f"A={tmp_path / 'missing.json'}"]) == 2
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown part 'bogus'"):
        select_part({}, "bogus")


def _scored(labels, predicted, with_id):
    """A metrics file's per-image predictions: one-hot-ish probabilities of the given predicted classes."""
    probs = [[0.8 if k == p else 0.1 for k in range(3)] for p in predicted]
    return {"classes": CLASSES, "per_class": {c: {} for c in CLASSES},
            "predictions": {"path": [f"/x/{i:02d}.png" for i in range(len(labels))], "label": labels,
                            "probs": probs, "source": ["s"] * len(labels), "with_patient_id": with_id}}


def test_paired_differences_on_the_whole_and_on_a_part(tmp_path, capsys):
    labels = [0, 1, 2] * 8                                   # 24 images
    with_id = [i % 2 == 0 for i in range(24)]
    a_pred = list(labels)                                    # A: all right
    b_pred = [(l + 1) % 3 if i < 6 else l for i, l in enumerate(labels)]  # B: the first 6 wrong
    (tmp_path / "a.json").write_text(json.dumps(_scored(labels, a_pred, with_id)))
    (tmp_path / "b.json").write_text(json.dumps(_scored(labels, b_pred, with_id)))
    assert main(["--paired", f"A={tmp_path / 'a.json'}", f"B={tmp_path / 'b.json'}"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("| accuracy: A − B"))
    assert line.startswith(f"| accuracy: A − B | {6 / 24:.3f} [")   # 24/24 − 18/24
    lo, hi = (float(v) for v in line.split("[")[1].rstrip("] |").split(","))
    assert 0 < lo <= 6 / 24 <= hi
    # images with a patient id: the even ones, of which 0, 2, 4 are among B's 6 mistakes → 12/12 − 9/12
    assert main(["--paired", "--part", "patient_wise", f"A={tmp_path / 'a.json'}", f"B={tmp_path / 'b.json'}"]) == 0
    assert f"| accuracy: A − B | {3 / 12:.3f} [" in capsys.readouterr().out

    other = _scored(labels[:-1], a_pred[:-1], with_id[:-1])  # not the same images
    (tmp_path / "c.json").write_text(json.dumps(other))
    assert main(["--paired", f"A={tmp_path / 'a.json'}", f"C={tmp_path / 'c.json'}"]) == 2
    assert "not scored on the same images" in capsys.readouterr().err
