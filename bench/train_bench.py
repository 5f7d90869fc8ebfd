"""Training throughput: ranks of each engine against independent single-rank trainings, timed inside the real
``train_fn``, and the input pipeline alone (docs/performance.md, "What is measured", 2 and 3)."""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import multiprocessing as mp
import os
import shutil
import time

from bench.harness import REPO, fmt, in_process, loadavg, pct, ratio, read_json, run_spawned, table, timed
from bench.monitors import CpuUse, PeakRss, maxrss_mb, others_share

logger = logging.getLogger(__name__)

STEPS = {"compact": 30, "original": 30, "efficientnet_lite0": 12}  # timed steps per model
QUICK_STEPS = {"compact": 6, "original": 4, "efficientnet_lite0": 3}


def threads_per_rank(config: dict, num_proc: int) -> int:
    """Intra-op threads per rank, as ``run_training`` chooses them."""
    return int(config["train"]["threads_per_rank"]) or max(1, (os.cpu_count() or 1) // num_proc)


def solo_engine() -> str:
    """The engine of a process training alone: Horovod where it is installed (the pinned stack), else tf-distribute."""
    return "horovod" if importlib.util.find_spec("horovod") is not None else "tf-distribute"


def rank_env(spark, threads: int) -> dict[str, str]:
    """The environment ``run_training`` gives each Horovod rank, plus this checkout on PYTHONPATH."""
    from covid_spark.engines.horovod import rank_env as job_rank_env

    env = job_rank_env(spark.sparkContext, threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH", "")) if p)
    return env


def timed_train_fn(job, barrier=None, warmup: int = 0) -> dict:
    """Batch-end times, CPU times and peak RSS of the real ``train_fn(job)``."""
    import tensorflow as tf

    from covid_spark.stages.train_rank import train_fn

    batch_ends: list[float] = []  # wall clock: comparable across processes
    batch_cpu: list[float] = []  # this process's CPU seconds (all threads) at the same batch ends
    fit_began: list[float] = []

    class StepTimer(tf.keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            fit_began.append(time.time())

        def on_train_batch_end(self, batch, logs=None):
            if barrier is not None and batch + 1 == warmup:
                barrier.wait(timeout=600)
            batch_ends.append(time.time())
            batch_cpu.append(time.process_time())

    original_fit = tf.keras.Model.fit

    def timed_fit(self, *args, callbacks=None, **kwargs):
        return original_fit(self, *args, callbacks=list(callbacks or []) + [StepTimer()], **kwargs)

    tf.keras.Model.fit = timed_fit
    try:
        result = train_fn(job)
    finally:
        tf.keras.Model.fit = original_fit
    return {"rank": result["rank"], "size": result["size"], "batch_ends": batch_ends, "batch_cpu": batch_cpu,
            "fit_began": fit_began[0], "loss": result["history"].get("loss", [None])[-1], "maxrss_mb": maxrss_mb()}


def window_rate(batch_ends: list[list[float]], warmup: int, batch_size: int,
                batch_cpu: list[list[float]] | None = None) -> dict:
    """Images/s (and cores busy) of processes measured together; ValueError without overlap."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 step, got {warmup}")
    if any(len(ends) <= warmup for ends in batch_ends):
        raise ValueError(f"every process needs more than {warmup} steps; got {[len(e) for e in batch_ends]}")
    opens = max(ends[warmup - 1] for ends in batch_ends)
    closes = min(ends[-1] for ends in batch_ends)
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


def _rate_of(reports: list, machine: CpuUse, job, warmup: int, wall: float) -> dict:
    """The rate over the processes' timed window, the others' share of the machine in it, wall and memory."""
    reports = sorted(reports, key=lambda r: r["rank"])
    rate = window_rate([r["batch_ends"] for r in reports], warmup, job.batch_size, [r["batch_cpu"] for r in reports])
    start, end = rate["window"]
    busy = machine.busy_between(start, end)
    rate["others_share"] = None if busy is None else others_share(busy, sum(rate["cpu_cores_per_process"]) *
                                                                  (end - start), end - start)
    return dict(rate, processes=len(reports), wall_s=round(wall, 1), maxrss_mb=[r["maxrss_mb"] for r in reports])


def launch(spark, job, num_proc: int, warmup: int) -> dict:
    """The rate of ``num_proc`` ranks of ``job.engine`` launched as ``run_training`` launches them."""
    started = time.perf_counter()
    with CpuUse() as machine:
        if job.engine == "horovod":
            import horovod.spark

            results = horovod.spark.run(timed_train_fn, args=(job,), num_proc=num_proc, use_gloo=True,
                                        use_mpi=False, env=rank_env(spark, job.threads),
                                        executable=spark.sparkContext.pythonExec, start_timeout=600, verbose=0)
        else:
            from covid_spark.engines.tfdistribute import TFDistributeLauncher

            results = TFDistributeLauncher(spark, env={"PYTHONPATH": REPO}).run(timed_train_fn, job, num_proc)
    wall = time.perf_counter() - started
    in_fit = max(r["batch_ends"][-1] for r in results) - min(r["fit_began"] for r in results)
    return dict(_rate_of(results, machine, job, warmup, wall), outside_fit_s=round(wall - in_fit, 1))


def _pair_worker(job, env: dict, warmup: int, barrier, results) -> None:
    os.environ.update(env)
    results.put(timed_train_fn(job, barrier, warmup))


def run_model(spark, dataset: str, config: dict, model: str, steps: int, warmup: int, workdir: str,
              batch_size: int | None = None, ranks: tuple[int, ...] = (1, 2),
              engines: tuple[str, ...] = ("horovod",), independent: bool = True) -> dict:
    """One model: ``ranks`` ranks of each of ``engines``, an independent pair (if ``independent``), the
    efficiencies."""
    from covid_spark.data.dataset import read_summary
    from covid_spark.stages.train import make_job

    threads, summary = threads_per_rank(config, 2), read_summary(None, dataset)
    cfg = dict(config["train"], model=model, epochs=1, batch_size=int(batch_size or config["train"]["batch_size"]))

    def job(name, engine):
        """A ``TrainJob`` for the warm-up and timed steps of one epoch on the train split, without validation."""
        made = make_job(cfg, summary, dataset, warmup + steps, threads, os.path.join(workdir, name), engine)
        return dataclasses.replace(made, val_rows=0, val_row_groups=0)

    out: dict = {"model": model, "threads_per_process": threads, "warmup_steps": warmup, "steps": steps,
                 "batch_size": job("x", "horovod").batch_size, "independent_engine": solo_engine()}
    for num_proc in ranks:
        for engine in (e for e in ("horovod", "tf-distribute") if e in engines):
            logger.info("train bench: %s, %d %s rank(s)", model, num_proc, engine)
            out[f"{engine.replace('-', '_')}_{num_proc}"] = launch(spark, job(f"{model}-{engine}{num_proc}", engine),
                                                                   num_proc, warmup)
    if not independent:
        return out
    logger.info("train bench: %s, 2 independent processes", model)  # started together, no launcher: a rank of one
    solos, env = [job(f"{model}-solo{i}", solo_engine()) for i in range(2)], rank_env(spark, threads)
    barrier, started = mp.get_context("spawn").Barrier(len(solos)), time.perf_counter()
    with CpuUse() as machine:
        reports = run_spawned(_pair_worker, [(solo, env, warmup) for solo in solos], barrier)
    out["independent_2"] = _rate_of(reports, machine, solos[0], warmup, time.perf_counter() - started)
    pair, one = out["independent_2"]["images_per_s"], (out.get("horovod_1") or {}).get("images_per_s")
    for key, rate in (("efficiency_tf_distribute", "tf_distribute_2"), ("efficiency", "horovod_2")):
        if rate in out:
            out[key] = ratio(out[rate]["images_per_s"], pair)
    if one:
        if "horovod_2" in out:
            out["speedup_2_vs_1"] = ratio(out["horovod_2"]["images_per_s"], one)
        out["independent_2_vs_1"] = ratio(pair, one)
    return out


def read_rates(dataset, batch_size, variants, seed, shuffle_buffer, threads, warmup, batches, env) -> dict:
    os.environ.update(env)
    import tensorflow as tf

    from covid_spark.training.tfdata import make_train_dataset

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    report = {}
    for name, augment in variants:
        reader, ds = make_train_dataset(dataset, batch_size, augment, seed, shuffle_buffer=shuffle_buffer)
        with reader:
            batches_iter = iter(ds)
            for _ in range(warmup):
                next(batches_iter)
            started = time.perf_counter()
            for _ in range(batches):
                images, _labels = next(batches_iter)
            seconds = time.perf_counter() - started
        report[name] = {"images": batches * batch_size, "seconds": round(seconds, 3),
                        "images_per_s": round(batches * batch_size / seconds, 1), "batch_shape": list(images.shape),
                        "maxrss_mb": maxrss_mb()}
    return report


def run_read(spark, dataset: str, config: dict, threads: int, warmup: int, batches: int,
             batch_size: int | None = None) -> dict:
    """Images/s of one rank's input pipeline, without then with augmentation."""
    cfg = config["train"]
    batch = int(batch_size or cfg["batch_size"])
    variants = (("no_augment", {}), ("augment", dict(cfg["augment"])))
    logger.info("read bench: %d + %d batches of %d, without and with augmentation", warmup, batches, batch)
    report = in_process(read_rates, dataset, batch, variants, int(cfg["seed"]), int(cfg["shuffle_buffer"]),
                        threads, warmup, batches, rank_env(spark, threads))
    return dict(report, batch_size=batch, threads=threads)


def one_epoch(spark, dataset: str, summary: dict, model: str, config_path: str | None, batch_size: int | None,
              workdir: str) -> dict:
    """One whole epoch of ``run_training`` (with validation), its rates by wall time and by the epoch's own time."""
    from covid_spark.config import load_config, override
    from covid_spark.data.rundir import RunDir
    from covid_spark.stages.train import run_training

    cfg = override(load_config(config_path, model=model), "train", {"model": model, "epochs": 1,
                                                                    "batch_size": batch_size})
    model_dir, rows = os.path.join(workdir, "epoch", model), summary["per_split"]["train"]
    batch = int(cfg["train"]["batch_size"])
    logger.info("bench epoch: %s, one epoch over %d train images", model, rows)
    load_start = loadavg()
    with PeakRss(interval=1.0) as rss:
        outer, run = timed(run_training, spark, dataset, model_dir, cfg, overwrite=True)
    history = {k: v[0] for k, v in read_json(RunDir(model_dir).history).items() if isinstance(v, list) and v}
    shutil.rmtree(model_dir, ignore_errors=True)
    epoch_s = history["seconds"]
    return {"model": model, "train_rows": rows, "val_rows": summary["per_split"].get("val", 0),
            "num_proc": run["num_proc"], "steps_per_epoch": run["steps_per_epoch"], "batch_size": batch,
            "threads_per_rank": run["threads_per_rank"], "run_json_wall_s": run["wall_seconds"],
            "epoch_s": round(epoch_s, 1), "call_s": round(outer, 1),
            "images_per_s_wall": round(rows / run["wall_seconds"], 1), "images_per_s_epoch": round(rows / epoch_s, 1),
            "images_per_s_steps": round(run["steps_per_epoch"] * run["num_proc"] * batch / epoch_s, 1),
            **{k: history.get(k) for k in ("loss", "val_loss", "val_accuracy")}, "jvm_peak_rss_mb": rss.peaks["jvm"],
            "loadavg_at_start": load_start, "loadavg_at_end": loadavg()}


RUNS = (("horovod_1", "1 Horovod rank", None), ("horovod_2", "2 Horovod ranks", "efficiency"),
        ("tf_distribute_1", "1 tf-distribute rank", None),
        ("tf_distribute_2", "2 tf-distribute ranks", "efficiency_tf_distribute"),
        ("independent_2", "2 independent processes", "independent_2_vs_1"))


def format_rates(entries: list[dict]) -> str:
    rows = []
    for e in entries:
        for key, label, ratio_key in RUNS:
            run = e.get(key)
            if run:
                rows.append([f"{e['model']}: {label}", run["images_per_s"], fmt(e.get(ratio_key), 2),
                             " / ".join(f"{c:.2f}" for c in run.get("cpu_cores_per_process", [])),
                             run.get("core_ms_per_image"), run["window_s"], pct(run.get("others_share")),
                             run.get("outside_fit_s"), " / ".join(fmt(m) for m in run["maxrss_mb"])])
    return table(["training run", "images/s", "/ baseline", "CPU cores busy, per process", "core-ms per image",
                  "window s", "other users' share", "outside fit() s", "peak RSS MiB, per process"], rows,
                 left=(0, 3, 8))
