"""Preprocessing throughput: the real Spark job against its own first pass, ``stage_images``, in plain processes
(docs/performance.md, "What is measured", 1)."""
from __future__ import annotations

import cProfile
import io
import json
import logging
import os
import pstats
import shutil
import time
import urllib.error
import urllib.request
from datetime import datetime

from bench.harness import FIXED_COST_IMAGES, MB, fmt, pct, run_at_barrier, table, timed
from bench.monitors import CpuUse, PeakRss, maxrss_mb

logger = logging.getLogger(__name__)

# The driver's calls that make up the Spark job's wall time: the decode job, each split's write, the steps between.
SPARK_DRIVER_CALLS = ("(collect)", "(parquet)", "(group_duplicates)", "(assign_splits)", "(discover)",
                      "(materialize_dataset)", "(createDataFrame)", "(__exit__)", "(unpersist)")


def _per_process(reports: list[dict]) -> list[dict]:
    return [{"images": r["images"], "seconds": round(r["seconds"], 3), "maxrss_mb": r["maxrss_mb"]} for r in reports]


def _stage_worker(location, index, processes, size, max_pixels, url, hashes_path, barrier, queue) -> None:
    from covid_spark.inputs.sources import discover
    from covid_spark.stages.preprocess_tasks import stage_images

    records = discover(location).records[index::processes]
    barrier.wait()
    seconds, metas = timed(lambda: list(stage_images(records, size, max_pixels, url)))
    if hashes_path:  # after the clock stops: wanted by the caller, not part of the work timed
        with open(hashes_path, "w", encoding="utf-8") as handle:
            json.dump({m.path: m.dhash for m in metas if m.dhash is not None}, handle)
    queue.put({"images": len(records), "staged": sum(m.row >= 0 for m in metas), "seconds": seconds,
               "maxrss_mb": maxrss_mb()})


def plain_stage(location: str, processes: int, config: dict, out_dir: str, hashes_to: str | None = None) -> dict:
    """``stage_images`` timed in ``processes`` plain processes over alternate records."""
    out_dir, cfg = os.path.abspath(out_dir), config["preprocess"]
    os.makedirs(out_dir, exist_ok=True)
    hash_files = [f"{hashes_to}-{i}.json" if hashes_to else None for i in range(processes)]
    reports, wall, cpu = run_at_barrier(
        _stage_worker, [(location, i, processes, int(cfg["image_size"]), int(cfg["max_pixels"]),
                         f"file://{out_dir}/plain-{i}.parquet", hash_files[i]) for i in range(processes)], 600, 60)
    images = sum(r["images"] for r in reports)
    written = sum(os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir) if n.endswith(".parquet"))
    shutil.rmtree(out_dir, ignore_errors=True)
    out = {"processes": processes, "images": images, "staged": sum(r["staged"] for r in reports),
           "seconds": round(wall, 3), "images_per_s": round(images / wall, 1), "written_bytes": written,
           "written_mb": round(written / MB, 1), "per_process": _per_process(reports), "cpu": cpu}
    if hashes_to:
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
    """Each Spark job after ``after_job_id``: description, wall seconds, per-stage task metrics; None without a UI."""
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


def spark_fixed_costs(spark_factory, source: str, workdir: str, config: dict, make_input) -> tuple:
    """``(spark, costs)``: the session's start-up and the job twice on a tiny input made by ``make_input``."""
    from covid_spark.stages.preprocess import preprocess

    tiny, output = make_input(source, os.path.join(workdir, "input-tiny"), FIXED_COST_IMAGES), f"{workdir}/ds-tiny"
    session, spark = timed(spark_factory)
    times = []
    for _ in range(2):
        seconds, summary = timed(preprocess, spark, tiny, output, config, overwrite=True)
        times.append(seconds)
    shutil.rmtree(output, ignore_errors=True)
    return spark, {"session_start_s": round(session, 3), "tiny_job_images": summary["inputs"],
                   "tiny_job_first_s": round(times[0], 3), "tiny_job_s": round(times[1], 3)}


def ratio(a: float | None, b: float) -> float | None:
    return None if a is None else round(a / b, 3)


def against_pair(run: dict, pair: dict, images: int, fixed_job_s: float) -> dict:
    """``pair``, ``spark`` (with its time less the fixed cost) and both Spark rates over the pair's."""
    net = run["seconds"] - fixed_job_s
    run.update(net_seconds=round(net, 3), net_images_per_s=round(images / net, 1) if net > 0 else None)
    return {"pair": pair, "spark": run, "spark_vs_pair": ratio(run["images_per_s"], pair["images_per_s"]),
            "spark_net_vs_pair": ratio(run["net_images_per_s"], pair["images_per_s"])}


def run_size(spark, location: str, output: str, config: dict, fixed_job_s: float, single: bool = True,
             hashes_to: str | None = None) -> dict:
    """One plain process (if ``single``), two (``plain_stage``), then the Spark job, on one input; with the ratios."""
    logger.info("preprocess bench: %s: %s2 processes, the Spark job", location, "1 process, " if single else "")
    one = plain_stage(location, 1, config, f"{output}-plain1") if single else None
    pair = plain_stage(location, 2, config, f"{output}-plain2", hashes_to)
    run = spark_preprocess(spark, location, output, config)
    entry = dict(against_pair(run, pair, pair["images"], fixed_job_s), images=pair["images"], input=location)
    if one:
        entry.update(single=one, pair_vs_single=ratio(pair["images_per_s"], one["images_per_s"]),
                     spark_vs_single=ratio(run["images_per_s"], one["images_per_s"]))
    return entry


def format_preprocess(entries: list[dict], fixed: dict) -> list[str]:
    """Spark's fixed costs, images/s and CPU per size, and where the largest size's Spark job spent its time."""
    return [format_sizes(entries), format_cpu(entries), format_jobs(max(entries, key=lambda e: e["images"])), (
            f"Spark fixed costs: session start {fmt(fixed['session_start_s'])} s; the job on {fixed['tiny_job_images']}"
            f" images {fmt(fixed['tiny_job_first_s'])} s the first time (starts the Python workers), "
            f"{fmt(fixed['tiny_job_s'])} s the next (subtracted for the net rates).")]


def format_sizes(entries: list[dict]) -> str:
    return table(["images", "input", "1 plain process", "2 plain processes", "Spark job", "Spark − fixed cost",
                  "Spark / pair", "(Spark − fixed) / pair", "pair / single"],
                 [[f"{e['images']:,}", e.get("kind") or e.get("size") or "",
                   (e.get("single") or {}).get("images_per_s"),
                   e["pair"]["images_per_s"], e["spark"]["images_per_s"], e["spark"]["net_images_per_s"],
                   fmt(e["spark_vs_pair"], 2), fmt(e["spark_net_vs_pair"], 2), fmt(e.get("pair_vs_single"), 2)]
                  for e in entries], left=(1,))


def format_cpu(entries: list[dict]) -> str:
    rows = []
    for e in entries:
        for key, label in (("single", "1 plain process"), ("pair", "2 plain processes"), ("spark", "Spark job")):
            run = e.get(key)
            if run:
                ours = run["cpu"]["ours_core_s"]
                rss = ([p["maxrss_mb"] for p in run["per_process"]] if key != "spark" else
                       [run["peak_rss_mb"]["jvm"], run["peak_rss_mb"]["spark_python_workers"]])
                rows.append([f"{e['images']:,}: {label}", run["cpu"]["wall_s"], ours["total"],
                             1000 * ours["total"] / e["images"], " / ".join(fmt(ours[k]) for k in (
                                 "jvm", "spark_python_workers", "driver", "other_children")),
                             pct(run["cpu"]["others_share"]), " / ".join(fmt(m) for m in rss)])
    return table(["preprocess run", "wall s", "our core-s", "our core-ms per image",
                  "JVM / Spark Python / driver / other core-s", "other users' share", "peak RSS MiB: each process "
                  "(Spark: JVM / Python workers)"], rows, left=(0, 4, 6))


def format_jobs(entry: dict) -> str | None:
    jobs = entry["spark"].get("jobs")
    if not jobs:
        return None
    rows = [[job["job"][:60], job["seconds"]] + [sum(s[k] for s in job["stages"]) for k in
                                                 ("task_s", "jvm_cpu_s", "gc_s", "shuffle_write_mb", "output_mb")]
            for job in jobs]
    rows.append(["whole job (driver wall, incl. driver-side steps)", entry["spark"]["seconds"], "", "", "", "", ""])
    return table([f"Spark job ({entry['images']:,} images)", "wall s", "task s", "JVM CPU s", "GC s", "shuffle MiB",
                  "written MiB"], rows)
