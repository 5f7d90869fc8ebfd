"""Keras layers of our own, registered so that a saved ``model.keras`` loads wherever this package is imported."""
from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable(package="covid_spark")
class HistogramEqualization(tf.keras.layers.Layer):
    """Per-image histogram equalisation of the grey level; 0..255 floats in, 0..255 floats out.

    Each image's grey level (the channel mean, rounded to 0..255) is mapped through its own
    cumulative histogram: ``(cdf(v) - cdf_min) / (pixels - cdf_min) * 255``, where ``cdf_min`` is the
    count of the darkest level present, so the darkest level becomes 0 and the brightest 255. A
    constant image becomes black. The output has the input's channel count, all channels equal.
    Inside the model, so training, evaluation, prediction and Grad-CAM all see the same input: it
    removes a scanner's global brightness and contrast, one cue that tells collections apart.
    """

    def call(self, images):
        grey = tf.cast(tf.clip_by_value(tf.round(tf.reduce_mean(images, axis=-1)), 0.0, 255.0), tf.int32)
        shape = tf.shape(grey)
        flat = tf.reshape(grey, [shape[0], -1])
        pixels = tf.shape(flat)[1]
        hist = tf.math.bincount(flat, minlength=256, maxlength=256, axis=-1)
        cdf = tf.cumsum(hist, axis=-1)
        cdf_min = tf.reduce_min(tf.where(hist > 0, cdf, pixels), axis=-1, keepdims=True)
        scale = 255.0 / tf.cast(tf.maximum(pixels - cdf_min, 1), tf.float32)
        lut = tf.cast(cdf - cdf_min, tf.float32) * scale
        out = tf.reshape(tf.gather(lut, flat, batch_dims=1), shape)
        return tf.repeat(out[..., None], tf.shape(images)[-1], axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape
