"""Preprocessing throughput: the real Spark preprocess job against plain Python processes.

The plain baselines call the job's own per-file function (``read_and_decode``: read, decode,
resize, perceptual hash) over the same inventory, in fresh processes started before the clock
starts, and write nothing; or (``plain_stage``, for ``bench.xl``) the job's whole first pass,
``stage_images``, which also writes the rows to Parquet as a Spark task does. The Spark figure is
the whole job: decode, duplicate grouping, split assignment and the Petastorm write of three splits.
"""
from __future__ import annotations

import cProfile
import io
import json
import logging
import multiprocessing as mp
import os
import pstats
import time
import urllib.error
import urllib.request
from datetime import datetime

from bench.memory import CpuUse, PeakRss, maxrss_mb
from bench.procs import collect

logger = logging.getLogger(__name__)

MB = 1024 * 1024


def _decode_worker(paths, size, max_pixels, barrier, queue) -> None:
    """Body of one plain process: wait for the start signal, decode ``paths``, report."""
    from covid_spark.stages.preprocess_tasks import read_and_decode

    barrier.wait()
    started = time.perf_counter()
    ok = 0
    for path in paths:
        ok += read_and_decode(path, size, max_pixels)[0].image is not None
    queue.put({"pid": os.getpid(), "images": len(paths), "decoded": ok,
               "seconds": time.perf_counter() - started, "maxrss_mb": maxrss_mb()})


def plain_decode(paths: list[str], processes: int, size: int, max_pixels: int) -> dict:
    """Decode ``paths`` split round-robin over ``processes`` independent processes at once.

    Processes are spawned and import everything before a barrier; the wall time runs from
    the barrier to the last process's report.
    """
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(processes + 1), ctx.Queue()
    chunks = [paths[i::processes] for i in range(processes)]
    workers = [ctx.Process(target=_decode_worker, args=(chunk, size, max_pixels, barrier, queue), daemon=True)
               for chunk in chunks]
    reports, wall, cpu = run_at_barrier(workers, barrier, queue, start_timeout=120, join_timeout=30)
    decoded = sum(r["decoded"] for r in reports)
    if decoded != len(paths):
        logger.warning("plain decode: %d of %d images decoded", decoded, len(paths))
    return {"processes": processes, "images": len(paths), "decoded": decoded, "seconds": round(wall, 3),
            "images_per_s": round(len(paths) / wall, 1),
            "per_process": [{"images": r["images"], "seconds": round(r["seconds"], 3),
                             "maxrss_mb": r["maxrss_mb"]} for r in reports], "cpu": cpu.result}


def run_at_barrier(workers, barrier, queue, start_timeout: float, join_timeout: float):
    """Start ``workers``, release them together at ``barrier`` and time them until each has reported.

    Returns ``(reports, wall seconds, CpuUse)``; the workers are reaped inside the CPU window so
    their CPU time is counted, and any still alive at the end are terminated.
    """
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=start_timeout)
        started = time.perf_counter()
        with CpuUse() as cpu:
            reports = collect(queue, workers)
            wall = time.perf_counter() - started
            for worker in workers:
                worker.join(timeout=join_timeout)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
    return reports, wall, cpu


def _stage_worker(location, index, processes, size, max_pixels, url, barrier, queue, hashes_path) -> None:
    """Body of one plain staging process: list the input, take its share, wait for the start signal,
    stage the share to ``url``, report."""
    from covid_spark.stages.preprocess_tasks import stage_images
    from covid_spark.inputs.sources import discover

    records = discover(location).records[index::processes]
    barrier.wait()
    started = time.perf_counter()
    metas = list(stage_images(records, size, max_pixels, url))
    seconds = time.perf_counter() - started
    if hashes_path:  # after the clock stops: wanted by the caller, not part of the work timed
        with open(hashes_path, "w", encoding="utf-8") as handle:
            json.dump({m.path: m.dhash for m in metas if m.dhash is not None}, handle)
    queue.put({"pid": os.getpid(), "images": len(records), "staged": sum(m.row >= 0 for m in metas),
               "seconds": seconds, "maxrss_mb": maxrss_mb()})


def plain_stage(location: str, processes: int, size: int, max_pixels: int, out_dir: str,
                hashes: bool = False) -> dict:
    """The preprocess job's first pass, ``stage_images``, in ``processes`` independent plain processes at once.

    Each process lists ``location`` as the job does (``discover``), takes every ``processes``-th
    record (alternate halves for two), and reads, decodes, resizes and hashes those files and
    writes the good rows with pyarrow to one Parquet file in ``out_dir``, exactly as a Spark task
    of the job does. Processes are spawned and import everything and list the input before a
    barrier; the wall time runs from the barrier to the last process's report. This process never
    holds the records, so its memory stays what it was. With ``hashes``, each process also writes
    ``{path: dhash}`` to a JSON file after its clock stops; the result's ``hash_files`` names them.
    The staged files stay in ``out_dir`` (the caller deletes it).
    """
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(processes + 1), ctx.Queue()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    hash_files = [os.path.join(out_dir, f"hashes-{i}.json") if hashes else None for i in range(processes)]
    workers = [ctx.Process(target=_stage_worker, daemon=True,
                           args=(location, i, processes, size, max_pixels,
                                 f"file://{os.path.join(out_dir, f'plain-{i}.parquet')}", barrier, queue,
                                 hash_files[i]))
               for i in range(processes)]
    reports, wall, cpu = run_at_barrier(workers, barrier, queue, start_timeout=600, join_timeout=60)
    images = sum(r["images"] for r in reports)
    written = sum(os.path.getsize(os.path.join(out_dir, name)) for name in os.listdir(out_dir)
                  if name.endswith(".parquet"))
    out = {"processes": processes, "images": images, "staged": sum(r["staged"] for r in reports),
           "seconds": round(wall, 3), "images_per_s": round(images / wall, 1), "written_bytes": written,
           "written_mb": round(written / MB, 1),
           "per_process": [{"images": r["images"], "seconds": round(r["seconds"], 3), "maxrss_mb": r["maxrss_mb"]}
                           for r in reports], "cpu": cpu.result}
    if hashes:
        out["hash_files"] = hash_files
    return out


def _top_functions(profile: cProfile.Profile, wanted: tuple[str, ...], limit: int = 12) -> list[dict]:
    """Cumulative wall time of the profiled functions whose location contains one of ``wanted``."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (filename, line, name), (_cc, calls, _tt, cumulative, _callers) in stats.stats.items():
        where = f"{filename}:{line}({name})"
        if any(w in where for w in wanted):
            rows.append({"function": f"{os.path.basename(filename)}:{name}", "calls": calls,
                         "seconds": round(cumulative, 3)})
    rows.sort(key=lambda r: -r["seconds"])
    return rows[:limit]


def _rest(spark, path: str):
    """GET one Spark monitoring REST endpoint of this application; None without a UI."""
    sc = spark.sparkContext
    if not sc.uiWebUrl:
        return None
    url = f"{sc.uiWebUrl}/api/v1/applications/{sc.applicationId}/{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        logger.warning("Spark REST API %s: %s", url, exc)
        return None


def _when(stamp: str) -> datetime:
    return datetime.strptime(stamp.replace("GMT", ""), "%Y-%m-%dT%H:%M:%S.%f")


def last_job_id(spark) -> int:
    """The id of the latest Spark job (-1 when none, or no UI to ask)."""
    jobs = _rest(spark, "jobs") or []
    return max((j["jobId"] for j in jobs), default=-1)


def job_breakdown(spark, after_job_id: int) -> list[dict] | None:
    """Each Spark job after ``after_job_id``: its description, wall seconds and per-stage task metrics.

    Per stage: ``task_s`` (sum of task wall times, which include waiting for the Python worker),
    ``jvm_cpu_s`` (CPU of the JVM's task threads only), ``gc_s``, and MiB shuffled, written and spilled. None when
    the session has no UI (the REST API lives there).
    """
    jobs = _rest(spark, "jobs")
    stages = _rest(spark, "stages")
    if jobs is None or stages is None:
        return None
    by_id = {st["stageId"]: st for st in stages if st.get("status") == "COMPLETE"}
    out = []
    for job in sorted((j for j in jobs if j["jobId"] > after_job_id), key=lambda j: j["jobId"]):
        seconds = None
        if job.get("completionTime") and job.get("submissionTime"):
            seconds = round((_when(job["completionTime"]) - _when(job["submissionTime"])).total_seconds(), 3)
        out.append({"job": job.get("description") or job["name"], "seconds": seconds, "tasks": job["numTasks"],
                    "stages": [{"stage": st["name"].split(" at ")[0], "tasks": st["numTasks"],
                                "task_s": round(st["executorRunTime"] / 1000, 2),
                                "jvm_cpu_s": round(st["executorCpuTime"] / 1e9, 2),
                                "gc_s": round(st["jvmGcTime"] / 1000, 2),
                                "shuffle_write_mb": round(st["shuffleWriteBytes"] / MB, 1),
                                "output_mb": round(st["outputBytes"] / MB, 1),
                                "spill_mb": round(st["diskBytesSpilled"] / MB, 1)}
                               for st in (by_id[i] for i in sorted(job["stageIds"]) if i in by_id)]})
    return out


# Driver-side calls that account for the Spark job's wall time: the decode job (collect),
# each split's write, and the pure steps in between.
SPARK_DRIVER_CALLS = ("(collect)", "(parquet)", "(group_duplicates)", "(assign_splits)", "(discover)",
                      "(materialize_dataset)", "(createDataFrame)", "(__exit__)", "(unpersist)")


def spark_preprocess(spark, input_location: str, output: str, config: dict) -> dict:
    """Run the real preprocess job once; wall time, throughput, counts and a driver profile."""
    from covid_spark.stages.preprocess import preprocess

    profile = cProfile.Profile()  # default timer is wall-clock: blocking JVM calls show their duration
    first_job = last_job_id(spark)
    with PeakRss() as rss, CpuUse() as cpu:
        started = time.perf_counter()
        profile.enable()
        try:
            summary = preprocess(spark, input_location, output, config, overwrite=True)
        finally:
            profile.disable()
        wall = time.perf_counter() - started
    return {"images": summary["inputs"], "written": summary["written"], "rejected": len(summary["rejected"]),
            "duplicate_groups": len(summary["duplicates"]),
            "images_in_duplicate_groups": sum(len(g) for g in summary["duplicates"]),
            "row_groups": summary["row_groups"], "seconds": round(wall, 3),
            "images_per_s": round(summary["inputs"] / wall, 1),
            "driver_profile": _top_functions(profile, SPARK_DRIVER_CALLS), "jobs": job_breakdown(spark, first_job),
            "peak_rss_mb": rss.peaks,
            "python_worker_peaks_mb": [dict(w, pid=pid) for pid, w in sorted(rss.workers.items())], "cpu": cpu.result}


def profile_decode(paths: list[str], size: int, max_pixels: int) -> list[dict]:
    """Where one process spends its time per image: cProfile of ``read_and_decode`` on ``paths``."""
    from covid_spark.stages.preprocess_tasks import read_and_decode

    profile = cProfile.Profile(time.process_time)
    profile.enable()
    for path in paths:
        read_and_decode(path, size, max_pixels)
    profile.disable()
    wanted = ("(read_and_decode)", "(decode_file)", "(dhash)", "(draft)", "(load)", "(resize)",
              "(_to_rgb)", "(_upright)", "(_open)", "(_sniff)", "(array)", "method 'read'")
    rows = _top_functions(profile, wanted, limit=14)
    for row in rows:
        row["ms_per_image"] = round(1000 * row["seconds"] / max(1, len(paths)), 2)
    return rows


def spark_fixed_costs(spark_factory, tiny_input: str, output: str, config: dict) -> tuple:
    """Start Spark and run the job on a tiny input twice; return ``(spark, costs)``.

    ``spark_factory()`` builds the session. The first tiny job also starts Spark's Python
    workers; the second is the steady per-job fixed cost subtracted for ``net`` throughput.
    """
    from covid_spark.stages.preprocess import preprocess

    started = time.perf_counter()
    spark = spark_factory()
    session = time.perf_counter() - started
    times = []
    for _ in range(2):
        started = time.perf_counter()
        summary = preprocess(spark, tiny_input, output, config, overwrite=True)
        times.append(time.perf_counter() - started)
    return spark, {"session_start_s": round(session, 3), "tiny_job_images": summary["inputs"],
                   "tiny_job_first_s": round(times[0], 3), "tiny_job_s": round(times[1], 3)}


def run_size(spark, input_location: str, output: str, config: dict, fixed_job_s: float) -> dict:
    """Single process, two processes, then Spark, on one input; with the ratios."""
    from covid_spark.inputs.sources import discover

    cfg = config["preprocess"]
    size, max_pixels = int(cfg["image_size"]), int(cfg["max_pixels"])
    paths = [r["path"] for r in discover(input_location).records]
    logger.info("preprocess bench: %d images, 1 process", len(paths))
    single = plain_decode(paths, 1, size, max_pixels)
    logger.info("preprocess bench: %d images, 2 processes", len(paths))
    pair = plain_decode(paths, 2, size, max_pixels)
    logger.info("preprocess bench: %d images, Spark job", len(paths))
    spark_run = spark_preprocess(spark, input_location, output, config)
    net_seconds = spark_run["seconds"] - fixed_job_s
    spark_run["net_images_per_s"] = round(len(paths) / net_seconds, 1) if net_seconds > 0 else None
    return {"images": len(paths), "input": input_location, "single": single, "pair": pair, "spark": spark_run,
            "spark_vs_pair": round(spark_run["images_per_s"] / pair["images_per_s"], 3),
            "spark_net_vs_pair": (round(spark_run["net_images_per_s"] / pair["images_per_s"], 3)
                                  if spark_run["net_images_per_s"] else None),
            "pair_vs_single": round(pair["images_per_s"] / single["images_per_s"], 3),
            "spark_vs_single": round(spark_run["images_per_s"] / single["images_per_s"], 3)}
