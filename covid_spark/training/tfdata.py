"""Training input: the train split as a tf.data pipeline, with on-line augmentation.

Reading a dataset (its summary, a split batch by batch or whole) is ``covid_spark.data.dataset``'s.
"""
from __future__ import annotations

import logging

import numpy as np

from covid_spark.data.dataset import split_url

logger = logging.getLogger(__name__)


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
    (an offset in ±b × 255); the result is clipped to 0..255. ``augment`` holds every ``train.augment``
    key, as the config gives it (checked there).
    """
    import tensorflow as tf

    shape = tf.shape(images)
    n, height, width = shape[0], shape[1], shape[2]  # dynamic: Petastorm's images have no static size
    seeds = tf.random.experimental.stateless_split(seed, num=7)

    def uniform(i, bound):
        return tf.random.stateless_uniform([n], seeds[i], -bound, bound)

    out = images
    if augment["flip"] or augment["rotation_deg"] or augment["shift"] or augment["zoom"]:
        flip = tf.random.stateless_uniform([n], seeds[0]) if augment["flip"] else tf.zeros([n])
        transforms = affine_transforms(height, width, uniform(1, augment["rotation_deg"] * np.pi / 180.0),
                                       uniform(2, augment["shift"] * tf.cast(height, tf.float32)),
                                       uniform(3, augment["shift"] * tf.cast(width, tf.float32)),
                                       1.0 + uniform(4, augment["zoom"]), flip)
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=out, transforms=transforms, output_shape=tf.stack([height, width]), fill_value=0.0,
            interpolation="BILINEAR", fill_mode="CONSTANT")
    if augment["contrast"]:
        factor = tf.reshape(1.0 + uniform(5, augment["contrast"]), [-1, 1, 1, 1])
        mean = tf.reduce_mean(out, axis=[1, 2], keepdims=True)
        out = (out - mean) * factor + mean
    if augment["brightness"]:
        out = out + 255.0 * tf.reshape(uniform(6, augment["brightness"]), [-1, 1, 1, 1])
    return tf.clip_by_value(out, 0.0, 255.0)


def augment_dataset(ds, augment: dict, seed: int):
    """Map ``augment_batch`` over a batched ``(image, label)`` dataset, seeding batch i with (seed, i).

    Repeatable: the i-th batch gets the same transforms on every run, in parallel or not.
    Returns ``ds`` unchanged when every transform is off (or ``augment`` is empty).
    """
    import tensorflow as tf

    if not any(augment.values()):
        return ds
    def augmented(xy, i):  # x is the image, or (image, source id) for the adversarial head
        x, y = xy
        image = x[0] if isinstance(x, tuple) else x
        image = augment_batch(image, tf.stack([tf.constant(seed, tf.int64), i]), augment)
        return ((image, x[1]) if isinstance(x, tuple) else image), y

    numbered = tf.data.Dataset.zip((ds, tf.data.Dataset.counter()))
    return numbered.map(augmented, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def make_train_dataset(dataset: str, batch_size: int, augment: dict, seed: int,
                       shard: int | None = None, shard_count: int | None = None, *,
                       shuffle_buffer: int, source_keep: dict[str, float] | None = None,
                       source_names: tuple[str, ...] = ()):
    """An endless, shuffled, augmented ``(image, label)`` tf.data pipeline over one train shard.

    ``source_keep`` (``"<class index>/<source>"`` → probability, from
    ``training.weights.source_keep_probabilities``) thins the stream, each image kept with its
    (class, source)'s probability, seeded; sources it does not name are kept. With ``source_names``
    the elements are ``((image, source id), label)``, for ``training.adversary.AdversarialTrainer``.

    Returns ``(reader, dataset)``; the caller closes the reader (use it as a context manager).
    Endless (``num_epochs=None``) so that every Horovod rank can run the same number of
    steps per epoch whatever the size of its shard.
    """
    import tensorflow as tf
    from petastorm import make_reader
    from petastorm.tf_utils import make_petastorm_dataset

    from covid_spark.data.schema import XraySchema  # imports Petastorm: only when this runs

    with_source = bool(source_keep or source_names)
    fields = [XraySchema.image, XraySchema.label] + ([XraySchema.source] if with_source else [])
    reader = make_reader(split_url(dataset, "train"), schema_fields=fields,
                         num_epochs=None,
                         shuffle_row_groups=True, seed=seed, cur_shard=shard, shard_count=shard_count,
                         reader_pool_type="thread", workers_count=1)
    def three_channels(row):  # a grey image is stored with one channel (schema.py)
        image = row.image
        image = tf.broadcast_to(image, tf.concat([tf.shape(image)[:2], [3]], axis=0))
        image = tf.cast(tf.ensure_shape(image, [None, None, 3]), tf.float32)
        return (image, row.label, row.source) if source_names else (image, row.label)

    ds = make_petastorm_dataset(reader)
    if source_keep:
        ds = ds.filter(source_sampler(source_keep, seed))
    ds = ds.map(three_channels)
    if source_names:
        from covid_spark.training.adversary import with_source_ids  # imports TensorFlow: only when this runs

        ds = with_source_ids(ds, source_names)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    ds = augment_dataset(ds.batch(batch_size, drop_remainder=True), augment, seed)
    return reader, ds.prefetch(tf.data.AUTOTUNE)


def source_sampler(source_keep: dict[str, float], seed: int):
    """A ``tf.data`` filter predicate keeping a row with its ``"<label>/<source>"`` probability."""
    import tensorflow as tf

    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(sorted(source_keep)), tf.constant([source_keep[k] for k in sorted(source_keep)], tf.float32)),
        default_value=1.0)
    generator = tf.random.Generator.from_seed(seed)

    def keep(row):
        key = tf.strings.join([tf.strings.as_string(row.label), "/", row.source])
        return generator.uniform([]) < table.lookup(key)

    return keep
