"""The package's layers, enforced: lower layers never import higher ones (at the top of a module or
inside a function), the import graph has no circle, a function-level import of the package's own
modules says why on its line, stages do not import each other, no module outgrows its reader, and
no stage or executor module pulls in a heavy library it does not use at import.

The order (docs/architecture.md explains it): constants and errors → inputs → data → models →
config, evaluation maths and reports → training core and tracking → engines → stages → cli → jobs.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = (
    ("covid_spark", "covid_spark.constants", "covid_spark.errors"),
    ("covid_spark.inputs",),
    ("covid_spark.data",),
    ("covid_spark.models", "covid_spark.lungs", "covid_spark.audit"),
    ("covid_spark.config", "covid_spark.evaluation", "covid_spark.report"),
    ("covid_spark.training", "covid_spark.tracking"),
    ("covid_spark.engines",),
    ("covid_spark.stages",),
    ("covid_spark.cli",),
    ("jobs",),
)
MAX_MODULE_LINES = 450
# A stage's own executor or rank module is part of it; the pipeline runs the stages.
STAGE_PARTS = {"covid_spark.stages.train": {"covid_spark.stages.train_rank"},
               "covid_spark.stages.preprocess": {"covid_spark.stages.preprocess_tasks"},
               "covid_spark.stages.predict": {"covid_spark.stages.predict_tasks"},
               # An increment of the preprocess stage, and predict over a watched folder, reuse their stage's steps.
               "covid_spark.stages.append": {"covid_spark.stages.preprocess", "covid_spark.stages.preprocess_tasks"},
               "covid_spark.stages.watch": {"covid_spark.stages.predict", "covid_spark.stages.predict_tasks"}}


def modules() -> dict[str, str]:
    """Module name → file, for the package and the jobs."""
    found = {}
    for top in ("covid_spark", "jobs"):
        for root, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in files:
                if name.endswith(".py"):
                    parts = os.path.relpath(os.path.join(root, name), REPO)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    found[".".join(parts)] = os.path.join(root, name)
    return found


def imports(name: str, path: str, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import in ``path``."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in known and candidate != name:
                out.append((candidate, node.lineno, id(node) in inside))
                break
    return out


def layer_of(name: str) -> int:
    best = None
    for index, members in enumerate(LAYERS):
        for member in members:
            if name == member or name.startswith(member + "."):
                if best is None or len(member) > best[1]:
                    best = (index, len(member))
    assert best is not None, f"{name} belongs to no layer: add its package to LAYERS"
    return best[0]


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_every_module_belongs_to_a_layer_and_imports_only_its_own_or_lower_layers():
    upward = [f"{name}:{line} imports {target}" for name, edges in graph().items()
              for target, line, _ in edges if layer_of(target) > layer_of(name)]
    assert upward == []


def test_the_import_graph_has_no_circle_counting_imports_inside_functions():
    edges = {name: {target for target, _, _ in targets} for name, targets in graph().items()}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                circles.append(trail[trail.index(target):] + [target] if target in trail else [node, target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_a_function_level_import_of_our_own_modules_says_why():
    found = modules()
    silent = []
    for name, targets in graph().items():
        with open(found[name], encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        silent += [f"{name}:{line} {lines[line - 1].strip()}" for _, line, inside in targets
                   if inside and "#" not in lines[line - 1]]
    assert silent == []


def test_stages_do_not_import_each_other():
    crossing = [f"{name} imports {target}" for name, targets in graph().items()
                if name.startswith("covid_spark.stages.") and name != "covid_spark.stages.pipeline"
                for target, _, _ in targets
                if target.startswith("covid_spark.stages.") and target not in STAGE_PARTS.get(name, ())]
    assert crossing == []


def test_no_module_is_longer_than_a_reader_holds():
    long = {name: n for name, path in modules().items()
            if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_MODULE_LINES}
    assert long == {}


def test_the_layer_checks_see_a_circle_and_an_upward_import(tmp_path):
    """The checks above can fail: a planted upward import is found by the same functions."""
    package = tmp_path / "covid_spark" / "inputs"
    package.mkdir(parents=True)
    (package / "bad.py").write_text("def f():\n    from covid_spark.stages import pipeline\n")
    edges = imports("covid_spark.inputs.bad", str(package / "bad.py"), {"covid_spark.stages.pipeline"})
    assert edges == [("covid_spark.stages.pipeline", 2, True)]
    assert layer_of("covid_spark.stages.pipeline") > layer_of("covid_spark.inputs.bad")


def test_every_stage_function_reads_in_one_screen():
    """A stage's steps are named functions: none longer than about 80 lines, docstring included."""
    long = []
    for name, path in modules().items():
        if name.startswith("covid_spark.stages."):
            with open(path, encoding="utf-8") as handle:
                tree = ast.parse(handle.read())
            long += [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 80]
    assert long == []


# Libraries a stage's driver or its executor code has no use for at import: each costs every process that
# imports it seconds and tens of MiB (scikit-learn with pandas and scipy.stats: about 130 MiB).
NOT_AT_IMPORT = ("sklearn", "pandas", "tensorflow", "keras", "matplotlib", "mlflow", "horovod")


def test_stage_and_executor_modules_import_no_heavy_library():
    """A stage module, and what Spark ships to its executors, imports none of NOT_AT_IMPORT (they come
    inside the functions that use them)."""
    script = ("import importlib, json, sys\n"
              "for name in sys.argv[1:]:\n"
              "    importlib.import_module(name)\n"
              f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({NOT_AT_IMPORT!r}))))\n")
    for module in ("covid_spark.stages.preprocess", "covid_spark.stages.preprocess_tasks",
                   "covid_spark.stages.predict", "covid_spark.stages.predict_tasks"):
        out = subprocess.run([sys.executable, "-c", script, module], cwd=REPO, capture_output=True, text=True,
                             check=True)
        assert json.loads(out.stdout) == [], module
