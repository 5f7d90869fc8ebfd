import pytest

from covid_spark.cli import parse_conf
from covid_spark.config import load_config, override


def test_defaults_and_override(tmp_path):
    config = load_config()
    assert config["preprocess"]["image_size"] == 224 and config["evaluate"]["bootstrap"] == 1000
    assert config["evaluate"]["audit"] is True and config["preprocess"]["lung_crop"] is False
    changed = override(config, "train", {"epochs": 3, "model": None})
    assert changed["train"]["epochs"] == 3 and changed["train"]["model"] == config["train"]["model"]
    assert config == load_config()  # override returns a copy; the original is untouched


def test_user_file_overrides_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  epochs: 5\n  augment:\n    flip: false\n")
    config = load_config(str(good))
    assert config["train"]["epochs"] == 5 and config["train"]["augment"]["flip"] is False
    assert config["train"]["augment"]["rotation_deg"] == load_config()["train"]["augment"]["rotation_deg"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epohcs: 5\n")
    with pytest.raises(ValueError, match="unknown config key 'train.epohcs'"):
        load_config(str(bad))


def test_parse_conf_splits_on_first_equals():
    assert parse_conf(["spark.a=b=c", "x= y"]) == {"spark.a": "b=c", "x": " y"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_conf(["novalue"])


def test_per_model_values_sit_between_defaults_and_the_users_file(tmp_path):
    raw = __import__("covid_spark.config", fromlist=["default_config"]).default_config()["train"]
    per_model = raw["per_model"]
    assert per_model["efficientnet_lite0"]["learning_rate"] != per_model["compact"]["learning_rate"]
    for name in ("efficientnet_lite0", "compact", "original"):
        train = load_config(model=name)["train"]
        assert {k: train[k] for k in per_model[name]} == per_model[name]
    default_model = raw["model"]
    assert load_config()["train"]["epochs"] == per_model[default_model]["epochs"]
    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  model: compact\n  learning_rate: 0.123\n")
    train = load_config(str(mine))["train"]
    assert train["learning_rate"] == 0.123  # the file wins over the per-model value
    assert train["epochs"] == per_model["compact"]["epochs"]  # the model named in the file picks its values
    train = load_config(str(mine), model="original")["train"]  # a --model flag picks another model's values
    assert train["epochs"] == per_model["original"]["epochs"] and train["learning_rate"] == 0.123
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  per_model:\n    compact: {epohcs: 3}\n")
    with pytest.raises(ValueError, match="train.per_model.compact.epohcs"):
        load_config(str(typo))


# ----------------------------------------------------------------------------- the schema, --set and precedence

def _train_config_of_the_train_job(monkeypatch, argv: list[str]) -> dict:
    """The config the train job would train with, given ``argv`` (no Spark, no training)."""
    import importlib

    train_job = importlib.import_module("jobs.train")
    seen = {}

    def fake_run_training(spark, dataset, model_dir, config, overwrite=False, resume=False):
        seen["config"] = config
        return {"model": config["train"]["model"], "num_proc": 1, "epochs_run": 0, "best_epoch": None,
                "wall_seconds": 0.0}

    monkeypatch.setattr(train_job, "build_spark", lambda args, app_name: (None, False))
    monkeypatch.setattr(train_job, "run_training", fake_run_training)
    assert train_job.main(["--dataset", "d", "--model-dir", "m"] + argv) == 0
    return seen["config"]


def test_precedence_defaults_per_model_file_set_flag_end_to_end(tmp_path, monkeypatch, capsys):
    from covid_spark.models.registry import REGISTRY

    mine = tmp_path / "mine.yaml"
    mine.write_text("train:\n  epochs: 5\n")
    run = lambda *argv: _train_config_of_the_train_job(monkeypatch, list(argv))["train"]  # noqa: E731
    default_model = load_config()["train"]["model"]
    assert run()["epochs"] == REGISTRY[default_model].train_defaults["epochs"]       # per-model > defaults
    assert run("--config", str(mine))["epochs"] == 5                                  # file > per-model
    assert run("--config", str(mine), "--set", "train.epochs=7")["epochs"] == 7       # --set > file
    assert run("--config", str(mine), "--set", "train.epochs=7", "--epochs", "9")["epochs"] == 9  # flag > --set
    assert run("--set", "train.epochs=7", "--set", "train.epochs=8")["epochs"] == 8   # the last --set wins
    # --set picks the model whose own values apply, as the file's train.model does; a flag picks another.
    assert run("--set", "train.model=original")["epochs"] == REGISTRY["original"].train_defaults["epochs"]
    train = run("--set", "train.model=original", "--model", "compact")
    assert train["model"] == "compact" and train["learning_rate"] == REGISTRY["compact"].train_defaults["learning_rate"]


def test_set_reaches_nested_keys_and_per_model_groups():
    config = load_config(sets=["train.augment.flip=true", "preprocess.holdout_source=nih", "evaluate.bootstrap=50"])
    assert config["train"]["augment"]["flip"] is True and config["evaluate"]["bootstrap"] == 50
    assert config["preprocess"]["holdout_source"] == "nih"
    assert load_config(sets=["preprocess.holdout_source="])["preprocess"]["holdout_source"] == ""  # empty: a string
    assert load_config(sets=["train.augment={flip: true, zoom: 0.1}"])["train"]["augment"] == dict(
        load_config()["train"]["augment"], flip=True, zoom=0.1)  # a mapping merges into the group
    per_model = "train.per_model.compact.learning_rate=0.002"
    assert load_config(model="compact", sets=[per_model])["train"]["learning_rate"] == 0.002
    assert load_config(model="original", sets=[per_model])["train"]["learning_rate"] == 0.001  # another model's
    assert load_config(model="compact", sets=[per_model, "train.learning_rate=0.01"])["train"]["learning_rate"] == 0.01
    # any train key may be a model's own, even one the registry does not set
    assert load_config(model="compact", sets=["train.per_model.compact.batch_size=8"])["train"]["batch_size"] == 8
    assert load_config(model="original", sets=["train.per_model.compact.batch_size=8"])["train"]["batch_size"] == 32


@pytest.mark.parametrize("pair, message", [
    ("train.epohcs=3", "unknown config key 'train.epohcs' (known: adversary, augment, batch_size,"),
    ("evaluate.split=val", "unknown config key 'evaluate.split' (known: audit, audit_cam_images, audit_images, bootstrap)"),
    ("classes=[a, b]", "unknown config key 'classes' (known: evaluate, preprocess, tracking, train)"),  # removed too
    ("train.augment.rotate=5", "unknown config key 'train.augment.rotate'"),
    ("train.per_model.resnet.epochs=3", "unknown config key 'train.per_model.resnet' (known: compact, "),
    ("train.per_model.compact.model=original", "unknown config key 'train.per_model.compact.model'"),
    ("train.per_model.compact.epohcs=3", "unknown config key 'train.per_model.compact.epohcs'"),
    ("train=3", "config key 'train' must be a mapping, found 3"),
    ("train.epochs.max=3", "config key 'train.epochs' must be an integer >= 1, found {'max': 3}"),
    ("train.epochs", "--set expects KEY=VALUE with a dotted config key (e.g. train.epochs=3), got 'train.epochs'"),
    ("=3", "--set expects KEY=VALUE"),
    ("train..epochs=3", "--set expects KEY=VALUE"),
    ("train.epochs=[1", "--set train.epochs: the value '[1' is not YAML"),
])
def test_set_refuses_unknown_keys_and_bad_pairs_naming_them(pair, message):
    with pytest.raises(ValueError) as caught:
        load_config(sets=[pair])
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("key, value, cast", [
    ("train.epochs", "5.0", 5), ("train.learning_rate", "0.5", 0.5),
    ("train.learning_rate", "1e-4", 1e-4),  # YAML 1.1 reads 1e-4 as a string: still the number
    ("train.learning_rate", "1", 1), ("train.augment.rotation_deg", "5", 5),  # an int is a float: kept as it is
    ("preprocess.skip_unknown_classes", "yes", True), ("train.augment.flip", "false", False),
    ("preprocess.holdout_source", "nih", "nih"), ("train.lr_schedule", "constant", "constant"),
])
def test_values_are_cast_to_the_declared_type_once_at_load(key, value, cast, tmp_path):
    section, *rest = key.split(".")
    from_set = load_config(sets=[f"{key}={value}"])
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}:\n" + "".join(f"{'  ' * (i + 1)}{k}:\n" for i, k in enumerate(rest[:-1]))
                    + f"{'  ' * len(rest)}{rest[-1]}: {value}\n")
    from_file = load_config(str(path))
    for config in (from_set, from_file):
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == cast and type(node) is type(cast), (key, node)


@pytest.mark.parametrize("key, value, message", [
    ("train.epochs", "five", "config key 'train.epochs' must be an integer >= 1, found 'five'"),
    ("train.epochs", "0", "config key 'train.epochs' must be an integer >= 1, found 0"),
    ("train.epochs", "2.5", "config key 'train.epochs' must be an integer >= 1, found 2.5"),
    ("train.epochs", "true", "config key 'train.epochs' must be an integer >= 1, found True"),
    ("train.learning_rate", "0", "config key 'train.learning_rate' must be a number > 0, found 0"),
    ("train.learning_rate", ".nan", "config key 'train.learning_rate' must be a number > 0, found nan"),
    ("train.augment.zoom", "-0.1", "config key 'train.augment.zoom' must be a number in [0, 1), found -0.1"),
    ("train.augment.rotation_deg", "180", "config key 'train.augment.rotation_deg' must be a number in [0, 180), "
                                          "found 180"),
    ("train.augment.shift", "true", "config key 'train.augment.shift' must be a number in [0, 1), found True"),
    ("train.augment.flip", "1", "config key 'train.augment.flip' must be true or false, found 1"),
    ("preprocess.skip_unknown_classes", "'true'", "config key 'preprocess.skip_unknown_classes' must be true or "
                                                  "false, found 'true'"),
    ("preprocess.duplicate_distance", "257", "config key 'preprocess.duplicate_distance' must be an integer in "
                                             "[0, 256], found 257"),
    ("preprocess.holdout_source", "2019", "config key 'preprocess.holdout_source' must be a string, found 2019"),
    ("train.model", "resnet", "config key 'train.model' must be one of compact, efficientnet_lite0, original, "
                              "found 'resnet'"),
    ("train.class_weights", "auto", "config key 'train.class_weights' must be one of balanced, none, found 'auto'"),
    ("train.per_model.compact.epochs", "0", "config key 'train.per_model.compact.epochs' must be an integer >= 1, "
                                            "found 0"),
    ("evaluate.bootstrap", "null", "config key 'evaluate.bootstrap' must be an integer >= 1, found None"),
])
def test_wrong_types_and_ranges_are_refused_naming_key_expected_and_found(key, value, message, tmp_path):
    with pytest.raises(ValueError) as from_set:
        load_config(sets=[f"{key}={value}"])
    assert str(from_set.value) == message
    path = tmp_path / "c.yaml"
    parts = key.split(".")
    path.write_text("".join(f"{'  ' * i}{k}:\n" for i, k in enumerate(parts[:-1]))
                    + f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}\n")
    with pytest.raises(ValueError) as from_file:
        load_config(str(path))
    assert str(from_file.value) == message


def test_checking_keeps_the_json_of_valid_values():
    """The pipeline skips or resumes training by a hash of the config's JSON: checking must not change the
    JSON of values that were valid before it (an int in a number key stays an int)."""
    import json
    import os

    import yaml

    from covid_spark.config import default_config
    from covid_spark.models.registry import REGISTRY

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "covid_spark", "defaults.yaml"), encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    raw["train"]["per_model"] = {name: dict(spec.train_defaults) for name, spec in REGISTRY.items()}
    assert json.dumps(default_config(), sort_keys=True) == json.dumps(raw, sort_keys=True)


def test_flags_are_checked_as_the_file_is_and_shares_together():
    with pytest.raises(ValueError, match=r"^config key 'train.batch_size' must be an integer >= 1, found 0$"):
        override(load_config(), "train", {"batch_size": 0})
    with pytest.raises(ValueError, match="unknown config key 'train.epohcs'"):
        override(load_config(), "train", {"epohcs": 3})
    with pytest.raises(ValueError, match=r"'preprocess.val_fraction' must be a number in \[0, 1\), found 1"):
        override(load_config(), "preprocess", {"val_fraction": 1})
    with pytest.raises(ValueError, match=r"'preprocess.val_fraction' \+ 'preprocess.test_fraction' must be below 1, "
                                         r"found 0.5 \+ 0.5"):
        load_config(sets=["preprocess.val_fraction=0.5", "preprocess.test_fraction=0.5"])
    # with a held-out source, test_fraction is not used: no sum to check
    assert load_config(sets=["preprocess.val_fraction=0.5", "preprocess.test_fraction=0.5",
                             "preprocess.holdout_source=nih"])["preprocess"]["val_fraction"] == 0.5


def test_schema_and_defaults_yaml_declare_the_same_keys():
    import os

    import yaml

    from covid_spark.config import SCHEMA, Field, PerModel, keys

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "covid_spark", "defaults.yaml"), encoding="utf-8") as handle:
        defaults = yaml.safe_load(handle)

    def leaves(tree, where=""):
        for key, value in tree.items():
            if isinstance(value, dict) and value and f"{where}{key}" != "train.per_model":
                yield from leaves(value, f"{where}{key}.")
            else:
                yield f"{where}{key}"

    assert sorted(leaves(defaults)) == sorted(keys())
    specs = [SCHEMA[k.split(".")[0]] for k in keys()]
    assert specs and all(isinstance(spec, dict) for spec in specs)
    for key in keys():
        node = SCHEMA
        for part in key.split("."):
            node = node[part]
        assert isinstance(node, (Field, PerModel)) and node.help, key


# Keys the config module itself reads: train.per_model (load_config applies the chosen model's values).
READ_BY_CONFIG = {"train.per_model"}


def test_every_config_key_is_read_somewhere_in_the_package():
    """A key nobody reads goes (as ``evaluate.split`` and ``classes`` went): every key of defaults.yaml
    is read in covid_spark/ outside config.py (where the schema names every key) as ``cfg["<key>"]`` (a
    stage's section), ``augment["<key>"]`` or ``config["<section>"]["<key>"]``."""
    import os
    import re

    from covid_spark.config import keys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = []
    for root, dirs, files in os.walk(os.path.join(repo, "covid_spark")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for name in files:
            if name.endswith(".py") and os.path.join(root, name) != os.path.join(repo, "covid_spark", "config.py"):
                with open(os.path.join(root, name), encoding="utf-8") as handle:
                    code.append(handle.read())
    text = "\n".join(code)
    def read(key: str) -> bool:
        section, name = key.split(".")[0], key.rsplit(".", 1)[-1]
        receiver = rf"(?:\bcfg|\baugment|\bconfig\[\"{section}\"\](?:\[\"augment\"\])?)"
        return re.search(rf"{receiver}\[\"{re.escape(name)}\"\]", text) is not None

    unread = [key for key in keys() if key not in READ_BY_CONFIG and not read(key)]
    assert unread == [], "read these keys or delete them from defaults.yaml and config.SCHEMA"


@pytest.mark.parametrize("name", ["preprocess", "train", "evaluate", "predict", "pipeline", "crossval"])
def test_every_job_takes_set_and_states_the_precedence_in_its_help(name, capsys):
    import importlib

    from covid_spark.config import PRECEDENCE

    parse_args = importlib.import_module(f"jobs.{name}").parse_args
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert PRECEDENCE in " ".join(capsys.readouterr().out.split())


def test_make_job_passes_gradient_compression_and_input_norm_which_the_config_checks():
    from covid_spark.stages.train import make_job

    summary = {"image_size": 224, "per_split_class": {"train": {"covid": 4, "normal": 2, "pneumonia": 2}},
               "per_split": {"val": 3}, "row_groups": {"val": 1}}
    cfg = override(load_config(), "train", {"gradient_compression": "fp16"})["train"]
    job = make_job(cfg, summary, "/tmp/ds", steps=2, threads=1, checkpoint_dir="/tmp/ckpt")
    assert job.compression == "fp16"
    assert job.class_weight == {0: 8 / 12, 1: 8 / 6, 2: 8 / 6}  # CLASSES order: covid, normal, pneumonia
    assert make_job(load_config()["train"], summary, "/tmp/ds", 2, 1, "/tmp/ckpt").compression == "none"
    assert make_job(override(load_config(), "train", {"input_norm": "equalize"})["train"], summary, "/tmp/ds",
                    2, 1, "/tmp/ckpt").input_norm == "equalize"
    # Checked once, where the config is made (a flag goes through override), not again by make_job.
    with pytest.raises(ValueError, match="train.gradient_compression.*'int8'"):
        override(load_config(), "train", {"gradient_compression": "int8"})
    with pytest.raises(ValueError, match="train.input_norm.*'clahe'"):
        override(load_config(), "train", {"input_norm": "clahe"})


def test_every_job_config_loads_and_xl_trains_five_epochs():
    import glob
    import os

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    for path in glob.glob(os.path.join(conf, "*.yaml")):
        load_config(path)                                   # no unknown key in any shipped config
    xl = load_config(os.path.join(conf, "xl.yaml"))
    assert (xl["train"]["model"], xl["train"]["epochs"], xl["train"]["num_proc"]) == ("efficientnet_lite0", 5, 2)
    assert load_config(os.path.join(conf, "xl.yaml"), model="original")["train"]["epochs"] == 40


def _make_dry_run(*args: str) -> str:
    import os
    import subprocess

    repo = os.path.join(os.path.dirname(__file__), "..")
    return subprocess.run(["make", "-n", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def test_make_targets_pass_inputs_config_and_epochs():
    xl = _make_dry_run("demo-xl", "RUN_ID=demo-t")
    assert "--input ../shared/data/cxr-xl --run-dir runs/xl-t --config conf/xl.yaml" in xl
    both = _make_dry_run("demo-xl", "RUN_ID=demo-t", "DATA=../shared/data/cxr3 ../shared/data/cxr-xl")
    assert "--input ../shared/data/cxr3 --input ../shared/data/cxr-xl --run-dir runs/xl-t" in both
    loso = _make_dry_run("loso", "DATA=d", "SOURCE=nih", "CONFIG=conf/xl.yaml", "EPOCHS=1", "RUN_ID=t")
    assert "--input d --run-dir runs/loso-nih-t --config conf/xl.yaml" in loso
    assert "--holdout-source nih" in loso and "--epochs 1" in loso
    assert "--config conf/demo.yaml" in _make_dry_run("loso", "RUN_ID=t")
    train = _make_dry_run("train", "DATASET=ds", "MODEL_DIR=m", "CONFIG=conf/xl.yaml")
    assert "--dataset ds --model-dir m" in train and "--config conf/xl.yaml" in train
    ev = " ".join(_make_dry_run("evaluate", "DATASET=ds", "MODEL_DIR=m", "SPLIT=all", "EXCLUDE=other",
                                "OUT=x.json").replace("\\\n", " ").split())
    assert "jobs/evaluate.py --dataset ds --model-dir m --split all --exclude-near-copies-of other --output x.json" in ev


# ----------------------------------------------------------------------------- the input image size, defined once

# The literal 224 may appear in code only here: the library's default, and the ImageNet weights' own size.
ALLOWED_224 = {("covid_spark/constants.py", "DEFAULT_IMAGE_SIZE"), ("covid_spark/models/architectures.py", "IMAGENET_INPUT_SIZE")}


def test_the_users_default_image_size_is_the_librarys():
    import inspect

    from covid_spark.constants import DEFAULT_IMAGE_SIZE
    from covid_spark.inputs.images import decode_image
    from covid_spark.models.registry import DEFAULT_INPUT_SHAPE

    assert load_config()["preprocess"]["image_size"] == DEFAULT_IMAGE_SIZE
    assert DEFAULT_INPUT_SHAPE == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3)
    assert inspect.signature(decode_image).parameters["size"].default == DEFAULT_IMAGE_SIZE


def test_no_other_224_in_the_code():
    """Numbers in code, not docstrings or comments (those may say what a map's size is at 224)."""
    import ast
    import io
    import os
    import tokenize

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found, allowed = [], set()
    files = sorted(os.path.relpath(os.path.join(root, f), repo).replace(os.sep, "/")
                   for top in ("covid_spark", "jobs", "bench") for root, _, names in os.walk(os.path.join(repo, top))
                   for f in names if f.endswith(".py"))
    for path in files:
        with open(os.path.join(repo, path), encoding="utf-8") as handle:
            text = handle.read()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NUMBER and ast.literal_eval(tok.string) == 224:
                line = tok.line.strip()
                here = [(path, const) for f, const in ALLOWED_224
                        if f == path and line.split("=")[0].split(":")[0].strip() == const]
                if here:
                    allowed.update(here)
                else:
                    found.append(f"{path}:{tok.start[0]}: {line}")
    assert found == [], "use covid_spark.constants.DEFAULT_IMAGE_SIZE or the config's preprocess.image_size"
    assert allowed == ALLOWED_224


def test_evaluation_split_and_inference_batch_are_defined_once():
    import inspect

    from covid_spark import constants as config
    from covid_spark.stages import evaluate
    from covid_spark.stages import predict
    from jobs import evaluate as evaluate_job
    from jobs import predict as predict_job

    assert config.EVALUATION_SPLIT == "test" and config.INFERENCE_BATCH_SIZE == 32
    assert evaluate_job.parse_args(["--dataset", "d", "--model-dir", "m"]).split == config.EVALUATION_SPLIT
    args = predict_job.parse_args(["--input", "i", "--model-dir", "m", "--output", "o.csv"])
    assert args.batch_size == config.INFERENCE_BATCH_SIZE
    for function in (predict.predict, evaluate.score_split, evaluate.predict_probs):
        assert inspect.signature(function).parameters["batch_size"].default == config.INFERENCE_BATCH_SIZE
