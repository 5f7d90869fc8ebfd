"""CNN architectures, built by pure functions. Pixel rescaling lives inside each model."""
from __future__ import annotations

from typing import Callable

# Few steps per epoch on small datasets: a faster-moving BN average keeps inference statistics current.
BN_MOMENTUM = 0.9
ORIGINAL_FILTERS = (8, 16, 32, 16, 32, 64, 32, 64, 128, 64, 256, 128, 256)


def original_model(input_shape=(224, 224, 3), num_classes: int = 3, dropout: float = 0.5):
    """The university project's CNN, unchanged: 13 × [Conv 3×3 same → LeakyReLU → MaxPool 2 same],
    Flatten → Dense 256 → LeakyReLU → Dropout → Dense softmax (1,022,883 parameters at 224×224×3).
    """
    from tensorflow import keras
    from tensorflow.keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
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


def compact_model(input_shape=(224, 224, 3), num_classes: int = 3, dropout: float = 0.3,
                  weight_decay: float = 1e-4):
    """A small residual, depthwise-separable CNN with batch normalisation and global average pooling.

    224 → stem conv s2 (112) → 4 stages of [SeparableConv → BN → ReLU] ×2 with a strided
    1×1 shortcut (56, 28, 14, 7) → GAP → Dropout → Dense softmax. About 0.2 M parameters,
    a few times cheaper per image than the original, and far less prone to overfitting.
    The last stage ("stage4_conv2", 7×7) is where Grad-CAM reads its gradients.
    """
    from tensorflow import keras
    from tensorflow.keras import layers, regularizers

    reg = regularizers.l2(weight_decay)
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
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


MODELS: dict[str, Callable] = {"original": original_model, "compact": compact_model}


def make_model(name: str, input_shape=(224, 224, 3), num_classes: int = 3):
    """Build the named architecture.

    Raises:
        ValueError: ``name`` is not one of MODELS.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    return MODELS[name](input_shape=input_shape, num_classes=num_classes)
