"""Preprocessing throughput: the real Spark preprocess job against plain Python processes.

The plain baselines run the job's own per-file function over the same inventory, in fresh processes that
import everything before the clock starts: ``plain_decode`` calls ``read_and_decode`` (read, decode,
resize, perceptual hash) and writes nothing; ``plain_stage`` runs the job's whole first pass,
``stage_images``, which also writes the rows to Parquet as a Spark task does. The Spark figure is the whole
job: decode, duplicate grouping, split assignment and the Petastorm write of three splits.
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

from bench.harness import MB, collect, fmt, pct, reap, table
from bench.monitors import CpuUse, PeakRss, maxrss_mb

logger = logging.getLogger(__name__)

# Driver-side calls that account for the Spark job's wall time: the decode job (collect), each split's
# write, and the pure steps in between.
SPARK_DRIVER_CALLS = ("(collect)", "(parquet)", "(group_duplicates)", "(assign_splits)", "(discover)",
                      "(materialize_dataset)", "(createDataFrame)", "(__exit__)", "(unpersist)")
DECODE_CALLS = ("(read_and_decode)", "(decode_file)", "(dhash)", "(draft)", "(load)", "(resize)", "(_to_rgb)",
                "(_upright)", "(_open)", "(_sniff)", "(array)", "method 'read'")


def paths_of(location: str) -> list[str]:
    from covid_spark.inputs.sources import discover

    return [r["path"] for r in discover(location).records]


def run_at_barrier(target, args_per_worker: list[tuple], start_timeout: float, join_timeout: float):
    """Spawn one process per argument tuple (``target(*args, barrier, queue)``), release them together at
    a barrier and time them until each has reported.

    Returns ``(reports, wall seconds, CpuUse result)``; the workers are reaped inside the CPU window so
    their CPU time is counted.
    """
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(args_per_worker) + 1), ctx.Queue()
    workers = [ctx.Process(target=target, args=(*args, barrier, queue), daemon=True) for args in args_per_worker]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(timeout=start_timeout)
        started = time.perf_counter()
        with CpuUse() as cpu:
            reports = collect(queue, workers)
            wall = time.perf_counter() - started
            reap(workers, join_timeout)
    finally:
        reap(workers, 0)
    return reports, wall, cpu.result


def _per_process(reports: list[dict]) -> list[dict]:
    return [{"images": r["images"], "seconds": round(r["seconds"], 3), "maxrss_mb": r["maxrss_mb"]} for r in reports]


def _decode_worker(paths, size, max_pixels, barrier, queue) -> None:
    from covid_spark.stages.preprocess import read_and_decode

    barrier.wait()
    started = time.perf_counter()
    ok = sum(read_and_decode(path, size, max_pixels)[0].image is not None for path in paths)
    queue.put({"images": len(paths), "decoded": ok, "seconds": time.perf_counter() - started,
               "maxrss_mb": maxrss_mb()})


def plain_decode(paths: list[str], processes: int, size: int, max_pixels: int) -> dict:
    """Decode ``paths``, split round-robin over ``processes`` independent processes at once; the wall
    time runs from the barrier to the last process's report."""
    reports, wall, cpu = run_at_barrier(_decode_worker, [(paths[i::processes], size, max_pixels)
                                                         for i in range(processes)], 120, 30)
    decoded = sum(r["decoded"] for r in reports)
    if decoded != len(paths):
        logger.warning("plain decode: %d of %d images decoded", decoded, len(paths))
    return {"processes": processes, "images": len(paths), "decoded": decoded, "seconds": round(wall, 3),
            "images_per_s": round(len(paths) / wall, 1), "per_process": _per_process(reports), "cpu": cpu}


def _stage_worker(location, index, processes, size, max_pixels, url, hashes_path, barrier, queue) -> None:
    from covid_spark.inputs.sources import discover
    from covid_spark.stages.preprocess import stage_images

    records = discover(location).records[index::processes]
    barrier.wait()
    started = time.perf_counter()
    metas = list(stage_images(records, size, max_pixels, url))
    seconds = time.perf_counter() - started
    if hashes_path:  # after the clock stops: wanted by the caller, not part of the work timed
        with open(hashes_path, "w", encoding="utf-8") as handle:
            json.dump({m.path: m.dhash for m in metas if m.dhash is not None}, handle)
    queue.put({"images": len(records), "staged": sum(m.row >= 0 for m in metas), "seconds": seconds,
               "maxrss_mb": maxrss_mb()})


def plain_stage(location: str, processes: int, size: int, max_pixels: int, out_dir: str,
                hashes: bool = False) -> dict:
    """The preprocess job's first pass, ``stage_images``, in ``processes`` independent plain processes at once.

    Each process lists ``location`` as the job does, takes every ``processes``-th record, and reads, decodes,
    resizes and hashes those files and writes the good rows to one Parquet file in ``out_dir``, as a Spark
    task of the job does; this process never holds the records. With ``hashes``, each process also writes
    ``{path: dhash}`` to a JSON file after its clock stops, named in the result's ``hash_files``. The staged
    files stay in ``out_dir`` (the caller deletes it).
    """
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    hash_files = [os.path.join(out_dir, f"hashes-{i}.json") if hashes else None for i in range(processes)]
    reports, wall, cpu = run_at_barrier(
        _stage_worker, [(location, i, processes, size, max_pixels, f"file://{out_dir}/plain-{i}.parquet",
                         hash_files[i]) for i in range(processes)], 600, 60)
    images = sum(r["images"] for r in reports)
    written = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir) if n.endswith(".parquet"))
    out = {"processes": processes, "images": images, "staged": sum(r["staged"] for r in reports),
           "seconds": round(wall, 3), "images_per_s": round(images / wall, 1), "written_bytes": written,
           "written_mb": round(written / MB, 1), "per_process": _per_process(reports), "cpu": cpu}
    if hashes:
        out["hash_files"] = hash_files
    return out


def _top_functions(profile: cProfile.Profile, wanted: tuple[str, ...], limit: int) -> list[dict]:
    """Cumulative time of the profiled functions whose location contains one of ``wanted``."""
    rows = []
    for (filename, line, name), (_cc, calls, _tt, cumulative, _callers) in pstats.Stats(
            profile, stream=io.StringIO()).stats.items():
        if any(w in f"{filename}:{line}({name})" for w in wanted):
            rows.append({"function": f"{os.path.basename(filename)}:{name}", "calls": calls,
                         "seconds": round(cumulative, 3)})
    return sorted(rows, key=lambda r: -r["seconds"])[:limit]


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


def job_breakdown(spark, after_job_id: int) -> list[dict] | None:
    """Each Spark job after ``after_job_id``: description, wall seconds and per-stage task metrics.

    Per stage: ``task_s`` (sum of task wall times, which include waiting for the Python worker),
    ``jvm_cpu_s`` (the JVM's task threads only), ``gc_s``, and MiB shuffled, written and spilled. None when
    the session has no UI (the REST API lives there).
    """
    jobs, stages = _rest(spark, "jobs"), _rest(spark, "stages")
    if jobs is None or stages is None:
        return None

    def when(stamp: str) -> datetime:
        return datetime.strptime(stamp.replace("GMT", ""), "%Y-%m-%dT%H:%M:%S.%f")

    by_id = {st["stageId"]: st for st in stages if st.get("status") == "COMPLETE"}
    out = []
    for job in sorted((j for j in jobs if j["jobId"] > after_job_id), key=lambda j: j["jobId"]):
        seconds = None
        if job.get("completionTime") and job.get("submissionTime"):
            seconds = round((when(job["completionTime"]) - when(job["submissionTime"])).total_seconds(), 3)
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


def spark_preprocess(spark, input_location: str, output: str, config: dict) -> dict:
    """Run the real preprocess job once; wall time, throughput, counts, a driver profile, memory and CPU."""
    from covid_spark.stages.preprocess import preprocess

    profile = cProfile.Profile()  # wall-clock timer: blocking JVM calls show their duration
    first_job = max((j["jobId"] for j in _rest(spark, "jobs") or []), default=-1)
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
            "driver_profile": _top_functions(profile, SPARK_DRIVER_CALLS, 12), "jobs": job_breakdown(spark, first_job),
            "peak_rss_mb": rss.peaks, "cpu": cpu.result,
            "python_worker_peaks_mb": [dict(w, pid=pid) for pid, w in sorted(rss.workers.items())]}


def profile_decode(paths: list[str], size: int, max_pixels: int) -> list[dict]:
    """Where one process spends its CPU time per image: cProfile of ``read_and_decode`` on ``paths``."""
    from covid_spark.stages.preprocess import read_and_decode

    profile = cProfile.Profile(time.process_time)
    profile.enable()
    for path in paths:
        read_and_decode(path, size, max_pixels)
    profile.disable()
    rows = _top_functions(profile, DECODE_CALLS, 14)
    for row in rows:
        row["ms_per_image"] = round(1000 * row["seconds"] / max(1, len(paths)), 2)
    return rows


def spark_fixed_costs(spark_factory, tiny_input: str, output: str, config: dict) -> tuple:
    """Start Spark (``spark_factory()``) and run the job on a tiny input twice; return ``(spark, costs)``.

    The first tiny job also starts Spark's Python workers; the second is the steady fixed cost per job,
    subtracted for the ``net`` throughput.
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


def net_rate(run: dict, images: int, fixed_job_s: float) -> float | None:
    """Images/s of a Spark run less the fixed cost per job; None when the run took no longer than that."""
    net = run["seconds"] - fixed_job_s
    return round(images / net, 1) if net > 0 else None


def ratio(a: float | None, b: float) -> float | None:
    return None if a is None else round(a / b, 3)


def run_size(spark, input_location: str, output: str, config: dict, fixed_job_s: float) -> dict:
    """One plain process, two plain processes, then the Spark job, on one input; with the ratios."""
    cfg = config["preprocess"]
    size, max_pixels = int(cfg["image_size"]), int(cfg["max_pixels"])
    paths = paths_of(input_location)
    logger.info("preprocess bench: %d images: 1 process, 2 processes, the Spark job", len(paths))
    single = plain_decode(paths, 1, size, max_pixels)
    pair = plain_decode(paths, 2, size, max_pixels)
    run = spark_preprocess(spark, input_location, output, config)
    run["net_images_per_s"] = net_rate(run, len(paths), fixed_job_s)
    return {"images": len(paths), "input": input_location, "single": single, "pair": pair, "spark": run,
            "spark_vs_pair": ratio(run["images_per_s"], pair["images_per_s"]),
            "spark_net_vs_pair": ratio(run["net_images_per_s"], pair["images_per_s"]),
            "pair_vs_single": ratio(pair["images_per_s"], single["images_per_s"]),
            "spark_vs_single": ratio(run["images_per_s"], single["images_per_s"])}


# ----------------------------------------------------------------------------------------- tables


def format_sizes(entries: list[dict]) -> str:
    """Images/s per input size: plain processes, the Spark job, the job less its fixed cost; the ratios."""
    return table(["images", "input", "1 plain process", "2 plain processes", "Spark job", "Spark − fixed cost",
                  "Spark / pair", "(Spark − fixed) / pair", "pair / single"],
                 [[f"{e['images']:,}", e.get("kind") or e.get("size") or "", (e.get("single") or {}).get("images_per_s"),
                   e["pair"]["images_per_s"], e["spark"]["images_per_s"], e["spark"]["net_images_per_s"],
                   fmt(e["spark_vs_pair"], 2), fmt(e["spark_net_vs_pair"], 2), fmt(e.get("pair_vs_single"), 2)]
                  for e in entries], left=(1,))


def format_cpu(entries: list[dict]) -> str:
    """Core-seconds each run used (ours, by process kind, per image) and what other users took meanwhile."""
    rows = []
    for e in entries:
        for key, label in (("single", "1 plain process"), ("pair", "2 plain processes"), ("spark", "Spark job")):
            cpu = (e.get(key) or {}).get("cpu")
            if cpu:
                ours = cpu["ours_core_s"]
                rows.append([f"{e['images']:,}: {label}", cpu["wall_s"], ours["total"],
                             1000 * ours["total"] / e["images"], f"{fmt(ours['jvm'])} / {fmt(ours['spark_python_workers'])}"
                             f" / {fmt(ours['driver'])} / {fmt(ours['other_children'])}", pct(cpu["others_share"])])
    return table(["preprocess run", "wall s", "our core-s", "our core-ms per image",
                  "JVM / Spark Python / driver / other core-s", "other users' share of the machine"], rows, left=(0, 4))


def format_jobs(entry: dict) -> str | None:
    """Where the Spark job's time went, job by job: wall, task and JVM CPU seconds, GC, MiB shuffled, written."""
    jobs = entry["spark"].get("jobs")
    if not jobs:
        return None
    rows = [[job["job"][:60], job["seconds"]] + [sum(s[k] for s in job["stages"]) for k in
                                                 ("task_s", "jvm_cpu_s", "gc_s", "shuffle_write_mb", "output_mb")]
            for job in jobs]
    rows.append(["whole job (driver wall, incl. driver-side steps)", entry["spark"]["seconds"], "", "", "", "", ""])
    return table([f"Spark job ({entry['images']:,} images)", "wall s", "task s", "JVM CPU s", "GC s", "shuffle MiB",
                  "written MiB"], rows)
