"""python -m bench.run [--quick] [--sizes all,5000] [--models compact,original] [--output bench/results.json]

Benchmarks of the pipeline's three throughput-bound stages, each against the baseline it must
be judged by, measured in the same run (see docs/performance.md):

1. preprocessing: the Spark preprocess job (local[2]) against the same per-file decode in one
   plain process and in two independent plain processes, at each input size; Spark's fixed
   costs (session start-up, a job on 6 images) apart;
2. reading: Petastorm → tf.data (make_train_dataset) without and with augmentation, against
   one rank's training rate;
3. training: 1 and 2 Horovod ranks (horovod.spark.run over the real train_fn) against two
   independent single-rank trainings at once, per model;
plus peak memory of the driver, the JVM and every rank. Writes JSON and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time

from bench.memory import PeakRss, maxrss_mb

logger = logging.getLogger("bench")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_INPUT = os.path.join(REPO, "..", "shared", "data", "cxr3")
GOALS = {"spark_vs_pair": 0.8, "read_vs_train": 5.0, "efficiency": 0.9}
DEFAULT_STEPS = {"compact": 30, "original": 30, "efficientnet_lite0": 12}
QUICK_STEPS = {"compact": 6, "original": 4, "efficientnet_lite0": 3}
FIXED_COST_IMAGES = 6


def machine() -> dict:
    """nproc, CPU model, RAM and load of this machine, and the library versions."""
    from covid_spark.data.rundir import versions

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram_gib = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal"))
        ram_gib = round(kib / 1024 ** 2, 1)
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": cpu, "ram_gib": ram_gib,
            "platform": platform.platform(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "versions": versions()}


def spark_settings(master: str) -> dict[str, str]:
    """conf/spark-local.conf (what `make demo` uses), with the UI on and no console progress bar."""
    settings = {"spark.master": master}
    path = os.path.join(REPO, "conf", "spark-local.conf")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if line and not line.startswith("#"):
                    key, _, value = line.partition(" ")
                    settings[key] = value.strip()
    if "log4j2.configurationFile=conf/" in settings.get("spark.driver.extraJavaOptions", ""):
        settings["spark.driver.extraJavaOptions"] = settings["spark.driver.extraJavaOptions"].replace(
            "=conf/", "=" + os.path.join(REPO, "conf") + "/")
    settings["spark.ui.showConsoleProgress"] = "false"
    settings["spark.ui.enabled"] = "true"  # its REST API gives per-job and per-stage times
    return settings


def start_spark(master: str):
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("covid-spark bench")
    for key, value in spark_settings(master).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def input_for(source: str, size: str, workdir: str) -> str:
    """The input location for one size: ``all`` is the source itself, a number N is N images."""
    from bench.inputs import sized_input, source_rows

    if size == "all":
        return source
    images = int(size)
    if images == len(source_rows(source)):
        return source
    return sized_input(source, os.path.join(workdir, f"input-{images}"), images)


def run_benchmarks(source: str, workdir: str, sizes=("all", "5000"), models=("compact", "original"),
                   steps: dict | None = None, warmup: int = 3, read_batches: int = 20, read_warmup: int = 3,
                   master: str = "local[2]", config: dict | None = None, batch_size: int | None = None,
                   spark=None, keep_work: bool = False, ranks: tuple[int, ...] = (1, 2),
                   engines: tuple[str, ...] | None = None) -> dict:
    """Run every benchmark; return the results (plain data, JSON-ready).

    ``spark``: an existing session to use (it is not stopped); otherwise one is started with
    ``master`` and stopped at the end. ``config``: the job config (default: packaged defaults).
    """
    from covid_spark.config import load_config

    from bench import preprocess_bench, read_bench, train_bench
    from bench.inputs import sized_input

    config = config or load_config()
    engines = tuple(engines or default_engines())
    steps = dict(DEFAULT_STEPS, **(steps or {}))
    os.makedirs(workdir, exist_ok=True)
    started = time.time()
    settings = {"input": os.path.abspath(source), "sizes": list(sizes), "models": list(models),
                "steps": {m: steps[m] for m in models}, "warmup_steps": warmup, "read_batches": read_batches,
                "horovod_ranks": list(ranks), "engines": list(engines), "image_size": int(config["preprocess"]["image_size"]),
                "master": master if spark is None else spark.sparkContext.master}
    results: dict = {"machine": machine(), "goals": GOALS, "settings": settings}
    owned = spark is None
    with PeakRss() as whole:
        try:
            tiny = sized_input(source, os.path.join(workdir, "input-tiny"), FIXED_COST_IMAGES)
            factory = (lambda: start_spark(master)) if owned else (lambda: spark)
            spark, fixed = preprocess_bench.spark_fixed_costs(factory, tiny, os.path.join(workdir, "ds-tiny"),
                                                              config)
            if not owned:
                fixed["session_start_s"] = None  # the caller's session was already running
            results["spark_fixed"] = fixed
            results["preprocess"] = []
            dataset = None
            for size in sizes:
                location = input_for(source, size, workdir)
                output = os.path.join(workdir, f"ds-{size}")
                entry = preprocess_bench.run_size(spark, location, output, config, fixed["tiny_job_s"])
                entry["size"] = size
                entry["duplicates_note"] = (
                    "input lists each source image several times (symlinks): copies are grouped as "
                    "duplicates and kept in one split" if size != "all" and location != source else None)
                results["preprocess"].append(entry)
                if dataset is None:
                    dataset = output
                elif not keep_work:
                    shutil.rmtree(output, ignore_errors=True)
            # the read and training benchmarks use the first size's dataset
            results["decode_profile"] = preprocess_bench.profile_decode(
                _paths(source)[:200], int(config["preprocess"]["image_size"]), int(config["preprocess"]["max_pixels"]))
            threads = train_bench.threads_per_rank(config, 2)
            results["read"] = read_bench.run_read(spark, dataset, config, threads, read_warmup, read_batches,
                                                  batch_size)
            results["train"] = []
            for model in models:
                with PeakRss() as rss:
                    entry = train_bench.run_model(spark, dataset, config, model, steps[model], warmup,
                                                  os.path.join(workdir, "train"), batch_size, ranks, engines)
                entry["peak_rss_mb"] = rss.peaks
                results["train"].append(entry)
        finally:
            if owned and spark is not None:
                spark.stop()
    results["memory"] = {"driver_python_maxrss_mb": maxrss_mb(), "tree_peaks_mb": whole.peaks}
    results["verdicts"] = verdicts(results)
    results["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.time() - started, 1)
    if not keep_work:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _paths(location: str) -> list[str]:
    from covid_spark.inputs.sources import discover

    return [r["path"] for r in discover(location).records]


def verdicts(results: dict) -> list[dict]:
    """Each goal: measured ratio, goal, met or not, and by how much it falls short."""
    out = []

    def add(name, ratio, goal, detail):
        if ratio is None:
            return
        out.append({"goal": name, "ratio": ratio, "target": goal, "met": ratio >= goal,
                    "shortfall_pct": None if ratio >= goal else round(100 * (1 - ratio / goal), 1),
                    "detail": detail})

    if results.get("preprocess"):
        largest = max(results["preprocess"], key=lambda e: e["images"])
        add("preprocess: Spark ≥ 0.8 × two plain processes (largest size)", largest["spark_vs_pair"],
            GOALS["spark_vs_pair"], f"{largest['images']} images")
    train_rate = training_rate(results)
    if results.get("read") and train_rate:
        for variant in ("no_augment", "augment"):
            add(f"read ({variant.replace('_', ' ')}) ≥ 5 × training rate",
                round(results["read"][variant]["images_per_s"] / train_rate, 2), GOALS["read_vs_train"],
                f"training rate {train_rate} images/s (compact, 1 rank)")
    for entry in results.get("train", []):
        if "efficiency" in entry:
            add(f"training ({entry['model']}): 2 ranks ≥ 0.9 × independent pair", entry["efficiency"],
                GOALS["efficiency"], "")
        if "efficiency_tf_distribute" in entry:
            add(f"training ({entry['model']}, tf-distribute): 2 ranks ≥ 0.9 × independent pair",
                entry["efficiency_tf_distribute"], GOALS["efficiency"], "")
    return out


def default_engines() -> tuple[str, ...]:
    """Both engines where Horovod is installed (the pinned stack), else tf-distribute alone."""
    import importlib.util

    return ("horovod", "tf-distribute") if importlib.util.find_spec("horovod") is not None else ("tf-distribute",)


def training_rate(results: dict) -> float | None:
    """The per-rank training rate the reader must sustain: the first model's 1-rank Horovod run."""
    for entry in results.get("train", []):
        if "horovod_1" in entry:
            return entry["horovod_1"]["images_per_s"]
        return round(entry["independent_2"]["images_per_s"] / 2, 1)
    return None


def _pct(share) -> str:
    return "–" if share is None else f"{100 * share:.0f} %"


def _fmt(value, digits=1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_tables(results: dict) -> str:
    """Markdown tables: throughput ratios, Spark's fixed costs, peak memory, goals."""
    lines = ["| measurement | images/s | baseline | baseline images/s | ratio | goal |",
             "|---|---:|---|---:|---:|---:|"]
    for e in results.get("preprocess", []):
        n = e["images"]
        spark_rate = e["spark"]["images_per_s"]
        lines.append(f"| preprocess {n}: Spark job, local[2] | {_fmt(spark_rate)} | 2 plain processes | "
                     f"{_fmt(e['pair']['images_per_s'])} | {_fmt(e['spark_vs_pair'], 2)} | ≥ 0.80 |")
        lines.append(f"| preprocess {n}: Spark job minus fixed job cost | {_fmt(e['spark']['net_images_per_s'])} "
                     f"| 2 plain processes | {_fmt(e['pair']['images_per_s'])} | "
                     f"{_fmt(e['spark_net_vs_pair'], 2)} | |")
        lines.append(f"| preprocess {n}: 2 plain processes | {_fmt(e['pair']['images_per_s'])} | 1 plain process | "
                     f"{_fmt(e['single']['images_per_s'])} | {_fmt(e['pair_vs_single'], 2)} | |")
    train_rate = training_rate(results)
    if results.get("read"):
        for variant in ("no_augment", "augment"):
            rate = results["read"][variant]["images_per_s"]
            ratio = round(rate / train_rate, 2) if train_rate else None
            lines.append(f"| read Petastorm → tf.data, {variant.replace('_', ' ')} | {_fmt(rate)} | "
                         f"training, 1 rank | {_fmt(train_rate)} | {_fmt(ratio, 2)} | ≥ 5 |")
    for e in results.get("train", []):
        m = e["model"]
        pair = e["independent_2"]["images_per_s"]
        if "horovod_2" in e:
            lines.append(f"| train {m}: 2 Horovod ranks | {_fmt(e['horovod_2']['images_per_s'])} | "
                         f"2 independent processes | {_fmt(pair)} | {_fmt(e['efficiency'], 2)} | ≥ 0.90 |")
        if "tf_distribute_2" in e:
            lines.append(f"| train {m}: 2 tf-distribute ranks | {_fmt(e['tf_distribute_2']['images_per_s'])} | "
                         f"2 independent processes | {_fmt(pair)} | {_fmt(e['efficiency_tf_distribute'], 2)} | ≥ 0.90 |")
        if "tf_distribute_1" in e:
            lines.append(f"| train {m}: 1 tf-distribute rank | {_fmt(e['tf_distribute_1']['images_per_s'])} "
                         f"| – | – | – | |")
        if "horovod_1" in e:
            lines.append(f"| train {m}: 1 Horovod rank | {_fmt(e['horovod_1']['images_per_s'])} | – | – | – | |")
            lines.append(f"| train {m}: 2 independent processes | {_fmt(pair)} | 1 Horovod rank | "
                         f"{_fmt(e['horovod_1']['images_per_s'])} | {_fmt(e['independent_2_vs_1'], 2)} | |")
    out = ["\n".join(lines)]
    fixed = results.get("spark_fixed")
    if fixed:
        out.append("| Spark fixed cost | seconds |\n|---|---:|\n"
                   f"| session start-up (JVM, SparkContext) | {_fmt(fixed['session_start_s'])} |\n"
                   f"| first preprocess job, {fixed['tiny_job_images']} images (starts Python workers) | "
                   f"{_fmt(fixed['tiny_job_first_s'])} |\n"
                   f"| next preprocess job, {fixed['tiny_job_images']} images | {_fmt(fixed['tiny_job_s'])} |" +
                   "".join(f"\n| horovod.spark.run outside fit() (launch, TF import, model build, save), "
                           f"{m['model']}, {k[-1]} rank(s) | {_fmt(m[k]['outside_fit_s'])} |"
                           for m in results.get("train", []) for k in ("horovod_1", "horovod_2") if k in m))
    out.append(format_cpu(results))
    breakdown = format_spark_jobs(results)
    if breakdown:
        out.append(breakdown)
    out.append(format_memory(results))
    if results.get("verdicts"):
        rows = ["| goal | measured | target | met |", "|---|---:|---:|---|"]
        for v in results["verdicts"]:
            met = "yes" if v["met"] else f"no, {v['shortfall_pct']:g} % short"
            rows.append(f"| {v['goal']} | {v['ratio']:.2f} | {v['target']:g} | {met} |")
        out.append("\n".join(rows))
    return "\n\n".join(out)


def format_cpu(results: dict) -> str:
    """Core-seconds each preprocessing run used (ours, per image) and what other users took meanwhile;
    CPU cores each training process kept busy in its timed window (measured inside the process:
    Horovod's launcher detaches the ranks from this process tree)."""
    rows = ["| run | wall s | our core-s | our core-ms per image | JVM / Spark Python / driver+children / "
            "other core-s | other users' share of the machine |", "|---|---:|---:|---:|---|---:|"]

    def row(label, cpu, images):
        if not cpu:
            return
        ours = cpu["ours_core_s"]
        per_image = f"{1000 * ours['total'] / images:.1f}" if images else "–"
        rows.append(f"| {label} | {cpu['wall_s']:.1f} | {ours['total']:.1f} | {per_image} | "
                    f"{ours['jvm']:.1f} / {ours['spark_python_workers']:.1f} / {ours['driver']:.1f} / "
                    f"{ours['other_children']:.1f} | {_pct(cpu['others_share'])} |")

    for e in results.get("preprocess", []):
        row(f"preprocess {e['images']}: 1 plain process", e["single"].get("cpu"), e["images"])
        row(f"preprocess {e['images']}: 2 plain processes", e["pair"].get("cpu"), e["images"])
        row(f"preprocess {e['images']}: Spark job", e["spark"].get("cpu"), e["images"])
    out = "\n".join(rows)
    train_rows = ["| training, timed window | window s | images/s | CPU cores busy, per process | "
                  "core-ms per image | other users' share of the machine |", "|---|---:|---:|---|---:|---:|"]
    for e in results.get("train", []):
        for key, label in (("horovod_1", "1 Horovod rank"), ("horovod_2", "2 Horovod ranks"),
                           ("independent_2", "2 independent processes")):
            run = e.get(key)
            if run and "cpu_cores_per_process" in run:
                train_rows.append(f"| {e['model']}: {label} | {run['window_s']:.1f} | {run['images_per_s']:.1f} | "
                                  f"{' / '.join(f'{c:.2f}' for c in run['cpu_cores_per_process'])} | "
                                  f"{run['core_ms_per_image']:.1f} | {_pct(run.get('others_share'))} |")
    if len(train_rows) > 2:
        out += "\n\n" + "\n".join(train_rows)
    return out


def format_spark_jobs(results: dict) -> str | None:
    """Where the Spark preprocess job's time goes, at the largest size: job by job, stage sums."""
    if not results.get("preprocess"):
        return None
    largest = max(results["preprocess"], key=lambda e: e["images"])
    jobs = largest["spark"].get("jobs")
    if not jobs:
        return None
    rows = [f"| Spark job ({largest['images']} images) | wall s | task s | JVM CPU s | GC s | shuffle MiB | "
            f"written MiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for job in jobs:
        stages = job["stages"]
        rows.append(f"| {job['job'][:60]} | {_fmt(job['seconds'])} | {_fmt(sum(s['task_s'] for s in stages))} | "
                    f"{_fmt(sum(s['jvm_cpu_s'] for s in stages))} | {_fmt(sum(s['gc_s'] for s in stages))} | "
                    f"{_fmt(sum(s['shuffle_write_mb'] for s in stages))} | "
                    f"{_fmt(sum(s['output_mb'] for s in stages))} |")
    rows.append(f"| whole job (driver wall, incl. driver-side steps) | {_fmt(largest['spark']['seconds'])} "
                f"| | | | | |")
    return "\n".join(rows)


def format_memory(results: dict) -> str:
    """Peak RSS (MiB) of the driver, the JVM, Spark's Python workers, plain processes and ranks."""
    rows = ["| process | peak RSS (MiB) |", "|---|---:|"]
    mem = results.get("memory", {})
    if mem:
        rows.append(f"| bench driver (Python, whole run, ru_maxrss) | {_fmt(mem['driver_python_maxrss_mb'])} |")
        rows.append(f"| Spark JVM (sampled) | {_fmt(mem['tree_peaks_mb']['jvm'])} |")
        rows.append(f"| Spark Python workers, all at once (sampled) | "
                    f"{_fmt(mem['tree_peaks_mb']['spark_python_workers'])} |")
        rows.append(f"| whole process tree at one instant (sampled) | {_fmt(mem['tree_peaks_mb']['tree'])} |")
    for e in results.get("preprocess", []):
        rows.append(f"| plain decode process ({e['images']} images, 1 process) | "
                    f"{_fmt(e['single']['per_process'][0]['maxrss_mb'])} |")
        peaks = e["spark"]["peak_rss_mb"]
        rows.append(f"| Spark job ({e['images']} images): JVM / Python workers | "
                    f"{_fmt(peaks['jvm'])} / {_fmt(peaks['spark_python_workers'])} |")
    if results.get("read"):
        for variant in ("no_augment", "augment"):
            rows.append(f"| reader process, {variant.replace('_', ' ')} | "
                        f"{_fmt(results['read'][variant]['maxrss_mb'])} |")
    for e in results.get("train", []):
        for key, label in (("horovod_1", "1 rank"), ("horovod_2", "2 ranks"), ("independent_2", "independent")):
            if key in e:
                rows.append(f"| {e['model']}, {label}: each process | "
                            f"{' / '.join(_fmt(x) for x in e[key]['maxrss_mb'])} |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Throughput benchmarks of preprocess, read and train.")
    parser.add_argument("--input", default=DEFAULT_INPUT,
                        help="manifest folder of real images (default ../shared/data/cxr3)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated input sizes: 'all' (the input as it is) or a number of images "
                             "(more than the input: listed repeatedly); default all,5000 (--quick: all)")
    parser.add_argument("--models", default=None,
                        help="comma-separated models; default compact,original (--quick: compact)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per run (default per model)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--read-batches", type=int, default=None, help="timed batches per read run (default 20)")
    parser.add_argument("--quick", action="store_true", help="one size, one model, few steps (a minute or two)")
    parser.add_argument("--master", default="local[2]", help="Spark master for the benchmark session")
    parser.add_argument("--engines", default=None,
                        help="training engines to time, comma-separated (default: horovod,tf-distribute where "
                             "Horovod is installed, else tf-distribute)")
    parser.add_argument("--config", default=None, help="job config YAML (default: the packaged defaults)")
    parser.add_argument("--workdir", default=os.path.join(REPO, "bench", "tmp", "work"),
                        help="scratch folder (removed at the end unless --keep-work)")
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--output", default=os.path.join(REPO, "bench", "results.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from covid_spark.cli import setup_logging

    setup_logging("bench")  # the root stays at WARNING: py4j logs a harmless reconnect at INFO
    args = parse_args(argv)
    from covid_spark.config import load_config

    sizes = (args.sizes or ("all" if args.quick else "all,5000")).split(",")
    models = (args.models or ("compact" if args.quick else "compact,original")).split(",")
    steps = dict(QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if args.steps:
        steps = {m: args.steps for m in models}
    read_batches = args.read_batches or (8 if args.quick else 20)
    if not os.path.isdir(args.input) and not os.path.isfile(args.input):
        print(f"bench: input {args.input} not found", file=sys.stderr)
        return 2
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run_benchmarks(args.input, args.workdir, sizes=[s.strip() for s in sizes if s.strip()],
                             models=[m.strip() for m in models if m.strip()], steps=steps,
                             warmup=args.warmup_steps, read_batches=read_batches, master=args.master,
                             config=load_config(args.config), keep_work=args.keep_work,
                             engines=tuple(e.strip() for e in args.engines.split(",")) if args.engines else None)
    results["command"] = command.strip()
    save(results, args.output)
    m = results["machine"]
    print(f"\nMachine: {m['nproc']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM; load average "
          f"{m['load_avg_at_start']} at start, {m['load_avg_at_end']} at end; {results['seconds']:.0f} s in all\n")
    print(format_tables(results))
    print(f"\nresults: {args.output}")
    return 0


def save(results: dict, path: str, section: str = "bench") -> None:
    """Write ``results`` under ``section`` of the JSON file at ``path``, keeping its other sections."""
    from covid_spark.data.storage import atomic_write_json

    existing = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                existing = json.load(handle)
        except (OSError, ValueError):
            existing = {}
    existing[section] = results
    atomic_write_json(path, existing)


if __name__ == "__main__":
    sys.exit(main())
