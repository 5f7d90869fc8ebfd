"""python -m bench.xl [--quick] [--sizes 671,5000,17445,50000] [--models …] [--skip-epoch] [--parts …]
(`make bench-xl`): preprocess, duplicates, predict and train on cxr-xl at scale → bench/results-xl.json
(docs/performance.md, "Real data at scale")."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time

from bench import dup_bench, predict_bench, train_bench
from bench.harness import (CXR_XL, MB, REPO, arguments, command, fmt, in_process, items, load, loadavg, machine, pct,
                           report, save, start_spark, table, timed, verdict, verdict_table)
from bench.inputs import copied_input, sampled_input, source_rows
from bench.monitors import JvmHeap, PeakRss, maxrss_mb
from bench.preprocess_bench import (format_preprocess, plain_stage, run_size, spark_fixed_costs,
                                    spark_preprocess)
from covid_spark.cli import setup_logging

logger = logging.getLogger("bench.xl")

DEFAULT_OUTPUT = os.path.join(REPO, "bench", "results-xl.json")
PARTS = ("preprocess", "duplicates", "predict", "train")
MODELS = ("efficientnet_lite0", "compact", "original")
MEMORY_KEYS = (("driver_mb", "Python driver (sampled RSS)"),
               ("python_worker_max_mb", "Spark Python worker, largest (sampled RSS)"),
               ("jvm_heap_after_gc_mb", "JVM heap after a full GC"))


PROFILES = {  # what one invocation runs: full (the defaults) or --quick (development and the smoke test)
    False: {"quick": False, "sizes": "671,5000,17445,50000", "memory_reference": 5000, "hashes_total": 100_000,
            "predict_images": 17_445, "models": MODELS, "steps": train_bench.STEPS, "warmup": 3, "skip_epoch": False},
    True: {"quick": True, "sizes": "200,1000,3000c", "memory_reference": 1000, "hashes_total": 5_000,
           "predict_images": 200, "models": ("compact",), "steps": train_bench.QUICK_STEPS, "warmup": 2,
           "skip_epoch": True}}


def parse_sizes(text: str, distinct: int) -> list[tuple[int, str]]:
    """``"671,3000c"`` → ``[(671, "sample"), (3000, "copies")]``; also copies above ``distinct``."""
    out = []
    for item in items(text):
        copies = item.lower().endswith("c")
        number = item[:-1] if copies else item
        if not number.isdigit() or int(number) < 1:
            raise ValueError(f"--sizes: {item!r} is not a positive number of images (optionally with a 'c' "
                             f"suffix for copies)")
        out.append((int(number), "copies" if copies or int(number) > distinct else "sample"))
    return sorted(set(out))


def warm_page_cache(location: str) -> dict:
    """Files and MiB read: every input file once, into the page cache."""
    from covid_spark.inputs.sources import discover

    started, files, total = time.perf_counter(), 0, 0
    for record in discover(location).records:
        try:
            with open(record["path"], "rb") as handle:
                total += len(handle.read())
            files += 1
        except OSError:
            pass
    return {"files": files, "mb": round(total / MB, 1), "seconds": round(time.perf_counter() - started, 2)}


def make_input(source: str, workdir: str, images: int, kind: str) -> str:
    return (copied_input if kind == "copies" else sampled_input)(
        source, os.path.join(workdir, f"input-{kind}-{images}"), images, seed=0)


def _memory_of(run: dict, heap: dict, driver_before_mb: float) -> dict:
    roles = {role: [w["peak_mb"] for w in run["python_worker_peaks_mb"] if w["role"] == role]
             for role in ("worker", "daemon")}
    peaks = run["peak_rss_mb"]
    return dict(heap, driver_mb=peaks["driver"], driver_before_job_mb=driver_before_mb,
                python_worker_max_mb=max(roles["worker"], default=None), python_workers_mb=sorted(roles["worker"]),
                python_daemon_mb=max(roles["daemon"], default=None),
                python_workers_sum_mb=peaks["spark_python_workers"], jvm_rss_mb=peaks["jvm"])


def preprocess_size(spark, source: str, workdir: str, images: int, kind: str, config: dict, fixed_job_s: float,
                    largest_sample: bool, keep_dataset: bool, gc_interval: float) -> dict:
    """One size: ``run_size`` on a warm page cache, then the job again under the memory samplers."""
    import psutil

    logger.info("xl preprocess: %d images (%s)", images, kind)
    setup_s, location = timed(make_input, source, workdir, images, kind)
    output = os.path.join(workdir, f"ds-{images}")
    try:
        page_cache = in_process(warm_page_cache, location)
        entry = run_size(spark, location, output, config, fixed_job_s, single=False,
                         hashes_to=os.path.join(workdir, f"hashes-{images}") if largest_sample else None)
        shutil.rmtree(output, ignore_errors=True)
        driver_before = round(psutil.Process().memory_info().rss / MB, 1)
        with JvmHeap(spark, interval=gc_interval) as heap:  # its forced full GCs pause the JVM: not in the timed run
            memory_run = spark_preprocess(spark, location, output, config)
        entry["spark"]["seconds_of_memory_run"] = memory_run["seconds"]
        if not (keep_dataset and largest_sample):
            shutil.rmtree(output, ignore_errors=True)
    finally:
        if kind == "copies":
            shutil.rmtree(location, ignore_errors=True)
    if entry["spark"]["images"] != images or entry["pair"]["images"] != images:
        logger.warning("xl preprocess: %d images asked, the job read %d and the pair %d",
                       images, entry["spark"]["images"], entry["pair"]["images"])
    return dict(entry, images=images, kind=kind, input_setup_s=round(setup_s, 1), page_cache=page_cache,
                memory=_memory_of(memory_run, heap.result, driver_before))


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
    """``(spark, part)``: Spark's fixed costs, then every size."""
    spark, fixed = spark_fixed_costs(spark_factory, source, workdir, config, sampled_input)
    largest = max((n for n, kind in sizes if kind == "sample"), default=None)
    entries = [preprocess_size(spark, source, workdir, n, kind, config, fixed["tiny_job_s"],
                               (n, kind) == (largest, "sample"), keep_dataset, gc_interval) for n, kind in sizes]
    hash_files = [f for e in entries for f in e["pair"].get("hash_files", [])]
    return spark, {"spark_fixed": fixed, "sizes": entries, "memory_reference": memory_reference,
                   "memory_growth": memory_growth(entries, memory_reference), "hash_files": hash_files}


def duplicates_on_one_cpu(hash_files: list[str], total: int, max_distance: int) -> dict:
    """``bench_duplicates`` on the hashes in ``hash_files``, pinned to one CPU."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    hashes = {}
    for path in hash_files:
        with open(path, encoding="utf-8") as handle:
            hashes.update({p: int(h) for p, h in json.load(handle).items()})
    result = dup_bench.bench_duplicates(hashes, total=total, max_distance=max_distance, seed=0)
    return {"real_hashes": len(hashes), "result": dict(result, maxrss_mb=maxrss_mb(), cpus=sorted(
        os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)}


def run_predict(source: str, workdir: str, images: int, model: str, image_size: int) -> dict:
    """``bench_predict`` on a sample of ``images`` with an untrained ``model``, in a process of its own."""
    location = sampled_input(source, os.path.join(workdir, f"input-predict-{images}"), images, seed=1)
    made = predict_bench.untrained_model_dir(model, image_size, os.path.join(workdir, f"model-untrained-{model}"))
    logger.info("xl predict: %d images, Spark against one plain process", images)
    return {"images": images, "input": location, "model": made,
            "result": in_process(predict_bench.bench_predict, location, made["model_dir"], images)}


def train_epoch(spark, dataset: str, summary: dict, model: str, config_path: str | None, batch_size: int | None,
                workdir: str) -> dict:
    """One whole epoch of ``run_training`` (with validation)."""
    from covid_spark.config import load_config, override
    from covid_spark.data.rundir import RunDir
    from covid_spark.stages.train import run_training

    cfg = override(load_config(config_path, model=model), "train", {"model": model, "epochs": 1,
                                                                    "batch_size": batch_size})
    model_dir, rows, batch = os.path.join(workdir, "epoch", model), summary["per_split"]["train"], \
        cfg["train"]["batch_size"]
    logger.info("xl train: %s, one epoch over %d train images", model, rows)
    load_start = loadavg()
    with PeakRss(interval=1.0) as rss:
        outer, run = timed(run_training, spark, dataset, model_dir, cfg, overwrite=True)
    with open(RunDir(model_dir).history, encoding="utf-8") as handle:
        history = {k: v[0] for k, v in json.load(handle).items() if isinstance(v, list) and v}
    shutil.rmtree(model_dir, ignore_errors=True)
    return {"model": model, "train_rows": rows, "val_rows": summary["per_split"].get("val", 0),
            "num_proc": run["num_proc"], "steps_per_epoch": run["steps_per_epoch"], "batch_size": int(batch),
            "threads_per_rank": run["threads_per_rank"], "run_json_wall_s": run["wall_seconds"],
            "epoch_s": round(history["seconds"], 1), "call_s": round(outer, 1),
            "images_per_s_wall": round(rows / run["wall_seconds"], 1),
            "images_per_s_epoch": round(rows / history["seconds"], 1),
            "images_per_s_steps": round(run["steps_per_epoch"] * run["num_proc"] * int(batch) / history["seconds"], 1),
            **{k: history.get(k) for k in ("loss", "val_loss", "val_accuracy")}, "jvm_peak_rss_mb": rss.peaks["jvm"],
            "loadavg_at_start": load_start, "loadavg_at_end": loadavg()}


def run_train(spark, dataset: str, config: dict, models, steps: dict, warmup: int, workdir: str,
              skip_epoch: bool, config_path: str | None, batch_size: int | None = None, rates: bool = True) -> dict:
    """Each model's 2-rank Horovod rate (if ``rates``), then one whole epoch each (unless ``skip_epoch``)."""
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
                              "steps": steps[model], "horovod_2": train_bench.launch(spark, job, 2, warmup)})
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
    if dup:
        out.append(verdict("duplicates_s", dup["seconds_banded"], f"{dup['n']:,} real hashes grown with copies",
                           f"all-pairs {dup['all_pairs_seconds']} s on {dup['all_pairs_checked_n']}"))
    pred = (results.get("predict") or {}).get("result") or {}
    if pred:
        out.append(verdict("predict_vs_plain", pred["ratio"], f"{pred['parallelism']} × plain, "
                                                              f"{pred['images']:,} images"))
    return [v for v in out if v]


def run_xl(source: str, workdir: str, parts=PARTS, profile: dict | None = None, config_path: str | None = None,
           config: dict | None = None, master: str = "local[2]", spark=None, results: dict | None = None,
           save_to: str | None = None, batch_size: int | None = None, predict_model: str | None = None,
           gc_interval: float = 2.0, train_rates: bool = True) -> dict:
    """The results of the chosen parts, updating ``results`` and saved to ``save_to`` after each part."""
    from covid_spark.config import load_config
    from covid_spark.data.dataset import has_summary
    from covid_spark.data.rundir import git_commit
    from covid_spark.stages.preprocess import preprocess

    profile, config = profile or PROFILES[False], config or load_config(config_path)
    distinct = len(source_rows(source))
    size_list, models = parse_sizes(profile["sizes"], distinct), tuple(profile["models"])
    results = results if results is not None else {}
    results["machine"] = machine()
    largest = max((n for n, kind in size_list if kind == "sample"), default=min(distinct, profile["memory_reference"]))
    owned, session = spark is None, {"spark": spark}

    def get_spark():
        session["spark"] = session["spark"] or start_spark(master)
        return session["spark"]

    def settings():
        """The session's memory settings, and where they came from."""
        conf = dict(session["spark"].sparkContext.getConf().getAll())
        return dict({k: conf.get(k) for k in ("spark.master", "spark.driver.memory", "spark.driver.extraJavaOptions",
                                              "spark.python.worker.reuse")},
                    source="conf/spark-local.conf" if owned else "the caller's session")

    def preprocess_part():
        session["spark"], part = run_preprocess(get_spark, source, workdir, size_list, config,
                                                profile["memory_reference"], "train" in parts, gc_interval)
        return dict(part, settings=settings())

    def duplicates_part():
        files = (results.get("preprocess") or {}).get("hash_files") or []
        if not files or not all(os.path.exists(f) for f in files):
            files = plain_stage(make_input(source, workdir, largest, "sample"), 2, config, f"{workdir}/plain-dup",
                                f"{workdir}/hashes-{largest}")["hash_files"]
        total, distance = profile["hashes_total"], int(config["preprocess"]["duplicate_distance"])
        logger.info("xl duplicates: real hashes grown to %d, max distance %d, one CPU", total, distance)
        return dict(in_process(duplicates_on_one_cpu, files, total, distance), total=total, max_distance=distance)

    def train_part():
        dataset = os.path.join(workdir, f"ds-{largest}")  # kept by the preprocess part, else made now (untimed)
        if not has_summary(None, dataset):
            preprocess(get_spark(), make_input(source, workdir, largest, "sample"), dataset, config, overwrite=True)
        return dict(run_train(get_spark(), dataset, config, models, profile["steps"], profile["warmup"], workdir,
                              profile["skip_epoch"], config_path, batch_size, rates=train_rates), settings=settings())

    work = {"preprocess": preprocess_part, "duplicates": duplicates_part, "train": train_part,
            "predict": lambda: run_predict(source, workdir, profile["predict_images"], predict_model or
                                           config["train"]["model"], int(config["preprocess"]["image_size"]))}
    started_all, work_made = time.time(), not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    invocation = {"parts": list(parts), "sizes": [f"{n}{'c' if k == 'copies' else ''}" for n, k in size_list],
                  "models": list(models), "quick": profile["quick"], "source": os.path.abspath(source),
                  "source_images": distinct, "git_commit": git_commit(), "loadavg_at_start": loadavg(),
                  "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        for name in (p for p in PARTS if p in parts):
            started, load = time.time(), loadavg()
            results[name] = dict(work[name](), seconds=round(time.time() - started, 1), loadavg_at_start=load,
                                 loadavg_at_end=loadavg())
            results["verdicts"] = verdicts(results)
            if save_to:
                save(results, save_to)
    finally:
        if owned and session["spark"] is not None:
            session["spark"].stop()
        if work_made:
            shutil.rmtree(workdir, ignore_errors=True)
    invocation.update(seconds=round(time.time() - started_all, 1), loadavg_at_end=loadavg(),
                      driver_python_maxrss_mb=maxrss_mb())
    results.setdefault("invocations", []).append(invocation)
    results["machine"]["load_avg_at_end"] = invocation["loadavg_at_end"]
    if save_to:
        save(results, save_to)
    return results


def format_preprocess_part(part: dict) -> str:
    lines = format_preprocess(part["sizes"], part["spark_fixed"]) + [table(
        ["images", "driver MiB (before the job)", "Spark Python workers MiB, each",
         "JVM heap after a full GC MiB (of max)", "forced GCs (s)"],
        [[f"{e['images']:,}", f"{fmt(m['driver_mb'])} ({fmt(m['driver_before_job_mb'])})",
          " / ".join(fmt(x) for x in m["python_workers_mb"]), f"{fmt(m['jvm_heap_after_gc_mb'])} "
          f"({fmt(m['jvm_max_heap_mb'])})", f"{m['forced_gc_samples']} ({fmt(m['forced_gc_s'])})"]
         for e, m in ((e, e["memory"]) for e in part["sizes"])], left=(2,))]
    if part.get("memory_growth"):
        lines.append(table(["peak memory", "at reference size", "MiB", "at largest size", "MiB", "ratio"],
                           [[g["process"], f"{g['reference_images']:,}", g["reference_mb"], f"{g['largest_images']:,}",
                             g["largest_mb"], fmt(g["ratio"], 2)] for g in part["memory_growth"]]))
    lines.append("Memory settings: " + "; ".join(f"{k} = {v}" for k, v in (part.get("settings") or {}).items() if v))
    return "\n\n".join(line for line in lines if line)


def format_tables(results: dict) -> str:
    out = []
    if results.get("preprocess"):
        out.append("### Preprocessing\n\n" + format_preprocess_part(results["preprocess"]))
    dup = (results.get("duplicates") or {}).get("result")
    if dup:
        out.append(f"### Duplicate grouping\n\n{dup['n']:,} hashes ({results['duplicates']['real_hashes']:,} real "
                   f"ones and copies with 0–10 bits flipped), one process on CPU {dup['cpus']}: banded "
                   f"**{dup['seconds_banded']:.2f} s** ({dup['cpu_seconds_banded']:.2f} s CPU), {dup['groups']:,} "
                   f"groups, the largest {dup['largest_group']}; all-pairs on {dup['all_pairs_checked_n']:,} of them "
                   f"{dup['all_pairs_seconds']:.2f} s against banded {dup['banded_seconds_same_set']:.2f} s, same "
                   f"groups: {'yes' if dup['same_groups_as_all_pairs'] else '**no**'}; max distance "
                   f"{dup['max_distance']} of {dup['bits']} bits.")
    pred = (results.get("predict") or {}).get("result")
    if pred:
        peaks = " / ".join(fmt(pred["peak_rss_mb"][k]) for k in ("driver", "jvm", "spark_python_workers"))
        out.append(f"### Predict\n\n{pred['images']:,} images, {results['predict']['model']['model']} (untrained "
                   f"head): Spark {pred['spark']['seconds']:.1f} s, {pred['spark']['images_per_s']:.1f} images/s; one "
                   f"plain process {pred['plain']['images_per_s']:.1f} images/s; Spark / ({pred['parallelism']} × "
                   f"plain) **{pred['ratio']:.2f}**; peak MiB driver / JVM / Python workers {peaks}; other users' "
                   f"share {pct(pred['cpu']['others_share'])}.")
    train = results.get("train")
    if train:
        split = train["per_split"]
        out += [f"### Training\n\nDataset: the {sum(split.values()):,}-image sample ({split['train']:,} train, "
                f"{split.get('val', 0):,} val); {train['threads_per_rank']} thread(s) per rank."]
        if train["rates"]:
            out.append(train_bench.format_rates(train["rates"]))
        if train["epochs"]:
            out.append(table(["model", "train images", "steps × batch × ranks", "run_training wall s",
                              "epoch s (fit, incl. validation)", "train images / wall s", "train images / epoch s",
                              "val accuracy after 1 epoch"],
                             [[e["model"], f"{e['train_rows']:,}",
                               f"{e['steps_per_epoch']} × {e['batch_size']} × {e['num_proc']}", e["run_json_wall_s"],
                               e["epoch_s"], e["images_per_s_wall"], e["images_per_s_epoch"], fmt(e["val_accuracy"], 3)]
                              for e in train["epochs"]], left=(0, 2)))
    if results.get("verdicts"):
        out.append("### Goals\n\n" + verdict_table(results["verdicts"]))
    out.append("Time per part: " + ", ".join(f"{p} {results[p]['seconds']:.0f} s" for p in PARTS if results.get(p)))
    return "\n\n".join(out)


def main(argv=None) -> int:
    parser = arguments("Benchmarks on cxr-xl at scale (see docs/performance.md).", input=CXR_XL, master="local[2]",
                       config=None, workdir=None, output=DEFAULT_OUTPUT)
    parser.add_argument("--sizes", help="comma-separated preprocess sizes; above the source's, or with a 'c' suffix, "
                                        "made of copies (default 671,5000,17445,50000; --quick 200,1000,3000c)")
    parser.add_argument("--models", help=f"comma-separated, of {','.join(MODELS)} (default all; --quick compact)")
    parser.add_argument("--parts", default=",".join(PARTS), help="fewer than all merge into the existing --output")
    parser.add_argument("--skip-epoch", action="store_true", help="no whole training epochs")
    parser.add_argument("--skip-rates", action="store_true", help="no timed training steps")
    parser.add_argument("--quick", action="store_true", help="small sizes and counts, compact only, no epoch")
    parser.add_argument("--memory-reference", type=int, help="the size memory is compared with (default 5000)")
    parser.add_argument("--hashes", dest="hashes_total", type=int, help="hashes to group (default 100000; --quick "
                                                                         "5000)")
    parser.add_argument("--predict-images", type=int, help="default 17445 (all of cxr-xl; --quick 200)")
    parser.add_argument("--predict-model", help="model to score with (default: train.model)")
    args = parser.parse_args(argv)
    parts, args.models = items(args.parts), tuple(items(args.models))
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}: parts are {', '.join(PARTS)}; models {', '.join(MODELS)}")
    if not os.path.exists(args.input):
        parser.error(f"input {args.input} not found")
    setup_logging("bench")  # INFO from bench and covid_spark; py4j's INFO chatter stays off
    profile = {k: getattr(args, k, None) or v for k, v in PROFILES[args.quick].items()}
    results = load(args.output) if set(parts) != set(PARTS) else {}
    results["command"] = command("xl", argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="covid-spark-bench-xl-")
    if not args.workdir:
        os.rmdir(workdir)  # run_xl removes a folder it makes, and keeps one given
    try:
        results = run_xl(args.input, workdir, parts=parts, profile=profile, config_path=args.config,
                         master=args.master, results=results, save_to=args.output, predict_model=args.predict_model,
                         train_rates=not args.skip_rates)
    except ValueError as exc:
        print(f"bench.xl: {exc}", file=sys.stderr)
        return 2
    last = results["invocations"][-1]
    report(results, last["loadavg_at_start"], format_tables(results), args.output, last["seconds"])
    return 0

if __name__ == "__main__":
    sys.exit(main())
