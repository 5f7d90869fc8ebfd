"""The jobs on a real Spark standalone cluster (a master and two 1-core workers on 127.0.0.1), with
each engine: Horovod (the pinned stack) and tf-distribute (both stacks).

Every test here but the first (a unit test of the Horovod ranks' environment) is marked
``slow`` and ``cluster``. The cluster and the jobs run the stack of the Python that runs pytest
(``make test`` or ``make test STACK=current``).

The code reaches the executors only as the package wheel shipped with ``--py-files``: the venv
has covid_spark installed in editable mode, so the executors run the venv's Python without
``site`` (no .pth files) and could not import the checkout even if they wanted to.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from covid_spark.constants import CLASSES

HAS_HOROVOD = importlib.util.find_spec("horovod") is not None
NO_HOROVOD = "Horovod is not installed: the current stack has none (docs/stacks.md); it runs on the pinned one"
ENGINES = ("horovod", "tf-distribute")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = sys.prefix  # the venv that runs pytest: .venv (pinned) or .venv-current
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
    paths = [site_packages]
    shim = os.path.join(site_packages, "setuptools", "_distutils")
    if sys.version_info >= (3, 12) and os.path.isdir(shim):
        # Python 3.12 has no distutils, which Petastorm imports; setuptools provides it through a .pth file
        # (distutils-precedence.pth) that -S skips, so the same package is put on the path by its name.
        (root / "distutils-shim").mkdir()
        os.symlink(shim, root / "distutils-shim" / "distutils")
        paths.insert(0, str(root / "distutils-shim"))
    wrapper = root / "executor-python"
    wrapper.write_text("#!/bin/sh\n"
                       "# The venv's Python without site: no .pth files, so no editable install.\n"
                       f'PYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{os.pathsep.join(paths)}"\n'
                       "export PYTHONPATH\n"
                       f'exec {PY} -S "$@"\n')
    wrapper.chmod(0o755)
    return {"zip": shipped_zip, "python": str(wrapper), "root": str(root)}


def _submit_command(cluster: dict, shipped: dict, script: str, *args: str) -> tuple[list[str], dict]:
    command = [os.path.join(VENV, "bin", "spark-submit"), "--master", cluster["url"],
               "--properties-file", os.path.join(REPO, "conf", "spark-standalone.conf"),
               "--py-files", shipped["zip"],
               # The executors' interpreter: PySpark sends the driver's PYSPARK_PYTHON, which
               # spark-submit sets from this (spark.executorEnv.PYSPARK_PYTHON would not choose it).
               "--conf", f"spark.pyspark.python={shipped['python']}",
               "--conf", f"spark.pyspark.driver.python={PY}",
               "--conf", "spark.ui.enabled=false",
               script, *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "PYTHONPATH", "SPARK_"))}
    env.update(PATH=os.path.join(VENV, "bin") + os.pathsep + os.environ.get("PATH", ""),
               SPARK_LOCAL_IP="127.0.0.1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONWARNINGS="ignore::FutureWarning,ignore::DeprecationWarning")
    return command, env


def spark_submit(cluster: dict, shipped: dict, script: str, *args: str) -> str:
    """Run ``spark-submit`` against the cluster; return stdout, fail with the log tail."""
    command, env = _submit_command(cluster, shipped, script, *args)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT)
    assert done.returncode == 0, (f"{os.path.basename(script)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def cluster_dataset(subset_dir, cluster, shipped, tmp_path_factory) -> str:
    """The subset preprocessed by a spark-submit on the cluster (2 row groups per split)."""
    dataset = str(tmp_path_factory.mktemp("cluster-dataset") / "dataset")
    spark_submit(cluster, shipped, os.path.join(REPO, "jobs", "preprocess.py"), "--input", subset_dir,
                 "--output", dataset, "--min-row-groups", "2", "--val-fraction", "0.2", "--test-fraction", "0.3")
    return dataset


TRAIN_ARGS = ("--batch-size", "4", "--num-proc", "2", "--model", "compact")


@pytest.fixture(scope="module", params=ENGINES)
def cluster_run(request, cluster_dataset, cluster, shipped, tmp_path_factory) -> dict:
    """train (2 ranks of the engine) → evaluate, each a spark-submit on the cluster. Horovod trains 1 epoch;
    tf-distribute's model is the one its fault case trained (``tf_distribute_fault``: killed, then resumed)."""
    engine = request.param
    if engine == "tf-distribute":
        return request.getfixturevalue("tf_distribute_fault")
    if not HAS_HOROVOD:
        pytest.skip(NO_HOROVOD)
    model_dir = str(tmp_path_factory.mktemp(f"cluster-{engine}") / "model")
    jobs = os.path.join(REPO, "jobs")
    spark_submit(cluster, shipped, os.path.join(jobs, "train.py"), "--dataset", cluster_dataset,
                 "--model-dir", model_dir, "--epochs", "1", "--engine", engine, *TRAIN_ARGS)
    spark_submit(cluster, shipped, os.path.join(jobs, "evaluate.py"), "--dataset", cluster_dataset,
                 "--model-dir", model_dir)
    return {"dataset": cluster_dataset, "model_dir": model_dir, "engine": engine, "epochs": 1}


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


def _assert_shipped_origins(origins: list[dict], cluster: dict, shipped: dict, kind: str, no_site: bool) -> None:
    name = os.path.basename(shipped["zip"])
    workers = os.path.realpath(cluster["dir"])
    assert len(origins) == 2, origins
    for where in origins:
        # The executor's own copy of the shipped file, in its work dir under a worker's dir.
        assert where["file"].startswith(workers + os.sep), (kind, where)
        assert f"{os.sep}{name}{os.sep}covid_spark{os.sep}__init__.py" in where["file"], (kind, where)
        assert not where["file"].startswith(os.path.realpath(REPO) + os.sep), (kind, where)
        if no_site:
            assert where["no_site"] == 1, (kind, where)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.skipif(not HAS_HOROVOD, reason=NO_HOROVOD)
def test_executors_and_horovod_ranks_import_the_shipped_wheel(cluster_dataset, cluster, shipped, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = spark_submit(cluster, shipped, str(probe), cluster_dataset, str(tmp_path / "model"))
    origins = json.loads(next(line for line in out.splitlines() if line.startswith("ORIGIN "))[len("ORIGIN "):])
    _assert_shipped_origins(origins["executors"], cluster, shipped, "executors", no_site=True)
    _assert_shipped_origins(origins["ranks"], cluster, shipped, "ranks", no_site=True)


@pytest.mark.slow
@pytest.mark.cluster
def test_preprocess_on_the_cluster_reconciles(cluster_dataset, subset_dir):
    summary = _read_json(os.path.join(cluster_dataset, "_summary.json"))
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
def test_train_ran_two_ranks_of_the_engine_on_the_cluster(cluster_run, cluster):
    run = _read_json(os.path.join(cluster_run["model_dir"], "run.json"))
    assert run["engine"] == cluster_run["engine"] and run["num_proc"] == 2
    assert run["spark_master"].startswith("spark://") and run["spark_master"] == cluster["url"]
    assert run["epochs_run"] == cluster_run["epochs"] and run["model"] == "compact"
    assert run["ranks_in_sync"] is True  # both ranks ended with the same weights
    assert os.path.getsize(os.path.join(cluster_run["model_dir"], "model.keras")) > 0
    history = _read_json(os.path.join(cluster_run["model_dir"], "history.json"))
    assert len(history["loss"]) == cluster_run["epochs"]


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


# ----------------------------------------------------------------------- tf-distribute's faults

# tf-distribute ranks started by the real launcher with a rank function of the test's: rank 1 of the first
# attempt finds its port taken by another process on its worker just before TensorFlow binds it (the
# window the engine closes as tightly as it can; see covid_spark/engines/tfdistribute.py); the launcher
# must start the stage again with new ports, after which the ranks run a collective (a sum over ranks).
PORT_PROBE = """
import json, os, sys
from pyspark.sql import SparkSession
from covid_spark.engines.tfdistribute import TFDistributeLauncher

marker = sys.argv[1]


def origin(_=None):
    import covid_spark
    return {"file": os.path.abspath(covid_spark.__file__), "no_site": sys.flags.no_site}


def rank_fn(job):
    import subprocess
    import tensorflow as tf
    from covid_spark.engines import tfdistribute

    rank = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    squatter = None
    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        port = tfdistribute._reserved.getsockname()[1]
        tfdistribute._release_port()
        # Another process on this worker takes the port; it ends when this rank's process does.
        squatter = subprocess.Popen([sys.executable, "-c",
            "import socket, sys; s = socket.socket(); s.bind(('', int(sys.argv[1]))); s.listen(); "
            "print('bound', flush=True); sys.stdin.read()", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert squatter.stdout.readline().strip() == "bound"
    context = tfdistribute.TFDistributeRank(job)
    total = context.strategy.reduce(tf.distribute.ReduceOp.SUM,
                                    context.strategy.run(lambda: tf.constant(float(rank + 1))), axis=None)
    return {"rank": context.rank, "size": context.size, "sum": float(total), **origin()}


class Job:
    threads = 1


spark = SparkSession.builder.appName("covid-spark tf-distribute port probe").getOrCreate()
try:
    executors = spark.sparkContext.parallelize(range(2), 2).map(origin).collect()
    ranks = TFDistributeLauncher(spark).run(rank_fn, Job(), 2)
finally:
    spark.stop()
print("PROBE " + json.dumps({"executors": executors, "ranks": ranks}))
"""


@pytest.mark.slow
@pytest.mark.cluster
def test_tf_distribute_ranks_import_the_wheel_and_survive_a_taken_port(cluster, shipped, tmp_path):
    probe = tmp_path / "port_probe.py"
    probe.write_text(PORT_PROBE)
    marker = tmp_path / "port-taken-once"
    command, env = _submit_command(cluster, shipped, str(probe), str(marker))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert marker.exists()  # rank 1's port was taken on the first attempt
    assert "port was taken before TensorFlow bound it; starting the ranks again with new ports (attempt 2 of 3)" \
        in done.stdout + done.stderr
    found = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("PROBE "))[len("PROBE "):])
    assert sorted(r["rank"] for r in found["ranks"]) == [0, 1] and {r["size"] for r in found["ranks"]} == {2}
    assert {r["sum"] for r in found["ranks"]} == {3.0}  # 1 + 2: the collective ran across both ranks
    _assert_shipped_origins(found["executors"], cluster, shipped, "executors", no_site=True)
    # A rank is a child process started with the executor's interpreter; it imports the executor's copy too.
    _assert_shipped_origins(found["ranks"], cluster, shipped, "ranks", no_site=False)
    assert _processes_under_workers(cluster, "rank_main") == []
    assert _processes_under_workers(cluster, "sys.stdin.read()") == []  # the squatter ended with its rank


def _worker_pids(cluster: dict) -> list[int]:
    pids = []
    for pidfile in sorted(glob.glob(os.path.join(cluster["dir"], "worker-*.pid"))):
        with open(pidfile, encoding="utf-8") as handle:
            pids.append(int(handle.read().strip()))
    return pids


def _processes_under_workers(cluster: dict, needle: str, worker: int | None = None) -> list:
    """Live processes below the workers' JVMs (executors, Python workers, ranks) whose command line holds
    ``needle``; ``worker`` (1-based) looks under that worker only."""
    import psutil

    pids = _worker_pids(cluster)
    found = []
    for pid in (pids if worker is None else [pids[worker - 1]]):
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for child in children:
            try:
                if needle in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
            except psutil.Error:  # ended while we looked
                pass
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it at once (PySpark's daemon has a process group of its own)."""
    import psutil

    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _status(cluster: dict) -> str:
    return subprocess.run(["bash", cluster["script"], "status"], env=cluster["env"], capture_output=True, text=True,
                          timeout=30).stdout


def _applications(cluster: dict) -> set[str]:
    """The ids of the applications the workers have run executors for (their work dirs)."""
    return {os.path.basename(p) for p in glob.glob(os.path.join(cluster["dir"], "worker-*", "app-*"))}


def _wait_for(predicate, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.fixture(scope="module")
def tf_distribute_fault(cluster_dataset, cluster, shipped, tmp_path_factory) -> dict:
    """tf-distribute's training on the cluster, with a fault: 2 ranks for up to 40 epochs; once the first
    epoch's checkpoint exists, worker 2 is lost: its whole process tree (the worker's JVM, its executor,
    the Python workers and the rank) is killed (SIGKILL), as when a machine goes down. What was left
    running is looked at then; the worker is started again (``cluster.sh up``), the job resumed
    (``--resume``) for one epoch more and the model evaluated, so that this one model also stands for
    the engine in ``cluster_run``. (A rank's process killed alone is reported by its task: see
    ``test_a_rank_process_that_dies_is_reported_with_its_signal`` in test_engines.py.)"""
    root = tmp_path_factory.mktemp("cluster-tf-distribute")
    model_dir = str(root / "model")
    state_file = os.path.join(model_dir, "checkpoints", "state.json")
    train = os.path.join(REPO, "jobs", "train.py")
    args = ("--dataset", cluster_dataset, "--model-dir", model_dir, "--engine", "tf-distribute", *TRAIN_ARGS)
    command, env = _submit_command(cluster, shipped, train, *args, "--epochs", "40")
    log = root / "train.log"
    before = _applications(cluster)
    with open(log, "w", encoding="utf-8") as out:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            # Once an epoch's checkpoint exists, worker 2 goes down with the rank Spark put there.
            assert _wait_for(lambda: os.path.exists(state_file) or job.poll() is not None, SUBMIT_TIMEOUT)
            assert job.poll() is None, log.read_text()[-6000:]
            (victim,) = _processes_under_workers(cluster, "rank_main", worker=2)
            rank = int(re.search(r"covid-spark-rank(\d+)-", " ".join(victim.cmdline())).group(1))
            _kill_tree(_worker_pids(cluster)[1])
            code = job.wait(timeout=SUBMIT_TIMEOUT)
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    text = log.read_text()
    apps = _applications(cluster) - before
    # Nothing of the failed application may be left: no rank, no executor (the workers end them).
    ranks_gone = _wait_for(lambda: not _processes_under_workers(cluster, "rank_main"), 60)
    executors_gone = all(_wait_for(lambda: not _processes_under_workers(cluster, app), 60) for app in apps)
    fault = {"code": code, "log": text, "rank": rank, "applications": apps,
             "ranks_left": [] if ranks_gone else [p.cmdline() for p in _processes_under_workers(cluster, "rank_main")],
             "executors_gone": executors_gone,
             "model_written": os.path.exists(os.path.join(model_dir, "model.keras")),
             "state": _read_json(state_file) if os.path.exists(state_file) else None}
    # The master drops the lost worker; `cluster.sh up` starts it again and waits until it has registered.
    fault["workers_seen"] = _wait_for(lambda: "workers: 1 alive" in _status(cluster), 60)
    restarted = subprocess.run(["bash", cluster["script"], "up"], env=cluster["env"], capture_output=True, text=True,
                               timeout=240)
    fault["restart"] = restarted.stdout + restarted.stderr
    fault["workers_after"] = _status(cluster)
    done = fault["state"]["epoch"] if fault["state"] else 0
    if code != 0 and done and restarted.returncode == 0:
        spark_submit(cluster, shipped, train, *args, "--epochs", str(done + 1), "--resume")
        spark_submit(cluster, shipped, os.path.join(REPO, "jobs", "evaluate.py"), "--dataset", cluster_dataset,
                     "--model-dir", model_dir)
    return {"dataset": cluster_dataset, "model_dir": model_dir, "engine": "tf-distribute", "epochs": done + 1,
            "fault": fault}


@pytest.mark.slow
@pytest.mark.cluster
def test_a_worker_lost_mid_training_fails_the_tf_distribute_job_naming_its_rank_and_resume_continues(
        tf_distribute_fault):
    fault, model_dir = tf_distribute_fault["fault"], tf_distribute_fault["model_dir"]
    text = fault["log"]
    assert fault["code"] != 0, text[-6000:]
    assert len(fault["applications"]) == 1, fault["applications"]
    # The last line a user reads names the rank, how it was lost and what to do.
    assert re.search(rf"RankLostError: tf-distribute: rank {fault['rank']} of 2 was lost during training "
                     rf"\(ExecutorLostFailure [^\n]*\).*rerun the train job with --resume", text), text[-6000:]
    assert fault["ranks_left"] == [] and fault["executors_gone"], fault
    assert fault["workers_seen"], fault["workers_after"]  # the master saw the worker go
    assert "worker 2 is not running: starting it again" in fault["restart"], fault["restart"]
    assert "workers: 2 alive" in fault["workers_after"], fault["restart"]
    assert not fault["model_written"]  # the failed run wrote no model

    state = fault["state"]
    done = state["epoch"]
    assert 1 <= done < 40
    run = _read_json(os.path.join(model_dir, "run.json"))
    history = _read_json(os.path.join(model_dir, "history.json"))
    assert run["resumed_from_epoch"] == done and run["epochs_run"] == done + 1 and run["engine"] == "tf-distribute"
    assert history["loss"][:done] == state["history"]["loss"] and len(history["loss"]) == done + 1
    assert run["ranks_in_sync"] is True
