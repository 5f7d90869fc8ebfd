"""Tests for covid_spark.evaluation.explain (Grad-CAM) on a tiny tf.keras model."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

try:  # only possible before TensorFlow runs its first op (another test module may have)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
except RuntimeError:
    pass

from tensorflow import keras  # noqa: E402
from tensorflow.keras import layers  # noqa: E402

from covid_spark.evaluation.explain import grad_cam, overlay, pick_gradcam_layer  # noqa: E402
from covid_spark.models.saved import load_model


def _tiny_layers():
    return [
        layers.Rescaling(1.0 / 255),
        layers.Conv2D(8, 3, padding="same", activation="relu", name="c1"),  # 32x32
        layers.MaxPooling2D(4),
        layers.Conv2D(8, 3, padding="same", activation="relu", name="c2"),  # 8x8
        layers.MaxPooling2D(),
        layers.Conv2D(4, 3, padding="same", name="c3"),  # 4x4: too small for min_size 7
        layers.GlobalAveragePooling2D(),
        layers.Dense(3, activation="softmax", name="probs"),
    ]


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = inputs
    for layer in _tiny_layers():
        x = layer(x)
    return keras.Model(inputs, x, name="tiny")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    imgs[:, 8:20, 10:24] = 255  # a bright patch gives the maps some structure
    return imgs


def test_pick_layer_takes_last_conv_that_is_big_enough(tiny_model):
    assert pick_gradcam_layer(tiny_model, min_size=7) == "c2"  # c2 is 8x8, c3 only 4x4
    assert pick_gradcam_layer(tiny_model, min_size=4) == "c3"
    assert pick_gradcam_layer(tiny_model, min_size=9) == "c1"


def test_pick_layer_prefers_main_path_over_residual_shortcut():
    # Like models.compact_model: the strided 1x1 shortcut is listed after the main-path convs in
    # model.layers, but Grad-CAM should read the main path's last conv.
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    short = layers.Conv2D(8, 1, strides=2, name="short")(x)
    y = layers.MaxPooling2D()(x)
    y = layers.SeparableConv2D(8, 3, padding="same", name="main1")(y)
    y = layers.SeparableConv2D(8, 3, padding="same", name="main2")(y)
    y = layers.Add()([y, short])
    outputs = layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(y))
    model = keras.Model(inputs, outputs, name="residual")
    conv_order = [layer.name for layer in model.layers if "Conv" in type(layer).__name__]
    assert conv_order[-1] == "short"  # the premise: list order alone would pick the shortcut
    assert pick_gradcam_layer(model) == "main2"


def test_sequential_model(images):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((32, 32, 3))] + _tiny_layers(), name="seq")
    assert pick_gradcam_layer(model) == "c2"
    maps = grad_cam(model, images)
    assert maps.shape == (3, 32, 32) and 0.0 <= maps.min() and maps.max() <= 1.0


def test_pick_layer_raises_when_none_is_big_enough(tiny_model):
    with pytest.raises(ValueError, match=r"model 'tiny' has no convolution layer .* at least 64x64"):
        pick_gradcam_layer(tiny_model, min_size=64)
    dense = keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="softmax")], name="mlp")
    with pytest.raises(ValueError, match="model 'mlp'.*found.*none"):
        pick_gradcam_layer(dense)


def test_grad_cam_shape_range_and_structure(tiny_model, images):
    maps = grad_cam(tiny_model, images, layer_name="c2")
    assert maps.shape == (3, 32, 32) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for m in maps:
        assert m.std() > 0  # not constant
        assert m.max() == pytest.approx(1.0) or m.max() == 0.0


def test_grad_cam_default_layer_and_predicted_class(tiny_model, images):
    pred = tiny_model.predict(images, verbose=0).argmax(axis=1)
    np.testing.assert_allclose(grad_cam(tiny_model, images), grad_cam(tiny_model, images, "c2", class_index=pred),
                               atol=1e-6)


def test_grad_cam_matches_manual_computation(tiny_model, images):
    # Independent computation: gradients of the logit (pre-softmax Dense output) w.r.t. c3's output
    probs_layer = tiny_model.get_layer("probs")
    feat_model = keras.Model(tiny_model.inputs, [tiny_model.get_layer("c2").output, probs_layer.input])
    x = tf.constant(images[:1].astype("float32"))
    with tf.GradientTape() as tape:
        feats, pen = feat_model(x)
        logit = tf.matmul(pen, probs_layer.kernel)[0, 2] + probs_layer.bias[2]
    g = tape.gradient(logit, feats)[0].numpy()
    cam = np.maximum((feats[0].numpy() * g.mean(axis=(0, 1))).sum(-1), 0)
    up = tf.image.resize(cam[None, ..., None], (32, 32)).numpy()[0, ..., 0]
    expected = up / up.max() if up.max() > 0 else up
    np.testing.assert_allclose(grad_cam(tiny_model, images[:1], "c2", class_index=2)[0], expected, atol=1e-5)


def test_grad_cam_differs_between_classes(tiny_model, images):
    a = grad_cam(tiny_model, images[:1], "c2", class_index=0)
    b = grad_cam(tiny_model, images[:1], "c2", class_index=1)
    assert np.abs(a - b).max() > 0.05


def test_grad_cam_errors(tiny_model, images):
    with pytest.raises(ValueError, match="no layer 'nope'"):
        grad_cam(tiny_model, images, layer_name="nope")
    with pytest.raises(ValueError, match=r"class_index must be in \[0, 2\]"):
        grad_cam(tiny_model, images, "c2", class_index=3)
    with pytest.raises(ValueError, match="images must be"):
        grad_cam(tiny_model, images[0], "c2")


def test_overlay():
    img = np.full((4, 5, 3), 100, np.uint8)
    heat = np.zeros((4, 5))
    heat[0, 0] = 1.0
    out = overlay(img, heat, alpha=0.5)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    # jet(0) = (0, 0, 0.5), jet(1) = (0.5, 0, 0): blend 50/50 with grey 100
    np.testing.assert_array_equal(out[1, 1], np.rint([50, 50, 100 / 2 + 0.5 * 127.5]).astype(np.uint8))
    np.testing.assert_array_equal(out[0, 0], np.rint([50 + 0.5 * 127.5, 50, 50]).astype(np.uint8))
    grey = overlay(np.full((4, 5), 100, np.uint8), heat, alpha=0.0)
    np.testing.assert_array_equal(grey, img)
    with pytest.raises(ValueError, match="does not match"):
        overlay(img, np.zeros((3, 3)))


def _named(name: str, conv_names: tuple[str, str]):
    inputs = keras.Input((32, 32, 3), name="image")
    x = layers.Conv2D(4, 3, padding="same", name=conv_names[0])(inputs)  # 32x32
    x = layers.Conv2D(4, 3, padding="same", name=conv_names[1])(layers.MaxPooling2D(2)(x))  # 16x16
    outputs = layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs, name=name)


def test_pick_layer_reads_the_model_registry_by_model_name():
    from covid_spark.evaluation.explain import last_conv_layer, registry_layer

    model = _named("compact", ("stage4_conv2", "later"))  # the registry's layer is not the last conv here
    assert registry_layer(model) == "stage4_conv2"
    assert pick_gradcam_layer(model) == "stage4_conv2" and last_conv_layer(model) == "later"
    # the registry's map under min_size (a small input): the last convolution that is big enough
    small = _named("compact", ("first", "stage4_conv2"))
    assert pick_gradcam_layer(small) == "stage4_conv2" and pick_gradcam_layer(small, min_size=20) == "first"
    with pytest.raises(ValueError, match="at least 40x40"):
        pick_gradcam_layer(small, min_size=40)
    # saved by an older version without the registry's layer: the last convolution, as before
    older = _named("compact", ("c1", "c2"))
    assert registry_layer(older) is None and pick_gradcam_layer(older) == "c2"
    # a model the registry does not know
    assert registry_layer(_named("mine", ("stage4_conv2", "later"))) is None


def test_a_saved_model_keeps_its_name_and_so_its_registry_layer(tmp_path):
    from covid_spark.evaluation.explain import registry_layer
    from covid_spark.models.registry import make_model
    from covid_spark.data.rundir import RunDir

    os.makedirs(tmp_path / "m")
    make_model("compact", (32, 32, 3)).save(RunDir(tmp_path / "m").model)
    loaded = load_model(RunDir(tmp_path / "m"))
    assert loaded.name == "compact" and registry_layer(loaded) == "stage4_conv2"
