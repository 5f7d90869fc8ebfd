"""Job configuration: package defaults, an optional YAML override file, then command-line flags."""
from __future__ import annotations

import copy
from importlib import resources
from typing import Any, Mapping

import yaml

CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")
# The one definition of the default input image size (square, pixels) in the library: where a function
# needs a default size it takes this one. The user's default is ``preprocess.image_size`` in
# defaults.yaml, which must equal it (tests/test_config.py checks); a dataset's own size is the
# ``image_size`` of its _summary.json, and a run's the ``image_size`` of its run.json.
DEFAULT_IMAGE_SIZE: int = 224


def _merge(base: dict, override: Mapping, where: str) -> dict:
    for key, value in override.items():
        if key not in base:
            raise ValueError(f"unknown config key '{where}{key}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"config key '{where}{key}' must be a mapping, found {value!r}")
            _merge(base[key], value, f"{where}{key}.")
        else:
            base[key] = value
    return base


def default_config() -> dict[str, Any]:
    """Return a fresh copy of the packaged defaults: defaults.yaml, with ``train.per_model`` filled from
    the model registry (``covid_spark.models.REGISTRY``: each architecture's own train values)."""
    from covid_spark.models import REGISTRY

    text = resources.files("covid_spark").joinpath("defaults.yaml").read_text()
    config = yaml.safe_load(text)
    config["train"]["per_model"] = {name: copy.deepcopy(dict(spec.train_defaults)) for name, spec in REGISTRY.items()}
    return config


def load_config(path: str | None = None, model: str | None = None) -> dict[str, Any]:
    """Load the defaults, overlaid with the YAML file at ``path`` when given.

    ``train.per_model`` holds each architecture's own hyperparameters (a pretrained network wants a
    smaller learning rate than one trained from scratch): ``models.REGISTRY[name].train_defaults``,
    unless the YAML file sets ``train.per_model.<name>.<key>``. Those of the model named by ``model``
    (a command-line flag) or else by ``train.model`` replace the general ``train`` values, except the
    ones the YAML file sets itself: defaults < per-model defaults < YAML file < flags.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds a key the defaults do not have, or is not a mapping.
    """
    config = default_config()
    user: Mapping = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            user = yaml.safe_load(handle) or {}
        if not isinstance(user, Mapping):
            raise ValueError(f"config file {path} must hold a mapping at top level")
        _merge(config, user, "")
    train = config["train"]
    name = model or train["model"]
    per_model = train.get("per_model") or {}
    if not isinstance(per_model, Mapping) or not isinstance(per_model.get(name, {}), Mapping):
        raise ValueError("config key 'train.per_model' must map model names to mappings of train keys")
    set_by_user = (user.get("train") or {}) if isinstance(user.get("train"), Mapping) else {}
    for key, value in (per_model.get(name) or {}).items():
        if key in ("per_model", "model") or key not in train:
            raise ValueError(f"unknown config key 'train.per_model.{name}.{key}'")
        if key not in set_by_user:
            train[key] = copy.deepcopy(value)
    if tuple(config["classes"]) != CLASSES:
        raise ValueError(f"config key 'classes' must be {list(CLASSES)}, found {config['classes']}")
    return config


def override(config: dict, section: str, values: Mapping[str, Any]) -> dict:
    """Copy of ``config`` with ``values`` (None entries ignored) set in ``section``."""
    config = copy.deepcopy(config)
    _merge(config, {section: {k: v for k, v in values.items() if v is not None}}, "")
    return config
