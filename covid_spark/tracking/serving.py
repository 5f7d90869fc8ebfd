"""The servable export: a trained model as a TensorFlow SavedModel that carries its own preprocessing.

``<run>/saved_model/`` takes exactly what ``predict`` hands the Keras model, the decoded image
(``covid_spark.inputs.images.read_image``: RGB, ``uint8``, S×S×3, S the run's ``image_size``), and returns the
class probabilities ``predict`` writes. Everything between (the cast to float, the rescaling, the
histogram equalisation of ``train.input_norm: equalize``) is inside the graph, so a server that has
never heard of this package (TensorFlow Serving, ``tf.saved_model.load`` in plain TensorFlow) gives the
same numbers. ``predict`` applies no temperature (the temperature in ``metrics.json`` is a calibration
measurement), so neither does this.

Its serving signature, ``serving_default``:

    input   image          uint8   [batch, S, S, 3]
    output  probabilities  float32 [batch, classes]   (columns in the order of the class names)
    output  classes        string  [batch, classes]   (the class names, one row per image, as TF
                                                        Serving's classify API lays them out)

The class names, image size and signature are also recorded in ``assets/serving.json``, and the
module's ``__call__`` takes the same images and returns the probabilities alone (what MLflow's
TensorFlow flavour calls). ``python -m covid_spark.tracking.serving RUN_DIR`` exports a run trained before
the train stage wrote it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from typing import Sequence

from covid_spark.data.rundir import RunDir
from covid_spark.errors import InputError
from covid_spark.models.saved import load_model

logger = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUT = "image"
PROBABILITIES = "probabilities"
CLASS_NAMES = "classes"
ASSET = "serving.json"


def servable(model, classes: Sequence[str], image_size: int):
    """A ``tf.Module`` around the Keras ``model``: uint8 images in, probabilities (and class names) out."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name=INPUT)

    class Servable(tf.Module):
        def __init__(self):
            super().__init__(name="covid_spark_servable")
            self.model = model
            self.class_names = tf.constant(list(classes), dtype=tf.string)

        @tf.function(input_signature=[spec])
        def __call__(self, image):
            return self.model(tf.cast(image, tf.float32), training=False)

        @tf.function(input_signature=[spec])
        def serve(self, image):
            probabilities = self.__call__(image)
            names = tf.broadcast_to(self.class_names[None, :], tf.shape(probabilities))
            return {PROBABILITIES: probabilities, CLASS_NAMES: names}

    return Servable()


def export_saved_model(model, path: str, classes: Sequence[str], image_size: int, about: dict | None = None) -> str:
    """Write ``model`` as a servable SavedModel at ``path`` (see the module docstring), atomically.

    Written into a temporary sibling and renamed into place; an existing export at ``path`` is
    replaced only once the new one is complete. ``about`` (the model's name, its run) is added to
    ``assets/serving.json``.

    Raises:
        ValueError: the model's input is not ``image_size``×``image_size``×3, or its output does not
            have one column per class.
    """
    import tensorflow as tf

    expected_in = (image_size, image_size, 3)
    if tuple(model.input_shape[1:]) != expected_in:
        raise InputError(f"model input is {tuple(model.input_shape[1:])}, expected {expected_in} (the run's image_size)")
    if model.output_shape[-1] != len(classes):
        raise InputError(f"model has {model.output_shape[-1]} outputs for {len(classes)} classes {list(classes)}")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = f"{path}.tmp-{tag}", f"{path}.old-{tag}"
    module = servable(model, classes, image_size)
    with tempfile.TemporaryDirectory() as scratch:
        info = {"signature": SIGNATURE, "input": {"name": INPUT, "dtype": "uint8", "shape": [None, *expected_in]},
                "outputs": {PROBABILITIES: "float32 [batch, classes]", CLASS_NAMES: "string [batch, classes]"},
                "classes": list(classes), "image_size": image_size,
                "preprocessing": "inside the graph: decode the file as covid_spark.inputs.images.read_image does "
                                 "(RGB, stretched to image_size x image_size, uint8) and feed it as is",
                **(about or {})}
        asset = os.path.join(scratch, ASSET)
        with open(asset, "w", encoding="utf-8") as handle:
            json.dump(info, handle, indent=2)
        module.about = tf.saved_model.Asset(asset)  # copied into <export>/assets/ by the save
        try:
            tf.saved_model.save(module, tmp, signatures={SIGNATURE: module.serve.get_concrete_function()})
            if os.path.exists(path):
                os.rename(path, old)
            os.rename(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return path


def export_run(run_dir: str) -> str:
    """Export ``<run_dir>/model.keras`` to ``<run_dir>/saved_model`` with the run's classes and image size.

    Raises:
        FileNotFoundError: the run has no model or no run.json (names the path).
    """
    paths = RunDir(run_dir)
    if not os.path.exists(paths.run_json):
        raise FileNotFoundError(f"{paths.run_json} not found: train a model into {run_dir} first (jobs/train.py)")
    with open(paths.run_json, encoding="utf-8") as handle:
        run = json.load(handle)
    model = load_model(paths)
    about = {"model": run.get("model"), "run_dir": os.path.abspath(run_dir), "git_commit": run.get("git_commit")}
    out = export_saved_model(model, paths.saved_model, run["classes"], int(run["image_size"]), about)
    logger.info("serving: wrote %s (signature %s: uint8 %dx%dx3 in, probabilities of %s out)", out, SIGNATURE,
                run["image_size"], run["image_size"], ", ".join(run["classes"]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m covid_spark.tracking.serving RUN_DIR``: (re)write a run's ``saved_model/`` from its ``model.keras``."""
    parser = argparse.ArgumentParser(description="Export a trained run's model as a servable TensorFlow SavedModel.")
    parser.add_argument("run_dir", help="a run (model) dir written by jobs/train.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(export_run(args.run_dir))
    except (FileNotFoundError, ValueError) as error:
        print(f"serving: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
