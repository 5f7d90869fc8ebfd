"""Training throughput: Horovod ranks over Spark against independent single-rank trainings.

Every run calls the real ``covid_spark.stages.train.train_fn`` with a job built as ``run_training``
builds it (no validation, one epoch of ``warmup + steps`` steps) and a step timer added to its
``fit()`` call. Images/s come from the batch-end timestamps after the warm-up steps, inside
the window where every process of the run was past its warm-up and none had finished, so a
pair that starts or ends a little apart is measured only while both are training.
"""
from __future__ import annotations

import importlib.util
import logging
import multiprocessing as mp
import os
import time

from bench.memory import MachineCpu, maxrss_mb
from bench.procs import collect

logger = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def threads_per_rank(config: dict, num_proc: int) -> int:
    """Intra-op threads per rank, as ``run_training`` chooses them."""
    return int(config["train"]["threads_per_rank"]) or max(1, (os.cpu_count() or 1) // num_proc)


def rank_env(spark, threads: int) -> dict[str, str]:
    """The environment ``run_training`` gives each rank, plus this checkout on PYTHONPATH."""
    from covid_spark.engines.horovod import rank_env as job_rank_env

    env = job_rank_env(spark.sparkContext, threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    return env


def make_job(dataset: str, config: dict, model: str, threads: int, steps: int, checkpoint_dir: str,
             batch_size: int | None = None) -> dict:
    """A ``train_fn`` job for ``steps`` steps of one epoch on ``dataset``'s train split."""
    from covid_spark.data.dataset import read_summary
    from covid_spark.stages.train import make_job as train_job

    cfg = dict(config["train"], model=model, epochs=1, batch_size=int(batch_size or config["train"]["batch_size"]))
    job = train_job(cfg, read_summary(None, dataset), dataset, steps, threads, checkpoint_dir)
    return dict(job, val_rows=0, val_row_groups=0)


def timed_train_fn(job: dict, barrier=None, warmup: int = 0) -> dict:
    """Run the real ``train_fn(job)``; return its rank, size, batch-end times and peak RSS.

    ``barrier`` (optional) is waited on at the end of step ``warmup``, so that independent
    processes, whose first steps (graph tracing) take different times, start their timed
    steps together; that step's end is stamped after the wait.
    """
    import tensorflow as tf

    from covid_spark.stages.train_rank import train_fn

    batch_ends: list[float] = []
    batch_cpu: list[float] = []  # this process's CPU seconds (all threads) at each batch end
    fit_began: list[float] = []

    class StepTimer(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            fit_began.append(time.time())

        def on_train_batch_end(self, batch, logs=None):
            if barrier is not None and batch + 1 == warmup:
                barrier.wait(timeout=600)
            batch_ends.append(time.time())  # wall clock: comparable across processes
            batch_cpu.append(time.process_time())

    model_class = tf.keras.Model
    original_fit = model_class.fit

    def timed_fit(self, *args, callbacks=None, **kwargs):
        return original_fit(self, *args, callbacks=list(callbacks or []) + [StepTimer()], **kwargs)

    model_class.fit = timed_fit
    try:
        result = train_fn(job)
    finally:
        model_class.fit = original_fit
    return {"rank": result["rank"], "size": result["size"], "pid": os.getpid(), "batch_ends": batch_ends,
            "batch_cpu": batch_cpu, "fit_began": fit_began[0],
            "loss": result["history"].get("loss", [None])[-1], "maxrss_mb": maxrss_mb()}


def window_rate(batch_ends: list[list[float]], warmup: int, batch_size: int,
                batch_cpu: list[list[float]] | None = None) -> dict:
    """Images/s of processes measured together, from their batch-end times.

    The window opens when the last process ends its ``warmup``-th step and closes when the
    first one ends its last step (give or take half a median step, for ranks in lockstep);
    each process's rate is its steps inside the window over their duration. With
    ``batch_cpu`` (each process's CPU seconds at the same batch ends), also the CPU cores each
    process kept busy over those steps.

    Raises:
        ValueError: fewer than two steps of some process fall inside the window.
    """
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 step, got {warmup}")
    if any(len(ends) <= warmup for ends in batch_ends):
        raise ValueError(f"every process needs more than {warmup} steps; got "
                         f"{[len(e) for e in batch_ends]}")
    opens = max(ends[warmup - 1] for ends in batch_ends)
    closes = min(ends[-1] for ends in batch_ends)
    # Ranks in lockstep end a step microseconds apart: allow half the median step either side.
    steps = sorted(b - a for ends in batch_ends for a, b in zip(ends[warmup - 1:], ends[warmup:]))
    slack = 0.5 * steps[len(steps) // 2] if steps else 0.0
    rates, counted, cores = [], [], []
    for index, ends in enumerate(batch_ends):
        inside = [i for i in range(warmup - 1, len(ends)) if opens - slack <= ends[i] <= closes + slack]
        if len(inside) < 2:
            raise ValueError(f"the processes overlapped for fewer than two steps after warm-up "
                             f"(window {closes - opens:.2f} s)")
        first, last = inside[0], inside[-1]
        seconds = ends[last] - ends[first]
        rates.append((last - first) * batch_size / seconds)
        counted.append(last - first)
        if batch_cpu is not None:
            cores.append(round((batch_cpu[index][last] - batch_cpu[index][first]) / seconds, 2))
    out = {"images_per_s": round(sum(rates), 1), "per_process": [round(r, 1) for r in rates],
           "window_s": round(closes - opens, 2), "window": [opens, closes], "timed_steps": counted}
    if batch_cpu is not None:
        out["cpu_cores_per_process"] = cores
        out["core_ms_per_image"] = round(1000 * sum(c / r for c, r in zip(cores, rates)) / len(rates), 2)
    return out


def _others_share(machine: MachineCpu, rate: dict) -> float | None:
    """Share of the machine's cores used by other processes during the timed window."""
    start, end = rate["window"]
    busy = machine.busy_between(start, end)
    if busy is None or end <= start:
        return None
    ours = sum(rate["cpu_cores_per_process"]) * (end - start)
    return round(max(0.0, busy - ours) / ((end - start) * (os.cpu_count() or 1)), 3)


def horovod_run(spark, job: dict, num_proc: int, warmup: int) -> dict:
    """``num_proc`` Horovod ranks through ``horovod.spark.run``, as ``run_training`` launches them."""
    import horovod.spark

    env = rank_env(spark, job["threads"])
    started = time.perf_counter()
    with MachineCpu() as machine:
        results = horovod.spark.run(timed_train_fn, args=(job,), num_proc=num_proc, use_gloo=True, use_mpi=False,
                                    env=env, executable=spark.sparkContext.pythonExec, start_timeout=600,
                                    verbose=0)
    return _ranks_result(results, time.perf_counter() - started, machine, job, num_proc, warmup)


def _ranks_result(results: list, wall: float, machine, job: dict, num_proc: int, warmup: int) -> dict:
    """The rate over the ranks' timed window, the others' share of the machine, wall and memory, for one launch."""
    results = sorted(results, key=lambda r: r["rank"])
    rate = window_rate([r["batch_ends"] for r in results], warmup, job["batch_size"],
                       [r["batch_cpu"] for r in results])
    rate["others_share"] = _others_share(machine, rate)
    in_fit = max(r["batch_ends"][-1] for r in results) - min(r["fit_began"] for r in results)
    return dict(rate, processes=num_proc, wall_s=round(wall, 1), outside_fit_s=round(wall - in_fit, 1),
                maxrss_mb=[r["maxrss_mb"] for r in results])


def tf_distribute_run(spark, job: dict, num_proc: int, warmup: int) -> dict:
    """``num_proc`` tf-distribute ranks (MultiWorkerMirroredStrategy in Spark barrier tasks), as ``run_training``
    launches them with ``train.engine: tf-distribute``."""
    from covid_spark.engines.tfdistribute import TFDistributeLauncher

    job = dict(job, engine="tf-distribute")
    started = time.perf_counter()
    with MachineCpu() as machine:
        results = TFDistributeLauncher(spark, env={"PYTHONPATH": REPO}).run(timed_train_fn, job, num_proc)
    return _ranks_result(results, time.perf_counter() - started, machine, job, num_proc, warmup)


def _pair_worker(job: dict, env: dict, barrier, warmup: int, results) -> None:
    os.environ.update(env)
    results.put(timed_train_fn(job, barrier, warmup))


def independent_run(jobs: list[dict], warmup: int, env: dict) -> dict:
    """The same jobs in independent plain processes (no launcher: Horovod size 1), started together."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(jobs)), ctx.Queue()
    workers = [ctx.Process(target=_pair_worker, args=(job, env, barrier, warmup, results),
                           daemon=True) for job in jobs]
    started = time.perf_counter()
    with MachineCpu() as machine:
        for worker in workers:
            worker.start()
        try:
            reports = collect(results, workers)
        finally:
            for worker in workers:
                worker.join(timeout=60)
                if worker.is_alive():
                    worker.terminate()
    wall = time.perf_counter() - started
    rate = window_rate([r["batch_ends"] for r in reports], warmup, jobs[0]["batch_size"],
                       [r["batch_cpu"] for r in reports])
    rate["others_share"] = _others_share(machine, rate)
    return dict(rate, processes=len(jobs), wall_s=round(wall, 1), maxrss_mb=[r["maxrss_mb"] for r in reports])


def run_model(spark, dataset: str, config: dict, model: str, steps: int, warmup: int, workdir: str,
              batch_size: int | None = None, ranks: tuple[int, ...] = (1, 2),
              engines: tuple[str, ...] = ("horovod",)) -> dict:
    """1 and 2 ranks of each engine and an independent pair, for one model; with the efficiencies.

    ``engines``: ``horovod`` (keys ``horovod_<n>``, ``efficiency``) and/or ``tf-distribute`` (keys
    ``tf_distribute_<n>``, ``efficiency_tf_distribute``). The independent processes run the rank
    function alone: as Horovod rank 0 of 1 where Horovod is installed, else as a tf-distribute
    strategy of one worker."""
    threads = threads_per_rank(config, 2)
    out: dict = {"model": model, "threads_per_process": threads, "warmup_steps": warmup, "steps": steps}

    def job(name):
        return make_job(dataset, config, model, threads, warmup + steps, os.path.join(workdir, name),
                        batch_size)

    out["batch_size"] = job("x")["batch_size"]
    for num_proc in ranks:
        if "horovod" in engines:
            logger.info("train bench: %s, %d Horovod rank(s)", model, num_proc)
            out[f"horovod_{num_proc}"] = horovod_run(spark, job(f"{model}-hvd{num_proc}"), num_proc, warmup)
        if "tf-distribute" in engines:
            logger.info("train bench: %s, %d tf-distribute rank(s)", model, num_proc)
            out[f"tf_distribute_{num_proc}"] = tf_distribute_run(spark, job(f"{model}-tfd{num_proc}"), num_proc,
                                                                 warmup)
    logger.info("train bench: %s, 2 independent processes", model)
    solo_engine = "horovod" if importlib.util.find_spec("horovod") is not None else "tf-distribute"
    out["independent_engine"] = solo_engine
    out["independent_2"] = independent_run([dict(job(f"{model}-solo{i}"), engine=solo_engine) for i in range(2)],
                                           warmup, rank_env(spark, threads))
    if "tf_distribute_2" in out:
        out["efficiency_tf_distribute"] = round(out["tf_distribute_2"]["images_per_s"]
                                                / out["independent_2"]["images_per_s"], 3)
    if "horovod_2" in out:
        out["efficiency"] = round(out["horovod_2"]["images_per_s"] / out["independent_2"]["images_per_s"], 3)
    if "horovod_1" in out and "horovod_2" in out:
        out["speedup_2_vs_1"] = round(out["horovod_2"]["images_per_s"] / out["horovod_1"]["images_per_s"], 3)
    if "horovod_1" in out:
        out["independent_2_vs_1"] = round(out["independent_2"]["images_per_s"]
                                          / out["horovod_1"]["images_per_s"], 3)
    return out
