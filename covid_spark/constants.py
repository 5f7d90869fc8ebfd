"""The package's few shared constants, defined once; the lowest layer (imports nothing of the package)."""
from __future__ import annotations

CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")
# The one definition of the default input image size (square, pixels) in the library: where a function
# needs a default size it takes this one. The user's default is ``preprocess.image_size`` in
# defaults.yaml, which must equal it (tests/test_config.py checks); a dataset's own size is the
# ``image_size`` of its _summary.json, and a run's the ``image_size`` of its run.json.
DEFAULT_IMAGE_SIZE: int = 224
# The split a run is judged on (its metrics.json, report and model card), and the number of images
# a model scores at once when it evaluates or predicts: one definition each.
EVALUATION_SPLIT: str = "test"
INFERENCE_BATCH_SIZE: int = 32
