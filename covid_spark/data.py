"""Petastorm splits → numpy arrays or tf.data pipelines (with on-line augmentation)."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from covid_spark.storage import to_url

logger = logging.getLogger(__name__)


def split_url(dataset: str, split: str) -> str:
    """URL of one split's Petastorm dataset inside a preprocessed dataset."""
    return f"{to_url(dataset).rstrip('/')}/{split}"


def load_split(dataset: str, split: str, fields: Sequence[str] = ("image", "label"),
               shard: int | None = None, shard_count: int | None = None) -> dict[str, np.ndarray]:
    """Read a whole split (or one shard of it) into memory, in a stable order (by path)."""
    from petastorm import make_reader

    from covid_spark.schema import XraySchema

    wanted = list(dict.fromkeys(list(fields) + ["path"]))
    columns: dict[str, list] = {f: [] for f in wanted}
    with make_reader(split_url(dataset, split), schema_fields=[XraySchema.fields[f] for f in wanted], num_epochs=1,
                     shuffle_row_groups=False, cur_shard=shard, shard_count=shard_count,
                     reader_pool_type="thread", workers_count=2) as reader:
        for row in reader:
            for f in wanted:
                columns[f].append(getattr(row, f))
    order = np.argsort(np.array(columns["path"], dtype=object).astype(str), kind="stable")
    out = {}
    for f in wanted:
        values = columns[f]
        arr = np.stack(values) if values and isinstance(values[0], np.ndarray) else np.array(values)
        out[f] = arr[order] if len(values) else arr
    return out


def augmenter(augment: dict, seed: int):
    """A Keras layer stack applying the configured random transforms to float images in 0..255."""
    from tensorflow import keras
    from tensorflow.keras import layers

    stack = []
    if augment.get("flip"):
        stack.append(layers.RandomFlip("horizontal", seed=seed))
    if augment.get("rotation_deg"):
        stack.append(layers.RandomRotation(float(augment["rotation_deg"]) / 360.0, fill_mode="constant", seed=seed + 1))
    if augment.get("shift"):
        s = float(augment["shift"])
        stack.append(layers.RandomTranslation(s, s, fill_mode="constant", seed=seed + 2))
    if augment.get("zoom"):
        z = float(augment["zoom"])
        stack.append(layers.RandomZoom((-z, z), fill_mode="constant", seed=seed + 3))
    if augment.get("contrast"):
        stack.append(layers.RandomContrast(float(augment["contrast"]), seed=seed + 4))
    if augment.get("brightness"):
        stack.append(layers.RandomBrightness(float(augment["brightness"]), value_range=(0, 255), seed=seed + 5))
    return keras.Sequential(stack, name="augment") if stack else None


def make_train_dataset(dataset: str, batch_size: int, augment: dict, seed: int,
                       shard: int | None = None, shard_count: int | None = None,
                       shuffle_buffer: int = 256):
    """An endless, shuffled, augmented ``(image, label)`` tf.data pipeline over one train shard.

    Returns ``(reader, dataset)``; the caller closes the reader (use it as a context manager).
    Endless (``num_epochs=None``) so that every Horovod rank can run the same number of
    steps per epoch whatever the size of its shard.
    """
    import tensorflow as tf
    from petastorm import make_reader
    from petastorm.tf_utils import make_petastorm_dataset

    from covid_spark.schema import XraySchema

    reader = make_reader(split_url(dataset, "train"), schema_fields=[XraySchema.image, XraySchema.label],
                         num_epochs=None,
                         shuffle_row_groups=True, seed=seed, cur_shard=shard, shard_count=shard_count,
                         reader_pool_type="thread", workers_count=2)
    ds = make_petastorm_dataset(reader).map(lambda row: (tf.cast(row.image, tf.float32), row.label))
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    ds = ds.batch(batch_size, drop_remainder=True)
    aug = augmenter(augment, seed)
    if aug is not None:
        ds = ds.map(lambda x, y: (tf.clip_by_value(aug(x, training=True), 0.0, 255.0), y),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return reader, ds.prefetch(tf.data.AUTOTUNE)
