"""Predict stage: batch inference over new images on the Spark executors."""
from __future__ import annotations

import csv
import logging
import os
import time
from typing import Iterable, Iterator

from covid_spark.config import CLASSES
from covid_spark.sources import discover

logger = logging.getLogger(__name__)

COLUMNS = ["path", "predicted"] + [f"p_{c}" for c in CLASSES] + ["error"]


def explain_name(path: str, predicted: str) -> str:
    """File name of a Grad-CAM overlay: the input's stem, a short hash of its full path, the class."""
    import hashlib

    stem = os.path.splitext(os.path.basename(path))[0][:80]
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}-{predicted}.png"


def predict_partition(records: Iterable[dict], model_bytes: bytes, size: int, batch_size: int,
                      threads: int, explain_dir: str | None = None) -> Iterator[tuple]:
    """mapPartitions body: load the model once, decode with the preprocess code, score in batches.

    With ``explain_dir``, also writes one Grad-CAM overlay PNG per readable image there.
    """
    import tempfile

    import numpy as np
    import tensorflow as tf

    from covid_spark.preprocess import read_and_decode

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        with open(path, "wb") as handle:
            handle.write(model_bytes)
        model = tf.keras.models.load_model(path, compile=False)

    layer = None
    if explain_dir:
        from covid_spark.explain import pick_gradcam_layer

        layer = pick_gradcam_layer(model, min_size=7)

    def flush(batch):
        images = np.stack([img for _, img in batch])
        probs = model(images.astype("float32"), training=False).numpy()
        if explain_dir:
            from PIL import Image

            from covid_spark.explain import grad_cam, overlay

            heatmaps = grad_cam(model, images, layer_name=layer)
            for (p, image), row, heat in zip(batch, probs, heatmaps):
                name = explain_name(p, CLASSES[int(row.argmax())])
                tmp = os.path.join(explain_dir, f".{name}.tmp.png")
                Image.fromarray(overlay(image, heat)).save(tmp)
                os.replace(tmp, os.path.join(explain_dir, name))
        for (p, _), row in zip(batch, probs):
            yield (p, CLASSES[int(row.argmax())], *(float(v) for v in row), "")

    batch = []
    for record in records:
        if record.get("skip_reason"):
            yield (record["path"], None, None, None, None, record["skip_reason"])
            continue
        image, _, error = read_and_decode(record["path"], size, record["max_pixels"])
        if error:
            yield (record["path"], None, None, None, None, error)
            continue
        batch.append((record["path"], image))
        if len(batch) == batch_size:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)


def write_table(rows: list[tuple], output: str) -> None:
    """Write rows to ``output`` as CSV or Parquet (by extension), atomically."""
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        if output.lower().endswith(".parquet"):
            import pyarrow as pa
            import pyarrow.parquet as pq

            columns = list(zip(*rows)) if rows else [[] for _ in COLUMNS]
            types = [pa.string(), pa.string()] + [pa.float64()] * len(CLASSES) + [pa.string()]
            table = pa.table({name: pa.array(list(col), type=t) for name, col, t in zip(COLUMNS, columns, types)})
            pq.write_table(table, tmp)
        else:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(COLUMNS)
                for row in rows:
                    writer.writerow(["" if v is None else (f"{v:.6f}" if isinstance(v, float) else v) for v in row])
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def predict(spark, input_location: str, model_dir: str, output: str, config: dict,
            batch_size: int = 32, overwrite: bool = True, explain_dir: str | None = None) -> dict:
    """Score every file at ``input_location``; one output row per input file.

    Raises:
        ValueError: output extension is neither .csv nor .parquet.
        FileNotFoundError: the input or the model is missing.
    """
    import json

    started = time.time()
    if not output.lower().endswith((".csv", ".parquet")):
        raise ValueError(f"--output {output} must end in .csv or .parquet")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"output {output} already exists; pass --overwrite")
    model_path = os.path.join(model_dir, "model.keras")
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"{model_path} not found: train a model into {model_dir} first")
    with open(os.path.join(model_dir, "run.json"), encoding="utf-8") as handle:
        size = int(json.load(handle)["image_size"])
    with open(model_path, "rb") as handle:
        model_bytes = handle.read()
    inventory = discover(input_location, labelled=False,
                         skip_unknown=bool(config["preprocess"]["skip_unknown_classes"]))
    max_pixels = int(config["preprocess"]["max_pixels"])
    records = [dict(r, max_pixels=max_pixels) for r in inventory.records] + \
              [{"path": s["path"], "skip_reason": s["reason"]} for s in inventory.skipped]
    if explain_dir:
        explain_dir = os.path.abspath(explain_dir)
        os.makedirs(explain_dir, exist_ok=True)
    sc = spark.sparkContext
    model_bc = sc.broadcast(model_bytes)
    slices = max(1, min(len(records), max(sc.defaultParallelism, len(records) // 256)))
    sc.setJobDescription(f"predict {len(records)} files")
    rows = (sc.parallelize(records, slices)
            .mapPartitions(lambda part: predict_partition(part, model_bc.value, size, batch_size, 1, explain_dir))
            .collect())
    rows.sort(key=lambda r: r[0])
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_table(rows, output)
    errors = sum(1 for r in rows if r[-1])
    result = {"inputs": len(records), "rows": len(rows), "predicted": len(rows) - errors, "errors": errors,
              "output": os.path.abspath(output), "explain_dir": explain_dir, "seconds": round(time.time() - started, 1)}
    logger.info("predict: %d files → %d predicted, %d with an error; %.1f s → %s",
                result["inputs"], result["predicted"], errors, result["seconds"], output)
    return result
