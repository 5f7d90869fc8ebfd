"""python -m bench.xl [--quick] [--sizes 671,5000,17445,50000] [--models …] [--skip-epoch] [--parts …]

Benchmarks on real data at scale: the 17,445 chest X-rays of ../shared/data/cxr-xl (what
`make bench-xl` runs; see docs/performance.md, "Real data at scale"). Each figure is measured
against its baseline in the same run, in a `local[2]` session with conf/spark-local.conf:

1. **preprocess**: the real preprocess job at each size, against two independent plain processes
   started together that run the job's own first pass (``stage_images``: read, decode, resize,
   hash, write the rows with pyarrow) over alternate halves of the files; minus the same job's
   time on 6 images (its fixed cost). A size up to the source's 17,445 images is a seeded sample
   stratified by label, listed by absolute path in a temporary manifest (nothing copied); a larger
   one (or one written ``3000c``) is made of byte copies of the source's files in a temporary
   folder, deleted afterwards. Peak memory at every size: the Python driver, each Spark Python
   worker, the JVM's heap after a full GC; and how each grows from the reference size to the largest.
2. **duplicates**: ``bench.dup_bench.bench_duplicates`` fed the real 256-bit hashes of the largest
   sample (from the plain processes).
3. **predict**: ``bench.predict_bench.bench_predict`` on a sample of cxr-xl, with an untrained model
   saved as the train stage saves one (no training needed for throughput).
4. **train**: each model's rate with 2 Horovod ranks over steps (``bench.train_bench``) on the
   largest sample's dataset, and one whole epoch of ``run_training`` over its train split.

Writes bench/results-xl.json (git-ignored; after every part, so a failure keeps what was done)
and prints Markdown tables. ``--parts`` reruns some parts and merges them into the existing file.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time

from bench.memory import JvmHeap, PeakRss, maxrss_mb

logger = logging.getLogger("bench.xl")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SOURCE = os.path.join(REPO, "..", "shared", "data", "cxr-xl")
DEFAULT_OUTPUT = os.path.join(REPO, "bench", "results-xl.json")
PARTS = ("preprocess", "duplicates", "predict", "train")
MODELS = ("efficientnet_lite0", "compact", "original")
GOALS = {"preprocess_net_vs_pair": 0.8, "memory_growth": 1.3, "duplicates_s": 10.0, "predict_vs_plain": 0.8}
FIXED_COST_IMAGES = 6


class Profile:
    """What one invocation runs: full (the defaults) or quick (development and the smoke test)."""

    def __init__(self, quick: bool):
        self.quick = quick
        self.sizes = "200,1000,3000c" if quick else "671,5000,17445,50000"
        self.memory_reference = 1000 if quick else 5000
        self.hashes_total = 5_000 if quick else 100_000
        self.predict_images = 200 if quick else 17_445  # all of cxr-xl: the fixed start-up per worker amortised as in real use
        self.models = ("compact",) if quick else MODELS
        self.steps = ({"compact": 6, "original": 4, "efficientnet_lite0": 3} if quick
                      else {"compact": 30, "original": 30, "efficientnet_lite0": 12})
        self.warmup = 2 if quick else 3
        self.skip_epoch = quick


def parse_sizes(text: str, distinct: int) -> list[tuple[int, str]]:
    """``"671,5000,50000"`` → ``[(671, "sample"), (5000, "sample"), (50000, "copies")]``.

    A size above ``distinct`` (the source's image count), or written with a ``c`` suffix, is made
    of copies; the others are samples of distinct images. Sorted by size (memory is compared
    from small to large, and a process's peak never falls).

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
        images = int(number)
        out.append((images, "copies" if copies or images > distinct else "sample"))
    return sorted(set(out))


def _loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _import_helper(name: str):
    """``bench.<name>``, or None when that module is not there (written by another change)."""
    try:
        return importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{name}":
            raise
        return None


def _rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _warm_worker(location: str, queue) -> None:
    from covid_spark.inputs.sources import discover

    started = time.perf_counter()
    files = total = 0
    for record in discover(location).records:
        try:
            with open(record["path"], "rb") as handle:
                total += len(handle.read())
            files += 1
        except OSError:
            pass
    queue.put({"files": files, "mb": round(total / 2 ** 20, 1), "seconds": round(time.perf_counter() - started, 2)})


def warm_page_cache(location: str) -> dict:
    """Read every input file once, so that the plain processes and Spark both find them in memory.

    In a spawned process, so that this driver's memory does not hold the listing.
    """
    import multiprocessing as mp

    from bench.procs import collect

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_warm_worker, args=(location, queue), daemon=True)
    worker.start()
    try:
        (report,) = collect(queue, [worker])
    finally:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.terminate()
    return report


# ----------------------------------------------------------------------------------------------
# 1. preprocess

def make_input(source: str, workdir: str, images: int, kind: str, seed: int = 0) -> tuple[str, float]:
    """The input location for one size, and the seconds it took to make."""
    from bench.inputs import copied_input, sampled_input

    started = time.perf_counter()
    folder = os.path.join(workdir, f"input-{kind}-{images}")
    location = (copied_input if kind == "copies" else sampled_input)(source, folder, images, seed=seed)
    return location, round(time.perf_counter() - started, 1)


def _memory_of(run: dict, heap: dict, driver_before_mb: float) -> dict:
    workers = [w["peak_mb"] for w in run["python_worker_peaks_mb"] if w["role"] == "worker"]
    daemons = [w["peak_mb"] for w in run["python_worker_peaks_mb"] if w["role"] == "daemon"]
    return {"driver_mb": run["peak_rss_mb"]["driver"], "driver_before_job_mb": driver_before_mb,
            "python_worker_max_mb": max(workers, default=None), "python_workers_mb": sorted(workers),
            "python_daemon_mb": max(daemons, default=None),
            "python_workers_sum_mb": run["peak_rss_mb"]["spark_python_workers"],
            "jvm_heap_after_gc_mb": heap["after_gc_peak_mb"], "jvm_heap_before_gc_mb": heap["before_gc_peak_mb"],
            "jvm_heap_committed_mb": heap["committed_peak_mb"], "jvm_max_heap_mb": heap["max_heap_mb"],
            "jvm_rss_mb": run["peak_rss_mb"]["jvm"], "forced_gc_samples": heap["samples"],
            "forced_gc_s": heap["gc_s"]}


def preprocess_size(spark, source: str, workdir: str, images: int, kind: str, config: dict, fixed_job_s: float,
                    keep_dataset: bool, want_hashes: bool, gc_interval: float) -> dict:
    """One size: make the input, warm the page cache, the plain pair, the Spark job timed, then again with
    the memory samplers (JVM heap after forced full GCs; peak RSS of driver and Python workers)."""
    import psutil

    from bench.preprocess_bench import plain_stage, spark_preprocess

    cfg = config["preprocess"]
    size, max_pixels = int(cfg["image_size"]), int(cfg["max_pixels"])
    logger.info("xl preprocess: %d images (%s): making the input", images, kind)
    location, setup_s = make_input(source, workdir, images, kind)
    cache = warm_page_cache(location)
    entry = {"images": images, "kind": kind, "input": location, "input_setup_s": setup_s, "page_cache": cache}
    try:
        logger.info("xl preprocess: %d images, 2 plain processes (stage_images)", images)
        plain_dir = os.path.join(workdir, f"plain-{images}")
        pair = plain_stage(location, 2, size, max_pixels, plain_dir, hashes=want_hashes)
        if want_hashes:  # kept for the duplicates part, read there (not in this driver)
            entry["hash_files"] = []
            for index, path in enumerate(pair.pop("hash_files")):
                entry["hash_files"].append(os.path.join(workdir, f"hashes-{images}-{index}.json"))
                os.replace(path, entry["hash_files"][-1])
        _rm(plain_dir)
        logger.info("xl preprocess: %d images, Spark job (timed)", images)
        output = os.path.join(workdir, f"ds-{images}")
        run = spark_preprocess(spark, location, output, config)
        _rm(output)
        # Memory in a second, identical run: the heap sampler forces a full GC every gc_interval s
        # (0.5 s of pauses at 17,445 images), which must not be inside the timed run.
        logger.info("xl preprocess: %d images, Spark job again (memory, forced GCs)", images)
        driver_before = round(psutil.Process().memory_info().rss / 2 ** 20, 1)
        with JvmHeap(spark, interval=gc_interval) as heap:
            memory_run = spark_preprocess(spark, location, output, config)
        run["seconds_of_memory_run"] = memory_run["seconds"]
        if not keep_dataset:
            _rm(output)
        else:
            entry["dataset"] = output
    finally:
        if kind == "copies":
            _rm(location)
    net_s = run["seconds"] - fixed_job_s
    run["net_seconds"] = round(net_s, 3)
    run["net_images_per_s"] = round(images / net_s, 1) if net_s > 0 else None
    entry.update(pair=pair, spark=run, memory=_memory_of(memory_run, heap.result, driver_before),
                 spark_vs_pair=round(run["images_per_s"] / pair["images_per_s"], 3),
                 spark_net_vs_pair=(round(run["net_images_per_s"] / pair["images_per_s"], 3)
                                    if run["net_images_per_s"] else None))
    if run["images"] != images or pair["images"] != images:
        logger.warning("xl preprocess: %d images asked, the job read %d and the pair %d",
                       images, run["images"], pair["images"])
    return entry


MEMORY_KEYS = (("driver_mb", "Python driver (sampled RSS)"),
               ("python_worker_max_mb", "Spark Python worker, largest (sampled RSS)"),
               ("jvm_heap_after_gc_mb", "JVM heap after a full GC"))


def memory_growth(entries: list[dict], reference: int) -> list[dict]:
    """Each process's peak at the largest size over its peak at ``reference`` images (goal ≤ 1.3)."""
    by_size = {e["images"]: e for e in entries}
    largest = max(entries, key=lambda e: e["images"])
    if reference not in by_size or largest["images"] == reference:
        return []
    ref = by_size[reference]
    out = []
    for key, label in MEMORY_KEYS:
        a, b = ref["memory"][key], largest["memory"][key]
        out.append({"process": label, "key": key, "reference_images": reference, "reference_mb": a,
                    "largest_images": largest["images"], "largest_mb": b,
                    "ratio": round(b / a, 3) if a and b is not None else None})
    return out


def run_preprocess(spark_factory, source: str, workdir: str, sizes: list[tuple[int, str]], config: dict,
                   memory_reference: int, keep_dataset: bool, gc_interval: float = 2.0) -> tuple:
    """Spark's fixed costs, then every size in turn. Returns ``(spark, part)``; the largest sample's
    dataset is kept (``part["dataset"]``) when ``keep_dataset``."""
    from bench.inputs import sampled_input
    from bench.preprocess_bench import spark_fixed_costs

    tiny = sampled_input(source, os.path.join(workdir, "input-tiny"), FIXED_COST_IMAGES)
    spark, fixed = spark_fixed_costs(spark_factory, tiny, os.path.join(workdir, "ds-tiny"), config)
    _rm(os.path.join(workdir, "ds-tiny"))
    samples = [n for n, kind in sizes if kind == "sample"]
    largest_sample = max(samples, default=None)
    entries = []
    for images, kind in sizes:
        is_largest = kind == "sample" and images == largest_sample
        entries.append(preprocess_size(spark, source, workdir, images, kind, config, fixed["tiny_job_s"],
                                       keep_dataset and is_largest, is_largest, gc_interval))
    part = {"spark_fixed": fixed, "sizes": entries, "memory_reference": memory_reference,
            "memory_growth": memory_growth(entries, memory_reference)}
    for entry in entries:
        if entry.get("dataset"):
            part["dataset"] = entry["dataset"]
        if entry.get("hash_files"):
            part["hash_files"] = entry["hash_files"]
    return spark, part


# ----------------------------------------------------------------------------------------------
# 2. duplicate grouping

def real_hashes(source: str, workdir: str, images: int, config: dict) -> list[str]:
    """JSON files of {path: 256-bit dHash} for a sample of ``images``, computed by the plain processes
    (when the preprocess part did not run in this invocation)."""
    from bench.preprocess_bench import plain_stage

    location, _ = make_input(source, workdir, images, "sample")
    cfg = config["preprocess"]
    plain_dir = os.path.join(workdir, "plain-hashes")
    result = plain_stage(location, 2, int(cfg["image_size"]), int(cfg["max_pixels"]), plain_dir, hashes=True)
    files = []
    for index, path in enumerate(result["hash_files"]):
        files.append(os.path.join(workdir, f"hashes-{images}-{index}.json"))
        os.replace(path, files[-1])
    _rm(plain_dir)
    return files


def _read_hashes(files: list[str]) -> dict[str, int]:
    hashes = {}
    for path in files:
        with open(path, encoding="utf-8") as handle:
            hashes.update({p: int(h) for p, h in json.load(handle).items()})
    return hashes


def _duplicates_worker(hash_files: list[str], total: int, max_distance: int, queue) -> None:
    """Body of a spawned process pinned to one CPU: ``bench_duplicates`` on the hashes in ``hash_files``."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from bench import dup_bench

    hashes = _read_hashes(hash_files)
    result = dup_bench.bench_duplicates(hashes, total=total, max_distance=max_distance, seed=0)
    queue.put(dict(result, cpus=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                   maxrss_mb=maxrss_mb()))


def run_duplicates(hash_files: list[str], total: int, max_distance: int) -> dict:
    """``bench.dup_bench.bench_duplicates`` fed the real hashes, in a fresh process on one CPU."""
    import multiprocessing as mp

    from bench.procs import collect

    if _import_helper("dup_bench") is None:
        return {"skipped": "bench/dup_bench.py is not in this checkout"}
    real = len(_read_hashes(hash_files))
    logger.info("xl duplicates: %d real hashes grown to %d, max distance %d, one CPU", real, total, max_distance)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_duplicates_worker, args=(hash_files, total, max_distance, queue), daemon=True)
    worker.start()
    try:
        (result,) = collect(queue, [worker])
    finally:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.terminate()
    return {"real_hashes": real, "total": total, "max_distance": max_distance, "result": result}


# ----------------------------------------------------------------------------------------------
# 3. predict

def _save_untrained(model: str, image_size: int, model_dir: str, queue) -> None:
    """Body of a spawned process: build ``model`` with fresh (or ImageNet) weights, save it as train.py does."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from covid_spark.constants import CLASSES
    from covid_spark.models.registry import make_model
    from covid_spark.data.rundir import RunDir, versions
    from covid_spark.data.storage import atomic_write_json

    net = make_model(model, input_shape=(image_size, image_size, 3), num_classes=len(CLASSES))
    net.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                metrics=["accuracy"])
    os.makedirs(model_dir, exist_ok=True)
    run_dir = RunDir(model_dir)
    tmp = os.path.join(model_dir, f".{os.path.basename(run_dir.model)}.tmp.keras")
    net.save(tmp)
    os.replace(tmp, run_dir.model)
    atomic_write_json(run_dir.run_json, {
        "model": model, "num_proc": 0, "classes": list(CLASSES), "image_size": image_size, "epochs": 0,
        "epochs_run": 0, "best_epoch": None, "untrained": True, "versions": versions(),
        "note": "untrained (fresh head; ImageNet weights where the model has them): for throughput only"})
    queue.put({"parameters": int(net.count_params())})


def untrained_model_dir(model: str, image_size: int, model_dir: str) -> dict:
    """A model dir (model.keras + run.json) holding an untrained ``model``, made in a spawned process
    so that TensorFlow never loads into this driver."""
    import multiprocessing as mp

    from bench.procs import collect

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_save_untrained, args=(model, image_size, model_dir, queue), daemon=True)
    worker.start()
    try:
        (report,) = collect(queue, [worker], timeout=600)
    finally:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.terminate()
    return dict(report, model=model, model_dir=model_dir)


def _predict_worker(location: str, model_dir: str, images: int, queue) -> None:
    """Body of a spawned process: ``bench_predict``, which starts (and stops) a Spark session of its own."""
    from bench import predict_bench

    queue.put(predict_bench.bench_predict(location, model_dir, n_images=images))


def run_predict(source: str, workdir: str, images: int, model: str, image_size: int) -> dict:
    """``bench.predict_bench.bench_predict`` on a sample of ``images`` with an untrained ``model``.

    It runs in a fresh process: it builds its own local[2] session and stops it at the end, which
    must not stop this run's session (nor a test's).
    """
    import multiprocessing as mp

    from bench.inputs import sampled_input
    from bench.procs import collect

    if _import_helper("predict_bench") is None:
        return {"skipped": "bench/predict_bench.py is not in this checkout"}
    location = sampled_input(source, os.path.join(workdir, f"input-predict-{images}"), images, seed=1)
    logger.info("xl predict: saving an untrained %s model", model)
    made = untrained_model_dir(model, image_size, os.path.join(workdir, f"model-untrained-{model}"))
    logger.info("xl predict: %d images, Spark against one plain process", images)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_predict_worker, args=(location, made["model_dir"], images, queue), daemon=True)
    worker.start()
    try:
        (result,) = collect(queue, [worker])
    finally:
        worker.join(timeout=120)
        if worker.is_alive():
            worker.terminate()
    return {"images": images, "input": location, "model": made, "result": result}


# ----------------------------------------------------------------------------------------------
# 4. train

def ensure_dataset(spark, source: str, workdir: str, images: int, config: dict) -> str:
    """The preprocessed dataset of the ``images`` sample: kept from the preprocess part, or made now (untimed)."""
    from covid_spark.data.dataset import has_summary
    from covid_spark.stages.preprocess import preprocess

    output = os.path.join(workdir, f"ds-{images}")
    if not has_summary(spark, output):
        location, _ = make_input(source, workdir, images, "sample")
        logger.info("xl train: preprocessing the %d-image sample for training", images)
        preprocess(spark, location, output, config, overwrite=True)
    return output


def run_train(spark, dataset: str, config: dict, models, steps: dict, warmup: int, workdir: str,
              skip_epoch: bool, config_path: str | None, batch_size: int | None = None, rates: bool = True) -> dict:
    """Each model's 2-rank rate over timed steps (unless not ``rates``), then (unless ``skip_epoch``)
    one whole epoch each."""
    from bench import train_bench
    from covid_spark.config import load_config, override
    from covid_spark.data.dataset import read_summary
    from covid_spark.data.rundir import RunDir
    from covid_spark.stages.train import run_training

    summary = read_summary(None, dataset)
    threads = train_bench.threads_per_rank(config, 2)
    part = {"dataset": dataset, "per_split": summary["per_split"], "threads_per_rank": threads, "rates": [],
            "epochs": []}
    for model in models if rates else ():
        job = train_bench.make_job(dataset, config, model, threads, warmup + steps[model],
                                   os.path.join(workdir, "train", f"{model}-hvd2"), batch_size)
        logger.info("xl train: %s, 2 Horovod ranks, %d + %d steps", model, warmup, steps[model])
        rate = train_bench.horovod_run(spark, job, 2, warmup)
        part["rates"].append({"model": model, "batch_size": job["batch_size"], "warmup_steps": warmup,
                              "steps": steps[model], "horovod_2": rate})
    if skip_epoch:
        return part
    for model in models:
        cfg = override(load_config(config_path, model=model), "train",
                       {"model": model, "epochs": 1, "batch_size": batch_size})
        model_dir = os.path.join(workdir, "epoch", model)
        logger.info("xl train: %s, one epoch over %d train images, 2 ranks", model, summary["per_split"]["train"])
        load_start = _loadavg()
        with PeakRss(interval=1.0) as rss:
            started = time.perf_counter()
            run = run_training(spark, dataset, model_dir, cfg, overwrite=True)
            outer = time.perf_counter() - started
        with open(RunDir(model_dir).history, encoding="utf-8") as handle:
            history = json.load(handle)
        rows = summary["per_split"]["train"]
        epoch_s = history["seconds"][0]
        part["epochs"].append({
            "model": model, "train_rows": rows, "val_rows": summary["per_split"].get("val", 0),
            "num_proc": run["num_proc"], "steps_per_epoch": run["steps_per_epoch"],
            "batch_size": int(cfg["train"]["batch_size"]), "threads_per_rank": run["threads_per_rank"],
            "run_json_wall_s": run["wall_seconds"], "epoch_s": round(epoch_s, 1), "call_s": round(outer, 1),
            "images_per_s_wall": round(rows / run["wall_seconds"], 1),
            "images_per_s_epoch": round(rows / epoch_s, 1),
            "images_per_s_steps": round(run["steps_per_epoch"] * run["num_proc"] * int(cfg["train"]["batch_size"])
                                        / epoch_s, 1),
            "loss": history.get("loss", [None])[0], "val_loss": history.get("val_loss", [None])[0],
            "val_accuracy": history.get("val_accuracy", [None])[0], "jvm_peak_rss_mb": rss.peaks["jvm"],
            "loadavg_at_start": load_start, "loadavg_at_end": _loadavg()})
        _rm(model_dir)
    return part


# ----------------------------------------------------------------------------------------------
# the whole run

def verdicts(results: dict) -> list[dict]:
    """Each goal: the measured figure, the target, met or not and by how much it misses."""
    out = []

    def add(goal, measured, target, higher_is_better, detail=""):
        if measured is None:
            return
        met = measured >= target if higher_is_better else measured <= target
        miss = None
        if not met:
            miss = round(100 * ((1 - measured / target) if higher_is_better else (measured / target - 1)), 1)
        out.append({"goal": goal, "measured": measured, "target": target, "met": met, "miss_pct": miss,
                    "detail": detail})

    pre = results.get("preprocess") or {}
    samples = [e for e in pre.get("sizes", []) if e["kind"] == "sample"]
    if samples:
        largest = max(samples, key=lambda e: e["images"])
        add(f"preprocess: (Spark − fixed cost) ≥ 0.8 × two plain processes at {largest['images']} images",
            largest["spark_net_vs_pair"], GOALS["preprocess_net_vs_pair"], True,
            f"whole job {largest['spark_vs_pair']:.2f} × the pair")
    for g in pre.get("memory_growth", []):
        add(f"memory: {g['process']} at {g['largest_images']} ≤ 1.3 × at {g['reference_images']}", g["ratio"],
            GOALS["memory_growth"], False, f"{g['reference_mb']} → {g['largest_mb']} MiB")
    dup = (results.get("duplicates") or {}).get("result")
    if isinstance(dup, dict):
        if isinstance(dup.get("seconds_banded"), (int, float)):
            add(f"duplicate grouping of {dup['n']:,} hashes (real ones grown with copies) < 10 s on one core",
                dup["seconds_banded"], GOALS["duplicates_s"], False,
                f"all-pairs {dup.get('all_pairs_seconds')} s on {dup.get('all_pairs_checked_n')}")
    pred = (results.get("predict") or {}).get("result")
    if isinstance(pred, dict) and pred.get("ratio") is not None:
        add(f"predict: Spark ≥ 0.8 × ({pred['parallelism']} × one plain process), {pred['images']:,} images",
            pred["ratio"], GOALS["predict_vs_plain"], True)
    return out


def run_xl(source: str, workdir: str, parts=PARTS, profile: Profile | None = None, sizes: str | None = None,
           models=None, skip_epoch: bool | None = None, config_path: str | None = None, config: dict | None = None,
           master: str = "local[2]", spark=None, results: dict | None = None, save_to: str | None = None,
           batch_size: int | None = None, predict_model: str | None = None, gc_interval: float = 2.0,
           train_rates: bool = True) -> dict:
    """Run the chosen parts; return the results (plain data). ``results``: earlier results to update
    part by part; ``save_to``: write them there after each part. ``spark``: a session to use (not stopped)."""
    from bench.inputs import source_rows
    from bench.run import machine, spark_settings, start_spark
    from covid_spark.config import load_config
    from covid_spark.data.rundir import git_commit

    profile = profile or Profile(False)
    config = config or load_config(config_path)
    distinct = len(source_rows(source))
    size_list = parse_sizes(sizes or profile.sizes, distinct)
    models = tuple(models or profile.models)
    skip_epoch = profile.skip_epoch if skip_epoch is None else skip_epoch
    results = results if results is not None else {}
    results["machine"] = dict(machine(), loadavg_at_start=_loadavg())
    samples = [n for n, kind in size_list if kind == "sample"]
    largest_sample = max(samples, default=min(distinct, profile.memory_reference))
    owned = spark is None
    session = {"spark": spark}

    def get_spark():
        if session["spark"] is None:
            session["spark"] = start_spark(master)
        return session["spark"]

    def settings():
        """The memory settings in force: from conf/spark-local.conf when this run started the session."""
        s = session["spark"]
        conf = dict(s.sparkContext.getConf().getAll()) if s is not None else {}
        chosen = spark_settings(master) if owned else conf
        return {"master": conf.get("spark.master", master),
                "spark.driver.memory": chosen.get("spark.driver.memory"),
                "spark.driver.extraJavaOptions": chosen.get("spark.driver.extraJavaOptions"),
                "spark.python.worker.reuse": conf.get("spark.python.worker.reuse", "true (default)"),
                "source": "conf/spark-local.conf" if owned else "the caller's session"}

    def finish(name, started, load_start, part):
        part.update(seconds=round(time.time() - started, 1), loadavg_at_start=load_start, loadavg_at_end=_loadavg())
        results[name] = part
        results["verdicts"] = verdicts(results)
        if save_to:
            save(results, save_to)

    started_all = time.time()
    work_made = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    invocation = {"parts": list(parts), "sizes": [f"{n}{'c' if k == 'copies' else ''}" for n, k in size_list],
                  "models": list(models), "quick": profile.quick, "source": os.path.abspath(source),
                  "source_images": distinct, "git_commit": git_commit(), "loadavg_at_start": _loadavg(),
                  "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        if "preprocess" in parts:
            started, load = time.time(), _loadavg()
            spark, part = run_preprocess(get_spark, source, workdir, size_list, config, profile.memory_reference,
                                         keep_dataset="train" in parts, gc_interval=gc_interval)
            session["spark"] = spark
            part["settings"] = settings()
            finish("preprocess", started, load, part)
        if "duplicates" in parts:
            started, load = time.time(), _loadavg()
            hash_files = (results.get("preprocess") or {}).get("hash_files") or []
            if not hash_files or not all(os.path.exists(f) for f in hash_files):
                hash_files = real_hashes(source, workdir, largest_sample, config)
            part = run_duplicates(hash_files, profile.hashes_total, int(config["preprocess"]["duplicate_distance"]))
            finish("duplicates", started, load, part)
        if "predict" in parts:
            started, load = time.time(), _loadavg()
            part = run_predict(source, workdir, profile.predict_images, predict_model or config["train"]["model"],
                               int(config["preprocess"]["image_size"]))
            finish("predict", started, load, part)
        if "train" in parts:
            started, load = time.time(), _loadavg()
            spark = get_spark()
            dataset = (results.get("preprocess") or {}).get("dataset") or ensure_dataset(
                spark, source, workdir, largest_sample, config)
            part = run_train(spark, dataset, config, models, profile.steps, profile.warmup, workdir, skip_epoch,
                             config_path, batch_size, rates=train_rates)
            part["settings"] = settings()
            finish("train", started, load, part)
    finally:
        if owned and session["spark"] is not None:
            session["spark"].stop()
        if work_made:
            _rm(workdir)
    invocation.update(seconds=round(time.time() - started_all, 1), loadavg_at_end=_loadavg(),
                      driver_python_maxrss_mb=maxrss_mb())
    results.setdefault("invocations", []).append(invocation)
    results["machine"]["loadavg_at_end"] = invocation["loadavg_at_end"]
    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if save_to:
        save(results, save_to)
    return results


def save(results: dict, path: str) -> None:
    from covid_spark.data.storage import atomic_write_json

    atomic_write_json(path, results)


# ----------------------------------------------------------------------------------------------
# tables

def _fmt(value, digits=1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(share) -> str:
    return "–" if share is None else f"{100 * share:.0f} %"


def _job_seconds(run: dict, word: str) -> float | None:
    jobs = run.get("jobs") or []
    times = [j["seconds"] for j in jobs if j["job"].startswith(word) and j["seconds"] is not None]
    return round(sum(times), 2) if times else None


def format_preprocess(part: dict) -> str:
    fixed = part["spark_fixed"]
    lines = [f"Spark fixed costs: session start {_fmt(fixed['session_start_s'])} s; the job on "
             f"{fixed['tiny_job_images']} images {_fmt(fixed['tiny_job_first_s'])} s the first time (starts the "
             f"Python workers), {_fmt(fixed['tiny_job_s'])} s the next (subtracted below).", "",
             "| images | input | 2 plain processes: s | images/s | Spark job: s | images/s | Spark − fixed: "
             "images/s | Spark / pair | (Spark − fixed) / pair |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e in part["sizes"]:
        lines.append(f"| {e['images']:,} | {'distinct sample' if e['kind'] == 'sample' else 'copies'} | "
                     f"{_fmt(e['pair']['seconds'])} | {_fmt(e['pair']['images_per_s'])} | "
                     f"{_fmt(e['spark']['seconds'])} | {_fmt(e['spark']['images_per_s'])} | "
                     f"{_fmt(e['spark']['net_images_per_s'])} | {_fmt(e['spark_vs_pair'], 2)} | "
                     f"**{_fmt(e['spark_net_vs_pair'], 2)}** |")
    lines += ["", "| images | decode + stage job s | distribute job s | driver and rest s | our core-s: pair | "
              "Spark: JVM / Python workers / driver | written by the pair, MiB | other users' share (pair / Spark) |",
              "|---:|---:|---:|---:|---:|---|---:|---|"]
    for e in part["sizes"]:
        run, pair = e["spark"], e["pair"]
        stage, dist = _job_seconds(run, "decode and stage"), _job_seconds(run, "distribute")
        rest = round(run["seconds"] - (stage or 0) - (dist or 0), 2) if stage is not None else None
        ours = run["cpu"]["ours_core_s"]
        lines.append(f"| {e['images']:,} | {_fmt(stage)} | {_fmt(dist)} | {_fmt(rest)} | "
                     f"{_fmt(pair['cpu']['ours_core_s']['total'])} | {_fmt(ours['jvm'])} / "
                     f"{_fmt(ours['spark_python_workers'])} / {_fmt(ours['driver'])} | {_fmt(pair['written_mb'])} | "
                     f"{_pct(pair['cpu']['others_share'])} / {_pct(run['cpu']['others_share'])} |")
    lines += ["", "| images | Python driver MiB (before the job) | Spark Python workers MiB, each | "
              "pyspark.daemon MiB | JVM heap after full GC MiB | JVM heap before GC, peak MiB | JVM RSS MiB | "
              "forced GCs (s) | plain process MiB, each |", "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for e in part["sizes"]:
        m = e["memory"]
        workers = " / ".join(_fmt(x) for x in m["python_workers_mb"]) or "–"
        lines.append(f"| {e['images']:,} | {_fmt(m['driver_mb'])} ({_fmt(m['driver_before_job_mb'])}) | "
                     f"{workers} | {_fmt(m['python_daemon_mb'])} | {_fmt(m['jvm_heap_after_gc_mb'])} | "
                     f"{_fmt(m['jvm_heap_before_gc_mb'])} | {_fmt(m['jvm_rss_mb'])} | "
                     f"{m['forced_gc_samples']} ({_fmt(m['forced_gc_s'])}) | "
                     f"{' / '.join(_fmt(p['maxrss_mb']) for p in e['pair']['per_process'])} |")
    if part.get("memory_growth"):
        lines += ["", "| peak memory | at reference size | MiB | at largest size | MiB | ratio | goal |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for g in part["memory_growth"]:
            lines.append(f"| {g['process']} | {g['reference_images']:,} | {_fmt(g['reference_mb'])} | "
                         f"{g['largest_images']:,} | {_fmt(g['largest_mb'])} | **{_fmt(g['ratio'], 2)}** | ≤ 1.3 |")
    settings = part.get("settings") or {}
    if settings:
        lines += ["", "Memory settings: " + "; ".join(f"{k} = {v}" for k, v in settings.items() if v)]
    return "\n".join(lines)


def format_duplicates(part: dict) -> str:
    if part.get("skipped"):
        return f"skipped: {part['skipped']}"
    r = part["result"]
    return "\n".join([
        "| hashes | base | banded: wall s | CPU s | groups | largest group | all-pairs on | all-pairs s | "
        "banded on the same set s | same groups |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['n']:,} | {part['real_hashes']:,} real cxr-xl hashes + copies with 0–10 bits flipped | "
        f"**{_fmt(r['seconds_banded'], 2)}** | {_fmt(r['cpu_seconds_banded'], 2)} | {r['groups']:,} | "
        f"{r['largest_group']} | {r['all_pairs_checked_n']:,} | {_fmt(r['all_pairs_seconds'], 2)} | "
        f"{_fmt(r['banded_seconds_same_set'], 2)} | {'yes' if r['same_groups_as_all_pairs'] else '**no**'} |",
        "", f"One process pinned to CPU {r.get('cpus')}; max distance {r['max_distance']} bits of {r['bits']}."])


def format_predict(part: dict) -> str:
    if part.get("skipped"):
        return f"skipped: {part['skipped']}"
    r = part["result"]
    peaks = r.get("peak_rss_mb", {})
    return "\n".join([
        "| images | model | Spark local[2]: s | images/s | 1 plain process: images/s | × parallelism | "
        "Spark / (parallelism × plain) | driver / JVM / Python workers peak MiB | other users' share |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|",
        f"| {r['images']:,} | {part['model']['model']} (untrained head) | {_fmt(r['spark']['seconds'])} | "
        f"{_fmt(r['spark']['images_per_s'])} | {_fmt(r['plain']['images_per_s'])} | {r['parallelism']} | "
        f"**{_fmt(r['ratio'], 2)}** | {_fmt(peaks.get('driver'))} / {_fmt(peaks.get('jvm'))} / "
        f"{_fmt(peaks.get('spark_python_workers'))} | {_pct((r.get('cpu') or {}).get('others_share'))} |"])


def format_train(part: dict) -> str:
    lines = [f"Dataset: the {sum(part['per_split'].values()):,}-image sample ({part['per_split']['train']:,} train, "
             f"{part['per_split'].get('val', 0):,} val); {part['threads_per_rank']} intra-op thread(s) per rank."]
    if part["rates"]:
        lines += ["", "| model | 2 Horovod ranks: images/s | timed steps × batch × ranks | "
                  "CPU cores busy, per rank | window s | other users' share | horovod.spark.run outside fit() s |",
                  "|---|---:|---|---|---:|---:|---:|"]
    for r in part["rates"]:
        h = r["horovod_2"]
        lines.append(f"| {r['model']} | **{_fmt(h['images_per_s'])}** | {r['steps']} × {r['batch_size']} × 2 | "
                     f"{' / '.join(f'{c:.2f}' for c in h.get('cpu_cores_per_process', []))} | "
                     f"{_fmt(h['window_s'])} | {_pct(h.get('others_share'))} | {_fmt(h['outside_fit_s'])} |")
    if part["epochs"]:
        lines += ["", "| model | train images | steps × batch × ranks | run_training wall s (run.json) | epoch s "
                  "(fit, incl. validation) | train images / wall s | train images / epoch s | val accuracy after 1 "
                  "epoch |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for e in part["epochs"]:
        lines.append(f"| {e['model']} | {e['train_rows']:,} | {e['steps_per_epoch']} × {e['batch_size']} × "
                     f"{e['num_proc']} | **{_fmt(e['run_json_wall_s'])}** | {_fmt(e['epoch_s'])} | "
                     f"**{_fmt(e['images_per_s_wall'])}** | {_fmt(e['images_per_s_epoch'])} | "
                     f"{_fmt(e['val_accuracy'], 3)} |")
    return "\n".join(lines)


def format_tables(results: dict) -> str:
    out = []
    if results.get("preprocess"):
        out.append("### Preprocessing\n\n" + format_preprocess(results["preprocess"]))
    if results.get("duplicates"):
        out.append("### Duplicate grouping\n\n" + format_duplicates(results["duplicates"]))
    if results.get("predict"):
        out.append("### Predict\n\n" + format_predict(results["predict"]))
    if results.get("train"):
        out.append("### Training\n\n" + format_train(results["train"]))
    if results.get("verdicts"):
        rows = ["| goal | measured | target | met |", "|---|---:|---:|---|"]
        for v in results["verdicts"]:
            met = "yes" if v["met"] else f"**no**, {v['miss_pct']:g} % off"
            rows.append(f"| {v['goal']} | {v['measured']:.2f} | {v['target']:g} | {met} |")
        out.append("### Goals\n\n" + "\n".join(rows))
    parts = [f"{name} {results[name]['seconds']:.0f} s" for name in PARTS if results.get(name)]
    out.append("Time per part: " + ", ".join(parts))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmarks on cxr-xl at scale: preprocess, duplicate grouping, "
                                                 "predict and training (see docs/performance.md).")
    parser.add_argument("--input", default=DEFAULT_SOURCE, help="source of real images (default ../shared/data/cxr-xl)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated preprocess sizes; above the source's count (or with a 'c' suffix) "
                             "made of copies (default 671,5000,17445,50000; --quick: 200,1000,3000c)")
    parser.add_argument("--models", default=None, help=f"comma-separated, of {','.join(MODELS)} (default all; "
                                                       "--quick: compact)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help="comma-separated parts to run; fewer than all merge into the existing --output")
    parser.add_argument("--skip-epoch", action="store_true", help="no whole training epochs")
    parser.add_argument("--skip-rates", action="store_true", help="no timed training steps (only the epochs)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes, 5,000 hashes, 200 predict images, compact only, few steps, no epoch")
    parser.add_argument("--memory-reference", type=int, default=None,
                        help="size the largest one's memory is compared with (default 5000; --quick 1000)")
    parser.add_argument("--hashes", type=int, default=None, help="hashes to group (default 100000)")
    parser.add_argument("--predict-images", type=int, default=None, help="default 17445 (all of cxr-xl; --quick 200)")
    parser.add_argument("--predict-model", default=None, help="model to score with (default: train.model)")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--config", default=None, help="job config YAML (default: the packaged defaults)")
    parser.add_argument("--workdir", default=None,
                        help="scratch folder for inputs and datasets (default: a new temporary folder, removed "
                             "at the end; a folder given is kept)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from covid_spark.cli import setup_logging

    setup_logging("bench")  # the root stays at WARNING: py4j logs a harmless reconnect at INFO
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"bench.xl: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",")] if args.models else None
    if models and set(models) - set(MODELS):
        print(f"bench.xl: unknown model(s) {', '.join(sorted(set(models) - set(MODELS)))}", file=sys.stderr)
        return 2
    if not os.path.exists(args.input):
        print(f"bench.xl: input {args.input} not found", file=sys.stderr)
        return 2
    profile = Profile(args.quick)
    if args.memory_reference:
        profile.memory_reference = args.memory_reference
    if args.hashes:
        profile.hashes_total = args.hashes
    if args.predict_images:
        profile.predict_images = args.predict_images
    results = {}
    if set(parts) != set(PARTS) and os.path.exists(args.output):
        with open(args.output, encoding="utf-8") as handle:
            results = json.load(handle)
    workdir = args.workdir or tempfile.mkdtemp(prefix="covid-spark-bench-xl-")
    if not args.workdir:
        os.rmdir(workdir)  # run_xl removes a folder it made itself
    results["command"] = "python -m bench.xl " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        results = run_xl(args.input, workdir, parts=parts, profile=profile, sizes=args.sizes, models=models,
                         skip_epoch=True if args.skip_epoch else None, config_path=args.config, master=args.master,
                         results=results, save_to=args.output, predict_model=args.predict_model,
                         train_rates=not args.skip_rates)
    except ValueError as exc:
        print(f"bench.xl: {exc}", file=sys.stderr)
        return 2
    m = results["machine"]
    last = results["invocations"][-1]
    print(f"\nMachine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM; /proc/loadavg "
          f"'{last['loadavg_at_start']}' at start, '{last['loadavg_at_end']}' at end; {last['seconds']:.0f} s in all\n")
    print(format_tables(results))
    print(f"\nresults: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
