import pytest

from covid_spark.cli import parse_conf
from covid_spark.config import load_config, override


def test_defaults_and_override(tmp_path):
    config = load_config()
    assert config["classes"] == ["covid", "normal", "pneumonia"]
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


def test_make_job_passes_gradient_compression_and_refuses_unknown_ones():
    from covid_spark.train import make_job

    summary = {"image_size": 224, "per_split_class": {"train": {"covid": 4, "normal": 2, "pneumonia": 2}},
               "per_split": {"val": 3}, "row_groups": {"val": 1}}
    cfg = override(load_config(), "train", {"gradient_compression": "fp16"})["train"]
    job = make_job(cfg, summary, "/tmp/ds", steps=2, threads=1, checkpoint_dir="/tmp/ckpt")
    assert job["compression"] == "fp16"
    assert job["class_weight"] == {0: 8 / 12, 1: 8 / 6, 2: 8 / 6}  # CLASSES order: covid, normal, pneumonia
    assert make_job(load_config()["train"], summary, "/tmp/ds", 2, 1, "/tmp/ckpt")["compression"] == "none"
    cfg["gradient_compression"] = "int8"
    with pytest.raises(ValueError, match="train.gradient_compression.*'int8'"):
        make_job(cfg, summary, "/tmp/ds", 2, 1, "/tmp/ckpt")
    assert make_job(override(load_config(), "train", {"input_norm": "equalize"})["train"], summary, "/tmp/ds",
                    2, 1, "/tmp/ckpt")["input_norm"] == "equalize"
    cfg = override(load_config(), "train", {"input_norm": "clahe"})["train"]
    with pytest.raises(ValueError, match="train.input_norm.*'clahe'"):
        make_job(cfg, summary, "/tmp/ds", 2, 1, "/tmp/ckpt")


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
ALLOWED_224 = {("covid_spark/config.py", "DEFAULT_IMAGE_SIZE"), ("covid_spark/models.py", "IMAGENET_INPUT_SIZE")}


def test_the_users_default_image_size_is_the_librarys():
    import inspect

    from covid_spark.config import DEFAULT_IMAGE_SIZE
    from covid_spark.images import decode_image
    from covid_spark.models import DEFAULT_INPUT_SHAPE

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
    for folder in ("covid_spark", "jobs", "bench"):
        for name in sorted(os.listdir(os.path.join(repo, folder))):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(repo, folder, name), encoding="utf-8") as handle:
                text = handle.read()
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                if tok.type == tokenize.NUMBER and ast.literal_eval(tok.string) == 224:
                    line = tok.line.strip()
                    here = [(f"{folder}/{name}", const) for f, const in ALLOWED_224
                            if f == f"{folder}/{name}" and line.split("=")[0].split(":")[0].strip() == const]
                    if here:
                        allowed.update(here)
                    else:
                        found.append(f"{folder}/{name}:{tok.start[0]}: {line}")
    assert found == [], "use covid_spark.config.DEFAULT_IMAGE_SIZE or the config's preprocess.image_size"
    assert allowed == ALLOWED_224
