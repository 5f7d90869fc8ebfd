"""Job configuration: package defaults, an optional YAML override file, then command-line flags."""
from __future__ import annotations

import copy
from importlib import resources
from typing import Any, Mapping

import yaml

CLASSES: tuple[str, ...] = ("covid", "normal", "pneumonia")


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
    """Return a fresh copy of the packaged defaults."""
    text = resources.files("covid_spark").joinpath("defaults.yaml").read_text()
    return yaml.safe_load(text)


def load_config(path: str | None = None) -> dict[str, Any]:
    """Load the defaults, overlaid with the YAML file at ``path`` when given.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file holds a key the defaults do not have, or is not a mapping.
    """
    config = default_config()
    if path:
        with open(path, encoding="utf-8") as handle:
            user = yaml.safe_load(handle) or {}
        if not isinstance(user, Mapping):
            raise ValueError(f"config file {path} must hold a mapping at top level")
        _merge(config, user, "")
    if tuple(config["classes"]) != CLASSES:
        raise ValueError(f"config key 'classes' must be {list(CLASSES)}, found {config['classes']}")
    return config


def override(config: dict, section: str, values: Mapping[str, Any]) -> dict:
    """Copy of ``config`` with ``values`` (None entries ignored) set in ``section``."""
    config = copy.deepcopy(config)
    _merge(config, {section: {k: v for k, v in values.items() if v is not None}}, "")
    return config
