"""python -m bench.run [--quick] [--sizes all,5000] [--models compact,original] (`make bench`): preprocess, read and
train, each against its baseline in the same run → bench/results.json (docs/performance.md, "What is measured")."""
from __future__ import annotations

import os
import shutil
import sys
import time

from bench import preprocess_bench, train_bench
from bench.harness import (DATA, GOALS, RESULTS, SCRATCH, arguments, command, fmt, items, loadavg, machine, report,
                           save, start_spark, table, verdict, verdict_table)
from bench.inputs import sized_input, source_rows
from bench.monitors import PeakRss, maxrss_mb
from covid_spark.cli import setup_logging


def input_for(source: str, size: str, workdir: str) -> str:
    """The input for one size: ``all`` is the source itself, a number N is N images (repeated by symlinks)."""
    if size == "all" or int(size) == len(source_rows(source)):
        return source
    return sized_input(source, os.path.join(workdir, f"input-{size}"), int(size))


def run_benchmarks(source: str, workdir: str, sizes=("all", "5000"), models=("compact", "original"),
                   steps: dict | None = None, warmup: int = 3, read_batches: int = 20, read_warmup: int = 3,
                   master: str = "local[2]", config: dict | None = None, batch_size: int | None = None,
                   spark=None, keep_work: bool = False, ranks: tuple[int, ...] = (1, 2),
                   engines: tuple[str, ...] | None = None) -> dict:
    """The results of every benchmark, in ``spark`` (not stopped) or a session of its own on ``master``."""
    from covid_spark.config import load_config

    config = config or load_config()
    engines = tuple(engines or (("horovod", "tf-distribute") if train_bench.solo_engine() == "horovod"
                                else ("tf-distribute",)))  # both where Horovod is installed (the pinned stack)
    steps = dict(train_bench.STEPS, **(steps or {}))
    os.makedirs(workdir, exist_ok=True)
    started = time.time()
    results: dict = {"machine": machine(), "goals": {k: vars(GOALS[k]) for k in ("preprocess_spark_vs_pair",
                                                                               "read_vs_train", "train_efficiency")},
                     "settings": {"input": os.path.abspath(source), "sizes": list(sizes), "models": list(models),
                                  "steps": {m: steps[m] for m in models}, "warmup_steps": warmup,
                                  "read_batches": read_batches, "horovod_ranks": list(ranks), "engines": list(engines),
                                  "image_size": int(config["preprocess"]["image_size"]),
                                  "master": master if spark is None else spark.sparkContext.master}}
    owned = spark is None
    with PeakRss() as whole:
        try:
            spark, fixed = preprocess_bench.spark_fixed_costs(lambda: spark or start_spark(master), source, workdir,
                                                              config, sized_input)
            if not owned:
                fixed["session_start_s"] = None  # the caller's session was already running
            results["spark_fixed"], results["preprocess"] = fixed, []
            dataset = None
            for size in sizes:
                location, output = input_for(source, size, workdir), os.path.join(workdir, f"ds-{size}")
                entry = preprocess_bench.run_size(spark, location, output, config, fixed["tiny_job_s"])
                entry["size"] = size
                entry["duplicates_note"] = (
                    "input lists each source image several times (symlinks): copies are grouped as duplicates and "
                    "kept in one split" if location != source else None)
                results["preprocess"].append(entry)
                if dataset is None:
                    dataset = output
                elif not keep_work:
                    shutil.rmtree(output, ignore_errors=True)
            threads = train_bench.threads_per_rank(config, 2)
            results["read"] = train_bench.run_read(spark, dataset, config, threads, read_warmup, read_batches,
                                                  batch_size)
            results["train"] = []
            for model in models:
                with PeakRss() as rss:
                    entry = train_bench.run_model(spark, dataset, config, model, steps[model], warmup,
                                                  os.path.join(workdir, "train"), batch_size, ranks, engines)
                results["train"].append(dict(entry, peak_rss_mb=rss.peaks))
        finally:
            if owned and spark is not None:
                spark.stop()
    results["memory"] = {"driver_python_maxrss_mb": maxrss_mb(), "tree_peaks_mb": whole.peaks}
    results["verdicts"] = verdicts(results)
    results["machine"]["load_avg_at_end"] = loadavg()
    results["seconds"] = round(time.time() - started, 1)
    if not keep_work:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def training_rate(results: dict) -> float | None:
    """The rate one rank's reader must sustain: the first model's 1-rank Horovod run (else half its pair)."""
    for entry in results.get("train", []):
        if "horovod_1" in entry:
            return entry["horovod_1"]["images_per_s"]
        return round(entry["independent_2"]["images_per_s"] / 2, 1)
    return None


def read_ratios(results: dict) -> dict[str, float | None]:
    rate = training_rate(results)
    return {v: round(results["read"][v]["images_per_s"] / rate, 2) if rate else None
            for v in ("no_augment", "augment")}


def verdicts(results: dict) -> list[dict]:
    """The goals of `make bench`, judged: preprocess at the largest size, reading, each model's training."""
    out = []
    if results.get("preprocess"):
        largest = max(results["preprocess"], key=lambda e: e["images"])
        out.append(verdict("preprocess_spark_vs_pair", largest["spark_vs_pair"], f"{largest['images']} images"))
    if results.get("read"):
        rate = training_rate(results)
        for variant, ratio in read_ratios(results).items():
            out.append(verdict("read_vs_train", ratio, variant.replace("_", " "),
                               f"training rate {rate} images/s (first model, 1 rank)"))
    for entry in results.get("train", []):
        out.append(verdict("train_efficiency", entry.get("efficiency"), f"{entry['model']}, horovod"))
        out.append(verdict("train_efficiency", entry.get("efficiency_tf_distribute"),
                           f"{entry['model']}, tf-distribute"))
    return [v for v in out if v]


def format_tables(results: dict) -> str:
    """Markdown: preprocessing, Spark's costs, reading, training, the whole run's memory, the goals."""
    out = []
    if results.get("preprocess"):
        out += preprocess_bench.format_preprocess(results["preprocess"], results["spark_fixed"])
    if results.get("read"):
        ratios = read_ratios(results)
        out.append(table(["read Petastorm → tf.data", "images/s", "training, 1 rank: images/s", "ratio", "goal",
                          "reader peak RSS MiB"],
                         [[v.replace("_", " "), results["read"][v]["images_per_s"], training_rate(results),
                           fmt(ratios[v], 2), GOALS["read_vs_train"].rule, results["read"][v]["maxrss_mb"]]
                          for v in ratios]))
    if results.get("train"):
        out.append(train_bench.format_rates(results["train"]))
    if results.get("memory"):
        mem, tree = results["memory"], results["memory"]["tree_peaks_mb"]
        out.append(f"Peak RSS of the whole run: bench driver {fmt(mem['driver_python_maxrss_mb'])} MiB (ru_maxrss); "
                   f"sampled, at one instant: JVM {fmt(tree['jvm'])}, Spark Python workers "
                   f"{fmt(tree['spark_python_workers'])}, the whole process tree {fmt(tree['tree'])} MiB.")
    if results.get("verdicts"):
        out.append(verdict_table(results["verdicts"]))
    return "\n\n".join(t for t in out if t)


def main(argv=None) -> int:
    parser = arguments("Throughput benchmarks of preprocess, read and train.", input=os.path.join(DATA, "cxr3"),
                       master="local[2]", config=None, output=RESULTS,
                       workdir=(os.path.join(SCRATCH, "work"), "scratch folder, removed unless --keep-work"))
    parser.add_argument("--sizes", help="comma-separated: 'all' (the input) or a number of images, the input's "
                                        "repeated as needed (default all,5000; --quick all)")
    parser.add_argument("--models", help="comma-separated models; default compact,original (--quick: compact)")
    parser.add_argument("--steps", type=int, help="timed training steps per run (default per model)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--read-batches", type=int, help="timed batches per read run (default 20; --quick 8)")
    parser.add_argument("--quick", action="store_true", help="one size, one model, few steps (a minute or two)")
    parser.add_argument("--engines", help="comma-separated (default: both where Horovod is installed)")
    parser.add_argument("--keep-work", action="store_true")
    args = parser.parse_args(argv)
    setup_logging("bench")  # INFO from bench and covid_spark; py4j's INFO chatter stays off
    from covid_spark.config import load_config

    if not os.path.exists(args.input):
        parser.error(f"input {args.input} not found")
    models = items(args.models or ("compact" if args.quick else "compact,original"))
    steps = {m: args.steps for m in models} if args.steps else (train_bench.QUICK_STEPS if args.quick else None)
    results = run_benchmarks(args.input, args.workdir, sizes=items(args.sizes or ("all" if args.quick else "all,5000")),
                             models=models, steps=steps, warmup=args.warmup_steps,
                             read_batches=args.read_batches or (8 if args.quick else 20), master=args.master,
                             config=load_config(args.config), keep_work=args.keep_work,
                             engines=tuple(items(args.engines)) or None)
    results["command"] = command("run", argv)
    save(results, args.output, section="bench")
    report(results, results["machine"]["load_avg_at_start"], format_tables(results), args.output, results["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
