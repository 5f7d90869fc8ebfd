"""Preprocessing throughput: the real Spark job against its own first pass, ``stage_images``, in plain processes
(docs/performance.md, "What is measured", 1)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from datetime import datetime

from bench.harness import FIXED_COST_IMAGES, MB, fmt, in_process, pct, ratio, run_at_barrier, table, timed
from bench.inputs import input_of_kind, sampled_input
from bench.monitors import CpuUse, JvmHeap, PeakRss, maxrss_mb

logger = logging.getLogger(__name__)

MEMORY_KEYS = (("driver_mb", "Python driver (sampled RSS)"),
               ("python_worker_max_mb", "Spark Python worker, largest (sampled RSS)"),
               ("jvm_heap_after_gc_mb", "JVM heap after a full GC"))

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
    per_process = [{"images": r["images"], "seconds": round(r["seconds"], 3), "maxrss_mb": r["maxrss_mb"]}
                   for r in reports]
    out = {"processes": processes, "images": images, "staged": sum(r["staged"] for r in reports),
           "seconds": round(wall, 3), "images_per_s": round(images / wall, 1), "written_bytes": written,
           "written_mb": round(written / MB, 1), "per_process": per_process, "cpu": cpu}
    if hashes_to:
        out["hash_files"] = hash_files
    return out


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
    """Run the real preprocess job once; wall time, throughput, counts, Spark's jobs, memory and CPU."""
    from covid_spark.stages.preprocess import preprocess

    first_job = max((j["jobId"] for j in _rest(spark, "jobs") or []), default=-1)
    with PeakRss() as rss, CpuUse() as cpu:
        wall, summary = timed(preprocess, spark, input_location, output, config, overwrite=True)
    return {"images": summary["inputs"], "written": summary["written"], "rejected": len(summary["rejected"]),
            "duplicate_groups": len(summary["duplicates"]),
            "images_in_duplicate_groups": sum(len(g) for g in summary["duplicates"]),
            "row_groups": summary["row_groups"], "seconds": round(wall, 3),
            "images_per_s": round(summary["inputs"] / wall, 1), "jobs": job_breakdown(spark, first_job),
            "peak_rss_mb": rss.peaks, "cpu": cpu.result,
            "python_worker_peaks_mb": [dict(w, pid=pid) for pid, w in sorted(rss.workers.items())]}


def spark_fixed_costs(spark_factory, source: str, workdir: str, config: dict) -> tuple:
    """``(spark, costs)``: the session's start-up and the job twice on a tiny sample of ``source``."""
    from covid_spark.stages.preprocess import preprocess

    tiny, output = sampled_input(source, os.path.join(workdir, "input-tiny"), FIXED_COST_IMAGES), f"{workdir}/ds-tiny"
    session, spark = timed(spark_factory)
    times = []
    for _ in range(2):
        seconds, summary = timed(preprocess, spark, tiny, output, config, overwrite=True)
        times.append(seconds)
    shutil.rmtree(output, ignore_errors=True)
    return spark, {"session_start_s": round(session, 3), "tiny_job_images": summary["inputs"],
                   "tiny_job_first_s": round(times[0], 3), "tiny_job_s": round(times[1], 3)}


def warm_page_cache(location: str) -> dict:
    """Files and MiB read: every input file once, into the page cache."""
    from covid_spark.inputs.sources import discover

    started, files, total = time.perf_counter(), 0, 0
    for record in discover(location).records:
        try:
            with open(record.path, "rb") as handle:
                total += len(handle.read())
            files += 1
        except OSError:
            pass
    return {"files": files, "mb": round(total / MB, 1), "seconds": round(time.perf_counter() - started, 2)}


def measure_size(spark, source: str, workdir: str, images: int, kind: str, config: dict, fixed_job_s: float,
                 profile: dict, keep: bool, hashes_to: str | None, gc_interval: float) -> dict:
    """One size: one plain process (``profile["single"]``), two, then the Spark job, and their ratios; with
    ``profile["memory"]`` on a warm page cache, then the job again under the memory samplers."""
    import psutil

    logger.info("bench preprocess: %d images (%s)", images, kind)
    setup_s, location = timed(input_of_kind, source, workdir, images, kind)
    output, page_cache, memory = os.path.join(workdir, f"ds-{images}"), None, None
    try:
        if profile["memory"]:
            page_cache = in_process(warm_page_cache, location)
        one = plain_stage(location, 1, config, f"{output}-plain1") if profile["single"] else None
        pair = plain_stage(location, 2, config, f"{output}-plain2", hashes_to)
        run = spark_preprocess(spark, location, output, config)
        if profile["memory"]:
            shutil.rmtree(output, ignore_errors=True)
            driver_before = round(psutil.Process().memory_info().rss / MB, 1)
            with JvmHeap(spark, interval=gc_interval) as heap:  # its forced full GCs pause the JVM: not timed
                memory_run = spark_preprocess(spark, location, output, config)
            run["seconds_of_memory_run"] = memory_run["seconds"]
            workers, daemons = ([w["peak_mb"] for w in memory_run["python_worker_peaks_mb"] if w["role"] == role]
                                for role in ("worker", "daemon"))
            peaks = memory_run["peak_rss_mb"]
            memory = dict(heap.result, driver_mb=peaks["driver"], driver_before_job_mb=driver_before,
                          python_worker_max_mb=max(workers, default=None), python_workers_mb=sorted(workers),
                          python_daemon_mb=max(daemons, default=None),
                          python_workers_sum_mb=peaks["spark_python_workers"], jvm_rss_mb=peaks["jvm"])
        if not keep:
            shutil.rmtree(output, ignore_errors=True)
    finally:
        if kind == "copies":
            shutil.rmtree(location, ignore_errors=True)
    if run["images"] != images or pair["images"] != images:
        logger.warning("bench preprocess: %d images asked, the job read %d and the pair %d",
                       images, run["images"], pair["images"])
    net = run["seconds"] - fixed_job_s
    run.update(net_seconds=round(net, 3), net_images_per_s=round(pair["images"] / net, 1) if net > 0 else None)
    entry = {"pair": pair, "spark": run, "spark_vs_pair": ratio(run["images_per_s"], pair["images_per_s"]),
             "spark_net_vs_pair": ratio(run["net_images_per_s"], pair["images_per_s"]), "images": images,
             "input": location, "kind": kind, "input_setup_s": round(setup_s, 1), "page_cache": page_cache,
             "memory": memory, "duplicates_note": None if kind != "links" else (
                 "input lists each source image several times (symlinks): copies are grouped as duplicates and "
                 "kept in one split")}
    if one:
        entry.update(single=one, pair_vs_single=ratio(pair["images_per_s"], one["images_per_s"]),
                     spark_vs_single=ratio(run["images_per_s"], one["images_per_s"]))
    return entry


def memory_growth(entries: list[dict], reference: int) -> list[dict]:
    """Each process's peak at the largest size over its peak at ``reference`` images."""
    by_size = {e["images"]: e for e in entries if e["memory"]}
    largest = max(by_size.values(), key=lambda e: e["images"], default=None)
    if reference not in by_size or largest["images"] == reference:
        return []
    return [{"process": label, "key": key, "reference_images": reference,
             "reference_mb": by_size[reference]["memory"][key], "largest_images": largest["images"],
             "largest_mb": largest["memory"][key],
             "ratio": ratio(largest["memory"][key], by_size[reference]["memory"][key])} for key, label in MEMORY_KEYS]


def format_preprocess(part: dict) -> str:
    """The preprocess part in Markdown: images/s and CPU per size, where the largest size's Spark job spent its
    time, Spark's fixed costs, memory per size and its growth, the memory settings."""
    entries, fixed = part["sizes"], part["spark_fixed"]
    sizes = table(["images", "input", "1 plain process", "2 plain processes", "Spark job", "Spark − fixed cost",
                   "Spark / pair", "(Spark − fixed) / pair", "pair / single"],
                  [[f"{e['images']:,}", e.get("kind") or e.get("size") or "",
                    (e.get("single") or {}).get("images_per_s"), e["pair"]["images_per_s"], e["spark"]["images_per_s"],
                    e["spark"]["net_images_per_s"], fmt(e["spark_vs_pair"], 2), fmt(e["spark_net_vs_pair"], 2),
                    fmt(e.get("pair_vs_single"), 2)] for e in entries], left=(1,))
    largest = max(entries, key=lambda e: e["images"])  # its Spark jobs, from Spark's REST API (None without a UI)
    jobs = [[job["job"][:60], job["seconds"]] + [sum(s[k] for s in job["stages"]) for k in
                                                 ("task_s", "jvm_cpu_s", "gc_s", "shuffle_write_mb", "output_mb")]
            for job in largest["spark"].get("jobs") or []]
    whole = ["whole job (driver wall, incl. driver-side steps)", largest["spark"]["seconds"], "", "", "", "", ""]
    jobs_table = table([f"Spark job ({largest['images']:,} images)", "wall s", "task s", "JVM CPU s", "GC s",
                        "shuffle MiB", "written MiB"], jobs + [whole]) if jobs else None
    lines = [sizes, format_cpu(entries), jobs_table,
             f"Spark fixed costs: session start {fmt(fixed['session_start_s'])} s; the job on "
             f"{fixed['tiny_job_images']} images {fmt(fixed['tiny_job_first_s'])} s the first time (starts the "
             f"Python workers), {fmt(fixed['tiny_job_s'])} s the next (subtracted for the net rates)."]
    with_memory = [e for e in entries if e["memory"]]
    if with_memory:
        lines.append(table(
            ["images", "driver MiB (before the job)", "Spark Python workers MiB, each",
             "JVM heap after a full GC MiB (of max)", "forced GCs (s)"],
            [[f"{e['images']:,}", f"{fmt(m['driver_mb'])} ({fmt(m['driver_before_job_mb'])})",
              " / ".join(fmt(x) for x in m["python_workers_mb"]), f"{fmt(m['jvm_heap_after_gc_mb'])} "
              f"({fmt(m['jvm_max_heap_mb'])})", f"{m['forced_gc_samples']} ({fmt(m['forced_gc_s'])})"]
             for e, m in ((e, e["memory"]) for e in with_memory)], left=(2,)))
    if part.get("memory_growth"):
        lines.append(table(["peak memory", "at reference size", "MiB", "at largest size", "MiB", "ratio"],
                           [[g["process"], f"{g['reference_images']:,}", g["reference_mb"], f"{g['largest_images']:,}",
                             g["largest_mb"], fmt(g["ratio"], 2)] for g in part["memory_growth"]]))
    lines.append("Memory settings: " + "; ".join(f"{k} = {v}" for k, v in (part.get("settings") or {}).items() if v))
    return "\n\n".join(line for line in lines if line)


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
