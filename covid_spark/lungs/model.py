"""The lung segmenter: a small U-Net (Ronneberger et al., 2015) and its portable weight file.

Input: grey images ``[N, size, size, 1]``, float pixel values 0..255 (:func:`covid_spark.lungs.segment.prepare`
makes them); the model rescales them itself. Output: ``[N, size, size, 1]`` lung probabilities (sigmoid).

Why 128 x 128: lung fields are large, smooth shapes; at 128 px one pixel is 1/128 of the film (6 px of
a 768 px cxr3 image), well under the spread between annotators' outlines, and cxr-xl's Radiography and
Kermany images are only 224 px. Four poolings take 128 to an 8 x 8 bottleneck, wide enough to see
both lungs at once. Training cost grows with the pixel count, and this model is trained on 2 CPU cores.

The weights travel as an ``.npz`` keyed by layer name and weight index, not as a Keras save file:
Keras 2 (TF 2.15) and tf-keras on TF 2.20 both rebuild the model from :func:`make_segmenter` and set
the arrays by name, with no dependence on either version's serialization format.
"""
from __future__ import annotations

import json

import numpy as np

DEFAULT_SIZE = 128
DEFAULT_BASE_FILTERS = 8
DEFAULT_DEPTH = 4


def _conv_block(layers, x, filters: int, name: str):
    for index in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{index}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{index}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{index}")(x)
    return x


def make_segmenter(size: int = DEFAULT_SIZE, base_filters: int = DEFAULT_BASE_FILTERS,
                   depth: int = DEFAULT_DEPTH):
    """A U-Net: ``depth`` poolings, ``base_filters * 2**level`` filters per level, sigmoid output.

    Args:
        size: side of the square input; must be divisible by ``2**depth``.
        base_filters: filters of the first level.
        depth: number of poolings (and of upsamplings).

    Returns:
        An uncompiled ``tf.keras.Model`` named ``lung_unet``, input ``(size, size, 1)``,
        output ``(size, size, 1)``.

    Raises:
        ValueError: if ``size`` is not divisible by ``2**depth``.
    """
    if size % (2 ** depth) != 0:
        raise ValueError(f"size must be divisible by 2**depth = {2 ** depth}; got size={size}")
    import tensorflow as tf  # heavy: imported when a model is built, not when the package is
    layers = tf.keras.layers

    inputs = tf.keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
    skips = []
    for level in range(depth):
        x = _conv_block(layers, x, base_filters * 2 ** level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_block(layers, x, base_filters * 2 ** depth, "bottom")
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base_filters * 2 ** level, 2, strides=2, name=f"up{level}_transpose")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(layers, x, base_filters * 2 ** level, f"up{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="lung_probability")(x)
    return tf.keras.Model(inputs, outputs, name="lung_unet")


def save_weights_npz(model, path: str, config: dict) -> None:
    """Write ``model``'s weights to ``path`` (.npz) keyed ``<layer>/<index>``, with the builder's ``config``.

    ``config`` holds :func:`make_segmenter`'s keyword arguments, so the file alone rebuilds the model.
    """
    arrays = {"__config__": np.frombuffer(json.dumps(config, sort_keys=True).encode(), dtype=np.uint8)}
    for layer in model.layers:
        for index, weight in enumerate(layer.get_weights()):
            arrays[f"{layer.name}/{index}"] = weight.astype(np.float32)
    with open(path, "wb") as handle:  # a file object, so numpy does not append a second ".npz"
        np.savez_compressed(handle, **arrays)


def load_weights_npz(path):
    """The model saved by :func:`save_weights_npz` at ``path`` (a file name or an open binary file),
    rebuilt and with its weights set.

    Raises:
        ValueError: if the file's arrays do not match the rebuilt model (a layer missing, a shape differs).
    """
    with np.load(path) as data:
        config = json.loads(bytes(data["__config__"]).decode())
        arrays = {key: data[key] for key in data.files if key != "__config__"}
    model = make_segmenter(**config)
    expected = set()
    for layer in model.layers:
        current = layer.get_weights()
        if not current:
            continue
        keys = [f"{layer.name}/{index}" for index in range(len(current))]
        expected.update(keys)
        missing = [key for key in keys if key not in arrays]
        if missing:
            raise ValueError(f"{path}: weights missing for {missing}")
        for key, weight in zip(keys, current):
            if arrays[key].shape != weight.shape:
                raise ValueError(f"{path}: {key} has shape {arrays[key].shape}, the model expects {weight.shape}")
        layer.set_weights([arrays[key] for key in keys])
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(f"{path}: arrays the model has no place for: {extra[:5]}")
    return model
