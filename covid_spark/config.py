"""Job configuration, declared once and checked once.

``SCHEMA`` declares every key: its type, the values it allows and what it means (each key once, as
Horovod's ``spark/common/params.py`` declares each parameter once). ``defaults.yaml`` holds the
default of every key, and nothing else (``default_config`` refuses a key the schema lacks or a
missing one). A job's config is, from lowest to highest precedence::

    defaults.yaml < train.per_model.<model> < the --config file < --set KEY=VALUE < the job's named flags

:func:`load_config` builds the first four and :func:`override` applies the flags; both check every
value they take against ``SCHEMA`` and cast it (``5.0`` becomes ``5`` for an integer, ``1e-4``, which
YAML 1.1 reads as a string, becomes the number), so the config they return is a plain nested dict
(stored as JSON in ``run.json``) whose values already have their declared types: code reads
``config["train"]["epochs"]`` as an int without casting or checking it again. A number key (float) keeps
an integer as it is (``rotation_deg: 5`` stays ``5``, a float by Python's numeric tower), so a config's
JSON, and the pipeline's cache keys made from it, do not change when it is checked again.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterable, Mapping, Sequence

import yaml

from covid_spark.errors import ConfigError
from covid_spark.models.registry import INPUT_NORMS, REGISTRY

PRECEDENCE = "packaged defaults < the model's own train values (train.per_model) < --config file < --set < named flags"

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Field:
    """One config key: its type (int, float, bool or str), its meaning, and the values it allows:
    ``choices`` (a tuple, or a function returning them, for lists defined elsewhere), or a range
    ``minimum``..``maximum`` (either end left out when None, excluded when ``*_excluded``)."""

    type: type
    help: str
    minimum: float | None = None
    maximum: float | None = None
    minimum_excluded: bool = False
    maximum_excluded: bool = False
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    # A str key's own rule, for values no list of choices can hold (a URI): ``rule(value)`` is true for
    # an accepted value, ``rule_text`` says what it must be.
    rule: Callable[[Any], bool] | None = None
    rule_text: str | None = None

    def allowed(self) -> tuple[str, ...] | None:
        return tuple(self.choices() if callable(self.choices) else self.choices) if self.choices else None

    def expected(self) -> str:
        """What a value must be, in words: ``an integer >= 1``, ``a number in [0, 1)``, ``one of a, b``."""
        choices = self.allowed()
        if choices:
            return f"one of {', '.join(sorted(choices))}"
        if self.rule_text:
            return self.rule_text
        text = _TYPE_NAMES[self.type]
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            left, right = "(" if self.minimum_excluded else "[", ")" if self.maximum_excluded else "]"
            return f"{text} in {left}{low:g}, {high:g}{right}"
        if low is not None:
            return f"{text} {'>' if self.minimum_excluded else '>='} {low:g}"
        if high is not None:
            return f"{text} {'<' if self.maximum_excluded else '<='} {high:g}"
        return text

    def check(self, key: str, value: Any) -> Any:
        """``value`` cast to the declared type, after checking it.

        Raises:
            ValueError: naming ``key``, what it must be and what was found.
        """
        cast = self._cast(value)
        if cast is None or not self._in_range(cast):
            raise ConfigError(f"config key '{key}' must be {self.expected()}, found {value!r}")
        return cast

    def _cast(self, value: Any) -> Any:
        """The value as the declared type, or None when it is not one (a bool is never a number; an int
        is a float, kept as it is)."""
        if self.type is bool:
            return value if isinstance(value, bool) else None
        if self.type is str:
            return value if isinstance(value, str) else None
        if isinstance(value, bool):
            return None
        if self.type is int:
            if isinstance(value, int):
                return value
            return int(value) if isinstance(value, float) and value.is_integer() else None
        if isinstance(value, int):
            return value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string: take it as the number it is
            try:
                value = float(value)
            except ValueError:
                return None
        return float(value) if isinstance(value, float) and math.isfinite(value) else None

    def _in_range(self, value: Any) -> bool:
        if self.rule is not None and not self.rule(value):
            return False
        choices = self.allowed()
        if choices is not None:
            return value in choices
        if self.minimum is not None and (value < self.minimum or (self.minimum_excluded and value == self.minimum)):
            return False
        return not (self.maximum is not None
                    and (value > self.maximum or (self.maximum_excluded and value == self.maximum)))


@dataclass(frozen=True)
class PerModel:
    """``train.per_model``: model name -> any ``train`` keys but ``model`` and ``per_model``, each
    checked as that key is."""

    help: str


def _model_names() -> list[str]:
    return sorted(REGISTRY)


def _input_norms() -> tuple[str, ...]:
    return INPUT_NORMS


# ``tracking.mlflow_uri``: off (empty), ``local`` (the run dir's own store), or a URI MLflow stores runs at.
TRACKING_LOCAL = "local"
TRACKING_URI_SCHEMES = ("http://", "https://", "sqlite:///", "file:")


def is_tracking_uri(value: str) -> bool:
    """True for what ``tracking.mlflow_uri`` accepts: empty (off), ``local``, or a URI MLflow stores runs at."""
    return value in ("", TRACKING_LOCAL) or value.startswith(TRACKING_URI_SCHEMES)


def _fraction(help: str) -> Field:
    return Field(float, help, minimum=0, maximum=1, maximum_excluded=True)


SCHEMA: dict[str, dict[str, Any]] = {
    "preprocess": {
        "image_size": Field(int, "side of the square images written, in pixels", minimum=1),
        "val_fraction": _fraction("share of the patients (of each class) put in val"),
        "test_fraction": _fraction("share of the patients (of each class) put in test; unused with holdout_source"),
        "seed": Field(int, "seeds the split assignment and the order images are staged in", minimum=0),
        "max_pixels": Field(int, "decompression-bomb limit: an image above this many pixels is rejected "
                                 "before decoding", minimum=1),
        "duplicate_distance": Field(int, "max Hamming distance between the 256-bit dHashes of two images "
                                         "counted as duplicates", minimum=0, maximum=256),
        "rows_per_row_group": Field(int, "rows per Parquet row group (Petastorm shards by row group)", minimum=1),
        "min_row_groups": Field(int, "row groups per split at least, so that as many Horovod ranks each get "
                                     "a shard", minimum=1),
        "skip_unknown_classes": Field(bool, "skip folders and labels that name no class instead of failing"),
        "holdout_source": Field(str, "leave-one-source-out: every image of this source is the test split "
                                     "(empty: off)"),
        "views": Field(str, "views to keep, e.g. PA,AP (unknown views are kept unless -unknown is listed; "
                            "empty: every view); preprocess and predict"),
        "border_crop": Field(float, "fraction of each side of the film trimmed before resizing (0: none): the "
                                    "edge is where collections put markers and text", minimum=0, maximum=0.3),
        "lung_crop": Field(bool, "crop every image to its lungs (the shipped segmenter, docs/lungs.md) plus "
                                 "preprocess.lung_crop_margin; evaluate and predict see the same crop"),
        "lung_crop_margin": Field(float, "margin around the lungs' box, as a fraction of the image", minimum=0,
                                  maximum=0.5),
    },
    "train": {
        "model": Field(str, "architecture (covid_spark.models.registry.REGISTRY)", choices=_model_names),
        "engine": Field(str, "what runs the ranks: horovod (horovod.spark.run over Gloo), tf-distribute "
                             "(MultiWorkerMirroredStrategy in Spark barrier tasks) or auto (horovod where it is "
                             "installed, else tf-distribute)", choices=("auto", "horovod", "tf-distribute")),
        "num_proc": Field(int, "ranks (Spark tasks)", minimum=1),
        "epochs": Field(int, "epochs to train", minimum=1),
        "batch_size": Field(int, "images per step per rank", minimum=1),
        "learning_rate": Field(float, "Adam learning rate per rank, scaled by the number of ranks with warm-up",
                               minimum=0, minimum_excluded=True),
        "warmup_epochs": Field(int, "epochs of linear learning-rate warm-up", minimum=0),
        "lr_schedule": Field(str, "cosine (to 2% of the peak at the last epoch) or constant after the warm-up",
                             choices=("cosine", "constant")),
        "early_stopping_patience": Field(int, "stop after this many epochs without a lower val loss (0: off)",
                                         minimum=0),
        "class_weights": Field(str, "balanced (n / (k n_c) per class) or none", choices=("balanced", "none")),
        "seed": Field(int, "seeds weights, shuffling and augmentation (plus the rank)", minimum=0),
        "threads_per_rank": Field(int, "TensorFlow threads per rank (0: cores / num_proc)", minimum=0),
        "shuffle_buffer": Field(int, "images in each rank's shuffle buffer (0 or 1: no shuffling)", minimum=0),
        "gradient_compression": Field(str, "fp16: Horovod sends gradients as float16", choices=("none", "fp16")),
        "source_cap": Field(float, "the most a source may be of a class in each epoch's train stream (images of "
                                   "larger sources are sampled out); 0 = off", minimum=0, maximum=1),
        "adversary": Field(float, "strength of an adversarial source head with gradient reversal, which trains "
                                  "the features to hide the image's source (docs/shortcuts.md); 0 = off", minimum=0),
        "input_norm": Field(str, "equalize: per-image histogram equalisation inside the model",
                            choices=_input_norms),
        "per_model": PerModel("each architecture's own train values (models.REGISTRY), which replace the "
                              "general ones unless the --config file or --set sets them"),
        "augment": {
            "flip": Field(bool, "random horizontal flip (puts the heart on the wrong side)"),
            "rotation_deg": Field(float, "random rotation up to ± this many degrees", minimum=0, maximum=180,
                                  maximum_excluded=True),
            "shift": _fraction("random shift up to ± this share of the height and width"),
            "zoom": _fraction("random zoom by up to ± this share"),
            "brightness": _fraction("random brightness offset up to ± this share of 255"),
            "contrast": _fraction("random contrast factor in [1 - c, 1 + c] about each channel's mean"),
        },
    },
    "evaluate": {
        "bootstrap": Field(int, "bootstrap resamples of the 95% intervals", minimum=1),
        "audit": Field(bool, "the shortcut audit in every evaluation: source probe, lungs-removed and lungs-only "
                             "scores, Grad-CAM energy inside the lungs (docs/shortcuts.md)"),
        "audit_images": Field(int, "at most this many evaluated images are audited, drawn per class and source",
                              minimum=10),
        "audit_cam_images": Field(int, "images whose Grad-CAM energy is measured (a sample of the audited ones)",
                                  minimum=1),
    },
    "tracking": {
        "mlflow_uri": Field(str, "MLflow tracking: empty (off, unless MLFLOW_TRACKING_URI is set), 'local' (an "
                                 "SQLite store beside the run dir: <run-dir>/../mlflow.db), or a tracking URI "
                                 "(http(s)://host:port of an mlflow server, sqlite:///file.db, file:///dir)",
                            rule=is_tracking_uri,
                            rule_text="empty, 'local', or an http://, https://, sqlite:/// or file:// URI"),
        "experiment": Field(str, "MLflow experiment the runs are logged in (created when missing)",
                            rule=bool, rule_text="a non-empty string"),
    },
}


def keys(schema: Mapping = SCHEMA, where: str = "") -> list[str]:
    """Every dotted key of ``schema`` (``train.per_model`` as one key)."""
    out = []
    for key, spec in schema.items():
        out += keys(spec, f"{where}{key}.") if isinstance(spec, Mapping) else [f"{where}{key}"]
    return out


def _check(tree: Any, schema: Mapping, where: str, partial: bool) -> dict:
    """A copy of ``tree`` with every value checked and cast against ``schema``; unknown keys refused,
    and missing ones too unless ``partial``."""
    if not isinstance(tree, Mapping):
        raise ConfigError(f"config key '{where[:-1]}' must be a mapping, found {tree!r}")
    out = {}
    for key, value in tree.items():
        name = f"{where}{key}"
        if key not in schema:
            raise ConfigError(f"unknown config key '{name}' (known: {', '.join(sorted(schema))})")
        spec = schema[key]
        if isinstance(spec, Mapping):
            out[key] = _check(value, spec, f"{name}.", partial)
        elif isinstance(spec, PerModel):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{name}' must map model names to mappings of train keys, found {value!r}")
            per_model = {k: v for k, v in SCHEMA["train"].items() if k not in ("model", "per_model")}
            out[key] = _check(value, {model: per_model for model in _model_names()}, f"{name}.", partial=True)
        else:
            out[key] = spec.check(name, value)
    missing = [key for key in schema if key not in tree] if not partial else []
    if missing:
        raise ConfigError(f"config key '{where}{missing[0]}' is missing")
    return out


def _deep_merge(base: dict, top: Mapping) -> dict:
    """``base`` with ``top`` merged in, mapping by mapping (both already checked)."""
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _check_together(config: Mapping) -> None:
    """What no single key can check: the val and test shares leave some patients to train."""
    pre = config["preprocess"]
    if not pre["holdout_source"] and pre["val_fraction"] + pre["test_fraction"] >= 1:
        raise ConfigError(f"config keys 'preprocess.val_fraction' + 'preprocess.test_fraction' must be below 1, "
                         f"found {pre['val_fraction']} + {pre['test_fraction']}")


def default_config() -> dict[str, Any]:
    """Return a fresh copy of the packaged defaults: defaults.yaml, with ``train.per_model`` filled from
    the model registry (``covid_spark.models.registry.REGISTRY``: each architecture's own train values).

    Raises:
        RuntimeError: defaults.yaml and ``SCHEMA`` disagree (a bug of the package, not of the user).
    """
    text = resources.files("covid_spark").joinpath("defaults.yaml").read_text()
    config = yaml.safe_load(text)
    config["train"]["per_model"] = {name: copy.deepcopy(dict(spec.train_defaults)) for name, spec in REGISTRY.items()}
    try:
        return _check(config, SCHEMA, "", partial=False)
    except ValueError as err:
        raise RuntimeError(f"covid_spark/defaults.yaml and covid_spark.config.SCHEMA disagree: {err}") from err


def parse_set(pair: str) -> dict[str, Any]:
    """``KEY=VALUE`` (a dotted key, split on the first ``=``; the value read as YAML) as a nested mapping:
    ``train.augment.flip=true`` -> ``{"train": {"augment": {"flip": True}}}``. An empty value is the
    empty string. Not checked here (:func:`load_config` checks it as it checks a file)."""
    key, sep, text = pair.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted config key (e.g. train.epochs=3), got {pair!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key.strip()}: the value {text!r} is not YAML ({' '.join(str(err).split())})") from err
    tree: dict[str, Any] = {}
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part.strip(), {})
    node[parts[-1].strip()] = value
    return tree


def load_config(path: str | None = None, model: str | None = None, sets: Sequence[str] = ()) -> dict[str, Any]:
    """The packaged defaults, overlaid with the YAML file at ``path`` when given, then with each
    ``sets`` entry (``KEY=VALUE``, see :func:`parse_set`), every value checked and cast (``SCHEMA``).

    ``train.per_model`` holds each architecture's own hyperparameters (a pretrained network wants a
    smaller learning rate than one trained from scratch): ``models.REGISTRY[name].train_defaults``,
    unless the file or ``sets`` set ``train.per_model.<name>.<key>``. Those of the model named by
    ``model`` (a command-line flag) or else by ``train.model`` replace the general ``train`` values,
    except the ones the file or ``sets`` set themselves: defaults < per-model < file < ``sets``
    (< flags, which the jobs apply with :func:`override`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown key, a value of the wrong type or out of range (naming the key, what it
            must be and what was found), a file that is not a mapping, or a malformed ``sets`` entry.
    """
    config = default_config()
    user: dict[str, Any] = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {path} must hold a mapping at top level")
        user = _check(loaded, SCHEMA, "", partial=True)
    for pair in sets:
        _deep_merge(user, _check(parse_set(pair), SCHEMA, "", partial=True))
    _deep_merge(config, user)
    train = config["train"]
    name = SCHEMA["train"]["model"].check("train.model", model) if model else train["model"]
    _deep_merge(train, _unset(train["per_model"].get(name, {}), user.get("train", {})))
    _check_together(config)
    return config


def _unset(values: Mapping, chosen: Mapping) -> dict:
    """The part of ``values`` whose keys (leaf by leaf) ``chosen`` does not hold."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            rest = _unset(value, chosen.get(key) or {})
            if rest:
                out[key] = rest
        elif key not in chosen:
            out[key] = value
    return out


def override(config: dict, section: str, values: Mapping[str, Any]) -> dict:
    """Copy of ``config`` with ``values`` (None entries ignored) set in ``section``, checked and cast
    as :func:`load_config` checks a file (a job's named flags: they win over everything).

    Raises:
        ValueError: an unknown key, or a value of the wrong type or out of range (naming the key).
    """
    checked = _check({section: {k: v for k, v in values.items() if v is not None}}, SCHEMA, "", partial=True)
    config = _deep_merge(copy.deepcopy(config), checked)
    _check_together(config)
    return config
