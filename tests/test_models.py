import os

import numpy as np
import pytest

from covid_spark.models.architectures import ORIGINAL_FILTERS
from covid_spark.models.registry import make_model
from covid_spark.models.saved import load_model


def test_original_has_the_published_parameter_count():
    model = make_model("original", (224, 224, 3), 3)
    # independent count: 13 conv layers (3×3 kernels + bias), Dense 256 on the 1×1×256 map, Dense 3
    convs, c_in = 0, 3
    for f in ORIGINAL_FILTERS:
        convs += (9 * c_in + 1) * f
        c_in = f
    side = 224
    for _ in ORIGINAL_FILTERS:
        side = -(-side // 2)
    expected = convs + (side * side * c_in + 1) * 256 + (256 + 1) * 3
    assert expected == 1_022_883
    assert model.count_params() == expected
    assert sum(1 for l in model.layers if type(l).__name__ == "Conv2D") == 13


def test_compact_model_shapes_and_grad_cam_layer():
    model = make_model("compact", (224, 224, 3), 3)
    assert model.output_shape == (None, 3)
    assert model.get_layer("stage4_conv2").output_shape[1:3] == (7, 7)
    assert model.count_params() < 500_000


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*compact.*original"):
        make_model("resnet")


def _equalize_numpy(grey: np.ndarray) -> np.ndarray:
    """Textbook histogram equalisation of one uint8 image, written independently of the layer."""
    values, counts = np.unique(grey, return_counts=True)
    cdf = np.cumsum(counts)
    lookup = np.zeros(256)
    lookup[values] = (cdf - cdf[0]) / max(grey.size - cdf[0], 1) * 255.0
    return lookup[grey]


def test_histogram_equalization_layer_matches_the_textbook_and_survives_saving(tmp_path):
    from covid_spark.data.rundir import RunDir  # loads our layer without custom_objects
    from covid_spark.models.layers import HistogramEqualization

    rng = np.random.default_rng(1)
    grey = rng.integers(40, 120, (3, 20, 24)).astype(np.uint8)     # a low-contrast image uses 0..255 after
    grey[2] = 77                                                  # a constant image becomes black
    images = np.repeat(grey[..., None], 3, axis=-1).astype("float32")
    out = HistogramEqualization()(images).numpy()
    assert out.shape == images.shape and np.all(out[..., 0] == out[..., 2])
    for i in range(3):
        np.testing.assert_allclose(out[i, ..., 0], _equalize_numpy(grey[i]), atol=1e-3)
    assert out[0].min() == 0 and out[0].max() == pytest.approx(255) and not out[2].any()

    model = make_model("compact", (32, 32, 3), input_norm="equalize")
    assert model.layers[1].name == "equalize"
    os.makedirs(tmp_path / "m")
    model.save(str(tmp_path / "m" / "model.keras"))
    batch = rng.integers(0, 255, (2, 32, 32, 3)).astype("float32")
    again = load_model(RunDir(tmp_path / "m"))
    np.testing.assert_allclose(again(batch, training=False).numpy(), model(batch, training=False).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="train.input_norm.*'clahe'"):
        make_model("compact", (32, 32, 3), input_norm="clahe")


# ----------------------------------------------------------------------------- the model registry


def _build(spec, size: int):
    """The entry's model without its pretrained weights (shapes and layers are the same)."""
    extra = {"pretrained": False} if spec.pretrained else {}
    return spec.build(input_shape=(size, size, 3), num_classes=3, input_norm="none", **extra)


def test_registry_is_what_models_and_make_model_offer():
    from covid_spark.models.registry import MODELS, REGISTRY

    assert sorted(MODELS) == sorted(REGISTRY) == ["compact", "efficientnet_lite0", "original"]
    for name, spec in REGISTRY.items():
        assert spec.name == name and MODELS[name] is spec.build and spec.description
    assert [n for n, s in REGISTRY.items() if s.pretrained] == ["efficientnet_lite0"]
    model = make_model("compact", (32, 32, 3))
    assert model.name == "compact" and model.count_params() == REGISTRY["compact"].params


def test_every_entry_builds_small_with_its_grad_cam_layer():
    from covid_spark.evaluation.explain import last_conv_layer, pick_gradcam_layer, registry_layer
    from covid_spark.models.registry import REGISTRY

    for name, spec in REGISTRY.items():
        model = _build(spec, 64)
        assert model.name == name  # a saved model keeps it: how explain finds the entry
        assert model.output_shape == (None, 3)
        assert model.count_params() == spec.params  # GAP, or 13 poolings to 1×1: the same at any size
        layer = model.get_layer(spec.gradcam_layer)
        assert "Conv" in type(layer).__name__ and len(layer.output_shape) == 4, name
        assert registry_layer(model) == spec.gradcam_layer
        # at 64 px the registry's map is under 7×7: Grad-CAM takes the last larger one instead
        assert layer.output_shape[1] < 7
        assert pick_gradcam_layer(model) == last_conv_layer(model, 7) != spec.gradcam_layer


def test_registry_grad_cam_layer_is_the_last_7x7_map_at_the_default_size():
    from covid_spark.constants import DEFAULT_IMAGE_SIZE
    from covid_spark.evaluation.explain import last_conv_layer, pick_gradcam_layer
    from covid_spark.models.registry import REGISTRY

    for name, spec in REGISTRY.items():
        model = _build(spec, DEFAULT_IMAGE_SIZE)
        assert model.get_layer(spec.gradcam_layer).output_shape[1:3] == (7, 7), name
        assert pick_gradcam_layer(model) == last_conv_layer(model, 7) == spec.gradcam_layer


def test_registry_train_defaults_are_what_load_config_gives(tmp_path):
    from covid_spark.config import default_config, load_config
    from covid_spark.models.registry import REGISTRY

    assert default_config()["train"]["per_model"] == {n: dict(s.train_defaults) for n, s in REGISTRY.items()}
    for name, spec in REGISTRY.items():
        train = load_config(model=name)["train"]
        assert {k: train[k] for k in spec.train_defaults} == dict(spec.train_defaults)
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  per_model:\n    compact: {epochs: 3}\n")
    train = load_config(str(mine), model="compact")["train"]
    assert train["epochs"] == 3 and train["learning_rate"] == REGISTRY["compact"].train_defaults["learning_rate"]
    assert REGISTRY["compact"].train_defaults["epochs"] == 40  # the registry itself is not changed
    with pytest.raises(TypeError):
        REGISTRY["compact"].train_defaults["epochs"] = 1


def test_registry_weights_name_the_package_provenance_reports():
    from covid_spark.models.registry import REGISTRY
    from covid_spark.models.pretrained import WEIGHTS_PACKAGE
    from covid_spark.models.registry import provenance

    spec = REGISTRY["efficientnet_lite0"]
    assert spec.weights.package == WEIGHTS_PACKAGE and spec.weights.license == "Apache-2.0"
    assert all(provenance(n) is None for n, s in REGISTRY.items() if not s.pretrained)
    assert provenance("resnet") is None
