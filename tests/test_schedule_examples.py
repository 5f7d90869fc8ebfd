"""examples/: the cron line and the Airflow DAG call jobs/pipeline.py with arguments it accepts.

Airflow is not installed: the DAG file is parsed with ``ast``, then run against two stub modules
that record what the DAG builds (operators, their arguments, their order). The cron file is read
as cron reads it (assignments, five time fields expanded to the values they select, a command), and
the command split into simple commands and spark-submit's options by tests/structure.py.
"""
from __future__ import annotations

import ast
import os
import runpy
import sys
import types
from string import Template
from urllib.parse import urlsplit

import pytest

from covid_spark.stages.pipeline import STAGES
from jobs.pipeline import parse_args
from tests.structure import parse_spark_submit, shell_commands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAG_FILE = os.path.join(REPO, "examples", "airflow", "covid_spark_dag.py")
CRON_FILE = os.path.join(REPO, "examples", "cron", "covid-spark.cron")
OPERATOR_MODULE = "airflow.providers.apache.spark.operators.spark_submit"


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
    """Stands in for SparkSubmitOperator: keeps its arguments and its downstream tasks."""

    def __init__(self, registry: list, **kwargs):
        self.kwargs, self.downstream = kwargs, []
        registry.append(self)

    def __rshift__(self, other):
        self.downstream.append(other)
        return other


class _Dag:
    def __init__(self, registry: list, **kwargs):
        self.kwargs = kwargs
        registry.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def dag_objects(monkeypatch) -> dict:
    """Run the DAG file with stub airflow modules; COVID_SPARK_HOME points at this checkout."""
    operators, dags = [], []
    airflow = types.ModuleType("airflow")
    airflow.DAG = lambda **kwargs: _Dag(dags, **kwargs)
    operator_module = types.ModuleType(OPERATOR_MODULE)
    operator_module.SparkSubmitOperator = lambda **kwargs: _Operator(operators, **kwargs)
    modules = {"airflow": airflow, OPERATOR_MODULE: operator_module}
    for name in ("airflow.providers", "airflow.providers.apache", "airflow.providers.apache.spark",
                 "airflow.providers.apache.spark.operators"):
        modules[name] = types.ModuleType(name)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("COVID_SPARK_HOME", REPO)
    runpy.run_path(DAG_FILE)
    assert len(dags) == 1, "the file should define one DAG"
    return {"operators": operators, "dag": dags[0]}


def _in_repo(path: str) -> str:
    relative = os.path.relpath(path, REPO)
    assert not relative.startswith(".."), f"{path} is outside the checkout"
    return relative


def test_dag_applications_and_properties_exist_in_the_repo(dag_objects):
    for op in dag_objects["operators"]:
        assert os.path.isfile(op.kwargs["application"]), _in_repo(op.kwargs["application"])
        assert _in_repo(op.kwargs["application"]) == os.path.join("jobs", "pipeline.py")
        if op.kwargs.get("properties_file"):
            assert os.path.isfile(op.kwargs["properties_file"]), _in_repo(op.kwargs["properties_file"])


def test_dag_stages_are_valid_cover_the_pipeline_and_run_in_order(dag_objects):
    operators = dag_objects["operators"]
    stages_of = {}
    for op in operators:
        args = parse_args([str(a) for a in op.kwargs["application_args"]])   # the job accepts them
        stages = args.stages.split(",")
        assert set(stages) <= set(STAGES), f"{op.kwargs['task_id']}: unknown stage in {args.stages!r}"
        assert "{{ ds }}" in args.run_dir, "one run directory per logical date"
        stages_of[op] = stages
    covered = [s for op in operators for s in stages_of[op]]
    assert sorted(covered) == sorted(STAGES), covered
    if len(operators) > 1:
        first = next(op for op in operators if stages_of[op][0] == STAGES[0])
        order, op = [], first
        while op is not None:
            order += stages_of[op]
            op = op.downstream[0] if op.downstream else None
        assert order == list(STAGES)


def test_dag_retries_and_does_not_overlap(dag_objects):
    dag = dag_objects["dag"].kwargs
    assert dag.get("max_active_runs") == 1
    default_retries = dag.get("default_args", {}).get("retries", 0)
    for op in dag_objects["operators"]:
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


def test_cron_runs_the_pipeline_once_a_night():
    _, jobs = read_crontab()
    assert len(jobs) == 1, jobs
    minutes, hours, days, months, weekdays = parse_schedule(jobs[0][0])
    assert len(minutes) == 1 and len(hours) == 1, "once a day"
    assert days == set(range(1, 32)) and months == set(range(1, 13)) and weekdays >= set(range(7)), "every day"
    assert not unescaped_percent(jobs[0][1]), "cron turns an unescaped % into a newline"


def test_dag_schedule_is_a_valid_cron_expression(dag_objects):
    schedule = dag_objects["dag"].kwargs["schedule"]
    minutes, hours, *_ = parse_schedule(schedule.split())
    assert len(minutes) == 1 and len(hours) == 1, "nightly"


def cron_commands() -> tuple[dict[str, str], list]:
    env, jobs = read_crontab()
    command = jobs[0][1].replace("\\%", "%")   # what cron hands to the shell
    return env, shell_commands(command)


def submit_position(argv: list[str]) -> int:
    return next(i for i, word in enumerate(argv) if os.path.basename(word) == "spark-submit")


def test_cron_command_locks_logs_and_submits_from_the_checkout():
    env, commands = cron_commands()
    assert [c.after for c in commands[1:]] == ["&&"] * (len(commands) - 1), "each step only after the previous one worked"
    cd, *_, last = commands
    assert cd.argv[0] == "cd" and Template(cd.argv[1]).substitute(env) == env["COVID_SPARK_HOME"]
    # flock -n: a night whose predecessor still runs is skipped, not queued behind it.
    at = submit_position(last.argv)
    assert last.argv[0] == "flock" and "-n" in last.argv[1:at]
    # stdout and stderr appended to a dated log in a folder an earlier step creates.
    (append, log), (stderr, target) = last.redirects
    assert (append, stderr, target) == (">>", "2>&", "1")
    assert "$(date +%F)" in log
    made = [word for c in commands if c.argv[:2] == ["mkdir", "-p"] for word in c.argv[2:]]
    assert os.path.dirname(log) in made
    # cron does not expand variables in its assignments: the venv's bin, first on PATH, is literal.
    venv_bin = os.path.join(env["COVID_SPARK_HOME"], ".venv", "bin")
    assert env["PATH"].split(":")[0] == venv_bin
    assert env["PYSPARK_PYTHON"] == env["PYSPARK_DRIVER_PYTHON"] == os.path.join(venv_bin, "python")


def test_cron_command_gives_the_pipeline_valid_arguments():
    env, commands = cron_commands()
    submit = parse_spark_submit(commands[-1].argv[submit_position(commands[-1].argv):])
    master = urlsplit(Template(submit.options["--master"]).substitute(env))
    assert master.scheme == "spark" and master.port == 7077
    properties = submit.options["--properties-file"]
    assert os.path.isfile(os.path.join(REPO, properties)), properties
    with open(os.path.join(REPO, properties), encoding="utf-8") as handle:
        assert not any(line.split()[:1] == ["spark.master"] for line in handle), "--master decides"
    assert submit.application == "jobs/pipeline.py" and os.path.isfile(os.path.join(REPO, submit.application))
    args = parse_args([Template(word).safe_substitute(env) for word in submit.app_args])
    assert args.input == [env["XRAYS"]]
    assert "$(date +%F)" in args.run_dir, "one dated run directory per night"
