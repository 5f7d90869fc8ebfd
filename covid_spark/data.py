"""Training input: the train split as a tf.data pipeline, with on-line augmentation.

Reading a dataset (its summary, a split batch by batch or whole) is ``covid_spark.dataset``'s.
"""
from __future__ import annotations

import logging

import numpy as np

from covid_spark.dataset import split_url

logger = logging.getLogger(__name__)


AUGMENT_KEYS = ("flip", "rotation_deg", "shift", "zoom", "brightness", "contrast")


def check_augment(augment: dict) -> dict:
    """``augment`` with its values as numbers, after checking them.

    Raises:
        ValueError: naming the ``train.augment`` key that is unknown, not a number or out of range.
    """
    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"config key 'train.augment.{unknown[0]}' is unknown; known: {', '.join(AUGMENT_KEYS)}")
    out = {"flip": bool(augment.get("flip", False))}
    limits = {"rotation_deg": 180.0, "shift": 1.0, "zoom": 1.0, "brightness": 1.0, "contrast": 1.0}
    for key, upper in limits.items():
        value = augment.get(key, 0) or 0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < upper:
            raise ValueError(f"config key 'train.augment.{key}' must be a number in [0, {upper:g}), found {value!r}")
        out[key] = float(value)
    return out


def affine_transforms(height: int, width: int, angle, shift_y, shift_x, zoom, flip):
    """Projective transforms (``[n, 8]``, as ``ImageProjectiveTransformV3`` takes them) for a batch.

    Each maps an output pixel to the input pixel it samples: horizontal flip (``flip`` > 0.5), then
    rotation by ``angle`` radians about the centre, shift by (``shift_y``, ``shift_x``) pixels, zoom by
    ``zoom`` about the centre (> 1 shows more of the image), the order and conventions of Keras's
    RandomFlip → RandomRotation → RandomTranslation → RandomZoom, but composed into one matrix so the
    image is resampled once instead of once per layer. All arguments after the size are ``[n]`` tensors.
    """
    import tensorflow as tf

    cy, cx = (tf.cast(height, tf.float32) - 1) / 2.0, (tf.cast(width, tf.float32) - 1) / 2.0
    one, zero = tf.ones_like(angle), tf.zeros_like(angle)

    def matrix(rows):
        return tf.stack([tf.stack(row, axis=-1) for row in rows], axis=-2)  # [n, 3, 3]

    cos, sin = tf.cos(angle), tf.sin(angle)
    flip_m = matrix([[tf.where(flip > 0.5, -one, one), zero, tf.where(flip > 0.5, 2 * cx * one, zero)],
                     [zero, one, zero], [zero, zero, one]])
    rotate = matrix([[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy],
                     [zero, zero, one]])
    translate = matrix([[one, zero, -shift_x], [zero, one, -shift_y], [zero, zero, one]])
    scale = matrix([[zoom, zero, cx * (1 - zoom)], [zero, zoom, cy * (1 - zoom)], [zero, zero, one]])
    composed = flip_m @ rotate @ translate @ scale
    return tf.reshape(composed, [-1, 9])[:, :8]


def augment_batch(images, seed, augment: dict):
    """The configured random transforms of a float ``[n, h, w, c]`` batch in 0..255, as a pure function
    of ``seed`` (a ``[2]`` int tensor): the same seed gives the same output, whatever thread runs it.

    Geometry (flip, rotation, shift, zoom) is one bilinear resampling with zeros outside the image;
    then per-image contrast (a factor in [1 - c, 1 + c] about each channel's mean) and brightness
    (an offset in ±b × 255); the result is clipped to 0..255.
    """
    import tensorflow as tf

    aug = check_augment(augment)
    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]  # dynamic: Petastorm's images have no static size
    seeds = tf.random.experimental.stateless_split(seed, num=7)

    def uniform(i, bound):
        return tf.random.stateless_uniform([n], seeds[i], -bound, bound)

    out = images
    if aug["flip"] or aug["rotation_deg"] or aug["shift"] or aug["zoom"]:
        flip = tf.random.stateless_uniform([n], seeds[0]) if aug["flip"] else tf.zeros([n])
        transforms = affine_transforms(height, width, uniform(1, aug["rotation_deg"] * np.pi / 180.0),
                                       uniform(2, aug["shift"] * tf.cast(height, tf.float32)),
                                       uniform(3, aug["shift"] * tf.cast(width, tf.float32)),
                                       1.0 + uniform(4, aug["zoom"]), flip)
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=out, transforms=transforms, output_shape=tf.stack([height, width]), fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT")
    if aug["contrast"]:
        factor = tf.reshape(1.0 + uniform(5, aug["contrast"]), [-1, 1, 1, 1])
        mean = tf.reduce_mean(out, axis=[1, 2], keepdims=True)
        out = (out - mean) * factor + mean
    if aug["brightness"]:
        out = out + 255.0 * tf.reshape(uniform(6, aug["brightness"]), [-1, 1, 1, 1])
    return tf.clip_by_value(out, 0.0, 255.0)


def augment_dataset(ds, augment: dict, seed: int):
    """Map ``augment_batch`` over a batched ``(image, label)`` dataset, seeding batch i with (seed, i).

    Repeatable: the i-th batch gets the same transforms on every run, in parallel or not.
    Returns ``ds`` unchanged when every transform is off.
    """
    import tensorflow as tf

    aug = check_augment(augment)
    if not any(aug.values()):
        return ds
    numbered = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))
    return numbered.map(
        lambda xy, i: (augment_batch(xy[0], tf.stack([tf.constant(seed, tf.int64), i]), aug), xy[1]),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


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
                         reader_pool_type="thread", workers_count=1)
    def three_channels(row):  # a grey image is stored with one channel (schema.py)
        image = row.image
        image = tf.broadcast_to(image, tf.concat([tf.shape(image)[:2], [3]], axis=0))
        return tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32), row.label

    ds = make_petastorm_dataset(reader).map(three_channels)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    ds = augment_dataset(ds.batch(batch_size, drop_remainder=True), augment, seed)
    return reader, ds.prefetch(tf.data.AUTOTUNE)
