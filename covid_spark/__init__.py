"""covid-spark: Spark + Petastorm + (Horovod | tf.distribute) + Keras chest X-ray classifier.

Sub-packages by layer, lowest first (a lower one never imports a higher one; ``tests/test_layers.py``):
``constants``, ``errors`` → ``inputs`` → ``data`` → ``models``, ``lungs``, ``audit`` → ``config``,
``evaluation``, ``report`` → ``training``, ``tracking`` → ``engines`` → ``stages`` → ``cli`` → ``jobs/``.
docs/architecture.md explains each.
"""
import importlib.util as _util
import os as _os

__version__ = '0.1.0'

# The code is written against the Keras 2 API (``tf.keras`` of TensorFlow 2.15). On the current stack
# (TensorFlow >= 2.16, whose ``tf.keras`` is Keras 3) ``tf-keras`` is installed, and this makes
# ``tf.keras`` resolve to it; it must be set before TensorFlow is first imported, which every
# process (driver, Spark Python workers, training ranks) does only after importing this package.
# Keras 3 is avoided on purpose: its ``model.fit`` under MultiWorkerMirroredStrategy fails
# (keras-team/keras#20585). On the pinned stack tf-keras is absent and nothing is set.
if _util.find_spec("tf_keras") is not None:
    _os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
