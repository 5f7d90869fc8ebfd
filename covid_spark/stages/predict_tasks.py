"""Predict stage, on the executors: :func:`predict_partition` (the ``mapPartitions`` body) decodes with
the preprocess code, scores in batches with a model loaded once per Python worker, and optionally
writes Grad-CAM overlays. The driver side is ``covid_spark.stages.predict``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Iterable, Iterator

import numpy as np

from covid_spark.constants import CLASSES
from covid_spark.data.rundir import RunDir
from covid_spark.inputs.images import read_image
from covid_spark.lungs.framing import Framing, frame_images, read_size
from covid_spark.models.saved import load_model

logger = logging.getLogger(__name__)


def explain_name(path: str, predicted: str) -> str:
    """File name of a Grad-CAM overlay: the input's stem, a short hash of its full path, the class."""
    stem = os.path.splitext(os.path.basename(path))[0][:80]
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}-{predicted}.png"


# The model a Python worker loaded last, keyed by a digest of its bytes: Spark reuses Python workers
# (spark.python.worker.reuse), so a worker's later partitions skip the 1-2 s load.
_MODEL_CACHE: dict[str, object] = {}


def set_tf_threads(threads: int) -> None:
    """Give TensorFlow ``threads`` intra-op threads and one inter-op thread (before its first op)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already ran an op in this process with other settings
        logger.warning("TensorFlow was initialised before predict set its threads (intra-op %d, inter-op %d)",
                       tf.config.threading.get_intra_op_parallelism_threads(),
                       tf.config.threading.get_inter_op_parallelism_threads())


def cached_model(model_bytes: bytes):
    """The Keras model saved as ``model_bytes``, loaded once per process (the last one is kept)."""
    key = hashlib.sha1(model_bytes).hexdigest()
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()
        with tempfile.TemporaryDirectory() as tmp:
            with open(RunDir(tmp).model, "wb") as handle:
                handle.write(model_bytes)
            _MODEL_CACHE[key] = load_model(RunDir(tmp))
    return _MODEL_CACHE[key]


def predict_partition(records: Iterable[tuple], model_bytes: bytes, size: int, max_pixels: int,
                      batch_size: int, threads: int = 1, explain_dir: str | None = None,
                      views=None, framing: Framing = Framing()) -> Iterator[tuple]:
    """mapPartitions body: decode with the preprocess code, score in batches, one row per record, in order.

    ``records`` are ``(path, skip_reason, listed_view)``; a skipped, unreadable or view-filtered
    (``views``, a ``views.ViewFilter``) file gets its error row in its place, so rows leave in the
    order records came. With ``explain_dir``, also writes one Grad-CAM overlay PNG per readable image
    there. ``framing`` (``lungs.framing.Framing``, the model's dataset's) trims or crops each image
    as preprocess did.
    """
    set_tf_threads(threads)
    model = cached_model(model_bytes)
    layer = None
    if explain_dir:
        from covid_spark.evaluation.explain import pick_gradcam_layer  # imports TensorFlow: only when this runs

        layer = pick_gradcam_layer(model, min_size=7)

    def flush(pending):
        """Rows for ``pending`` [(path, image or None, error)], scoring its images in one batch."""
        images = [image for _, image, _ in pending if image is not None]
        probs = iter(())
        if images:
            batch = np.stack(images)
            scores = model(batch.astype("float32"), training=False).numpy()
            if explain_dir:
                write_overlays(model, batch, scores, [p for p, image, _ in pending if image is not None],
                               layer, explain_dir)
            probs = iter(scores)
        for path, image, error in pending:
            if image is None:
                yield (path, None, None, None, None, error)
            else:
                row = next(probs)
                yield (path, CLASSES[int(row.argmax())], *(float(v) for v in row), "")

    pending, images = [], 0
    for path, skip, view in records:
        if skip:
            pending.append((path, None, skip))
        else:
            read = read_image(path, read_size(size, framing), max_pixels, views=views, listed_view=view)
            image = read.image if read.image is None else frame_images([read.image], size, framing)[0][0]
            pending.append((path, image, read.error or read.excluded))
            images += read.image is not None
        # Rows leave in input order, so an error row waits for the batch it sits in to be scored;
        # flushing at 4 batches' worth of entries bounds that wait when many files in a row fail.
        if images == batch_size or len(pending) >= 4 * batch_size:
            yield from flush(pending)
            pending, images = [], 0
    if pending:
        yield from flush(pending)


def write_overlays(model, images, probs, paths: list[str], layer: str, explain_dir: str) -> None:
    """One Grad-CAM overlay PNG per image into ``explain_dir``, each written atomically."""
    from PIL import Image

    from covid_spark.evaluation.explain import grad_cam, overlay  # imports TensorFlow: only when this runs

    heatmaps = grad_cam(model, images, layer_name=layer)
    for path, image, row, heat in zip(paths, images, probs, heatmaps):
        name = explain_name(path, CLASSES[int(row.argmax())])
        tmp = os.path.join(explain_dir, f".{name}.tmp.png")
        Image.fromarray(overlay(image, heat)).save(tmp)
        os.replace(tmp, os.path.join(explain_dir, name))
