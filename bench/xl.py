"""python -m bench.xl [--quick] [--sizes 671,5000,17445,50000] [--models …] [--skip-epoch] [--parts …]

Benchmarks on real data at scale (what `make bench-xl` runs), the 17,445 X-rays of ../shared/data/cxr-xl,
each figure against its baseline in the same run, in a local[2] session with conf/spark-local.conf:

1. **preprocess**: the real job at each size against two plain processes running its first pass
   (``stage_images``) over alternate halves of the files, less the job's time on 6 images (its fixed cost).
   A size up to the source's is a seeded sample stratified by label, listed by absolute path; a larger one
   (or one written ``3000c``) is byte copies in a temporary folder. Peak memory at every size (the driver,
   each Spark Python worker, the JVM's heap after a full GC) and its growth from the reference size.
2. **duplicates**: ``bench.dup_bench.bench_duplicates`` on the real hashes of the largest sample.
3. **predict**: ``bench.predict_bench.bench_predict`` on a sample, with an untrained model.
4. **train**: each model's rate with 2 Horovod ranks over timed steps, and one whole epoch of ``run_training``.

Writes bench/results-xl.json after every part (a failure keeps what was done) and prints Markdown tables.
``--parts`` reruns some parts and merges them into the existing file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

from bench import dup_bench, predict_bench, train_bench
from bench.harness import (DATA, FIXED_COST_IMAGES, REPO, cli_logging, fmt, in_process, loadavg, local_settings,
                           machine, machine_line, pct, save, start_spark, table, verdict, verdict_table)
from bench.inputs import copied_input, sampled_input, source_rows
from bench.monitors import JvmHeap, PeakRss, maxrss_mb
from bench.preprocess_bench import (format_cpu, format_jobs, format_sizes, net_rate, plain_stage, ratio,
                                    spark_fixed_costs, spark_preprocess)

logger = logging.getLogger("bench.xl")

DEFAULT_OUTPUT = os.path.join(REPO, "bench", "results-xl.json")
PARTS = ("preprocess", "duplicates", "predict", "train")
MODELS = ("efficientnet_lite0", "compact", "original")
MEMORY_KEYS = (("driver_mb", "Python driver (sampled RSS)"),
               ("python_worker_max_mb", "Spark Python worker, largest (sampled RSS)"),
               ("jvm_heap_after_gc_mb", "JVM heap after a full GC"))


class Profile:
    """What one invocation runs: full (the defaults) or quick (development and the smoke test)."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.sizes = "200,1000,3000c" if quick else "671,5000,17445,50000"
        self.memory_reference = 1000 if quick else 5000
        self.hashes_total = 5_000 if quick else 100_000
        self.predict_images = 200 if quick else 17_445  # all of cxr-xl: each worker's start-up amortised as in use
        self.models = ("compact",) if quick else MODELS
        self.steps = ({"compact": 6, "original": 4, "efficientnet_lite0": 3} if quick
                      else {"compact": 30, "original": 30, "efficientnet_lite0": 12})
        self.warmup = 2 if quick else 3
        self.skip_epoch = quick


def parse_sizes(text: str, distinct: int) -> list[tuple[int, str]]:
    """``"671,5000,50000"`` → ``[(671, "sample"), (5000, "sample"), (50000, "copies")]``, sorted by size.

    A size above ``distinct`` (the source's image count), or written with a ``c`` suffix, is made of copies.

    Raises:
        ValueError: a size is not a positive integer (with an optional ``c``).
    """
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        copies = item.lower().endswith("c")
        number = item[:-1] if copies else item
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"--sizes: {item!r} is not a positive number of images (optionally with a 'c' "
                             f"suffix for copies)")
        out.append((int(number), "copies" if copies or int(number) > distinct else "sample"))
    return sorted(set(out))


def _rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _warm_worker(location: str, queue) -> None:
    from covid_spark.inputs.sources import discover

    started, files, total = time.perf_counter(), 0, 0
    for record in discover(location).records:
        try:
            with open(record["path"], "rb") as handle:
                total += len(handle.read())
            files += 1
        except OSError:
            pass
    queue.put({"files": files, "mb": round(total / 2 ** 20, 1), "seconds": round(time.perf_counter() - started, 2)})


def make_input(source: str, workdir: str, images: int, kind: str, seed: int = 0) -> tuple[str, float]:
    """The input for one size, and the seconds it took to make."""
    started = time.perf_counter()
    location = (copied_input if kind == "copies" else sampled_input)(
        source, os.path.join(workdir, f"input-{kind}-{images}"), images, seed=seed)
    return location, round(time.perf_counter() - started, 1)


def stage_pair(location: str, workdir: str, images: int, config: dict, hashes: bool) -> dict:
    """``plain_stage`` in two processes; with ``hashes``, their hash files kept in ``workdir`` (``hash_files``)."""
    cfg = config["preprocess"]
    plain_dir = os.path.join(workdir, f"plain-{images}")
    pair = plain_stage(location, 2, int(cfg["image_size"]), int(cfg["max_pixels"]), plain_dir, hashes=hashes)
    for index, path in enumerate(pair.get("hash_files") or []):
        pair["hash_files"][index] = os.path.join(workdir, f"hashes-{images}-{index}.json")
        os.replace(path, pair["hash_files"][index])
    _rm(plain_dir)
    return pair


def _memory_of(run: dict, heap: dict, driver_before_mb: float) -> dict:
    workers = [w["peak_mb"] for w in run["python_worker_peaks_mb"] if w["role"] == "worker"]
    daemons = [w["peak_mb"] for w in run["python_worker_peaks_mb"] if w["role"] == "daemon"]
    return {"driver_mb": run["peak_rss_mb"]["driver"], "driver_before_job_mb": driver_before_mb,
            "python_worker_max_mb": max(workers, default=None), "python_workers_mb": sorted(workers),
            "python_daemon_mb": max(daemons, default=None), "python_workers_sum_mb": run["peak_rss_mb"]["spark_python_workers"],
            "jvm_heap_after_gc_mb": heap["after_gc_peak_mb"], "jvm_heap_before_gc_mb": heap["before_gc_peak_mb"],
            "jvm_heap_committed_mb": heap["committed_peak_mb"], "jvm_max_heap_mb": heap["max_heap_mb"],
            "jvm_rss_mb": run["peak_rss_mb"]["jvm"], "forced_gc_samples": heap["samples"], "forced_gc_s": heap["gc_s"]}


def preprocess_size(spark, source: str, workdir: str, images: int, kind: str, config: dict, fixed_job_s: float,
                    keep_dataset: bool, want_hashes: bool, gc_interval: float) -> dict:
    """One size: make the input, warm the page cache (both sides then read from memory), the plain pair, the
    Spark job timed, then the job again with the memory samplers (peak RSS; JVM heap after forced full GCs,
    whose pauses must not be inside the timed run)."""
    import psutil

    logger.info("xl preprocess: %d images (%s)", images, kind)
    location, setup_s = make_input(source, workdir, images, kind)
    entry = {"images": images, "kind": kind, "input": location, "input_setup_s": setup_s,
             "page_cache": in_process(_warm_worker, location)}
    output = os.path.join(workdir, f"ds-{images}")
    try:
        pair = stage_pair(location, workdir, images, config, want_hashes)
        if want_hashes:
            entry["hash_files"] = pair.pop("hash_files")
        run = spark_preprocess(spark, location, output, config)
        _rm(output)
        driver_before = round(psutil.Process().memory_info().rss / 2 ** 20, 1)
        with JvmHeap(spark, interval=gc_interval) as heap:
            memory_run = spark_preprocess(spark, location, output, config)
        run["seconds_of_memory_run"] = memory_run["seconds"]
        if keep_dataset:
            entry["dataset"] = output
        else:
            _rm(output)
    finally:
        if kind == "copies":
            _rm(location)
    run["net_seconds"] = round(run["seconds"] - fixed_job_s, 3)
    run["net_images_per_s"] = net_rate(run, images, fixed_job_s)
    entry.update(pair=pair, spark=run, memory=_memory_of(memory_run, heap.result, driver_before),
                 spark_vs_pair=ratio(run["images_per_s"], pair["images_per_s"]),
                 spark_net_vs_pair=ratio(run["net_images_per_s"], pair["images_per_s"]))
    if run["images"] != images or pair["images"] != images:
        logger.warning("xl preprocess: %d images asked, the job read %d and the pair %d",
                       images, run["images"], pair["images"])
    return entry


def memory_growth(entries: list[dict], reference: int) -> list[dict]:
    """Each process's peak at the largest size over its peak at ``reference`` images."""
    by_size = {e["images"]: e for e in entries}
    largest = max(entries, key=lambda e: e["images"])
    if reference not in by_size or largest["images"] == reference:
        return []
    out = []
    for key, label in MEMORY_KEYS:
        a, b = by_size[reference]["memory"][key], largest["memory"][key]
        out.append({"process": label, "key": key, "reference_images": reference, "reference_mb": a,
                    "largest_images": largest["images"], "largest_mb": b,
                    "ratio": round(b / a, 3) if a and b is not None else None})
    return out


def run_preprocess(spark_factory, source: str, workdir: str, sizes: list[tuple[int, str]], config: dict,
                   memory_reference: int, keep_dataset: bool, gc_interval: float = 2.0) -> tuple:
    """Spark's fixed costs, then every size. Returns ``(spark, part)``; the largest sample's dataset
    (``part["dataset"]``, when ``keep_dataset``) and hash files (``part["hash_files"]``) are kept."""
    tiny = sampled_input(source, os.path.join(workdir, "input-tiny"), FIXED_COST_IMAGES)
    spark, fixed = spark_fixed_costs(spark_factory, tiny, os.path.join(workdir, "ds-tiny"), config)
    _rm(os.path.join(workdir, "ds-tiny"))
    largest = max((n for n, kind in sizes if kind == "sample"), default=None)
    entries = [preprocess_size(spark, source, workdir, n, kind, config, fixed["tiny_job_s"],
                               keep_dataset and n == largest and kind == "sample", n == largest and kind == "sample",
                               gc_interval) for n, kind in sizes]
    part = {"spark_fixed": fixed, "sizes": entries, "memory_reference": memory_reference,
            "memory_growth": memory_growth(entries, memory_reference)}
    for entry in entries:
        part.update({k: entry[k] for k in ("dataset", "hash_files") if entry.get(k)})
    return spark, part


def _duplicates_worker(hash_files: list[str], total: int, max_distance: int, queue) -> None:
    """``bench_duplicates`` on the hashes in ``hash_files``, pinned to one CPU."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result = dup_bench.bench_duplicates(_read_hashes(hash_files), total=total, max_distance=max_distance, seed=0)
    queue.put(dict(result, cpus=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                   maxrss_mb=maxrss_mb()))


def _read_hashes(files: list[str]) -> dict[str, int]:
    hashes = {}
    for path in files:
        with open(path, encoding="utf-8") as handle:
            hashes.update({p: int(h) for p, h in json.load(handle).items()})
    return hashes


def run_duplicates(hash_files: list[str], total: int, max_distance: int) -> dict:
    """``bench_duplicates`` fed the real hashes, grown to ``total``, in a fresh process on one CPU."""
    real = len(_read_hashes(hash_files))
    logger.info("xl duplicates: %d real hashes grown to %d, max distance %d, one CPU", real, total, max_distance)
    return {"real_hashes": real, "total": total, "max_distance": max_distance,
            "result": in_process(_duplicates_worker, hash_files, total, max_distance)}


def _predict_worker(location: str, model_dir: str, images: int, queue) -> None:
    queue.put(predict_bench.bench_predict(location, model_dir, n_images=images))


def run_predict(source: str, workdir: str, images: int, model: str, image_size: int) -> dict:
    """``bench_predict`` on a sample of ``images`` with an untrained ``model``, in a fresh process: it starts
    and stops a session of its own, which must not stop this run's (nor a test's)."""
    location = sampled_input(source, os.path.join(workdir, f"input-predict-{images}"), images, seed=1)
    made = predict_bench.untrained_model_dir(model, image_size, os.path.join(workdir, f"model-untrained-{model}"))
    logger.info("xl predict: %d images, Spark against one plain process", images)
    return {"images": images, "input": location, "model": made,
            "result": in_process(_predict_worker, location, made["model_dir"], images)}


def ensure_dataset(spark, source: str, workdir: str, images: int, config: dict) -> str:
    """The preprocessed dataset of the ``images`` sample: kept from the preprocess part, or made now (untimed)."""
    from covid_spark.data.dataset import has_summary
    from covid_spark.stages.preprocess import preprocess

    output = os.path.join(workdir, f"ds-{images}")
    if not has_summary(spark, output):
        preprocess(spark, make_input(source, workdir, images, "sample")[0], output, config, overwrite=True)
    return output


def train_epoch(spark, dataset: str, summary: dict, model: str, config_path: str | None, batch_size: int | None,
                workdir: str) -> dict:
    """One whole epoch of ``run_training`` over the train split (with validation), 2 ranks."""
    from covid_spark.config import load_config, override
    from covid_spark.data.rundir import RunDir
    from covid_spark.stages.train import run_training

    cfg = override(load_config(config_path, model=model), "train", {"model": model, "epochs": 1, "batch_size": batch_size})
    model_dir, rows, batch = os.path.join(workdir, "epoch", model), summary["per_split"]["train"], cfg["train"]["batch_size"]
    logger.info("xl train: %s, one epoch over %d train images", model, rows)
    load_start = loadavg()
    with PeakRss(interval=1.0) as rss:
        started = time.perf_counter()
        run = run_training(spark, dataset, model_dir, cfg, overwrite=True)
        outer = time.perf_counter() - started
    with open(RunDir(model_dir).history, encoding="utf-8") as handle:
        history = json.load(handle)
    _rm(model_dir)
    epoch_s = history["seconds"][0]
    return {"model": model, "train_rows": rows, "val_rows": summary["per_split"].get("val", 0),
            "num_proc": run["num_proc"], "steps_per_epoch": run["steps_per_epoch"], "batch_size": int(batch),
            "threads_per_rank": run["threads_per_rank"], "run_json_wall_s": run["wall_seconds"],
            "epoch_s": round(epoch_s, 1), "call_s": round(outer, 1),
            "images_per_s_wall": round(rows / run["wall_seconds"], 1), "images_per_s_epoch": round(rows / epoch_s, 1),
            "images_per_s_steps": round(run["steps_per_epoch"] * run["num_proc"] * int(batch) / epoch_s, 1),
            "loss": history.get("loss", [None])[0], "val_loss": history.get("val_loss", [None])[0],
            "val_accuracy": history.get("val_accuracy", [None])[0], "jvm_peak_rss_mb": rss.peaks["jvm"],
            "loadavg_at_start": load_start, "loadavg_at_end": loadavg()}


def run_train(spark, dataset: str, config: dict, models, steps: dict, warmup: int, workdir: str,
              skip_epoch: bool, config_path: str | None, batch_size: int | None = None, rates: bool = True) -> dict:
    """Each model's 2-rank Horovod rate over timed steps (unless not ``rates``), then (unless ``skip_epoch``)
    one whole epoch each."""
    from covid_spark.data.dataset import read_summary

    summary = read_summary(None, dataset)
    threads = train_bench.threads_per_rank(config, 2)
    part = {"dataset": dataset, "per_split": summary["per_split"], "threads_per_rank": threads, "rates": [],
            "epochs": []}
    for model in models if rates else ():
        job = train_bench.make_job(dataset, config, model, threads, warmup + steps[model],
                                   os.path.join(workdir, "train", f"{model}-hvd2"), batch_size)
        logger.info("xl train: %s, 2 Horovod ranks, %d + %d steps", model, warmup, steps[model])
        part["rates"].append({"model": model, "batch_size": job.batch_size, "warmup_steps": warmup,
                              "steps": steps[model], "horovod_2": train_bench.horovod_run(spark, job, 2, warmup)})
    for model in () if skip_epoch else models:
        part["epochs"].append(train_epoch(spark, dataset, summary, model, config_path, batch_size, workdir))
    return part


def verdicts(results: dict) -> list[dict]:
    """The goals of `make bench-xl`, judged."""
    out = []
    pre = results.get("preprocess") or {}
    samples = [e for e in pre.get("sizes", []) if e["kind"] == "sample"]
    if samples:
        largest = max(samples, key=lambda e: e["images"])
        out.append(verdict("preprocess_net_vs_pair", largest["spark_net_vs_pair"], f"{largest['images']:,} images",
                           f"whole job {largest['spark_vs_pair']:.2f} × the pair"))
    for g in pre.get("memory_growth", []):
        out.append(verdict("memory_growth", g["ratio"], f"{g['process']}, {g['reference_images']:,} → "
                           f"{g['largest_images']:,} images", f"{g['reference_mb']} → {g['largest_mb']} MiB"))
    dup = (results.get("duplicates") or {}).get("result") or {}
    if isinstance(dup.get("seconds_banded"), (int, float)):
        out.append(verdict("duplicates_s", dup["seconds_banded"], f"{dup['n']:,} real hashes grown with copies",
                           f"all-pairs {dup.get('all_pairs_seconds')} s on {dup.get('all_pairs_checked_n')}"))
    pred = (results.get("predict") or {}).get("result") or {}
    if pred.get("ratio") is not None:
        out.append(verdict("predict_vs_plain", pred["ratio"], f"{pred['parallelism']} × plain, {pred['images']:,} images"))
    return [v for v in out if v]


def run_xl(source: str, workdir: str, parts=PARTS, profile: Profile | None = None, sizes: str | None = None,
           models=None, skip_epoch: bool | None = None, config_path: str | None = None, config: dict | None = None,
           master: str = "local[2]", spark=None, results: dict | None = None, save_to: str | None = None,
           batch_size: int | None = None, predict_model: str | None = None, gc_interval: float = 2.0,
           train_rates: bool = True) -> dict:
    """Run the chosen parts; return the results (plain data). ``results``: earlier results to update part by
    part; ``save_to``: write them there after each part. ``spark``: a session to use (not stopped)."""
    from covid_spark.config import load_config
    from covid_spark.data.rundir import git_commit

    profile = profile or Profile(False)
    config = config or load_config(config_path)
    distinct = len(source_rows(source))
    size_list = parse_sizes(sizes or profile.sizes, distinct)
    models = tuple(models or profile.models)
    skip_epoch = profile.skip_epoch if skip_epoch is None else skip_epoch
    results = results if results is not None else {}
    results["machine"] = machine()
    largest_sample = max((n for n, kind in size_list if kind == "sample"),
                         default=min(distinct, profile.memory_reference))
    owned, session = spark is None, {"spark": spark}

    def get_spark():
        session["spark"] = session["spark"] or start_spark(master)
        return session["spark"]

    def settings():
        """The memory settings in force: conf/spark-local.conf when this run started the session."""
        conf = dict(session["spark"].sparkContext.getConf().getAll())
        chosen = local_settings(master) if owned else conf
        return {"master": conf.get("spark.master", master), "spark.driver.memory": chosen.get("spark.driver.memory"),
                "spark.driver.extraJavaOptions": chosen.get("spark.driver.extraJavaOptions"),
                "spark.python.worker.reuse": conf.get("spark.python.worker.reuse", "true (default)"),
                "source": "conf/spark-local.conf" if owned else "the caller's session"}

    def run_part(name, work):
        started, load = time.time(), loadavg()
        part = work()
        results[name] = dict(part, seconds=round(time.time() - started, 1), loadavg_at_start=load,
                             loadavg_at_end=loadavg())
        results["verdicts"] = verdicts(results)
        if save_to:
            save(results, save_to)

    def preprocess_part():
        spark_now, part = run_preprocess(get_spark, source, workdir, size_list, config, profile.memory_reference,
                                         keep_dataset="train" in parts, gc_interval=gc_interval)
        session["spark"] = spark_now
        return dict(part, settings=settings())

    def duplicates_part():
        hash_files = (results.get("preprocess") or {}).get("hash_files") or []
        if not hash_files or not all(os.path.exists(f) for f in hash_files):
            location = make_input(source, workdir, largest_sample, "sample")[0]
            hash_files = stage_pair(location, workdir, largest_sample, config, hashes=True)["hash_files"]
        return run_duplicates(hash_files, profile.hashes_total, int(config["preprocess"]["duplicate_distance"]))

    def train_part():
        dataset = (results.get("preprocess") or {}).get("dataset") or ensure_dataset(
            get_spark(), source, workdir, largest_sample, config)
        return dict(run_train(get_spark(), dataset, config, models, profile.steps, profile.warmup, workdir,
                              skip_epoch, config_path, batch_size, rates=train_rates), settings=settings())

    work = {"preprocess": preprocess_part, "duplicates": duplicates_part, "train": train_part,
            "predict": lambda: run_predict(source, workdir, profile.predict_images,
                                           predict_model or config["train"]["model"],
                                           int(config["preprocess"]["image_size"]))}
    started_all, work_made = time.time(), not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    invocation = {"parts": list(parts), "sizes": [f"{n}{'c' if k == 'copies' else ''}" for n, k in size_list],
                  "models": list(models), "quick": profile.quick, "source": os.path.abspath(source),
                  "source_images": distinct, "git_commit": git_commit(), "loadavg_at_start": loadavg(),
                  "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        for name in (p for p in PARTS if p in parts):
            run_part(name, work[name])
    finally:
        if owned and session["spark"] is not None:
            session["spark"].stop()
        if work_made:
            _rm(workdir)
    invocation.update(seconds=round(time.time() - started_all, 1), loadavg_at_end=loadavg(),
                      driver_python_maxrss_mb=maxrss_mb())
    results.setdefault("invocations", []).append(invocation)
    results["machine"]["load_avg_at_end"] = invocation["loadavg_at_end"]
    if save_to:
        save(results, save_to)
    return results


def format_preprocess(part: dict) -> str:
    fixed, sizes = part["spark_fixed"], part["sizes"]
    lines = [f"Spark fixed costs: session start {fmt(fixed['session_start_s'])} s; the job on "
             f"{fixed['tiny_job_images']} images {fmt(fixed['tiny_job_first_s'])} s the first time (starts the "
             f"Python workers), {fmt(fixed['tiny_job_s'])} s the next (subtracted below).",
             format_sizes(sizes), format_cpu(sizes), format_jobs(max(sizes, key=lambda e: e["images"])) or ""]
    lines.append(table(["images", "Python driver MiB (before the job)", "Spark Python workers MiB, each",
                        "pyspark.daemon MiB", "JVM heap after full GC MiB", "JVM heap before GC, peak MiB",
                        "JVM RSS MiB", "forced GCs (s)", "plain process MiB, each"],
                       [[f"{e['images']:,}", f"{fmt(m['driver_mb'])} ({fmt(m['driver_before_job_mb'])})",
                         " / ".join(fmt(x) for x in m["python_workers_mb"]) or "–", m["python_daemon_mb"],
                         m["jvm_heap_after_gc_mb"], m["jvm_heap_before_gc_mb"], m["jvm_rss_mb"],
                         f"{m['forced_gc_samples']} ({fmt(m['forced_gc_s'])})",
                         " / ".join(fmt(p["maxrss_mb"]) for p in e["pair"]["per_process"])]
                        for e, m in ((e, e["memory"]) for e in sizes)], left=(2, 8)))
    if part.get("memory_growth"):
        lines.append(table(["peak memory", "at reference size", "MiB", "at largest size", "MiB", "ratio"],
                           [[g["process"], f"{g['reference_images']:,}", g["reference_mb"], f"{g['largest_images']:,}",
                             g["largest_mb"], fmt(g["ratio"], 2)] for g in part["memory_growth"]]))
    settings = part.get("settings") or {}
    lines.append("Memory settings: " + "; ".join(f"{k} = {v}" for k, v in settings.items() if v))
    return "\n\n".join(line for line in lines if line)


def format_tables(results: dict) -> str:
    out = []
    if results.get("preprocess"):
        out.append("### Preprocessing\n\n" + format_preprocess(results["preprocess"]))
    dup = (results.get("duplicates") or {}).get("result")
    if dup:
        out.append("### Duplicate grouping\n\n" + table(
            ["hashes", "base", "banded: wall s", "CPU s", "groups", "largest group", "all-pairs on", "all-pairs s",
             "banded on the same set s", "same groups"],
            [[f"{dup['n']:,}", f"{results['duplicates']['real_hashes']:,} real hashes + copies, 0–10 bits flipped",
              fmt(dup["seconds_banded"], 2), fmt(dup["cpu_seconds_banded"], 2), f"{dup['groups']:,}",
              dup["largest_group"], f"{dup['all_pairs_checked_n']:,}", fmt(dup["all_pairs_seconds"], 2),
              fmt(dup["banded_seconds_same_set"], 2), "yes" if dup["same_groups_as_all_pairs"] else "**no**"]],
            left=(1, 9)) + f"\n\nOne process pinned to CPU {dup.get('cpus')}; max distance {dup['max_distance']} bits "
                           f"of {dup['bits']}.")
    pred = (results.get("predict") or {}).get("result")
    if pred:
        peaks = pred.get("peak_rss_mb", {})
        out.append("### Predict\n\n" + table(
            ["images", "model", "Spark: s", "images/s", "1 plain process: images/s", "× parallelism",
             "Spark / (parallelism × plain)", "driver / JVM / Python workers peak MiB", "other users' share"],
            [[f"{pred['images']:,}", f"{results['predict']['model']['model']} (untrained head)", pred["spark"]["seconds"],
              pred["spark"]["images_per_s"], pred["plain"]["images_per_s"], pred["parallelism"], fmt(pred["ratio"], 2),
              " / ".join(fmt(peaks.get(k)) for k in ("driver", "jvm", "spark_python_workers")),
              pct((pred.get("cpu") or {}).get("others_share"))]], left=(1, 7)))
    train = results.get("train")
    if train:
        lines = [f"Dataset: the {sum(train['per_split'].values()):,}-image sample ({train['per_split']['train']:,} "
                 f"train, {train['per_split'].get('val', 0):,} val); {train['threads_per_rank']} thread(s) per rank."]
        if train["rates"]:
            lines.append(train_bench.format_rates(train["rates"]))
        if train["epochs"]:
            lines.append(table(["model", "train images", "steps × batch × ranks", "run_training wall s",
                                "epoch s (fit, incl. validation)", "train images / wall s", "train images / epoch s",
                                "val accuracy after 1 epoch"],
                               [[e["model"], f"{e['train_rows']:,}", f"{e['steps_per_epoch']} × {e['batch_size']} × "
                                 f"{e['num_proc']}", e["run_json_wall_s"], e["epoch_s"], e["images_per_s_wall"],
                                 e["images_per_s_epoch"], fmt(e["val_accuracy"], 3)] for e in train["epochs"]],
                               left=(0, 2)))
        out.append("### Training\n\n" + "\n\n".join(lines))
    if results.get("verdicts"):
        out.append("### Goals\n\n" + verdict_table(results["verdicts"]))
    out.append("Time per part: " + ", ".join(f"{p} {results[p]['seconds']:.0f} s" for p in PARTS if results.get(p)))
    return "\n\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmarks on cxr-xl at scale: preprocess, duplicate grouping, "
                                                 "predict and training (see docs/performance.md).")
    parser.add_argument("--input", default=os.path.join(DATA, "cxr-xl"), help="real images (default: cxr-xl)")
    parser.add_argument("--sizes", help="comma-separated preprocess sizes; above the source's count (or with a 'c' "
                                        "suffix) made of copies (default 671,5000,17445,50000; --quick 200,1000,3000c)")
    parser.add_argument("--models", help=f"comma-separated, of {','.join(MODELS)} (default all; --quick compact)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated parts to run; fewer than all merge into the existing --output")
    parser.add_argument("--skip-epoch", action="store_true", help="no whole training epochs")
    parser.add_argument("--skip-rates", action="store_true", help="no timed training steps (only the epochs)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 5,000 hashes, 200 predict images, compact only, few steps, no epoch")
    parser.add_argument("--memory-reference", type=int, help="size the largest one's memory is compared with "
                                                             "(default 5000; --quick 1000)")
    parser.add_argument("--hashes", type=int, help="hashes to group (default 100000)")
    parser.add_argument("--predict-images", type=int, help="default 17445 (all of cxr-xl; --quick 200)")
    parser.add_argument("--predict-model", help="model to score with (default: train.model)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--config", help="job config YAML (default: the packaged defaults)")
    parser.add_argument("--workdir", help="scratch folder (default: a new temporary folder, removed at the end; "
                                          "a folder given is kept)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    cli_logging()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    problem = (f"unknown part(s) {', '.join(sorted(set(parts) - set(PARTS)))}; choose from {', '.join(PARTS)}"
               if set(parts) - set(PARTS) else
               f"unknown model(s) {', '.join(sorted(set(models) - set(MODELS)))}" if models and set(models) - set(MODELS)
               else None if os.path.exists(args.input) else f"input {args.input} not found")
    if problem:
        print(f"bench.xl: {problem}", file=sys.stderr)
        return 2
    profile = Profile(args.quick)
    for name in ("memory_reference", "predict_images"):
        setattr(profile, name, getattr(args, name) or getattr(profile, name))
    profile.hashes_total = args.hashes or profile.hashes_total
    results = {}
    if set(parts) != set(PARTS) and os.path.exists(args.output):
        with open(args.output, encoding="utf-8") as handle:
            results = json.load(handle)
    workdir = args.workdir or os.path.join(tempfile.gettempdir(), f"covid-spark-bench-xl-{os.getpid()}")
    results["command"] = "python -m bench.xl " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        results = run_xl(args.input, workdir, parts=parts, profile=profile, sizes=args.sizes, models=models,
                         skip_epoch=True if args.skip_epoch else None, config_path=args.config, master=args.master,
                         results=results, save_to=args.output, predict_model=args.predict_model,
                         train_rates=not args.skip_rates)
    except ValueError as exc:
        print(f"bench.xl: {exc}", file=sys.stderr)
        return 2
    last = results["invocations"][-1]
    print(f"\nMachine: {machine_line(results['machine'])}; load average {last['loadavg_at_start']} at start, "
          f"{last['loadavg_at_end']} at end; {last['seconds']:.0f} s in all\n\n{format_tables(results)}\n\n"
          f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
