"""Every job's entry point alike: bad arguments or input end in exit status 2 and ONE line on stderr,
``<job>: <message>`` naming the path or key; an existing output is refused unless --overwrite.

Fast: no training, no real data. Errors are found before any Spark work: the jobs that only need a
session to exist get a stand-in that must be stopped (``fake_spark``); preprocess, whose output check
goes through Hadoop's filesystem, gets the session-scoped ``spark`` fixture (``build_spark`` reuses it).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess

import pytest

from covid_spark.cli import job_main, one_line
from covid_spark.constants import CLASSES
from covid_spark.errors import ConfigError, DatasetError, InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXISTS = "already exists: pass --overwrite to replace it"


def job(name: str):
    return importlib.import_module(f"jobs.{name}")


def one_error_line(capsys, name: str) -> str:
    """stderr, which must be exactly one line starting with ``<name>: ``; returned without the newline."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n") and err.startswith(f"{name}: "), repr(err)
    return err[:-1]


class FakeSpark:
    """Stands in for a SparkSession the job owns: any use of it beyond ``stop`` is an error."""

    def __init__(self):
        self.stopped = False

    def stop(self):
        self.stopped = True


@pytest.fixture
def fake_spark(monkeypatch):
    """Patch ``build_spark`` of every job that builds a session to return an owned ``FakeSpark``."""
    fake = FakeSpark()
    for name in ("train", "evaluate", "predict", "pipeline"):
        monkeypatch.setattr(job(name), "build_spark", lambda args, app_name: (fake, True))
    yield fake


def fake_dataset(folder, train_rows: int = 40) -> str:
    """A folder holding only a ``_summary.json`` that passes training's and evaluation's checks."""
    os.makedirs(folder, exist_ok=True)
    summary = {"classes": list(CLASSES), "image_size": 64, "per_split": {"train": train_rows, "val": 10, "test": 10},
               "row_groups": {"train": 4, "val": 2, "test": 2},
               "per_split_class": {"train": {c: train_rows // 3 for c in CLASSES}}}
    with open(os.path.join(folder, "_summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle)
    return str(folder)


def fake_model_dir(folder) -> str:
    """A model dir with a ``run.json`` and a ``model.keras`` that is never loaded (checks come first)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.keras"), "wb") as handle:
        handle.write(b"not loaded")
    with open(os.path.join(folder, "run.json"), "w", encoding="utf-8") as handle:
        json.dump({"image_size": 64, "model": "compact"}, handle)
    return str(folder)


# --- the shared wrapper -------------------------------------------------------------------------

def test_user_errors_become_one_line_and_status_2(capsys):
    @job_main("demo")
    def main(argv=None):
        raise {"value": ConfigError("bad value\n  on two lines"), "missing": FileNotFoundError("x not found"),
               "exists": FileExistsError("y exists"), "job": InputError("--folds must be at least 2"),
               "dataset": DatasetError("d is not a dataset", dataset="d"),
               "perm": PermissionError(13, "Permission denied", "/root/z")}[argv[0]]

    assert main(["value"]) == 2 and one_error_line(capsys, "demo") == "demo: bad value on two lines"
    assert main(["dataset"]) == 2 and one_error_line(capsys, "demo") == "demo: d is not a dataset"
    assert main(["missing"]) == 2 and one_error_line(capsys, "demo") == "demo: x not found"
    assert main(["exists"]) == 2 and one_error_line(capsys, "demo") == "demo: y exists"
    assert main(["job"]) == 2 and one_error_line(capsys, "demo") == "demo: --folds must be at least 2"
    assert main(["perm"]) == 2 and one_error_line(capsys, "demo") == "demo: /root/z: Permission denied"


def test_a_bug_keeps_its_traceback():
    @job_main("demo")
    def main(argv=None):
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        main([])


def test_an_internal_value_error_is_a_bug_and_keeps_its_traceback(tmp_path):
    """numpy, pyarrow and TensorFlow raise ValueError too: only a UserError is bad input."""
    import sys

    script = tmp_path / "job.py"
    script.write_text("import numpy as np\n"
                      "from covid_spark.cli import job_main\n"
                      "@job_main('demo')\n"
                      "def main(argv=None):\n"
                      "    return int(np.zeros(3).reshape(2, 2).sum())\n"
                      "raise SystemExit(main([]))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "in main" in done.stderr
    assert "ValueError: cannot reshape array of size 3 into shape (2,2)" in done.stderr
    assert "demo: " not in done.stderr


def test_traceback_of_a_user_error_on_request(capsys, monkeypatch):
    @job_main("demo")
    def main(argv=None):
        raise InputError("bad")

    monkeypatch.setenv("COVID_SPARK_TRACEBACK", "1")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("demo: bad\n")


def test_one_line_of_an_os_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        open(tmp_path / "nope.json", encoding="utf-8")
    assert one_line(caught.value) == f"{tmp_path / 'nope.json'}: No such file or directory"


# --- preprocess ---------------------------------------------------------------------------------

def test_preprocess_names_a_missing_input(spark, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert job("preprocess").main(["--input", str(missing), "--output", str(tmp_path / "ds")]) == 2
    assert one_error_line(capsys, "preprocess") == f"preprocess: input {missing} does not exist"
    assert not (tmp_path / "ds").exists()


def test_preprocess_refuses_an_existing_output(spark, tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    assert job("preprocess").main(["--input", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert one_error_line(capsys, "preprocess") == f"preprocess: {out} {EXISTS}"


def test_preprocess_refuses_a_bad_conf(spark, tmp_path, capsys):
    assert job("preprocess").main(["--input", str(tmp_path), "--output", str(tmp_path / "ds"),
                                   "--conf", "novalue"]) == 2
    assert one_error_line(capsys, "preprocess") == "preprocess: --conf expects KEY=VALUE, got 'novalue'"


# --- train --------------------------------------------------------------------------------------

def test_train_names_a_missing_dataset(fake_spark, tmp_path, capsys):
    dataset = tmp_path / "x"
    assert job("train").main(["--dataset", str(dataset), "--model-dir", str(tmp_path / "m")]) == 2
    assert one_error_line(capsys, "train") == (f"train: {dataset}/_summary.json not found: "
                                               f"is {dataset} a dataset written by jobs/preprocess.py?")
    assert fake_spark.stopped


def test_train_refuses_an_existing_model_dir(fake_spark, tmp_path, capsys):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "model.keras").write_bytes(b"old")
    assert job("train").main(["--dataset", fake_dataset(tmp_path / "ds"), "--model-dir", str(model_dir),
                              "--batch-size", "4", "--num-proc", "2"]) == 2
    assert one_error_line(capsys, "train") == (f"train: {model_dir} {EXISTS} "
                                               f"or --resume to continue from its last checkpoint")
    assert (model_dir / "model.keras").read_bytes() == b"old" and fake_spark.stopped


def test_train_names_an_unknown_model(fake_spark, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:  # the flag: argparse's own error
        job("train").main(["--dataset", "d", "--model-dir", "m", "--model", "resnet"])
    assert caught.value.code == 2 and "invalid choice: 'resnet'" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  model: resnet\n")
    assert job("train").main(["--dataset", fake_dataset(tmp_path / "ds"), "--model-dir", str(tmp_path / "m"),
                              "--config", str(config)]) == 2
    assert one_error_line(capsys, "train") == ("train: config key 'train.model' must be one of "
                                               "compact, efficientnet_lite0, original, found 'resnet'")
    assert not (tmp_path / "m").exists()


# --- evaluate -----------------------------------------------------------------------------------

def test_evaluate_names_a_missing_dataset_and_model(fake_spark, tmp_path, capsys):
    dataset = tmp_path / "x"
    assert job("evaluate").main(["--dataset", str(dataset), "--model-dir", str(tmp_path / "m")]) == 2
    assert one_error_line(capsys, "evaluate").startswith(f"evaluate: {dataset}/_summary.json not found")
    assert fake_spark.stopped
    model_dir = tmp_path / "m"
    assert job("evaluate").main(["--dataset", fake_dataset(tmp_path / "ds"), "--model-dir", str(model_dir)]) == 2
    assert one_error_line(capsys, "evaluate") == (f"evaluate: {model_dir}/model.keras not found: "
                                                  f"train a model into {model_dir} first (jobs/train.py)")


def test_evaluate_refuses_an_existing_metrics_file(fake_spark, tmp_path, capsys):
    model_dir = fake_model_dir(tmp_path / "m")
    dataset = fake_dataset(tmp_path / "ds")
    metrics = os.path.join(model_dir, "metrics.json")
    with open(metrics, "w", encoding="utf-8") as handle:
        handle.write("{}")
    assert job("evaluate").main(["--dataset", dataset, "--model-dir", model_dir]) == 2
    assert one_error_line(capsys, "evaluate") == f"evaluate: {metrics} {EXISTS}"
    other = tmp_path / "other.json"
    other.write_text("{}")
    assert job("evaluate").main(["--dataset", dataset, "--model-dir", model_dir, "--split", "all",
                                 "--output", str(other)]) == 2
    assert one_error_line(capsys, "evaluate") == f"evaluate: {other} {EXISTS}"
    assert other.read_text() == "{}"


# --- predict ------------------------------------------------------------------------------------

def test_predict_refuses_an_existing_output_by_default(fake_spark, tmp_path, capsys):
    model_dir = fake_model_dir(tmp_path / "m")
    out = tmp_path / "p.csv"
    out.write_text("old")
    for extra in ([], ["--no-overwrite"]):  # the old flag is still accepted; refusing is the default
        assert job("predict").main(["--input", str(tmp_path), "--model-dir", model_dir,
                                    "--output", str(out)] + extra) == 2
        assert one_error_line(capsys, "predict") == f"predict: {out} {EXISTS}"
    assert out.read_text() == "old" and fake_spark.stopped
    assert job("predict").parse_args(["--input", "i", "--model-dir", "m", "--output", "o.csv",
                                      "--overwrite"]).overwrite


def test_predict_names_a_missing_input_model_or_bad_output(fake_spark, tmp_path, capsys):
    model_dir = fake_model_dir(tmp_path / "m")
    missing = tmp_path / "missing"
    assert job("predict").main(["--input", str(missing), "--model-dir", model_dir,
                                "--output", str(tmp_path / "p.csv")]) == 2
    assert one_error_line(capsys, "predict") == f"predict: input {missing} does not exist"
    empty = tmp_path / "empty"
    assert job("predict").main(["--input", str(tmp_path), "--model-dir", str(empty),
                                "--output", str(tmp_path / "p.csv")]) == 2
    assert one_error_line(capsys, "predict") == (f"predict: {empty}/model.keras not found: "
                                                 f"train a model into {empty} first")
    assert job("predict").main(["--input", str(tmp_path), "--model-dir", model_dir,
                                "--output", str(tmp_path / "p.txt")]) == 2
    assert one_error_line(capsys, "predict") == f"predict: --output {tmp_path / 'p.txt'} must end in .csv or .parquet"
    assert not (tmp_path / "p.csv").exists()


# --- pipeline -----------------------------------------------------------------------------------

def test_pipeline_names_unknown_stages_and_models(fake_spark, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    assert job("pipeline").main(["--input", "i", "--run-dir", run_dir, "--stages", "train,deploy"]) == 2
    assert one_error_line(capsys, "pipeline") == ("pipeline: unknown stage(s) deploy; "
                                                  "choose from preprocess, train, evaluate, report")
    with pytest.raises(SystemExit) as caught:
        job("pipeline").main(["--input", "i", "--run-dir", run_dir, "--model", "resnet"])
    assert caught.value.code == 2 and "invalid choice: 'resnet'" in capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  model: resnet\n")
    assert job("pipeline").main(["--input", "i", "--run-dir", run_dir, "--config", str(config)]) == 2
    assert one_error_line(capsys, "pipeline").startswith("pipeline: config key 'train.model' must be one of")
    assert not os.path.exists(run_dir)


def test_pipeline_names_the_stage_and_a_missing_input(fake_spark, tmp_path, capsys, caplog):
    missing = tmp_path / "missing"
    with caplog.at_level(logging.ERROR, logger="covid_spark"):
        assert job("pipeline").main(["--input", str(missing), "--run-dir", str(tmp_path / "run")]) == 2
    assert one_error_line(capsys, "pipeline") == (f"pipeline: FAILED at stage 'preprocess': stage 'preprocess' "
                                                  f"failed: FileNotFoundError: input {missing} does not exist")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # bad input: no traceback
    assert fake_spark.stopped


def test_pipeline_keeps_the_traceback_of_a_failed_stage_that_is_a_bug(fake_spark, tmp_path, capsys, caplog,
                                                                     monkeypatch):
    from covid_spark.stages.pipeline import StageFailed

    def broken(*args, **kwargs):
        try:
            raise KeyError("bug")
        except KeyError as exc:
            raise StageFailed("train", exc) from exc

    monkeypatch.setattr(job("pipeline"), "run_pipeline", broken)
    with caplog.at_level(logging.ERROR, logger="covid_spark"):
        assert job("pipeline").main(["--input", "i", "--run-dir", str(tmp_path / "run")]) == 2
    assert one_error_line(capsys, "pipeline") == "pipeline: FAILED at stage 'train': stage 'train' failed: KeyError: 'bug'"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info[0] is KeyError


# --- crossval -----------------------------------------------------------------------------------

def test_crossval_names_a_missing_dataset_and_compare_file(tmp_path, capsys):
    dataset = tmp_path / "x"
    out = str(tmp_path / "cv.json")
    assert job("crossval").main(["--dataset", str(dataset), "--output", out]) == 2
    assert one_error_line(capsys, "crossval") == (f"crossval: {dataset}/_summary.json not found: "
                                                  f"is {dataset} a dataset written by jobs/preprocess.py?")
    compare = tmp_path / "cv-other.json"
    assert job("crossval").main(["--dataset", str(dataset), "--output", out, "--compare", str(compare)]) == 2
    assert one_error_line(capsys, "crossval") == f"crossval: {compare}: No such file or directory"
    compare.write_text('{"complete": false}')
    assert job("crossval").main(["--dataset", str(dataset), "--output", out, "--compare", str(compare)]) == 2
    assert one_error_line(capsys, "crossval") == (f"crossval: --compare {compare} is not a complete output of "
                                                  f"jobs/crossval.py (no 'predictions')")
    assert not os.path.exists(out)


def test_crossval_refuses_an_existing_output_and_unknown_models(tmp_path, capsys):
    out = tmp_path / "cv.json"
    out.write_text("{}")
    assert job("crossval").main(["--dataset", str(tmp_path / "x"), "--output", str(out)]) == 2
    assert one_error_line(capsys, "crossval") == f"crossval: {out} {EXISTS}"
    with pytest.raises(SystemExit) as caught:
        job("crossval").main(["--dataset", "d", "--output", "o.json", "--model", "resnet"])
    assert caught.value.code == 2 and "invalid choice: 'resnet'" in capsys.readouterr().err


def test_the_old_crossval_command_points_to_the_job():
    import sys

    old = subprocess.run([sys.executable, "-m", "covid_spark.stages.crossval", "--dataset", "d", "--output", "o.json"],
                         capture_output=True, text=True)
    assert old.returncode == 2 and "jobs/crossval.py" in old.stderr and old.stderr.count("\n") == 1


def test_make_cv_runs_the_job():
    repo = os.path.join(os.path.dirname(__file__), "..")
    dry = subprocess.run(["make", "-n", "cv", "DATASET=ds", "MODEL=compact", "TRANSFORM=equalize", "OVERWRITE=1"],
                         cwd=repo, check=True, capture_output=True, text=True).stdout
    assert "jobs/crossval.py --dataset ds --config conf/demo.yaml --model compact" in dry
    assert "--transform equalize" in dry and "--output runs/cv-compact-equalize.json --overwrite" in dry


# --- --set KEY=VALUE: checked like the --config file, before any work ------------------------------

JOB_ARGS = {"preprocess": ["--input", "i", "--output", "o"], "train": ["--dataset", "d", "--model-dir", "m"],
            "evaluate": ["--dataset", "d", "--model-dir", "m"], "predict": ["--input", "i", "--model-dir", "m",
                                                                            "--output", "o.csv"],
            "pipeline": ["--input", "i", "--run-dir", "r"], "crossval": ["--dataset", "d", "--output", "o.json"]}


@pytest.mark.parametrize("name", sorted(JOB_ARGS))
@pytest.mark.parametrize("pair, message", [
    ("train.epohcs=3", "unknown config key 'train.epohcs' (known: adversary, augment, batch_size, class_weights, "),
    ("train.epochs=five", "config key 'train.epochs' must be an integer >= 1, found 'five'"),
    ("train.per_model.compact.learning_rate=-1", "config key 'train.per_model.compact.learning_rate' must be a "
                                                 "number > 0, found -1"),
    ("epochs", "--set expects KEY=VALUE with a dotted config key (e.g. train.epochs=3), got 'epochs'"),
])
def test_every_job_refuses_a_bad_set_with_status_2_naming_the_key(name, pair, message, fake_spark, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative outputs: nothing may be written, even by mistake
    assert job(name).main(JOB_ARGS[name] + ["--set", pair]) == 2
    assert one_error_line(capsys, name).startswith(f"{name}: {message}")
    assert os.listdir(tmp_path) == [] and not fake_spark.stopped  # refused before a session was built


# --- the same option names and overwrite rule -----------------------------------------------------

@pytest.mark.parametrize("name, required", [
    ("preprocess", ["--input", "i", "--output", "o"]),
    ("train", ["--dataset", "d", "--model-dir", "m"]),
    ("evaluate", ["--dataset", "d", "--model-dir", "m"]),
    ("predict", ["--input", "i", "--model-dir", "m", "--output", "o.csv"]),
    ("crossval", ["--dataset", "d", "--output", "o.json"]),
])
def test_every_job_that_writes_an_output_takes_overwrite(name, required):
    parse_args = job(name).parse_args
    assert parse_args(required).overwrite is False
    assert parse_args(required + ["--overwrite"]).overwrite is True
    assert parse_args(required + ["--config", "c.yaml"]).config == "c.yaml"
