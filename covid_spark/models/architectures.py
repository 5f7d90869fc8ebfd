"""CNN architectures, built by pure functions (TensorFlow is imported inside each builder, so that
importing this module stays cheap for the driver). Pixel rescaling lives inside each model."""
from __future__ import annotations

from covid_spark.constants import DEFAULT_IMAGE_SIZE
from covid_spark.errors import ConfigError
from covid_spark.models.pretrained import load_efficientnet_lite0

# Builders' default input: the library's default image size, RGB.
DEFAULT_INPUT_SHAPE = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3)

# Few steps per epoch on small datasets: a faster-moving BN average keeps inference statistics current.
BN_MOMENTUM = 0.9
ORIGINAL_FILTERS = (8, 16, 32, 16, 32, 64, 32, 64, 128, 64, 256, 128, 256)


INPUT_NORMS = ("none", "equalize")


def model_input(input_shape, input_norm: str = "none"):
    """``(inputs, x)``: the model's 0..255 image input, and what its first layer reads: the input itself, or
    with ``input_norm="equalize"`` its per-image histogram equalisation (``layers.HistogramEqualization``).

    Raises:
        ValueError: ``input_norm`` is not one of INPUT_NORMS.
    """
    from tensorflow import keras

    if input_norm not in INPUT_NORMS:
        raise ConfigError(f"config key 'train.input_norm' must be one of {', '.join(INPUT_NORMS)}, found {input_norm!r}")
    inputs = keras.Input(shape=input_shape, name="image")
    if input_norm == "none":
        return inputs, inputs
    from covid_spark.models.layers import HistogramEqualization  # imports TensorFlow: only when this runs

    return inputs, HistogramEqualization(name="equalize")(inputs)


def original_model(input_shape=DEFAULT_INPUT_SHAPE, num_classes: int = 3, dropout: float = 0.5, input_norm: str = "none"):
    """The university project's CNN, unchanged: 13 × [Conv 3×3 same → LeakyReLU → MaxPool 2 same],
    Flatten → Dense 256 → LeakyReLU → Dropout → Dense softmax (1,022,883 parameters for 3 classes;
    the same at any input up to 8192×8192, which 13 poolings bring to 1×1).
    """
    from tensorflow import keras
    from tensorflow.keras import layers

    inputs, x = model_input(input_shape, input_norm)
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    for i, filters in enumerate(ORIGINAL_FILTERS, start=1):
        x = layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = layers.LeakyReLU(name=f"lrelu{i}")(x)
        x = layers.MaxPooling2D(2, padding="same", name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, name="fc")(x)
    x = layers.LeakyReLU(name="fc_lrelu")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="original")


def compact_model(input_shape=DEFAULT_INPUT_SHAPE, num_classes: int = 3, dropout: float = 0.3,
                  weight_decay: float = 1e-4, input_norm: str = "none"):
    """A small residual, depthwise-separable CNN with batch normalisation and global average pooling.

    224 → stem conv s2 (112) → 4 stages of [SeparableConv → BN → ReLU] ×2 with a strided
    1×1 shortcut (56, 28, 14, 7) → GAP → Dropout → Dense softmax. About 0.2 M parameters,
    a few times cheaper per image than the original, and far less prone to overfitting.
    """
    from tensorflow import keras
    from tensorflow.keras import layers, regularizers

    reg = regularizers.l2(weight_decay)
    inputs, x = model_input(input_shape, input_norm)
    x = layers.Rescaling(1.0 / 255, name="rescale")(x)
    x = layers.Conv2D(24, 3, strides=2, padding="same", use_bias=False, kernel_regularizer=reg, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((48, 96, 160, 256), start=1):
        shortcut = layers.Conv2D(filters, 1, strides=2, padding="same", use_bias=False,
                                 kernel_regularizer=reg, name=f"stage{stage}_short")(x)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"stage{stage}_short_bn")(shortcut)
        x = layers.MaxPooling2D(2, padding="same", name=f"stage{stage}_pool")(x)
        for k in (1, 2):
            x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False,
                                       depthwise_regularizer=reg, pointwise_regularizer=reg,
                                       name=f"stage{stage}_conv{k}")(x)
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"stage{stage}_bn{k}")(x)
            if k == 1:
                x = layers.ReLU(name=f"stage{stage}_relu{k}")(x)
        x = layers.Add(name=f"stage{stage}_add")([x, shortcut])
        x = layers.ReLU(name=f"stage{stage}_out")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg, name="probs")(x)
    return keras.Model(inputs, outputs, name="compact")


# EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant: ReLU6, no squeeze-excitation, fixed stem and
# head): per stage (repeats, kernel, first stride, expansion, output channels).
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The size the ImageNet weights were trained at and the ImageNet check runs at: a fact of the weights,
# not a default of this project (that is constants.DEFAULT_IMAGE_SIZE).
IMAGENET_INPUT_SIZE = 224


def efficientnet_lite0_features(inputs, bn_epsilon: float = 1e-3):
    """EfficientNet-Lite0 from 0..255 pixels to its 1280-channel head (7×7 at 224×224), layer names
    matching ``pretrained.load_efficientnet_lite0``. Returns the head's ReLU6 output."""
    from tensorflow.keras import layers

    def conv_bn(x, filters, kernel, stride, name, act=True):
        x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(epsilon=bn_epsilon, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x

    x = layers.Normalization(mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD], name="imagenet_norm")(inputs)
    x = conv_bn(x, 32, 3, 2, "stem_conv")
    channels, block = 32, 0
    for repeats, kernel, stride, expand, out in LITE0_STAGES:
        for i in range(repeats):
            step = stride if i == 0 else 1
            block_input = x
            if expand != 1:
                x = conv_bn(x, channels * expand, 1, 1, f"block{block}_expand")
            x = layers.DepthwiseConv2D(kernel, strides=step, padding="same", use_bias=False, name=f"block{block}_dw")(x)
            x = layers.BatchNormalization(epsilon=bn_epsilon, name=f"block{block}_dw_bn")(x)
            x = layers.ReLU(6.0, name=f"block{block}_dw_relu")(x)
            x = conv_bn(x, out, 1, 1, f"block{block}_project", act=False)
            if step == 1 and channels == out:
                x = layers.Add(name=f"block{block}_add")([x, block_input])
            channels, block = out, block + 1
    return conv_bn(x, 1280, 1, 1, "head_conv")


def efficientnet_lite0_model(input_shape=DEFAULT_INPUT_SHAPE, num_classes: int = 3, dropout: float = 0.2,
                             pretrained: bool = True, train_bn: bool = False, input_norm: str = "none"):
    """EfficientNet-Lite0 with ImageNet weights (transfer learning), GAP → Dropout → Dense softmax.

    3.4 M parameters. The ImageNet weights come from an installed package (see ``pretrained``), not a
    download. Batch-norm layers stay in inference mode with their ImageNet statistics unless
    ``train_bn``: with 32 images per rank and a few hundred training images their batch statistics
    are too noisy to re-estimate. Every convolution is fine-tuned.
    """
    from tensorflow import keras
    from tensorflow.keras import layers

    inputs, x = model_input(input_shape, input_norm)
    x = efficientnet_lite0_features(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probs")(x)
    model = keras.Model(inputs, outputs, name="efficientnet_lite0")
    if pretrained:
        load_efficientnet_lite0(model)
    if not train_bn:
        for layer in model.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
    return model


def efficientnet_lite0_imagenet():
    """The ImageNet classifier itself (1000 logits), to check the port of the weights."""
    from tensorflow import keras
    from tensorflow.keras import layers

    inputs = keras.Input(shape=(IMAGENET_INPUT_SIZE, IMAGENET_INPUT_SIZE, 3), name="image")
    x = layers.GlobalAveragePooling2D(name="gap")(efficientnet_lite0_features(inputs))
    model = keras.Model(inputs, layers.Dense(1000, name="imagenet_logits")(x), name="efficientnet_lite0_imagenet")
    load_efficientnet_lite0(model, include_top=True)
    return model
