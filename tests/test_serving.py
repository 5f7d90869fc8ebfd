"""The servable export (covid_spark.tracking.serving): saved_model/ scores as predict does, in plain TensorFlow."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from covid_spark.constants import CLASSES

# What a user of saved_model/ runs (the README's recipe), in a fresh interpreter that never imports
# covid_spark: scores the arrays predict decoded (images.npy), and decodes the same files with plain
# Pillow as the README says, to check that recipe gives predict's arrays.
PLAIN_TENSORFLOW = r"""
import json, sys
import numpy as np
import tensorflow as tf
from PIL import Image, ImageOps

export, images_npy, paths_json, out_npy = sys.argv[1:5]
model = tf.saved_model.load(export)
serve = model.signatures["serving_default"]
outputs = serve(image=tf.constant(np.load(images_npy)))
np.save(out_npy, outputs["probabilities"].numpy())

size = serve.structured_input_signature[1]["image"].shape[1]
def decode(path):  # the README's plain-Pillow decode of an 8-bit JPEG or PNG, as predict decodes it
    img = Image.open(path)
    if img.format == "JPEG":
        img.draft(img.mode if img.mode in ("RGB", "L") else None, (size, size))
    img = ImageOps.exif_transpose(img).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
plain = np.stack([decode(p) for p in json.load(open(paths_json))])
with open(export + "/assets/serving.json") as handle:
    about = json.load(handle)
print(json.dumps({"classes": [c.decode() for c in outputs["classes"].numpy()[0]], "about_classes": about["classes"],
                  "plain_equal": bool((plain == np.load(images_npy)).all()), "size": size,
                  "covid_spark_imported": any(m.split(".")[0] == "covid_spark" for m in sys.modules)}))
"""


def tiny_model(input_norm: str = "none", size: int = 32):
    from covid_spark.models.registry import make_model

    return make_model("compact", input_shape=(size, size, 3), num_classes=len(CLASSES), input_norm=input_norm)


@pytest.mark.parametrize("input_norm", ["none", "equalize"])
def test_export_scores_uint8_images_as_the_keras_model_scores_floats(tmp_path, input_norm):
    import tensorflow as tf

    from covid_spark.tracking.serving import export_saved_model

    model = tiny_model(input_norm)
    path = export_saved_model(model, str(tmp_path / "saved_model"), list(CLASSES), 32, {"model": "compact"})
    images = np.random.RandomState(0).randint(0, 256, (4, 32, 32, 3)).astype("uint8")
    loaded = tf.saved_model.load(path)
    outputs = loaded.signatures["serving_default"](image=tf.constant(images))
    expected = model(images.astype("float32"), training=False).numpy()
    np.testing.assert_allclose(outputs["probabilities"].numpy(), expected, atol=1e-6)
    assert outputs["classes"].numpy().tolist() == [[c.encode() for c in CLASSES]] * 4
    np.testing.assert_allclose(loaded(images).numpy(), expected, atol=1e-6)
    with open(os.path.join(path, "assets", "serving.json"), encoding="utf-8") as handle:
        about = json.load(handle)
    assert about["classes"] == list(CLASSES) and about["image_size"] == 32 and about["model"] == "compact"
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError), match="uint8"):  # the signature takes uint8
        loaded.signatures["serving_default"](image=tf.constant(images.astype("float32")))


def test_export_replaces_an_old_one_atomically_and_refuses_a_wrong_shape(tmp_path):
    from covid_spark.tracking.serving import export_saved_model

    target = tmp_path / "saved_model"
    target.mkdir()
    (target / "stale.txt").write_text("old export")
    export_saved_model(tiny_model(), str(target), list(CLASSES), 32)
    assert "stale.txt" not in os.listdir(target) and "saved_model.pb" in os.listdir(target)
    assert sorted(os.listdir(tmp_path)) == ["saved_model"]  # no temporary left beside it
    with pytest.raises(ValueError, match=r"model input is \(32, 32, 3\), expected \(64, 64, 3\)"):
        export_saved_model(tiny_model(), str(tmp_path / "other"), list(CLASSES), 64)
    with pytest.raises(ValueError, match="3 outputs for 2 classes"):
        export_saved_model(tiny_model(), str(tmp_path / "other"), ["a", "b"], 32)
    assert not (tmp_path / "other").exists()


def test_export_command_names_a_run_without_a_model(tmp_path, capsys):
    from covid_spark.tracking.serving import main

    assert main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == (f"serving: {tmp_path / 'nothing' / 'run.json'} not found: train a model into "
                                       f"{tmp_path / 'nothing'} first (jobs/train.py)\n")


@pytest.mark.slow
def test_saved_model_in_plain_tensorflow_equals_predict(tracked_run, tmp_path):
    """The train stage's saved_model/, loaded in a process that never imports covid_spark, gives the
    probabilities predict writes for the same decoded images."""
    import shutil

    import pyarrow.parquet as pq

    from covid_spark.config import load_config
    from covid_spark.inputs.images import read_image
    from covid_spark.data.rundir import RunDir

    run = RunDir(tracked_run["run_dir"])
    folder = tmp_path / "new"
    folder.mkdir()
    for label in CLASSES:
        source = os.path.join(tracked_run["subset"], label)
        for name in sorted(n for n in os.listdir(source) if not n.startswith(".") and n != "broken.jpg")[:2]:
            shutil.copy(os.path.join(source, name), folder / f"{label}-{name}")
    out = str(tmp_path / "predictions.parquet")  # full float precision (the CSV keeps 6 decimals)
    import jobs.predict

    assert jobs.predict.main(["--input", str(folder), "--model-dir", run.path, "--output", out]) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6 and not [r["error"] for r in rows if r["error"]]
    size, max_pixels = 224, load_config()["preprocess"]["max_pixels"]
    decoded = [read_image(r["path"], size, max_pixels) for r in rows]  # predict's decode, as predict calls it
    assert [d.error for d in decoded if d.image is None] == []
    np.save(tmp_path / "images.npy", np.stack([d.image for d in decoded]))
    (tmp_path / "paths.json").write_text(json.dumps([r["path"] for r in rows]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", PLAIN_TENSORFLOW, run.saved_model, str(tmp_path / "images.npy"),
                           str(tmp_path / "paths.json"), str(tmp_path / "probs.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"classes": list(CLASSES), "about_classes": list(CLASSES), "plain_equal": True, "size": size,
                      "covid_spark_imported": False}
    expected = np.array([[r[f"p_{c}"] for c in CLASSES] for r in rows])
    np.testing.assert_allclose(np.load(tmp_path / "probs.npy"), expected, atol=1e-4, rtol=0)
