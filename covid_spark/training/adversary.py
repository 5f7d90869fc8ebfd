"""An adversarial source head: training that removes the image's source from the classifier's features.

A small head reads the classifier's penultimate features through a gradient-reversal layer (Ganin &
Lempitsky 2015) and learns to tell the image's source; the reversed gradient pushes the features to
make that impossible, while the class loss keeps them useful (Robinson/Trivedi et al. 2022 gained up to
0.13 AUC on held-out sources this way). ``train.adversary`` is the strength λ (0: off).

:class:`AdversarialTrainer` wraps the classifier: it trains on ``((image, source_id), label)`` batches
(class loss + λ × source loss, the reversal inside) and validates on plain ``(image, label)`` batches
with the class loss alone, so its ``val_loss`` is the baseline's. The classifier it wraps shares
every weight and is what is saved: the head is thrown away. Imports TensorFlow.
"""
from __future__ import annotations

import tensorflow as tf

HEAD_UNITS = 64


@tf.custom_gradient
def _reverse(x, strength):
    def grad(upstream):
        return -strength * upstream, tf.zeros_like(strength)
    return tf.identity(x), grad


class GradientReversal(tf.keras.layers.Layer):
    """Identity forward; the gradient times ``-strength`` backward."""

    def __init__(self, strength: float, **kwargs):
        super().__init__(**kwargs)
        self.strength = float(strength)

    def call(self, inputs):
        return _reverse(inputs, tf.constant(self.strength, inputs.dtype))

    def get_config(self):
        return {**super().get_config(), "strength": self.strength}


class AdversarialTrainer(tf.keras.Model):
    """``classifier`` plus a source head on its penultimate features, trained against each other."""

    def __init__(self, classifier: tf.keras.Model, sources: int, strength: float, **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.strength = float(strength)
        self.both = tf.keras.Model(classifier.inputs, [classifier.layers[-1].input, classifier.output])
        self.head = tf.keras.Sequential([GradientReversal(strength), tf.keras.layers.Flatten(),
                                         tf.keras.layers.Dense(HEAD_UNITS, activation="relu"),
                                         tf.keras.layers.Dense(sources)], name="source_head")
        self.head.build(classifier.layers[-1].input.shape)  # built now, so saved weights load before fitting
        # Per image, averaged in train_step: a loss object's own mean (reduction AUTO) raises under a
        # tf.distribute strategy (the tf-distribute engine), where the mean must be over the global batch.
        self.source_loss = tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE)
        self.source_tracker = tf.keras.metrics.Mean(name="source_loss")

    def call(self, inputs, training=None):
        image = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        return self.classifier(image, training=training)

    @property
    def output_shape(self):
        return self.classifier.output_shape

    @property
    def metrics(self):
        return super().metrics + [self.source_tracker]

    def train_step(self, data):
        (image, source), label, weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            features, probs = self.both(image, training=True)
            source_logits = self.head(features, training=True)
            class_loss = self.compiled_loss(label, probs, weight, regularization_losses=self.losses)
            per_image = self.source_loss(source, source_logits)
            # Over the global batch, as the compiled class loss is: the replicas' gradients are summed.
            source_loss = tf.nn.compute_average_loss(per_image)
            loss = class_loss + source_loss  # the reversal scales the source gradient by -λ for the features
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        self.compiled_metrics.update_state(label, probs, weight)
        self.source_tracker.update_state(per_image)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, label, weight = tf.keras.utils.unpack_x_y_sample_weight(data)
        probs = self.classifier(x[0] if isinstance(x, (tuple, list)) else x, training=False)
        self.compiled_loss(label, probs, weight, regularization_losses=self.losses)
        self.compiled_metrics.update_state(label, probs, weight)
        return {m.name: m.result() for m in self.metrics if m.name != "source_loss"}


def with_source_ids(dataset, sources: tuple[str, ...]):
    """Map ``(row)`` Petastorm rows with ``image``, ``label`` and ``source`` into ``((image, id), label)``,
    ``id`` the source's index in ``sources`` (an unknown source gets the last index + 1 folded to 0)."""
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(list(sources)), tf.range(len(sources), dtype=tf.int64)),
        default_value=0)
    return dataset.map(lambda image, label, source: ((image, table.lookup(source)), label))
