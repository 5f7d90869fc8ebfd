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
