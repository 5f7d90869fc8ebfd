"""Grad-CAM heatmaps for tf.keras (Keras 2) functional and Sequential image classifiers.

Grad-CAM (Selvaraju et al., 2017): the feature maps A^k of a convolution layer are weighted by
the spatial mean of d(score_c)/dA^k, summed over channels and passed through a ReLU. The score
is the class logit when the model exposes it (a Dense/Activation softmax head), because the
gradient of a saturated softmax probability vanishes and the maps turn to noise.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf
from matplotlib import colormaps

from covid_spark.models.registry import REGISTRY

log = logging.getLogger(__name__)


def _steps_from_input(model) -> dict[int, int]:
    """Longest path, in layers, from the model's inputs to each layer (keyed by ``id(layer)``).

    ``model.layers`` is topologically ordered, but layers at the same distance from the output
    (a residual block's main path and its 1x1 shortcut) come in an arbitrary order; the longest
    path from the input tells the main path, which has seen the most processing, from the shortcut.
    """
    steps: dict[int, int] = {}
    for layer in model.layers:
        before = []
        for node in getattr(layer, "inbound_nodes", None) or []:
            inbound = node.inbound_layers
            for parent in inbound if isinstance(inbound, (list, tuple)) else [inbound]:
                if id(parent) in steps:
                    before.append(steps[id(parent)])
        steps[id(layer)] = 1 + max(before) if before else 0
    return steps


def _spatial_size(layer) -> tuple[int | None, int | None] | None:
    """(height, width) of a layer's 4-D output, or ``None`` when the output is not (n, h, w, c)."""
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):  # layer never called, or called several times
        return None
    if len(shape) != 4:
        return None
    return shape[1], shape[2]


def pick_gradcam_layer(model, min_size: int = 7) -> str:
    """Name of the convolution layer Grad-CAM reads for ``model``.

    The model registry's layer (``models.REGISTRY[model.name].gradcam_layer``; a saved model keeps
    its architecture's name) when the model holds it with a feature map at least ``min_size`` in both
    dims; otherwise :func:`last_conv_layer`: a model the registry does not know, one saved by a version
    whose layers differ, or an input so small that the registry's map is below ``min_size``.

    Raises:
        ValueError: if the model has no such layer (the message names the model and its conv layers).
    """
    name = registry_layer(model)
    if name is not None:
        h, w = _spatial_size(model.get_layer(name))
        if h is not None and w is not None and h >= min_size and w >= min_size:
            return name
        log.info("Grad-CAM: %r's registry layer %s is %sx%s, under %d; searching for a larger one",
                 model.name, name, h, w, min_size)
    return last_conv_layer(model, min_size)


def registry_layer(model) -> str | None:
    """The Grad-CAM layer the model registry names for ``model.name``, when the model has that layer
    and its output is 4-D (n, h, w, c); otherwise None."""
    spec = REGISTRY.get(model.name)
    if spec is None:
        return None
    try:
        layer = model.get_layer(spec.gradcam_layer)
    except ValueError:
        log.info("Grad-CAM: model %r has no layer %s (saved by an older version?)", model.name, spec.gradcam_layer)
        return None
    return spec.gradcam_layer if _spatial_size(layer) is not None else None


def last_conv_layer(model, min_size: int = 7) -> str:
    """Name of the last convolution layer whose feature map is at least ``min_size`` in both dims.

    Convolution layers are those whose class name contains "Conv" (Conv2D, SeparableConv2D,
    DepthwiseConv2D, ...). "Last" means farthest from the input along the longest path, then
    latest in ``model.layers``: in a residual block that is the main-path convolution, not the
    1x1 shortcut. Deeper maps are more semantic but coarser; ``min_size`` keeps the heatmap from
    being a handful of blurry blocks.

    Raises:
        ValueError: if the model has no such layer (the message names the model and its conv layers).
    """
    steps = _steps_from_input(model)
    convs = [(steps.get(id(layer), 0), i, layer) for i, layer in enumerate(model.layers)
             if "Conv" in type(layer).__name__]
    found = []
    for _, _, layer in sorted(convs, key=lambda t: (t[0], t[1]), reverse=True):
        size = _spatial_size(layer)
        if size is None:
            continue
        found.append(f"{layer.name} {size[0]}x{size[1]}")
        h, w = size
        if h is not None and w is not None and h >= min_size and w >= min_size:
            return layer.name
    raise ValueError(
        f"model {model.name!r} has no convolution layer with a feature map of at least {min_size}x{min_size}; "
        f"convolution layers found (last first): {', '.join(found) or 'none'}"
    )


def _score_head(model):
    """(tensor to differentiate, function mapping it to class scores, whether scores are logits)."""
    last = model.layers[-1]
    activation = getattr(last, "activation", None)
    act_name = getattr(activation, "__name__", "")
    kind = type(last).__name__
    if kind == "Dense" and act_name == "softmax":
        kernel, bias = last.kernel, last.bias

        def logits(penultimate):
            z = tf.matmul(tf.cast(penultimate, kernel.dtype), kernel)
            return z + bias if bias is not None else z

        return last.input, logits, True
    if (kind == "Activation" and act_name == "softmax") or kind == "Softmax":
        return last.input, lambda t: t, True
    if kind == "Dense" and act_name == "linear":
        return model.outputs[0], lambda t: t, True
    return model.outputs[0], lambda t: t, False


def grad_cam(
    model,
    images: np.ndarray,
    layer_name: str | None = None,
    class_index: int | np.ndarray | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Grad-CAM heatmaps for a batch of images.

    Args:
        model: a built tf.keras classifier taking raw pixel values (it rescales internally).
        images: uint8 array (n, h, w, c), as fed to the model.
        layer_name: convolution layer to explain; default :func:`pick_gradcam_layer` (the model
            registry's layer for a model it knows).
        class_index: class to explain: one int for all images, an int array (n,), or ``None``
            for each image's predicted class.
        batch_size: images per forward/backward pass.

    Returns:
        float32 array (n, h, w) in [0, 1], bilinearly upsampled to the image size and scaled
        so that each map's maximum is 1 (all zeros where the ReLU'd map is zero everywhere).

    Raises:
        ValueError: on a non-4-D ``images``, an unknown layer, or class indices out of range.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (n, h, w, channels); got shape {images.shape}")
    n, h, w = images.shape[:3]
    if layer_name is None:
        layer_name = pick_gradcam_layer(model)
    try:
        conv = model.get_layer(layer_name)
    except ValueError as err:
        raise ValueError(f"model {model.name!r} has no layer {layer_name!r}") from err

    target, to_scores, is_logit = _score_head(model)
    if not is_logit:
        log.info("grad_cam: model %r exposes no logits; differentiating its output", model.name)
    grad_model = tf.keras.Model(model.inputs, [conv.output, target])
    num_classes = int(model.outputs[0].shape[-1])

    if class_index is None:
        wanted = None
    else:
        wanted = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (n,))
        if wanted.size and (wanted.min() < 0 or wanted.max() >= num_classes):
            raise ValueError(f"class_index must be in [0, {num_classes - 1}]; got {class_index!r}")

    input_dtype = model.inputs[0].dtype
    maps = np.zeros((n, h, w), dtype=np.float32)
    for start in range(0, n, batch_size):
        x = tf.cast(images[start:start + batch_size], input_dtype)
        with tf.GradientTape() as tape:
            features, head = grad_model(x, training=False)
            scores = tf.cast(to_scores(head), tf.float32)
            if wanted is None:
                cls = tf.argmax(scores, axis=-1)
            else:
                cls = tf.constant(wanted[start:start + batch_size])
            # Images are independent at inference, so one gradient of the sum gives each its own.
            chosen = tf.reduce_sum(tf.gather(scores, cls, axis=1, batch_dims=1))
        grads = tf.cast(tape.gradient(chosen, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
        cam = tf.image.resize(cam[..., None], (h, w), method="bilinear")[..., 0].numpy()
        peak = cam.reshape(len(cam), -1).max(axis=1)
        safe = np.where(peak > 0, peak, 1.0)[:, None, None]
        maps[start:start + len(cam)] = np.clip(np.where(peak[:, None, None] > 0, cam / safe, 0.0), 0.0, 1.0)
    return maps


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend an image with the jet colouring of a heatmap; returns uint8 RGB (h, w, 3).

    Args:
        image: uint8 (h, w), (h, w, 1) or (h, w, 3).
        heatmap: (h, w) values in [0, 1] (values outside are clipped).
        alpha: weight of the heatmap colours, in [0, 1].

    Raises:
        ValueError: if shapes do not match or ``alpha`` is outside [0, 1].
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image must be (h, w), (h, w, 1) or (h, w, 3); got shape {np.asarray(image).shape}")
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.shape != img.shape[:2]:
        raise ValueError(f"heatmap shape {heat.shape} does not match image size {img.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    colours = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * img.astype(np.float64) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
