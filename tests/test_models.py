import pytest

from covid_spark.models import ORIGINAL_FILTERS, make_model


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
