"""A run's trained Keras model loaded back, with the package's own layers registered (TensorFlow is
imported when a model is loaded, not with this module)."""
from __future__ import annotations

import os

from covid_spark.data.rundir import RunDir, keras_in_use, saved_keras_version
from covid_spark.errors import InputError


def load_model(run: RunDir):
    """Load the run dir's ``model.keras`` (our own layers registered first, so no ``custom_objects`` is needed).

    A model saved by another Keras than this stack's does not always load: Keras 2.15 (the pinned
    stack) cannot read what tf-keras 2.20 (the current stack) saves (its config names ``tf_keras``
    modules), while the other way round works. Such a failure is reported naming both versions.

    Raises:
        FileNotFoundError: no model there (names the path).
        InputError: the model was saved by another Keras and does not load here (names both versions).
    """
    if not os.path.exists(run.model):
        raise FileNotFoundError(f"{run.model} not found: train a model into {run.path} first (jobs/train.py)")
    import tensorflow as tf

    import covid_spark.models.layers  # noqa: F401  (imports TensorFlow; registers our layers for loading)

    try:
        return tf.keras.models.load_model(run.model, compile=False)
    except Exception as error:
        saved, here = saved_keras_version(run.model), keras_in_use()
        if saved is None or saved == here.split()[-1]:
            raise
        major_minor = tuple(int(x) for x in saved.split(".")[:2] if x.isdigit())
        saver = f"tf-keras {saved}" if (2, 16) <= major_minor < (3,) else f"Keras {saved}"
        raise InputError(
            f"{run.model} was saved by {saver} and does not load with {here} (TensorFlow "
            f"{tf.__version__}) on this stack: {type(error).__name__}: {str(error)[:200]}. Load it on the stack "
            f"that trained it (its run.json 'versions'); a model saved by the pinned stack (Keras 2.15) loads "
            f"on the current one (tf-keras), not the other way round") from error
