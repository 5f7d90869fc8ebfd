"""examples/: the cron line and the Airflow DAG call jobs/pipeline.py with arguments it accepts.

Airflow is not installed: the DAG file is parsed with ``ast``, then run against two stub modules
that record what the DAG builds (operators, their arguments, their order).
"""
from __future__ import annotations

import ast
import os
import re
import runpy
import shlex
import sys
import types

import pytest

from covid_spark.pipeline import STAGES
from jobs.pipeline import parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAG_FILE = os.path.join(REPO, "examples", "airflow", "covid_spark_dag.py")
CRON_FILE = os.path.join(REPO, "examples", "cron", "covid-spark.cron")
OPERATOR_MODULE = "airflow.providers.apache.spark.operators.spark_submit"

# One cron time field: *, a number or range, optionally stepped, comma-separated; or a name.
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$|^[A-Za-z]{3}(-[A-Za-z]{3})?$")
CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


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


def _cron_jobs() -> list[str]:
    with open(CRON_FILE, encoding="utf-8") as handle:
        lines = [line.strip() for line in handle]
    return [line for line in lines if line and not line.startswith("#")
            and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\s*=", line)]


def test_cron_line_has_five_schedule_fields_and_runs_the_pipeline():
    jobs = _cron_jobs()
    assert len(jobs) == 1, jobs
    fields = jobs[0].split(None, 5)
    assert len(fields) == 6, "5 time fields and a command"
    for field, (low, high) in zip(fields[:5], CRON_RANGES):
        assert CRON_FIELD.match(field), f"bad cron field {field!r}"
        for number in map(int, re.findall(r"(?<![/\d])\d+", field)):
            assert low <= number <= high, f"{number} outside {low}-{high} in {field!r}"
    command = fields[5]
    assert re.search(r"(?<!\\)%", command) is None, "cron turns an unescaped % into a newline"
    assert "flock" in command and "jobs/pipeline.py" in command


def test_cron_command_gives_the_pipeline_valid_arguments():
    command = _cron_jobs()[0].split(None, 5)[5]
    words = shlex.split(command.split(">>")[0])
    assert "flock" in words
    submit = next(i for i, word in enumerate(words) if os.path.basename(word) == "spark-submit")
    submit = words[submit:]
    assert "--master" in submit and "spark.master" not in command
    assert os.path.isfile(os.path.join(REPO, submit[submit.index("--properties-file") + 1]))
    assert os.path.isfile(os.path.join(REPO, "jobs", "pipeline.py"))
    args = parse_args(submit[submit.index("jobs/pipeline.py") + 1:])
    assert "date +" in args.run_dir, "a dated run id"
