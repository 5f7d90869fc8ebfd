"""On-line augmentation (covid_spark.training.tfdata): the composed transform against hand-derived pixel moves,
repeatability under a parallel tf.data map, and config errors that name the key."""
from __future__ import annotations

import numpy as np
import pytest

from covid_spark.training import tfdata as data

tf = pytest.importorskip("tensorflow")

OFF = {"flip": False, "rotation_deg": 0, "shift": 0, "zoom": 0, "brightness": 0, "contrast": 0}


def warp(image: np.ndarray, angle=0.0, shift_y=0.0, shift_x=0.0, zoom=1.0, flip=0.0) -> np.ndarray:
    """Apply one transform of ``affine_transforms`` to one [h, w] image."""
    h, w = image.shape
    transforms = data.affine_transforms(h, w, *(tf.constant([v], tf.float32) for v in (angle, shift_y, shift_x,
                                                                                          zoom, flip)))
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.constant(image[None, :, :, None], tf.float32), transforms=transforms,
        output_shape=tf.constant([h, w]), fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return out.numpy()[0, :, :, 0]


@pytest.fixture
def ramp() -> np.ndarray:
    return np.arange(1, 7 * 7 + 1, dtype=np.float32).reshape(7, 7)  # every pixel distinct, none zero


def test_integer_shift_moves_content_right_and_down_and_fills_zeros(ramp):
    expected = np.zeros_like(ramp)
    expected[1:, 3:] = ramp[:-1, :-3]
    np.testing.assert_allclose(warp(ramp, shift_y=1, shift_x=3), expected, atol=1e-4)


def test_quarter_turn_is_numpys_rot90(ramp):
    np.testing.assert_allclose(warp(ramp, angle=np.pi / 2), np.rot90(ramp), atol=1e-3)
    np.testing.assert_allclose(warp(ramp, angle=-np.pi / 2), np.rot90(ramp, k=-1), atol=1e-3)


def test_zoom_two_shows_twice_the_field_about_the_centre(ramp):
    out = warp(ramp, zoom=2.0)
    assert out[3, 3] == ramp[3, 3]
    assert out[2, 2] == ramp[1, 1] and out[4, 4] == ramp[5, 5] and out[3, 4] == ramp[3, 5]
    assert out[0, 0] == 0 and out[6, 6] == 0  # samples (-3, -3) and (9, 9): outside the image


def test_flip_then_shift_is_the_keras_layer_order(ramp):
    flipped = ramp[:, ::-1]
    expected = np.zeros_like(ramp)
    expected[:, 2:] = flipped[:, :-2]
    np.testing.assert_allclose(warp(ramp, shift_x=2, flip=1.0), expected, atol=1e-4)
    np.testing.assert_allclose(warp(ramp, flip=1.0), flipped, atol=1e-4)


def test_augment_batch_is_a_function_of_its_seed():
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)), tf.float32)
    cfg = {"flip": True, "rotation_deg": 10, "shift": 0.1, "zoom": 0.1, "brightness": 0.1, "contrast": 0.2}
    first = data.augment_batch(images, tf.constant([7, 3], tf.int64), cfg).numpy()
    again = data.augment_batch(images, tf.constant([7, 3], tf.int64), cfg).numpy()
    other = data.augment_batch(images, tf.constant([7, 4], tf.int64), cfg).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.min() >= 0 and first.max() <= 255
    assert not np.allclose(first, images.numpy(), atol=1.0)
    np.testing.assert_array_equal(data.augment_batch(images, tf.constant([1, 1], tf.int64), OFF).numpy(),
                                  images.numpy())


def test_contrast_keeps_each_channels_mean_and_scales_spread():
    rng = np.random.default_rng(1)
    images = rng.uniform(100, 150, (3, 8, 8, 3)).astype(np.float32)  # far from 0 and 255: no clipping
    out = data.augment_batch(tf.constant(images), tf.constant([0, 0], tf.int64), dict(OFF, contrast=0.3)).numpy()
    np.testing.assert_allclose(out.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=1e-3)
    ratio = out.std(axis=(1, 2)) / images.std(axis=(1, 2))  # one factor per image, shared by its channels
    assert np.all((ratio > 0.7 - 1e-4) & (ratio < 1.3 + 1e-4))
    np.testing.assert_allclose(ratio, ratio[:, :1].repeat(3, axis=1), rtol=1e-4)


def test_augment_dataset_repeats_exactly_under_a_parallel_map():
    images = np.random.default_rng(2).uniform(0, 255, (40, 12, 12, 3)).astype(np.float32)
    labels = np.arange(40) % 3

    def batches():
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(40, seed=5).batch(8)
        return [x.numpy() for x, _ in data.augment_dataset(ds, dict(OFF, rotation_deg=5, shift=0.05, zoom=0.05),
                                                           seed=42)]

    first, second = batches(), batches()
    assert len(first) == 5
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(first[0], first[1])


@pytest.mark.parametrize("augment, key", [({"rotation_deg": "five"}, "rotation_deg"), ({"zoom": -0.1}, "zoom"),
                                          ({"shift": True}, "shift"), ({"rotate": 5}, "rotate")])
def test_bad_augment_values_name_the_key(augment, key):
    from covid_spark.config import load_config, override

    with pytest.raises(ValueError, match=f"train.augment.{key}"):  # checked once, where the config is loaded
        override(load_config(), "train", {"augment": augment})


def test_train_input_repeats_batch_for_batch(pipeline_run):
    def first_batches(n=3):
        reader, ds = data.make_train_dataset(pipeline_run["dataset"], 4, dict(OFF, rotation_deg=5, shift=0.05,
                                                                              zoom=0.05), seed=42, shard=0,
                                             shard_count=2, shuffle_buffer=16)
        with reader:
            return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]

    first, second = first_batches(), first_batches()
    for (xa, ya), (xb, yb) in zip(first, second):
        np.testing.assert_array_equal(ya, yb)
        np.testing.assert_array_equal(xa, xb)


def test_training_twice_with_the_same_seed_gives_the_same_history(pipeline_run, tracked_run):
    """Two trainings of one model on one subset with the same seed, each its own 2-rank launch: the train
    job's (pipeline_run) and `make demo`'s pipeline job with tracking on (tracked_run). Every per-epoch number
    must repeat exactly."""
    import json

    from covid_spark.data.rundir import RunDir

    histories = []
    for run_dir in (pipeline_run["model_dir"], tracked_run["run_dir"]):
        with open(RunDir(run_dir).history, encoding="utf-8") as handle:
            history = json.load(handle)
        history.pop("seconds")  # wall time per epoch: the one thing allowed to differ
        histories.append(history)
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(histories[0])
    assert len(histories[0]["loss"]) == 2
    assert histories[0] == histories[1]
