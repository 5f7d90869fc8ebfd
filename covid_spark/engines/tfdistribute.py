"""The tf-distribute engine: ``tf.distribute.MultiWorkerMirroredStrategy`` in Spark barrier tasks.

Spark has no maintained TensorFlow distributor, but its barrier execution mode is what such
distributors were built on. :class:`TFDistributeLauncher` (on the driver) runs ``num_proc`` barrier
tasks; each task (:func:`_barrier_task`) starts one rank as a child process of its Python worker
(:func:`rank_main`), learns every peer's address through ``BarrierTaskContext.allGather``, hands
the child its ``TF_CONFIG``, and returns the child's result. Inside the child,
:class:`TFDistributeRank` is the rank context of ``covid_spark.stages.train.train_fn``.

Why a child process, as Horovod's task service does: a process configures TensorFlow's collective
ops once, while Spark reuses its Python workers from one job to the next (a second training in the
same session would find the first one's cluster); the child also starts with its own environment
(``TF_CONFIG``, thread counts) before TensorFlow is imported, and dies with its task.

The port: TensorFlow's gRPC server binds its port with SO_REUSEPORT disabled
(``NoReusePortOption`` in ``grpc_server_lib.cc``), so a port cannot be held by us while TensorFlow
binds it too. Each child imports TensorFlow first (the slow part), then binds a socket to a free
port the kernel picks, reports it, keeps it bound while the addresses are exchanged, and closes it
only immediately before the strategy starts its server: the window in which another process could
take the port is microseconds, not the seconds of a TensorFlow import. If the port is taken anyway,
the child exits saying so (:data:`PORT_TAKEN`), Spark fails the barrier stage (which ends every
task of it and so every child: a child exits when its task's pipe closes), and the launcher starts
the whole stage again with new ports, up to :data:`PORT_ATTEMPTS` times. A retry inside one rank
would not do: the other ranks' strategies would be waiting for the old address.

Contract, as Horovod's: each rank reads its own shard of the train split (``train_fn`` asks for
shard ``rank`` of ``size``), runs the same number of steps per epoch, only rank 0 prints and writes
checkpoints into the model dir, and each rank's history comes back to the driver. Gradients are
summed over the ranks by the strategy (the loss of each rank is divided by the number of ranks, so
the step is the mean, as Horovod's average); the initial weights are rank 0's (the strategy
broadcasts them when variables are created in its scope).

Keras: ``tf.keras`` must be Keras 2 (TensorFlow 2.15's own, or ``tf-keras`` with
``TF_USE_LEGACY_KERAS=1``, set by ``covid_spark/__init__.py``): Keras 3's ``model.fit`` under this
strategy fails (keras-team/keras#20585, tensorflow/tensorflow#72388).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable

from covid_spark.engines.base import rank_settings
from covid_spark.errors import ConfigError
from covid_spark.training.job import TrainJob

logger = logging.getLogger(__name__)

PORT_ATTEMPTS = 3
PORT_TAKEN = "covid-spark: tf-distribute port taken"  # in the error of a rank whose port was taken
RANK_LOST = "covid-spark: tf-distribute rank lost"  # in the error of a task whose rank process died
# How long the driver waits for executors to offer enough task slots: a local master has its slots at once;
# a cluster's executors join after the application starts (their JVMs start on the workers, slowly on a busy one).
SLOT_WAIT_S = {"local": 20, "cluster": 180}
_JOB_FILE, _RESULT_FILE = "job.pkl", "result.pkl"
_FOLDER_PREFIX, _OWNER_FILE = "covid-spark-rank", "owner.pid"  # a task's folder, and the pid of its Python worker

_reserved: socket.socket | None = None  # inside a rank: the port held until the strategy binds it


# ----------------------------------------------------------------------------------------- driver


def task_slots(sc) -> int:
    """How many tasks the cluster can run at once now (what a barrier stage needs for all its tasks).

    Spark's own count (``SparkContext.maxNumConcurrentTasks`` of the default resource profile, which
    its barrier check uses), read through py4j; ``defaultParallelism`` where that is not reachable.
    """
    try:
        jsc = sc._jsc.sc()
        return int(jsc.maxNumConcurrentTasks(jsc.resourceProfileManager().defaultResourceProfile()))
    except Exception:  # noqa: BLE001  (a private Scala method: any failure falls back to the public count)
        return int(sc.defaultParallelism)


def check_slots(sc, num_proc: int, wait_s: float | None = None) -> int:
    """Wait up to ``wait_s`` (default :data:`SLOT_WAIT_S` for the master's kind) for ``num_proc`` task slots
    (executors may still be joining), else raise.

    Without this, Spark retries a barrier stage that needs more slots than the cluster has for
    minutes (``spark.scheduler.barrier.maxConcurrentTasksCheck.*``: 40 × 15 s) before it fails.

    Raises:
        ConfigError: fewer slots than ranks (names both numbers and what to change).
    """
    if wait_s is None:
        wait_s = SLOT_WAIT_S["local" if sc.master.startswith("local") else "cluster"]
    deadline = time.monotonic() + wait_s
    while True:
        slots = task_slots(sc)
        if slots >= num_proc or time.monotonic() >= deadline:
            break
        time.sleep(1)
    if slots < num_proc:
        raise ConfigError(
            f"train.num_proc is {num_proc} but Spark offers {slots} task slot(s) (master {sc.master}, after "
            f"{wait_s:.0f} s); the tf-distribute engine runs all ranks at once in one barrier stage, so it needs "
            f"a slot per rank: use --num-proc {max(1, slots)} or give the cluster more executor cores")
    return slots


class TFDistributeLauncher:
    """``num_proc`` ranks as the tasks of one Spark barrier stage (see the module's docstring)."""

    def __init__(self, spark, env: dict[str, str] | None = None):
        self.spark = spark
        self.env = dict(env or {})  # more environment for the ranks (a PYTHONPATH is put first on theirs)

    def run(self, fn: Callable[[TrainJob], dict], job: TrainJob, num_proc: int) -> list[dict]:
        from pyspark import cloudpickle

        sc = self.spark.sparkContext
        check_slots(sc, num_proc)
        _release_barrier_timer_at_exit(sc)
        payload = cloudpickle.dumps((fn, job))
        env = {**rank_settings(job.threads), **self.env}

        def task(_, payload=payload, env=env):  # plain values only: no SparkContext in the closure
            return _barrier_task(payload, env)

        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                rdd = sc.parallelize(range(num_proc), num_proc).barrier().mapPartitions(task)
                return [pickle.loads(blob) for blob in rdd.collect()]
            except Exception as error:  # noqa: BLE001  (py4j wraps the task's error; only a taken port is retried)
                lost = lost_rank(str(error))
                if lost is not None:
                    raise RankLostError(lost, num_proc) from error
                if PORT_TAKEN not in str(error) or attempt == PORT_ATTEMPTS:
                    raise
                logger.warning("tf-distribute: a rank's port was taken before TensorFlow bound it; starting "
                               "the ranks again with new ports (attempt %d of %d)", attempt + 1, PORT_ATTEMPTS)
        raise AssertionError("unreachable")


class RankLostError(RuntimeError):
    """A rank's process or its executor died while the ranks ran (not bad input: the traceback stays)."""

    def __init__(self, lost: tuple[int, str], num_proc: int):
        rank, how = lost
        self.rank = rank
        super().__init__(
            f"tf-distribute: rank {rank} of {num_proc} was lost during training ({how}); Spark stopped the "
            f"other rank(s) with it. The last checkpoint written is kept: rerun the train job with --resume "
            f"to continue from it")


# A task of ours that saw its rank's process die (written by _expect), and Spark's own words for a barrier
# task that ended otherwise (its executor lost, say), which name the task's partition: the rank.
_OUR_LOST = re.compile(re.escape(RANK_LOST) + r": rank (\d+) on (\S+) (.+?)\.? \(")
_SPARK_LOST = re.compile(r"barrier task ResultTask\(\d+, (\d+)\) finished unsuccessfully\.\s*\n?\s*"
                         r"(ExecutorLostFailure[^\n]*)")


def lost_rank(message: str) -> tuple[int, str] | None:
    """(rank, what happened) when ``message`` (a failed barrier stage's) says a rank's process or executor
    died; None for any other failure (an error raised by the rank function keeps its own message)."""
    ours = _OUR_LOST.search(message)
    if ours:
        return int(ours.group(1)), f"its process on {ours.group(2)} {ours.group(3)}"
    spark = _SPARK_LOST.search(message)
    if spark:
        return int(spark.group(1)), spark.group(2).strip()
    return None


_timer_hook: list = []


def _release_barrier_timer_at_exit(sc) -> None:
    """Let a local-mode ``spark-submit`` end after a barrier stage (once per driver process).

    Spark 3.5's ``BarrierTaskContext`` keeps a ``java.util.Timer`` in its companion object, a non-daemon
    thread that never ends; with a ``local[N]`` master the tasks run in the driver's JVM, so after the
    Python driver exits, spark-submit's JVM waits for that thread for ever (seen here: 10 minutes
    until killed). SPARK-49479 fixed the driver's own timer the same way; Spark 4 made this one a daemon.
    At the driver's exit this cancels the timer (no barrier stage runs after that).
    """
    if _timer_hook or not sc.master.startswith("local"):
        return
    import atexit

    jvm = sc._jvm

    def cancel():
        try:
            owner = jvm.java.lang.Class.forName("org.apache.spark.BarrierTaskContext$")
            timer = getattr(owner.getField("MODULE$").get(None), "org$apache$spark$BarrierTaskContext$$timer")()
            if timer.getClass().getName() == "java.util.Timer":
                timer.cancel()
        except Exception:  # noqa: BLE001  (another Spark, or the JVM already gone: nothing to release)
            pass

    atexit.register(cancel)
    _timer_hook.append(cancel)


# --------------------------------------------------------------------------------- barrier task


def _barrier_task(payload: bytes, env: dict[str, str]):
    """One barrier task: start the rank's process, exchange addresses, relay TF_CONFIG, return its result."""
    from pyspark import BarrierTaskContext

    context = BarrierTaskContext.get()
    rank = context.partitionId()
    host = context.getTaskInfos()[rank].address.rsplit(":", 1)[0]
    sweep_stale_folders(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix=f"{_FOLDER_PREFIX}{rank}-") as folder:
        with open(os.path.join(folder, _OWNER_FILE), "w", encoding="utf-8") as handle:
            handle.write(str(os.getpid()))
        with open(os.path.join(folder, _JOB_FILE), "wb") as handle:
            handle.write(payload)
        read_fd, write_fd = os.pipe()
        child_env = dict(os.environ, **env)
        # The task's own import path (with the files shipped by --py-files), so the child imports the same code.
        child_env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", "")] + sys.path if p)
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; from covid_spark.engines.tfdistribute import rank_main; "
                                   "rank_main(sys.argv[1], int(sys.argv[2]))", folder, str(write_fd)],
            stdin=subprocess.PIPE, env=child_env, pass_fds=(write_fd,), text=True)
        os.close(write_fd)
        try:
            with os.fdopen(read_fd, "r") as messages:
                port = _expect(messages, child, rank, host, "starting (before it reported its port)")
                addresses = context.allGather(f"{host}:{port}")
                child.stdin.write(json.dumps({"cluster": {"worker": list(addresses)},
                                              "task": {"type": "worker", "index": rank}}) + "\n")
                child.stdin.flush()
                _expect(messages, child, rank, host, "training")
            with open(os.path.join(folder, _RESULT_FILE), "rb") as handle:
                status, value = pickle.load(handle)
            if status != "ok":
                raise RuntimeError(f"tf-distribute rank {rank} failed:\n{value}")
            # Every rank is done before any exits: a rank's last collective may still read from a peer.
            context.barrier()
            child.stdin.write("exit\n")
            child.stdin.flush()
            child.wait(timeout=60)
            yield pickle.dumps(value)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()


def sweep_stale_folders(parent: str) -> list[str]:
    """Remove the task folders under ``parent`` whose Python worker is gone; return their paths.

    A task removes its folder when it ends, but not when its Python worker is killed (an aborted
    job, a lost executor). A folder whose ``owner.pid`` names no living process is such a leftover;
    one without that file (being created, or from before it was written) is left alone.
    """
    removed = []
    for name in sorted(n for n in os.listdir(parent) if n.startswith(_FOLDER_PREFIX)):
        path = os.path.join(parent, name)
        try:
            with open(os.path.join(path, _OWNER_FILE), encoding="utf-8") as handle:
                owner = int(handle.read().strip())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _expect(messages, child, rank: int, host: str, doing: str) -> str:
    """The next line the rank's process sends, or raise if it died (``doing`` says when, for the error)."""
    line = messages.readline()
    if not line:
        code = child.wait()
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
               else f"exited with code {code}")
        raise RuntimeError(f"{RANK_LOST}: rank {rank} on {host} {how} while {doing} "
                           f"(its output is in the executor's log)")
    return line.strip()


# ------------------------------------------------------------------------------------ rank process


def rank_main(folder: str, fd: int) -> None:
    """The rank's process: import TensorFlow, hold a port, wait for TF_CONFIG, run ``fn(job)``, report.

    Messages to the task go over pipe ``fd`` (stdout stays the rank's own, for its progress lines);
    the task writes ``TF_CONFIG`` and later ``exit`` on stdin. A closed stdin (the task ended) ends
    the process at once, so no rank outlives its task.
    """
    global _reserved

    with open(os.path.join(folder, _JOB_FILE), "rb") as handle:
        fn, job = pickle.load(handle)
    # The rank's temporary files (a non-zero rank's checkpoints, TensorFlow's autograph sources) go in its
    # task's folder, which the task removes even when this process is killed.
    tempfile.tempdir = folder
    import tensorflow  # noqa: F401  (the slow import, before the port is picked)

    messages = os.fdopen(fd, "w")
    _reserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _reserved.bind(("", 0))
    messages.write(f"{_reserved.getsockname()[1]}\n")
    messages.flush()
    os.environ["TF_CONFIG"] = sys.stdin.readline().strip()
    if not os.environ["TF_CONFIG"]:
        os._exit(3)

    def watch_stdin():
        for line in sys.stdin:
            if line.strip() == "exit":
                break
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # after "exit", or at once when the task's end closed the pipe

    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        outcome = ("ok", fn(job))
    except BaseException as error:  # noqa: BLE001  (reported to the task, which raises it in Spark)
        text = traceback.format_exc()
        if _port_taken(error):
            text = f"{PORT_TAKEN}: {text}"
        outcome = ("error", text)
    tmp = os.path.join(folder, f".{_RESULT_FILE}.tmp")
    with open(tmp, "wb") as handle:
        pickle.dump(outcome, handle)
    os.replace(tmp, os.path.join(folder, _RESULT_FILE))
    messages.write("done\n")
    messages.flush()
    threading.Event().wait()  # until watch_stdin ends the process


def _port_taken(error: BaseException) -> bool:
    text = str(error)
    return "Address already in use" in text or "Could not start gRPC server" in text


def _release_port() -> None:
    global _reserved
    if _reserved is not None:
        _reserved.close()
        _reserved = None


# ---------------------------------------------------------------------------------- rank context


class TFDistributeRank:
    """Inside a tf-distribute rank: ``MultiWorkerMirroredStrategy`` over the ``TF_CONFIG`` cluster
    (one CPU replica per rank; collectives by ring), or a single worker without ``TF_CONFIG``.

    The strategy averages the gradients itself, so ``optimizer`` and ``callbacks`` add nothing; the
    model is built and compiled in :meth:`scope`; :meth:`distribute` gives the strategy each rank's
    own dataset as it is (no re-sharding, no re-batching: the rank already reads its shard, batched
    per rank). Reading the model's weights is a collective here (batch norm's moving statistics are
    synchronised on read), so every rank saves when rank 0 does (:attr:`every_rank_saves`).
    """

    every_rank_saves = True
    distributes_datasets = True

    def __init__(self, job: TrainJob):
        import tensorflow as tf

        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        workers = config.get("cluster", {}).get("worker", [])
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING)
        _release_port()  # immediately before the strategy binds it (the module's docstring)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        self.rank = int(config.get("task", {}).get("index", 0)) if workers else 0
        self.size = max(1, len(workers))
        if self.strategy.num_replicas_in_sync != self.size:
            raise RuntimeError(f"tf-distribute: {self.strategy.num_replicas_in_sync} replicas for {self.size} "
                               f"ranks; expected one CPU replica per rank")

    def optimizer(self, optimizer):
        return optimizer

    def callbacks(self) -> list:
        return []

    def scope(self):
        return self.strategy.scope()

    def distribute(self, dataset):
        """This rank's dataset, as the strategy's input: each rank feeds its own replica."""
        return self.strategy.distribute_datasets_from_function(lambda _context: dataset)
