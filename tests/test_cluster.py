"""The jobs on a real Spark standalone cluster (a master and two 1-core workers on 127.0.0.1).

Every test here but the first (a unit test of the Horovod ranks' environment) is marked
``slow`` and ``cluster``.

The code reaches the executors only as the package wheel shipped with ``--py-files``: the .venv
has covid_spark installed in editable mode, so the executors run the venv's Python without
``site`` (no .pth files) and could not import the checkout even if they wanted to.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess

import pytest

from covid_spark.constants import CLASSES

# Every test here runs or prepares Horovod ranks (and the cluster runs the pinned stack's .venv).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("horovod") is None,
    reason="Horovod is not installed: the current stack has none (README 'Two stacks'); these run on the pinned one")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(REPO, ".venv")
PY = os.path.join(VENV, "bin", "python")
SUBMIT_TIMEOUT = 420

# Where the executors and the Horovod ranks import covid_spark from. The ranks are launched by
# covid_spark.stages.train.run_training itself (on a real dataset); only the function they run is swapped.
PROBE = '''
import json, os, sys
import horovod.spark
from pyspark.sql import SparkSession
from covid_spark.config import load_config, override
from covid_spark.stages.train import run_training

dataset, model_dir = sys.argv[1], sys.argv[2]


def origin(_=None):
    import covid_spark
    return {"file": os.path.abspath(covid_spark.__file__), "no_site": sys.flags.no_site}


class Launched(Exception):
    pass


def launch_origin(fn, args=(), **kwargs):   # what run_training passes, with origin as the body
    launch_origin.ranks = real_run(origin, **kwargs)
    raise Launched


real_run, horovod.spark.run = horovod.spark.run, launch_origin
spark = SparkSession.builder.appName("covid-spark import probe").getOrCreate()
try:
    executors = spark.sparkContext.parallelize(range(2), 2).map(origin).collect()
    try:
        run_training(spark, dataset, model_dir, override(load_config(), "train", {"num_proc": 2, "batch_size": 4}))
    except Launched:
        pass
finally:
    spark.stop()
print("ORIGIN " + json.dumps({"executors": executors, "ranks": launch_origin.ranks}))
'''


class _FakeContext:
    """Just enough SparkContext for rank_env: the conf spark-submit sets for --py-files."""

    def __init__(self, py_files: str):
        self.conf = {"spark.submit.pyFiles": py_files} if py_files else {}

    def getConf(self):
        return self

    def get(self, key, default=None):
        return self.conf.get(key, default)


def test_rank_env_puts_the_executors_copies_of_shipped_files_first(monkeypatch):
    from covid_spark.engines.horovod import rank_env

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/driver/dist/covid_spark.zip", "/spark/python"]))
    env = rank_env(_FakeContext("file:/driver/dist/covid_spark.zip,hdfs://nn/deps/extra.zip"), 3)
    assert env["PYTHONPATH"].split(os.pathsep) == ["covid_spark.zip", "extra.zip",
                                                   "/driver/dist/covid_spark.zip", "/spark/python"]
    assert env["OMP_NUM_THREADS"] == "3" and env["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.delenv("PYTHONPATH")
    assert "PYTHONPATH" not in rank_env(_FakeContext(""), 1)   # nothing shipped: the executor's own


def _need_tools() -> None:
    for tool in ("java", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not on PATH")
    if not os.path.exists(os.path.join(VENV, "bin", "spark-class")):
        pytest.skip(f"no pip pyspark in {VENV}: run make setup")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master and two workers started by scripts/cluster.sh, stopped in ``finally``."""
    _need_tools()
    state = str(tmp_path_factory.mktemp("cluster") / "state")
    env = dict(os.environ, CLUSTER_DIR=state, VENV=VENV)
    script = os.path.join(REPO, "scripts", "cluster.sh")
    try:
        up = subprocess.run(["bash", script, "up"], env=env, capture_output=True, text=True, timeout=240)
        assert up.returncode == 0, f"cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
        with open(os.path.join(state, "master-url"), encoding="utf-8") as handle:
            url = handle.read().strip()
        yield {"url": url, "dir": state, "env": env, "script": script}
    finally:
        subprocess.run(["bash", script, "down"], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> dict:
    """The package wheel (built from a copy of the sources) and the executors' Python wrapper."""
    root = tmp_path_factory.mktemp("shipped")
    src = root / "src"
    src.mkdir()
    shutil.copy(os.path.join(REPO, "setup.py"), src)
    shutil.copytree(os.path.join(REPO, "covid_spark"), src / "covid_spark",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(src), "-w", str(root / "dist")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = glob.glob(str(root / "dist" / "covid_spark-*.whl"))
    # PySpark 3.5 puts only .zip/.egg/.jar files from --py-files on the executors' sys.path;
    # a pure-Python wheel is a zip archive, so it is shipped under a .zip name.
    shipped_zip = os.path.join(root, os.path.basename(wheel)[:-len(".whl")] + ".zip")
    shutil.copy(wheel, shipped_zip)
    site_packages = subprocess.run([PY, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    wrapper = root / "executor-python"
    wrapper.write_text("#!/bin/sh\n"
                       "# The venv's Python without site: no .pth files, so no editable install.\n"
                       f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site_packages}"\n'
                       "export PYTHONPATH\n"
                       f'exec {PY} -S "$@"\n')
    wrapper.chmod(0o755)
    return {"zip": shipped_zip, "python": str(wrapper), "root": str(root)}


def spark_submit(cluster: dict, shipped: dict, script: str, *args: str) -> str:
    """Run ``spark-submit`` against the cluster; return stdout, fail with the log tail."""
    command = [os.path.join(VENV, "bin", "spark-submit"), "--master", cluster["url"],
               "--properties-file", os.path.join(REPO, "conf", "spark-standalone.conf"),
               "--py-files", shipped["zip"],
               # The executors' interpreter: PySpark 3.5 sends the driver's PYSPARK_PYTHON, which
               # spark-submit sets from this (spark.executorEnv.PYSPARK_PYTHON would not choose it).
               "--conf", f"spark.pyspark.python={shipped['python']}",
               "--conf", f"spark.pyspark.driver.python={PY}",
               "--conf", "spark.ui.enabled=false",
               script, *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "PYTHONPATH", "SPARK_"))}
    env.update(PATH=os.path.join(VENV, "bin") + os.pathsep + os.environ.get("PATH", ""),
               SPARK_LOCAL_IP="127.0.0.1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT)
    assert done.returncode == 0, (f"{os.path.basename(script)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def cluster_run(subset_dir, cluster, shipped, tmp_path_factory) -> dict:
    """preprocess → train (2 Horovod ranks, 1 epoch) → evaluate, each a spark-submit on the cluster."""
    root = tmp_path_factory.mktemp("cluster-run")
    dataset, model_dir = str(root / "dataset"), str(root / "model")
    jobs = os.path.join(REPO, "jobs")
    spark_submit(cluster, shipped, os.path.join(jobs, "preprocess.py"), "--input", subset_dir,
                 "--output", dataset, "--min-row-groups", "2", "--val-fraction", "0.2", "--test-fraction", "0.3")
    spark_submit(cluster, shipped, os.path.join(jobs, "train.py"), "--dataset", dataset, "--model-dir", model_dir,
                 "--epochs", "1", "--batch-size", "4", "--num-proc", "2", "--model", "compact")
    spark_submit(cluster, shipped, os.path.join(jobs, "evaluate.py"), "--dataset", dataset, "--model-dir", model_dir)
    return {"dataset": dataset, "model_dir": model_dir}


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.slow
@pytest.mark.cluster
def test_cluster_script_reports_two_workers(cluster):
    status = subprocess.run(["bash", cluster["script"], "status"], env=cluster["env"],
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert cluster["url"] in status.stdout and "2 alive" in status.stdout
    assert cluster["url"].startswith("spark://127.0.0.1:")


@pytest.mark.slow
@pytest.mark.cluster
def test_executors_and_horovod_ranks_import_the_shipped_wheel(cluster_run, cluster, shipped, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = spark_submit(cluster, shipped, str(probe), cluster_run["dataset"], str(tmp_path / "model"))
    origins = json.loads(next(line for line in out.splitlines() if line.startswith("ORIGIN "))[len("ORIGIN "):])
    name = os.path.basename(shipped["zip"])
    workers = os.path.realpath(cluster["dir"])
    for kind in ("executors", "ranks"):
        assert len(origins[kind]) == 2, origins
        for where in origins[kind]:
            # The executor's own copy of the shipped file, in its work dir under a worker's dir.
            assert where["file"].startswith(workers + os.sep), (kind, where)
            assert f"{os.sep}{name}{os.sep}covid_spark{os.sep}__init__.py" in where["file"], (kind, where)
            assert not where["file"].startswith(os.path.realpath(REPO) + os.sep), (kind, where)
            assert where["no_site"] == 1, (kind, where)


@pytest.mark.slow
@pytest.mark.cluster
def test_preprocess_on_the_cluster_reconciles(cluster_run, subset_dir):
    summary = _read_json(os.path.join(cluster_run["dataset"], "_summary.json"))
    with open(os.path.join(subset_dir, "manifest.csv"), encoding="utf-8") as handle:
        manifest_rows = sum(1 for _ in handle) - 1
    assert summary["inputs"] == manifest_rows
    assert summary["inputs"] == summary["written"] + len(summary["rejected"]) + len(summary["skipped"])
    assert [os.path.basename(r["path"]) for r in summary["rejected"]] == ["broken.jpg"]
    assert [os.path.basename(s["path"]) for s in summary["skipped"]] == [".DS_Store"]
    assert sum(summary["per_split"].values()) == summary["written"] == manifest_rows - 2
    assert all(summary["row_groups"][s] >= 2 for s in ("train", "val", "test"))


@pytest.mark.slow
@pytest.mark.cluster
def test_train_ran_two_horovod_ranks_on_the_cluster(cluster_run, cluster):
    run = _read_json(os.path.join(cluster_run["model_dir"], "run.json"))
    assert run["num_proc"] == 2
    assert run["spark_master"].startswith("spark://") and run["spark_master"] == cluster["url"]
    assert run["epochs_run"] == 1 and run["model"] == "compact"
    assert os.path.getsize(os.path.join(cluster_run["model_dir"], "model.keras")) > 0
    history = _read_json(os.path.join(cluster_run["model_dir"], "history.json"))
    assert len(history["loss"]) == 1


@pytest.mark.slow
@pytest.mark.cluster
def test_evaluate_on_the_cluster_covers_the_test_split(cluster_run):
    summary = _read_json(os.path.join(cluster_run["dataset"], "_summary.json"))
    metrics = _read_json(os.path.join(cluster_run["model_dir"], "metrics.json"))
    for key in ("n", "accuracy", "loss", "macro_f1", "per_class", "confusion_matrix", "ci95", "ece"):
        assert key in metrics, key
    matrix = metrics["confusion_matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert sum(map(sum, matrix)) == summary["per_split"]["test"] == metrics["n"]
    for i, name in enumerate(CLASSES):
        assert sum(matrix[i]) == summary["per_split_class"]["test"].get(name, 0)
