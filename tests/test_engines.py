"""The training engines (issue 17): choosing one, refusing one this stack cannot run, the
driver's slot check, the pieces tf-distribute adds to the core, and a 2-rank tf-distribute training
end to end (it runs on both stacks: Horovod is not needed)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import types
import sys
import tempfile

import numpy as np
import pytest

from covid_spark.engines import registry as launch
from covid_spark.models.saved import load_model

HAS_HOROVOD = importlib.util.find_spec("horovod") is not None


def _without_horovod(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "horovod" else real(name, *a))


def test_auto_is_horovod_where_installed_else_tf_distribute(monkeypatch):
    assert launch.resolve_engine("auto") == ("horovod" if HAS_HOROVOD else "tf-distribute")
    assert launch.resolve_engine("tf-distribute") == "tf-distribute"  # runs on both stacks
    assert set(launch.ENGINES) == {"horovod", "tf-distribute"}
    _without_horovod(monkeypatch)
    assert launch.resolve_engine("auto") == "tf-distribute"
    with pytest.raises(ValueError, match="train.engine must be one of auto, horovod, tf-distribute; found 'mpi'"):
        launch.resolve_engine("mpi")


def test_horovod_where_it_is_absent_names_engine_stack_and_setup(monkeypatch):
    _without_horovod(monkeypatch)
    with pytest.raises(ValueError) as caught:
        launch.resolve_engine("horovod")
    message = str(caught.value)
    assert "train.engine 'horovod' needs Horovod" in message
    assert f"Python {sys.version.split()[0]} at {sys.prefix}" in message and "no Horovod" in message
    assert "make setup (scripts/setup_env.sh" in message and "--engine tf-distribute" in message


def test_tf_distribute_on_keras_3_without_tf_keras_is_refused(monkeypatch):
    versions = {"tensorflow": "2.20.0", "keras": "3.15.1"}
    monkeypatch.setattr(launch, "_version", lambda *dists: next((versions[d] for d in dists if d in versions), None))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tf_keras", "horovod") else real(name, *a))
    with pytest.raises(ValueError, match=r"'tf-distribute' needs the Keras 2 API .*keras-team/keras#20585"
                                         r".*TensorFlow 2\.20\.0, Keras 3\.15\.1.*make setup STACK=current"):
        launch.resolve_engine("tf-distribute")
    versions["tensorflow"] = "2.15.1"  # TensorFlow 2.15's own tf.keras is Keras 2
    assert launch.resolve_engine("tf-distribute") == "tf-distribute"


def test_the_train_job_refuses_a_missing_engine_before_spark_starts(monkeypatch, tmp_path, capsys):
    import jobs.train as job

    _without_horovod(monkeypatch)
    monkeypatch.setattr(job, "build_spark", lambda *a, **k: pytest.fail("Spark started"))
    code = job.main(["--dataset", str(tmp_path / "ds"), "--model-dir", str(tmp_path / "m"), "--engine", "horovod"])
    assert code == 2
    assert "train: train.engine 'horovod' needs Horovod" in capsys.readouterr().err


def test_the_pipeline_refuses_a_missing_engine_before_preprocessing(monkeypatch, tmp_path, capsys):
    import jobs.pipeline as job

    _without_horovod(monkeypatch)
    monkeypatch.setattr(job, "build_spark", lambda *a, **k: pytest.fail("Spark started"))
    code = job.main(["--input", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--engine", "horovod"])
    assert code == 2 and "needs Horovod" in capsys.readouterr().err


def test_fewer_task_slots_than_ranks_is_an_error_on_the_driver(spark):
    from covid_spark.engines.tfdistribute import check_slots, task_slots

    sc = spark.sparkContext
    assert task_slots(sc) == 2  # the fixture's local[2]
    assert check_slots(sc, 2, wait_s=0) == 2
    with pytest.raises(ValueError, match=r"train.num_proc is 3 but Spark offers 2 task slot\(s\).*--num-proc 2"):
        check_slots(sc, 3, wait_s=0)


def test_task_slots_fall_back_to_default_parallelism():
    from covid_spark.engines.tfdistribute import task_slots

    class Context:  # no JVM behind it: Spark's own count is unreachable
        defaultParallelism = 5
        _jsc = None

    assert task_slots(Context()) == 5


def test_class_weights_as_sample_weights_train_as_keras_class_weight():
    tf = pytest.importorskip("tensorflow")
    from covid_spark.training.core import with_class_weights

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 4)).astype(np.float32), np.array([0, 1, 2, 0] * 3)
    weights = {0: 0.5, 1: 2.0, 2: 1.25}

    def trained(**fit):
        tf.keras.utils.set_random_seed(7)
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=tf.keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy")
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(6)
        if fit.pop("as_samples", False):
            data = with_class_weights(data, weights)
        model.fit(data, epochs=2, verbose=0, shuffle=False, **fit)
        return model.get_weights()

    by_keras, by_samples, unweighted = trained(class_weight=weights), trained(as_samples=True), trained()
    for a, b in zip(by_keras, by_samples):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(by_keras[0], unweighted[0])  # the weights did change the training


def test_every_rank_runs_as_many_val_batches_none_empty(pipeline_run):
    from covid_spark.data.dataset import iter_split_batches
    from covid_spark.stages.train_rank import _val_plan

    dataset = pipeline_run["dataset"]
    with open(os.path.join(dataset, "_summary.json"), encoding="utf-8") as handle:
        summary = json.load(handle)
    job = types.SimpleNamespace(dataset=dataset, batch_size=2, val_row_groups=summary["row_groups"]["val"])
    plans = [_val_plan(job, rank, 2, equal_steps=True) for rank in range(2)]
    for rank, (shard, sizes) in enumerate(plans):
        counted = sum(len(b["path"]) for b in iter_split_batches(dataset, "val", batch_size=3,
                                                                 shard=shard[0], shard_count=shard[1]))
        assert sum(sizes) == counted and min(sizes) >= 1 and max(sizes) <= 2
    assert len(plans[0][1]) == len(plans[1][1])
    largest = max(sum(sizes) for _, sizes in plans)
    assert len(plans[0][1]) == math.ceil(largest / 2) or plans[0][0] == (None, None)
    assert _val_plan(job, 1, 2, equal_steps=False)[1] is None  # Horovod: the plain batches


@pytest.mark.slow
def test_two_tf_distribute_ranks_train_resume_and_write_the_run(pipeline_run, tmp_path):
    """2 ranks, 2 epochs, then --resume to a third: the contract the Horovod engine keeps too. Where the shared
    fixture's training is already this one (the current stack, whose `auto` engine is tf-distribute), its model
    is copied instead of trained again."""
    import shutil

    from covid_spark.training.core import LearningRateSchedule
    from covid_spark.data.rundir import RunDir

    train = pipeline_run["jobs"]["train"]
    dataset, model_dir = pipeline_run["dataset"], str(tmp_path / "tfd")
    args = ["--dataset", dataset, "--model-dir", model_dir, "--batch-size", "4", "--num-proc", "2",
            "--model", "compact", "--engine", "tf-distribute"]
    with open(RunDir(pipeline_run["model_dir"]).run_json, encoding="utf-8") as handle:
        fixture = json.load(handle)
    if fixture["engine"] == "tf-distribute" and fixture["num_proc"] == 2 and fixture["epochs_run"] == 2:
        shutil.copytree(pipeline_run["model_dir"], model_dir)
    else:
        assert train.main(args + ["--epochs", "2"]) == 0
    run = RunDir(model_dir)
    with open(run.run_json, encoding="utf-8") as handle:
        first = json.load(handle)
    assert first["engine"] == "tf-distribute" and first["num_proc"] == 2 and first["epochs_run"] == 2
    assert first["ranks_in_sync"] is True  # both ranks ended with the same weights
    with open(os.path.join(dataset, "_summary.json"), encoding="utf-8") as handle:
        n_train = json.load(handle)["per_split"]["train"]
    steps = math.ceil(n_train / (4 * 2))
    assert first["steps_per_epoch"] == steps
    with open(run.history, encoding="utf-8") as handle:
        history = json.load(handle)
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr"} <= set(history)
    assert all(len(v) == 2 for v in history.values())
    warmup = first["config"]["train"]["warmup_epochs"]
    rate = first["config"]["train"]["learning_rate"]
    schedule = LearningRateSchedule(rate * 2, 2, warmup, first["config"]["train"]["lr_schedule"], 2, steps)
    expected = [float(np.float32(schedule.rate(e, steps - 1))) for e in range(2)]
    assert history["lr"] == pytest.approx(expected, rel=1e-6)  # the schedule reached every rank's optimizer
    model = load_model(run)
    assert model.name == "compact"
    with open(run.checkpoint_state, encoding="utf-8") as handle:
        assert json.load(handle)["epoch"] == 2

    assert train.main(args + ["--epochs", "3", "--resume"]) == 0
    with open(run.run_json, encoding="utf-8") as handle:
        resumed = json.load(handle)
    with open(run.history, encoding="utf-8") as handle:
        longer = json.load(handle)
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 3 and resumed["engine"] == "tf-distribute"
    assert longer["loss"][:2] == history["loss"] and len(longer["loss"]) == 3


def test_a_taken_port_reruns_the_barrier_stage_and_other_errors_do_not():
    import pickle

    from covid_spark.engines import tfdistribute

    class Stage:
        def __init__(self, outcomes):
            self.outcomes = outcomes

        def barrier(self):
            return self

        def mapPartitions(self, fn):
            return self

        def collect(self):
            outcome = self.outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

    class Context:
        master, defaultParallelism, _jsc = "spark://nowhere:7077", 2, None

        def __init__(self, outcomes):
            self.stage, self.started = Stage(outcomes), 0

        def parallelize(self, data, slices):
            self.started += 1
            return self.stage

    class Spark:
        def __init__(self, outcomes):
            self.sparkContext = Context(outcomes)

    results = [pickle.dumps({"rank": 0}), pickle.dumps({"rank": 1})]
    taken = RuntimeError(f"rank 1 failed: {tfdistribute.PORT_TAKEN}: Address already in use")
    spark = Spark([taken, list(results)])
    assert tfdistribute.TFDistributeLauncher(spark).run(len, types.SimpleNamespace(threads=1), 2) == [{"rank": 0}, {"rank": 1}]
    assert spark.sparkContext.started == 2  # the second attempt, with new ports, succeeded
    spark = Spark([taken] * tfdistribute.PORT_ATTEMPTS)
    with pytest.raises(RuntimeError, match="Address already in use"):
        tfdistribute.TFDistributeLauncher(spark).run(len, types.SimpleNamespace(threads=1), 2)
    assert spark.sparkContext.started == tfdistribute.PORT_ATTEMPTS
    spark = Spark([ValueError("a bug in the rank function"), list(results)])
    with pytest.raises(ValueError, match="a bug"):
        tfdistribute.TFDistributeLauncher(spark).run(len, types.SimpleNamespace(threads=1), 2)
    assert spark.sparkContext.started == 1  # not rerun
    assert tfdistribute._port_taken(RuntimeError("UNKNOWN: Could not start gRPC server"))
    assert not tfdistribute._port_taken(RuntimeError("Connection refused"))


SCRATCH_PREFIX = "covid-spark-test-scratch-"


def _fail_in_rank_1(job):
    """A rank function: rank 1 fails once the strategy is up, rank 0 would wait five minutes."""
    import time

    from covid_spark.engines.tfdistribute import TFDistributeRank

    tempfile.mkdtemp(prefix=SCRATCH_PREFIX)  # scratch, as a rank's checkpoints: its task must remove it
    rank = TFDistributeRank(job)
    if rank.rank == 1:
        raise ValueError("boom in rank 1")
    time.sleep(300)
    return {"rank": rank.rank}


@pytest.mark.slow
def test_a_failing_rank_ends_the_stage_with_its_error_and_leaves_no_rank_behind(spark):
    import time

    import psutil

    from covid_spark.engines.tfdistribute import TFDistributeLauncher, sweep_stale_folders

    def leftovers():  # the tasks' folders and the ranks' scratch, in the temporary folder they all share
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith((SCRATCH_PREFIX, "covid-spark-rank"))}

    before = leftovers()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    launcher = TFDistributeLauncher(spark, env={"PYTHONPATH": repo})
    with pytest.raises(Exception, match="boom in rank 1"):  # not after rank 0's five minutes (timeout 1200 s)
        launcher.run(_fail_in_rank_1, types.SimpleNamespace(threads=1), 2)

    def ranks_left():
        left = []
        for process in psutil.Process().children(recursive=True):
            try:
                if "rank_main" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process.pid)
            except psutil.Error:  # ended while we looked
                pass
        return left

    for _ in range(30):  # Spark ends the other task's Python worker, whose rank then sees its pipe close
        if not ranks_left():
            break
        time.sleep(1)
    assert ranks_left() == []
    for _ in range(30):  # a task whose Python worker was killed leaves its folder to the next task's sweep
        sweep_stale_folders(tempfile.gettempdir())
        if not leftovers() - before:
            break
        time.sleep(1)
    assert leftovers() - before == set()
    assert spark.sparkContext.parallelize(range(4), 2).sum() == 6  # the session still runs jobs


def test_task_folders_whose_python_worker_is_gone_are_swept(tmp_path):
    import subprocess

    from covid_spark.engines.tfdistribute import sweep_stale_folders

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    owners = {"covid-spark-rank0-dead": gone.stdout.strip(), "covid-spark-rank1-alive": str(os.getpid()),
              "covid-spark-rank0-garbled": "not a pid", "other-dead": gone.stdout.strip()}
    for name, owner in owners.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "owner.pid").write_text(owner)
    (tmp_path / "covid-spark-rank1-no-owner").mkdir()  # being created: its owner file not yet written
    assert sweep_stale_folders(str(tmp_path)) == [str(tmp_path / "covid-spark-rank0-dead")]
    assert sorted(os.listdir(tmp_path)) == ["covid-spark-rank0-garbled", "covid-spark-rank1-alive",
                                            "covid-spark-rank1-no-owner", "other-dead"]


def test_a_lost_rank_is_named_from_the_failed_stage_and_other_failures_are_not():
    from covid_spark.engines import tfdistribute

    ours = (f"Could not recover from a failed barrier ResultStage. Most recent failure reason: Stage failed because "
            f"barrier task ResultTask(4, 1) finished unsuccessfully.\nTraceback ...\nRuntimeError: "
            f"{tfdistribute.RANK_LOST}: rank 1 on 10.0.0.7 was killed by SIGKILL while training (its output is in "
            f"the executor's log)")
    assert tfdistribute.lost_rank(ours) == (1, "its process on 10.0.0.7 was killed by SIGKILL while training")
    executor = ("Stage failed because barrier task ResultTask(7, 0) finished unsuccessfully.\n"
                "ExecutorLostFailure (executor 2 exited caused by one of the running tasks) Reason: worker lost")
    assert tfdistribute.lost_rank(executor) == (
        0, "ExecutorLostFailure (executor 2 exited caused by one of the running tasks) Reason: worker lost")
    assert tfdistribute.lost_rank("barrier task ResultTask(7, 0) finished unsuccessfully.\n"
                                  "ValueError: boom in rank 0") is None  # the rank function's own error
    message = str(tfdistribute.RankLostError((1, "its process on h was killed by SIGKILL while training"), 2))
    assert message.startswith("tf-distribute: rank 1 of 2 was lost during training (its process on h was killed")
    assert message.endswith("rerun the train job with --resume to continue from it")

    class Stage:  # a barrier stage whose task reports its rank's process gone
        def barrier(self):
            return self

        def mapPartitions(self, fn):
            return self

        def collect(self):
            raise RuntimeError(ours)

    class Spark:
        class sparkContext:
            master, defaultParallelism, _jsc = "spark://nowhere:7077", 2, None

            @staticmethod
            def parallelize(data, slices):
                return Stage()

    with pytest.raises(tfdistribute.RankLostError, match="rank 1 of 2 was lost") as caught:
        tfdistribute.TFDistributeLauncher(Spark()).run(len, types.SimpleNamespace(threads=1), 2)
    assert caught.value.rank == 1 and isinstance(caught.value.__cause__, RuntimeError)  # Spark's error kept


def test_a_rank_process_that_dies_is_reported_with_its_signal():
    import subprocess

    from covid_spark.engines.tfdistribute import RANK_LOST, _expect

    child = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                             stdout=subprocess.PIPE, text=True)
    with pytest.raises(RuntimeError, match=f"{RANK_LOST}: rank 3 on host7 was killed by SIGKILL while training"):
        _expect(child.stdout, child, 3, "host7", "training")
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(5)"], stdout=subprocess.PIPE, text=True)
    with pytest.raises(RuntimeError, match="rank 0 on h exited with code 5 while starting"):
        _expect(child.stdout, child, 0, "h", "starting")
