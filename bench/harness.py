"""What every benchmark shares: paths, the Spark session, facts about the machine, spawned processes,
saving results, Markdown tables, and the one table of goals with the verdicts judged against it."""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue as queue_module
import sys
import time
import timeit
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data")
CXR_XL = os.path.abspath(os.path.join(DATA, "cxr-xl"))
RESULTS = os.path.join(REPO, "bench", "results.json")
FIXED_COST_IMAGES = 6  # the tiny input whose job time is Spark's fixed cost per preprocess job
MB = 1024 * 1024


@dataclass(frozen=True)
class Goal:
    """A figure a benchmark measures, the target it must reach and the direction that counts as met."""

    what: str
    direction: str  # ">=": the figure must be at least the target; "<=": at most
    target: float

    @property
    def rule(self) -> str:
        return f"{'≥' if self.direction == '>=' else '≤'} {self.target:g}"

    def met(self, measured: float) -> bool:
        return measured >= self.target if self.direction == ">=" else measured <= self.target


GOALS = {
    "preprocess_spark_vs_pair": Goal("preprocess: Spark job / two plain processes, largest size", ">=", 0.8),
    "read_vs_train": Goal("read: Petastorm → tf.data images/s / one rank's training rate", ">=", 5.0),
    "train_efficiency": Goal("training: 2 ranks / two independent processes", ">=", 0.9),
    "preprocess_net_vs_pair": Goal("preprocess: (Spark job − its fixed cost) / two plain processes", ">=", 0.8),
    "memory_growth": Goal("memory: peak at the largest size / at the reference size", "<=", 1.3),
    "duplicates_s": Goal("duplicate grouping on one core, seconds", "<=", 10.0),
    "predict_vs_plain": Goal("predict: Spark / (parallelism × one plain process)", ">=", 0.8),
}


def verdict(key: str, measured: float | None, subject: str = "", detail: str = "") -> dict | None:
    """``measured`` judged against ``GOALS[key]`` (``subject``: what was measured); None when nothing was."""
    if measured is None:
        return None
    goal = GOALS[key]
    met = goal.met(measured)
    return {"key": key, "goal": f"{goal.what} {goal.rule}" + (f" ({subject})" if subject else ""),
            "measured": measured, "direction": goal.direction, "target": goal.target, "met": met,
            "miss_pct": None if met else round(100 * abs(measured - goal.target) / goal.target, 1), "detail": detail}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(function, *args, **kwargs) -> tuple[float, object]:
    """``(wall seconds, result)`` of one call."""
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """``a / b`` rounded to ``digits``; None when either is missing or ``b`` is zero."""
    return round(a / b, digits) if a is not None and b else None


def items(text: str | None) -> list[str]:
    """A comma-separated option as its non-empty items."""
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def speed_reference(repeats: int = 3) -> dict:
    """Single-core rates, best of ``repeats``: a Python loop (M iterations/s) and SHA-256 (MiB/s)."""
    block = bytes(32 * MB)
    loop, sha = (min(timeit.repeat(work, number=1, repeat=repeats)) for work in (
        lambda: sum(i for i in range(1_000_000)), lambda: hashlib.sha256(block).digest()))
    return {"python_mloops_per_s": round(1 / loop, 1), "sha256_mb_per_s": round(32 / sha, 1)}


def machine() -> dict:
    """Cores usable here, CPU model, RAM, platform, load, library versions and the speed reference."""
    import psutil

    from covid_spark.data.rundir import versions

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), None)
    except OSError:
        model = None
    return {"nproc": len(usable_cpus()), "cpu_count": os.cpu_count(), "cpu_model": model or "unknown",
            "ram_gib": round(psutil.virtual_memory().total / 1024 ** 3, 1), "platform": platform.platform(),
            "load_avg_at_start": loadavg(), "speed_reference": speed_reference(), "versions": versions()}


def decode_rate(images: int = 400) -> dict:
    """How fast one plain process decodes and resizes cxr-xl images (images/s), with the load and the time."""
    from covid_spark.constants import DEFAULT_IMAGE_SIZE
    from covid_spark.inputs.images import decode_image

    blobs = []
    for path in sorted(glob.glob(os.path.join(CXR_XL, "*", "*.jpg")))[:images]:
        with open(path, "rb") as handle:
            blobs.append(handle.read())
    seconds, _ = timed(lambda: [decode_image(blob, DEFAULT_IMAGE_SIZE) for blob in blobs])
    return {"decode_images_per_s": round(len(blobs) / seconds, 1), "loadavg": loadavg(),
            "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def machine_line(m: dict) -> str:
    ref = m["speed_reference"]
    return (f"{m['nproc']} CPUs ({m['cpu_model']}, {ref['python_mloops_per_s']} M Python loops/s, "
            f"SHA-256 {ref['sha256_mb_per_s']} MiB/s on one core), {m['ram_gib']} GiB RAM")


def start_spark(master: str = "local[2]", settings: dict[str, str] | None = None, app: str = "covid-spark bench"):
    """A SparkSession on ``master`` with ``settings``, by default conf/spark-local.conf's with the UI on (for its
    REST API) and no progress bar; logs errors only."""
    from pyspark.sql import SparkSession

    if not settings:
        settings = {}
        with open(os.path.join(REPO, "conf", "spark-local.conf"), encoding="utf-8") as handle:
            for line in (raw.strip() for raw in handle):
                if line and not line.startswith("#"):
                    key, _, value = line.partition(" ")
                    settings[key] = value.strip()
        options = settings.get("spark.driver.extraJavaOptions", "")
        settings["spark.driver.extraJavaOptions"] = options.replace("=conf/", "=" + os.path.join(REPO, "conf") + "/")
        settings.update({"spark.ui.showConsoleProgress": "false", "spark.ui.enabled": "true"})
    builder = SparkSession.builder.appName(app)
    for key, value in dict(settings, **{"spark.master": master}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def collect(results, workers, timeout: float = 3600.0) -> list:
    """One report per worker from the ``results`` queue; RuntimeError if one died first, TimeoutError."""
    reports, deadline = [], time.monotonic() + timeout
    while len(reports) < len(workers):
        dead = [w for w in workers if w.exitcode is not None]
        try:  # a report a dead worker left in the pipe gets a longer, last chance
            reports.append(results.get(timeout=2.0 if len(dead) > len(reports) else 1.0))
        except queue_module.Empty:
            if len(dead) > len(reports):
                codes = ", ".join(f"pid {w.pid}: exit {w.exitcode}" for w in dead)
                raise RuntimeError(f"benchmark process(es) died without a result ({codes})") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"benchmark processes gave {len(reports)} of {len(workers)} results in "
                                   f"{timeout:.0f} s") from None
    return reports


def reap(workers, timeout: float = 60.0) -> None:
    """Join each worker, terminating any still alive after ``timeout`` seconds."""
    for worker in workers:
        worker.join(timeout=timeout)
        if worker.is_alive():
            worker.terminate()


def spawn(target, args_per_worker, *shared, daemon: bool = True) -> tuple[list, object]:
    """``target(*args, *shared, queue)`` started in a fresh spawned process per tuple: ``(workers, queue)``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    workers = [ctx.Process(target=target, args=(*args, *shared, queue), daemon=daemon) for args in args_per_worker]
    for worker in workers:
        worker.start()
    return workers, queue


def run_spawned(target, args_per_worker, *shared, timeout: float = 3600.0, join_timeout: float = 60.0,
                daemon: bool = True) -> list:
    """The reports of ``target(*args, *shared, queue)``, one spawned process per tuple, reaped at the end."""
    workers, queue = spawn(target, args_per_worker, *shared, daemon=daemon)
    try:
        return collect(queue, workers, timeout)
    finally:
        reap(workers, join_timeout)


def _returning(function, args, queue) -> None:
    queue.put(function(*args))


def in_process(function, *args, timeout: float = 3600.0):
    """``function(*args)``, run in a fresh spawned process (not a daemon: it may start processes of its own)."""
    return run_spawned(_returning, [(function, args)], timeout=timeout, join_timeout=120, daemon=False)[0]


def run_at_barrier(target, args_per_worker: list[tuple], start_timeout: float, join_timeout: float):
    """``(reports, wall s, CPU use)`` of ``target(*args, barrier, queue)`` per tuple, released together."""
    from bench.monitors import CpuUse

    barrier = mp.get_context("spawn").Barrier(len(args_per_worker) + 1)
    workers, queue = spawn(target, args_per_worker, barrier)
    try:
        barrier.wait(timeout=start_timeout)
        started = time.perf_counter()
        with CpuUse() as cpu:  # the workers reaped inside, so that their CPU time counts
            reports = collect(queue, workers)
            wall = time.perf_counter() - started
            reap(workers, join_timeout)
    finally:
        reap(workers, 0)
    return reports, wall, cpu.result


def read_json(path: str):
    """The JSON document at ``path``."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load(path: str) -> dict:
    """The JSON results at ``path``; empty when the file is missing or unreadable."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}


def save(results: dict, path: str, section: str | None = None) -> None:
    """``results`` written atomically to ``path`` (under ``section``, keeping the file's other sections)."""
    from covid_spark.data.storage import atomic_write_json

    atomic_write_json(path, results if section is None else dict(load(path), **{section: results}))


OPTIONS = {"input": "images: a folder or manifest", "master": "Spark master", "model": "model to build",
           "config": "job config YAML (default: the packaged defaults)", "output": "results JSON",
           "workdir": "scratch folder, kept (default: a temporary one, removed at the end)"}


def arguments(description: str, **defaults) -> argparse.ArgumentParser:
    """A parser with an option ``--name`` (``_`` written ``-``) per keyword: one of the shared ``OPTIONS`` given its
    default, any other given ``(default, help)``; an int or float default makes the option's type."""
    parser = argparse.ArgumentParser(description=" ".join(description.split()))
    for name, default in defaults.items():
        default, text = default if isinstance(default, tuple) else (default, OPTIONS[name])
        kind = type(default) if isinstance(default, (int, float)) else None
        parser.add_argument(f"--{name.replace('_', '-')}", default=default, type=kind,
                            help=text + (" (default: %(default)s)" if default else ""))
    return parser


def command(module: str, argv) -> str:
    """The command line that ran ``python -m bench.<module>``."""
    return " ".join([f"python -m bench.{module}", *(sys.argv[1:] if argv is None else argv)])


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def pct(share) -> str:
    return "–" if share is None else f"{100 * share:.0f} %"


def table(headings: list[str], rows, left: tuple[int, ...] = (0,)) -> str:
    """A Markdown table, right-aligned but the ``left`` columns; cells not text go through :func:`fmt`."""
    lines = ["| " + " | ".join(headings) + " |",
             "|" + "|".join("---" if i in left else "---:" for i in range(len(headings))) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
