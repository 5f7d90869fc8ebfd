"""examples/: the cron lines and the Airflow DAGs call the jobs with arguments they accept, in order.

Airflow is not installed: the DAG file is parsed with ``ast``, then run against stub modules that record
what the DAGs build (operators, their DAG, their arguments, their order). The cron file is read as cron
reads it (assignments, five time fields expanded to the values they select, a command), and each
command split into simple commands and spark-submit's options by tests/structure.py.
"""
from __future__ import annotations

import ast
import importlib
import os
import runpy
import sys
import types
from string import Template
from urllib.parse import urlsplit

import pytest

from tests.structure import parse_spark_submit, shell_commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAG_FILE = os.path.join(REPO, "examples", "airflow", "covid_spark_dag.py")
CRON_FILE = os.path.join(REPO, "examples", "cron", "covid-spark.cron")
OPERATOR_MODULE = "airflow.providers.apache.spark.operators.spark_submit"
BASH_MODULE = "airflow.operators.bash"


def test_dag_parses_and_imports_spark_submit_operator():
    with open(DAG_FILE, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), filename=DAG_FILE)
    compile(tree, DAG_FILE, "exec")
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert (OPERATOR_MODULE, "SparkSubmitOperator") in imported
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
             and getattr(node.func, "id", None) == "SparkSubmitOperator"]
    assert calls and all(any(k.arg == "application" for k in call.keywords) for call in calls)


class _Operator:
    """Stands in for an Airflow operator: keeps its arguments, its DAG and its downstream tasks."""

    def __init__(self, registry: dict, kind: str, **kwargs):
        self.kind, self.kwargs, self.downstream = kind, kwargs, []
        self.dag = registry["current"]
        registry["operators"].append(self)

    def __rshift__(self, other):
        self.downstream.append(other)
        return other


class _Dag:
    def __init__(self, registry: dict, **kwargs):
        self.kwargs, self.registry = kwargs, registry
        registry["dags"][kwargs["dag_id"]] = self

    def __enter__(self):
        self.registry["current"] = self
        return self

    def __exit__(self, *exc):
        self.registry["current"] = None
        return False


@pytest.fixture
def dag_objects(monkeypatch) -> dict:
    """Run the DAG file with stub airflow modules; COVID_SPARK_HOME points at this checkout."""
    registry = {"operators": [], "dags": {}, "current": None}
    airflow = types.ModuleType("airflow")
    airflow.DAG = lambda **kwargs: _Dag(registry, **kwargs)
    operator_module = types.ModuleType(OPERATOR_MODULE)
    operator_module.SparkSubmitOperator = lambda **kwargs: _Operator(registry, "spark", **kwargs)
    bash_module = types.ModuleType(BASH_MODULE)
    bash_module.BashOperator = lambda **kwargs: _Operator(registry, "bash", **kwargs)
    modules = {"airflow": airflow, OPERATOR_MODULE: operator_module, BASH_MODULE: bash_module}
    for name in ("airflow.providers", "airflow.providers.apache", "airflow.providers.apache.spark",
                 "airflow.providers.apache.spark.operators", "airflow.operators"):
        modules[name] = types.ModuleType(name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("COVID_SPARK_HOME", REPO)
    runpy.run_path(DAG_FILE)
    assert set(registry["dags"]) == {"covid_spark_weekly", "covid_spark_score_arrivals"}
    return registry


def _job_args(application: str, args: list[str]):
    """The job's own parser applied to ``args`` (SystemExit if it refuses them)."""
    relative = os.path.relpath(application, REPO)
    assert relative.startswith("jobs" + os.sep) and os.path.isfile(os.path.join(REPO, relative)), relative
    module = importlib.import_module("jobs." + os.path.basename(relative)[:-3])
    return os.path.basename(relative)[:-3], module.parse_args([str(a) for a in args])


def _spark_tasks(dag_objects: dict, dag_id: str) -> dict:
    return {op.kwargs["task_id"]: op for op in dag_objects["operators"]
            if op.kind == "spark" and op.dag is dag_objects["dags"][dag_id]}


def test_dag_applications_exist_and_accept_their_arguments(dag_objects):
    for op in dag_objects["operators"]:
        if op.kind == "spark":
            _job_args(op.kwargs["application"], op.kwargs["application_args"])
            if op.kwargs.get("properties_file"):
                assert os.path.isfile(op.kwargs["properties_file"]), op.kwargs["properties_file"]


def test_weekly_dag_appends_trains_evaluates_one_dataset_in_order(dag_objects):
    tasks = _spark_tasks(dag_objects, "covid_spark_weekly")
    jobs = {task: _job_args(op.kwargs["application"], op.kwargs["application_args"]) for task, op in tasks.items()}
    assert [jobs[t][0] for t in ("append", "train", "evaluate")] == ["preprocess", "train", "evaluate"]
    append, train, evaluate = (jobs[t][1] for t in ("append", "train", "evaluate"))
    assert append.append and append.input and append.output == train.dataset == evaluate.dataset
    assert train.model_dir == evaluate.model_dir and "{{ ds }}" in train.model_dir, "one run dir per logical date"
    assert train.resume, "a retried training resumes from its checkpoint"
    order, op = [], tasks["append"]
    while op is not None:
        order.append(op.kwargs["task_id"])
        op = op.downstream[0] if op.downstream else None
    assert order == ["append", "train", "evaluate", "publish"]


def test_scoring_dag_scores_each_arrival_once_with_the_published_model(dag_objects):
    (score,) = _spark_tasks(dag_objects, "covid_spark_score_arrivals").values()
    name, args = _job_args(score.kwargs["application"], score.kwargs["application_args"])
    assert name == "predict" and args.watch and args.once and not args.input
    publish = next(op for op in dag_objects["operators"] if op.kwargs["task_id"] == "publish")
    assert publish.kwargs["bash_command"].split()[-1] == args.model_dir


def test_dags_retry_and_do_not_overlap(dag_objects):
    for dag in dag_objects["dags"].values():
        assert dag.kwargs.get("max_active_runs") == 1
        default_retries = dag.kwargs.get("default_args", {}).get("retries", 0)
        for op in dag_objects["operators"]:
            if op.dag is dag:
                assert op.kwargs.get("retries", default_retries) >= 1, op.kwargs["task_id"]


def parse_cron_field(field: str, low: int, high: int, names: tuple[str, ...] = ()) -> set[int]:
    """The values one cron time field selects: comma-separated items, each ``*``, ``N``, ``N-M``
    or a three-letter name (months and weekdays), optionally ``/step``. ValueError when invalid."""
    def value(word: str) -> int:
        if word.lower() in names:
            return names.index(word.lower()) + low
        number = int(word)   # ValueError for anything else
        if not low <= number <= high:
            raise ValueError(f"{number} outside {low}-{high}")
        return number

    selected: set[int] = set()
    for item in field.split(","):
        base, _, step = item.partition("/")
        stride = int(step) if step else 1
        if stride < 1:
            raise ValueError(f"step {step} in {field!r}")
        if base == "*":
            first, last = low, high
        else:
            start, _, end = base.partition("-")
            first = value(start)
            last = value(end) if end else (high if step else first)
            if first > last:
                raise ValueError(f"range {base} in {field!r}")
        selected.update(range(first, last + 1, stride))
    return selected


MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
CRON_FIELDS = [(0, 59, ()), (0, 23, ()), (1, 31, ()), (1, 12, MONTHS), (0, 7, WEEKDAYS)]


def parse_schedule(fields: list[str]) -> list[set[int]]:
    assert len(fields) == 5, fields
    return [parse_cron_field(field, low, high, names) for field, (low, high, names) in zip(fields, CRON_FIELDS)]


def read_crontab() -> tuple[dict[str, str], list[tuple[list[str], str]]]:
    """(environment assignments, [(five time fields, command)]) of the cron file, as cron reads it:
    ``NAME = value`` lines set the environment (values not expanded), other lines are jobs."""
    env, jobs = {}, []
    with open(CRON_FILE, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition("=")
            if sep and name.strip().isidentifier():
                env[name.strip()] = value.strip()
                continue
            words = line.split(None, 5)
            assert len(words) == 6, f"5 time fields and a command: {line!r}"
            jobs.append((words[:5], words[5]))
    return env, jobs


def unescaped_percent(command: str) -> bool:
    """Whether cron would cut the command at a % (it turns an unescaped one into a newline)."""
    return any(char == "%" and (i == 0 or command[i - 1] != "\\") for i, char in enumerate(command))


def test_cron_parser_rejects_what_cron_rejects():
    assert parse_schedule("30 1 * * *".split()) == [{30}, {1}, set(range(1, 32)), set(range(1, 13)), set(range(8))]
    assert parse_schedule("*/15 0-6/2 1,15 jan-mar mon-fri".split())[:2] == [{0, 15, 30, 45}, {0, 2, 4, 6}]
    for bad in ("60 1 * * *", "30 24 * * *", "0 1 0 * *", "0 1 * 13 *", "0 1 * * 8", "5-1 * * * *", "*/0 * * * *", "x * * * *"):
        with pytest.raises(ValueError):
            parse_schedule(bad.split())
    assert unescaped_percent("date +%F") and not unescaped_percent("date +\\%F")


def test_dag_schedules_are_weekly_and_frequent(dag_objects):
    minutes, hours, _, _, weekdays = parse_schedule(dag_objects["dags"]["covid_spark_weekly"].kwargs["schedule"].split())
    assert len(minutes) == len(hours) == 1 and len(weekdays) == 1, "once a week"
    assert dag_objects["dags"]["covid_spark_score_arrivals"].kwargs["schedule"].total_seconds() <= 3600


def submit_position(argv: list[str]) -> int:
    return next(i for i, word in enumerate(argv) if os.path.basename(word) == "spark-submit")


def cron_jobs() -> tuple[dict[str, str], dict[str, tuple[list[set[int]], list]]]:
    """The environment and, per job script (preprocess, train, predict), its schedule and commands."""
    env, lines = read_crontab()
    jobs = {}
    for fields, command in lines:
        assert not unescaped_percent(command), "cron turns an unescaped % into a newline"
        commands = shell_commands(command.replace("\\%", "%"))   # what cron hands to the shell
        first = next(c for c in commands if any(os.path.basename(w) == "spark-submit" for w in c.argv))
        submit = parse_spark_submit(first.argv[submit_position(first.argv):])
        jobs[os.path.basename(submit.application)[:-3]] = (parse_schedule(fields), commands)
    return env, jobs


def test_cron_appends_nightly_trains_weekly_and_scores_arrivals_often():
    _, jobs = cron_jobs()
    assert set(jobs) == {"preprocess", "train", "predict"}
    minutes, hours, days, months, weekdays = jobs["preprocess"][0]
    assert len(minutes) == len(hours) == 1 and weekdays >= set(range(7)) and days == set(range(1, 32))
    minutes, hours, _, _, weekdays = jobs["train"][0]
    assert len(minutes) == len(hours) == 1 and len(weekdays) == 1, "once a week"
    assert len(jobs["predict"][0][0]) >= 4 and jobs["predict"][0][1] == set(range(24)), "several times an hour"


def test_cron_commands_lock_log_and_submit_from_the_checkout():
    env, jobs = cron_jobs()
    venv_bin = os.path.join(env["COVID_SPARK_HOME"], ".venv", "bin")
    assert env["PATH"].split(":")[0] == venv_bin
    assert env["PYSPARK_PYTHON"] == env["PYSPARK_DRIVER_PYTHON"] == os.path.join(venv_bin, "python")
    for name, (_, commands) in jobs.items():
        assert [c.after for c in commands[1:]] == ["&&"] * (len(commands) - 1), name
        cd = commands[0]
        assert cd.argv[0] == "cd" and Template(cd.argv[1]).substitute(env) == env["COVID_SPARK_HOME"]
        made = [word for c in commands if c.argv[:2] == ["mkdir", "-p"] for word in c.argv[2:]]
        submits = [c for c in commands if any(os.path.basename(w) == "spark-submit" for w in c.argv)]
        assert submits[0].argv[0] == "flock" and "-n" in submits[0].argv[1:submit_position(submits[0].argv)], name
        for command in submits:
            (append, log), (stderr, target) = command.redirects
            assert (append, stderr, target) == (">>", "2>&", "1") and "$(date +%F)" in log
            assert os.path.dirname(log) in made


def test_cron_commands_give_the_jobs_valid_arguments():
    env, jobs = cron_jobs()
    parsed = {}
    for name, (_, commands) in jobs.items():
        for command in commands:
            if any(os.path.basename(w) == "spark-submit" for w in command.argv):
                submit = parse_spark_submit(command.argv[submit_position(command.argv):])
                master = urlsplit(Template(submit.options["--master"]).substitute(env))
                assert master.scheme == "spark" and master.port == 7077
                properties = submit.options["--properties-file"]
                with open(os.path.join(REPO, properties), encoding="utf-8") as handle:
                    assert not any(line.split()[:1] == ["spark.master"] for line in handle), "--master decides"
                job, args = _job_args(os.path.join(REPO, submit.application),
                                      [Template(word).safe_substitute(env) for word in submit.app_args])
                parsed[job] = args
    assert parsed["preprocess"].append and parsed["preprocess"].input == [env["XRAYS"]]
    assert parsed["preprocess"].output == parsed["train"].dataset == parsed["evaluate"].dataset == env["DATASET"]
    assert "$(date +%F)" in parsed["train"].model_dir and parsed["train"].model_dir == parsed["evaluate"].model_dir
    assert parsed["predict"].watch == env["INCOMING"] and parsed["predict"].once
    _, commands = jobs["train"]
    assert commands[-1].argv[:2] == ["ln", "-sfn"] and commands[-1].argv[-1] == parsed["predict"].model_dir
