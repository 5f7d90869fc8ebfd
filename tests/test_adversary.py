"""The adversarial source head (training/adversary.py): the reversal's gradient, and training through
the training core with it, checkpoint and resume included; what is saved is the plain classifier."""
from __future__ import annotations

import os

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from covid_spark.training.adversary import AdversarialTrainer, GradientReversal, with_source_ids  # noqa: E402
from covid_spark.training.core import fit_model  # noqa: E402


def test_the_reversal_is_the_identity_forward_and_minus_strength_backward():
    x = tf.constant([[1.0, -2.0, 3.0]])
    layer = GradientReversal(0.3)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.constant([[1.0, 2.0, 3.0]]))
    assert np.array_equal(y.numpy(), x.numpy())
    assert np.allclose(tape.gradient(loss, x).numpy(), [[-0.3, -0.6, -0.9]])


def _classifier():
    inputs = tf.keras.Input((8, 8, 3))
    x = tf.keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = tf.keras.layers.GlobalAveragePooling2D(name="features")(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(3, activation="softmax", name="probs")(x), name="tiny")


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (n, 8, 8, 3)).astype("float32")
    labels = np.arange(n) % 3
    sources = np.array(["a", "b"])[np.arange(n) % 2]
    return images, labels, sources


def test_training_with_the_head_fits_resumes_and_leaves_a_plain_classifier(tmp_path):
    tf.keras.utils.set_random_seed(0)
    images, labels, sources = _data()
    rows = tf.data.Dataset.from_tensor_slices((images, labels, sources))
    train = with_source_ids(rows, ("a", "b")).repeat().batch(8)
    val = tf.data.Dataset.from_tensor_slices((images, labels)).batch(16)
    classifier = _classifier()
    before = [w.numpy().copy() for w in classifier.trainable_weights]
    trainer = AdversarialTrainer(classifier, sources=2, strength=0.5)
    head_before = [w.numpy().copy() for w in trainer.head.trainable_weights]
    out = fit_model(trainer, train, epochs=2, steps_per_epoch=3, learning_rate=0.01, ranks=1, warmup_epochs=0,
                    lr_schedule="constant", val_ds=val, class_weight={0: 1.0, 1: 2.0, 2: 1.0},
                    checkpoint_dir=str(tmp_path / "ckpt"), model_name="tiny")
    assert len(out["history"]["loss"]) == 2 and len(out["history"]["val_loss"]) == 2
    assert "source_loss" in out["history"] and "val_source_loss" not in out["history"]
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, classifier.trainable_weights))
    assert any(not np.array_equal(a, w.numpy()) for a, w in zip(head_before, trainer.head.trainable_weights))
    # The classifier alone scores images; its val loss is the trainer's (class loss only).
    assert classifier(images[:5]).shape == (5, 3)
    val_loss = tf.keras.losses.sparse_categorical_crossentropy(labels, classifier(images)).numpy().mean()
    assert val_loss == pytest.approx(trainer.evaluate(val, verbose=0, return_dict=True)["loss"], rel=1e-4)
    # Resume: a new trainer loads the checkpoint the core wrote, head included.
    again = AdversarialTrainer(_classifier(), sources=2, strength=0.5)
    again.load_weights(os.path.join(str(tmp_path / "ckpt"), "last.weights.h5"))
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(again.weights, trainer.weights))


def _fit_two_steps(strategy):
    """Two steps of a fresh trainer under ``strategy`` (None: no strategy); its weights and source loss."""
    tf.keras.utils.set_random_seed(0)
    images, labels, sources = _data(16)
    train = with_source_ids(tf.data.Dataset.from_tensor_slices((images, labels, sources)), ("a", "b")).batch(8)
    with strategy.scope() if strategy else tf.keras.utils.custom_object_scope({}):
        trainer = AdversarialTrainer(_classifier(), sources=2, strength=0.5)
        trainer.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    history = trainer.fit(train, epochs=1, verbose=0).history
    return [w.numpy() for w in trainer.weights], history["source_loss"][0]


def test_the_head_trains_under_a_tf_distribute_strategy_as_without_one():
    """The tf-distribute engine fits inside a strategy: the source loss is averaged over the global batch
    there, so one replica takes the very steps a plain fit takes."""
    plain_weights, plain_source_loss = _fit_two_steps(None)
    weights, source_loss = _fit_two_steps(tf.distribute.MirroredStrategy(["/cpu:0"]))
    assert source_loss == pytest.approx(plain_source_loss, rel=1e-5)
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(plain_weights, weights))
