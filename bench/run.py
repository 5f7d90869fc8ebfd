"""python -m bench.run [--xl] [--quick] [--parts …] [--sizes …] [--models …] [--skip-epoch] (`make bench`,
`make bench-xl`): preprocess, read, train, duplicates, predict and one epoch per model, each against its baseline
in the same run → bench/results.json ("bench") or, with --xl, bench/results-xl.json (docs/performance.md)."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time

from bench import dup_bench, predict_bench, train_bench
from bench.harness import (CXR_XL, DATA, REPO, RESULTS, GOALS, arguments, command, fmt, in_process, items, load,
                           loadavg, machine, machine_line, pct, ratio, save, start_spark, table, verdict)
from bench.inputs import input_of_kind, sampled_input, source_rows
from bench.monitors import PeakRss, maxrss_mb
from bench.preprocess_bench import format_preprocess, measure_size, memory_growth, plain_stage, spark_fixed_costs
from covid_spark.cli import setup_logging

logger = logging.getLogger("bench.run")

PARTS = ("preprocess", "read", "train", "duplicates", "predict", "epoch")
MODELS = ("efficientnet_lite0", "compact", "original")
# What one invocation runs. demo (`make bench`): cxr3, sizes above it repeated by symlinks, one plain process too,
# 1 and 2 ranks of each engine against an independent pair. xl (`make bench-xl`): cxr-xl, samples and byte copies,
# peak memory in a second run of each size, 2 Horovod ranks, duplicates, predict and one epoch per model.
DEMO = {"input": os.path.join(DATA, "cxr3"), "output": RESULTS, "section": "bench",
        "parts": ("preprocess", "read", "train"), "sizes": "all,5000", "above": "links", "single": True,
        "memory": False, "models": ("compact", "original"), "steps": train_bench.STEPS, "warmup": 3,
        "read_batches": 20, "read_warmup": 3, "ranks": (1, 2), "engines": None, "independent": True}
XL = dict(DEMO, input=CXR_XL, output=os.path.join(REPO, "bench", "results-xl.json"), section=None,
          parts=("preprocess", "train", "duplicates", "predict", "epoch"), sizes="671,5000,17445,50000",
          above="copies", single=False, memory=True, memory_reference=5000, hashes_total=100_000,
          predict_images=17_445, models=MODELS, ranks=(2,), engines=("horovod",), independent=False)
PROFILES = {"demo": DEMO, "demo-quick": dict(DEMO, sizes="all", models=("compact",), steps=train_bench.QUICK_STEPS,
                                             read_batches=8),
            "xl": XL, "xl-quick": dict(XL, parts=XL["parts"][:-1], sizes="200,1000,3000c", memory_reference=1000,
                                       hashes_total=5_000, predict_images=200, models=("compact",),
                                       steps=train_bench.QUICK_STEPS, warmup=2)}


def parse_sizes(text: str, distinct: int, above: str = "copies") -> list[tuple[int, str]]:
    """``"all,671,3000c"`` → ``[(distinct, "all"), (671, "sample"), (3000, "copies")]``: a size above
    ``distinct`` is made as ``above`` ("copies" or "links", symlinks repeating the source)."""
    out = []
    for item in items(text):
        copies = item.lower().endswith("c")
        number = item[:-1] if copies else item
        if item != "all" and (not number.isdigit() or int(number) < 1):
            raise ValueError(f"--sizes: {item!r} is not 'all' or a positive number of images (optionally with a "
                             f"'c' suffix for copies)")
        n = distinct if item == "all" else int(number)
        out.append((n, "all" if item == "all" else "copies" if copies else above if n > distinct else "sample"))
    return sorted(set(out))


def training_rate(results: dict) -> float | None:
    """The rate one rank's reader must sustain: the first model's 1-rank Horovod run, else half its pair."""
    for entry in (results.get("train") or {}).get("rates", []):
        if "horovod_1" in entry:
            return entry["horovod_1"]["images_per_s"]
        return round((entry.get("independent_2") or entry["horovod_2"])["images_per_s"] / 2, 1)
    return None


def read_ratios(results: dict) -> dict[str, float | None]:
    """Each read variant's rate over the training rate."""
    return {v: ratio(results["read"][v]["images_per_s"], training_rate(results), 2) for v in ("no_augment", "augment")}


def verdicts(results: dict) -> list[dict]:
    """The goals, judged on what was measured. Preprocess: the largest size not made of copies, the whole job
    (without a memory run: `make bench`) or net of its fixed cost (`make bench-xl`)."""
    out = []
    pre = results.get("preprocess") or {}
    judged = [e for e in pre.get("sizes", []) if e["kind"] != "copies"]
    if judged:
        e = max(judged, key=lambda e: e["images"])
        net = any(s["memory"] for s in pre["sizes"])
        out.append(verdict("preprocess_net_vs_pair" if net else "preprocess_spark_vs_pair",
                           e["spark_net_vs_pair" if net else "spark_vs_pair"], f"{e['images']:,} images",
                           f"whole job {e['spark_vs_pair']:.2f} × the pair"))
    for g in pre.get("memory_growth", []):
        out.append(verdict("memory_growth", g["ratio"], f"{g['process']}, {g['reference_images']:,} → "
                           f"{g['largest_images']:,} images", f"{g['reference_mb']} → {g['largest_mb']} MiB"))
    if results.get("read"):
        rate = training_rate(results)
        for variant, measured in read_ratios(results).items():
            out.append(verdict("read_vs_train", measured, variant.replace("_", " "),
                               f"training rate {rate} images/s (first model, 1 rank)"))
    for entry in (results.get("train") or {}).get("rates", []):
        out.append(verdict("train_efficiency", entry.get("efficiency"), f"{entry['model']}, horovod"))
        out.append(verdict("train_efficiency", entry.get("efficiency_tf_distribute"),
                           f"{entry['model']}, tf-distribute"))
    dup = (results.get("duplicates") or {}).get("result") or {}
    if dup:
        out.append(verdict("duplicates_s", dup["seconds_banded"], f"{dup['n']:,} real hashes grown with copies",
                           f"all-pairs {dup['all_pairs_seconds']} s on {dup['all_pairs_checked_n']}"))
    pred = (results.get("predict") or {}).get("result") or {}
    if pred:
        out.append(verdict("predict_vs_plain", pred["ratio"], f"{pred['parallelism']} × plain, "
                                                              f"{pred['images']:,} images"))
    return [v for v in out if v]


def run(source: str, workdir: str | None, profile: dict, parts=None, config: dict | None = None,
        config_path: str | None = None, master: str = "local[2]", spark=None, results: dict | None = None,
        save_to: str | None = None, batch_size: int | None = None, predict_model: str | None = None,
        gc_interval: float = 2.0) -> dict:
    """The results of the chosen ``parts`` (default: the profile's), updating ``results``, saved to ``save_to``
    (under ``profile["section"]``) after each part; Spark in ``spark`` (not stopped) or a session on ``master``.
    ``workdir`` is kept if it exists, else made and removed at the end (None: a temporary folder)."""
    from covid_spark.config import load_config
    from covid_spark.data.dataset import has_summary, read_summary
    from covid_spark.data.rundir import git_commit
    from covid_spark.stages.preprocess import preprocess

    work_made = workdir is None or not os.path.exists(workdir)
    workdir = workdir or tempfile.mkdtemp(prefix="covid-spark-bench-")
    parts, config = tuple(parts or profile["parts"]), config or load_config(config_path)
    distinct = len(source_rows(source))
    sizes, models = parse_sizes(profile["sizes"], distinct, profile["above"]), tuple(profile["models"])
    steps, threads = dict(train_bench.STEPS, **profile["steps"]), train_bench.threads_per_rank(config, 2)
    engines = tuple(profile["engines"] or (("horovod", "tf-distribute") if train_bench.solo_engine() == "horovod"
                                           else ("tf-distribute",)))  # both where Horovod is installed
    results = results if results is not None else {}
    results["machine"] = machine()
    # the dataset later parts use: the largest size of distinct images, kept by the preprocess part, else made
    kept = max(((n, k) for n, k in sizes if k in ("all", "sample")), default=None)
    largest = kept[0] if kept else min(distinct, profile.get("memory_reference", distinct))
    dataset = os.path.join(workdir, f"ds-{largest}")
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
        spark, fixed = spark_fixed_costs(get_spark, source, workdir, config)
        if not owned:
            fixed["session_start_s"] = None  # the caller's session was already running
        keep, hashes = bool({"read", "train", "epoch"} & set(parts)), "duplicates" in parts
        entries = [measure_size(spark, source, workdir, n, kind, config, fixed["tiny_job_s"], profile,
                                keep and (n, kind) == kept, f"{workdir}/hashes-{n}" if hashes and (n, kind) == kept
                                else None, gc_interval) for n, kind in sizes]
        return {"spark_fixed": fixed, "sizes": entries, "memory_reference": profile.get("memory_reference"),
                "memory_growth": memory_growth(entries, profile.get("memory_reference")),
                "hash_files": [f for e in entries for f in e["pair"].get("hash_files", [])], "settings": settings()}

    def ready_dataset() -> str:
        if not has_summary(None, dataset):  # no preprocess part: made now, untimed
            preprocess(get_spark(), input_of_kind(source, workdir, largest, "sample"), dataset, config, overwrite=True)
        return dataset

    def train_part():
        rates = []
        for model in models:
            with PeakRss() as rss:
                entry = train_bench.run_model(get_spark(), ready_dataset(), config, model, steps[model],
                                              profile["warmup"], os.path.join(workdir, "train"), batch_size,
                                              tuple(profile["ranks"]), engines, profile["independent"])
            rates.append(dict(entry, peak_rss_mb=rss.peaks))
        return {"dataset": dataset, "per_split": read_summary(None, dataset)["per_split"],
                "threads_per_rank": threads, "rates": rates, "settings": settings()}

    def duplicates_part():
        files = (results.get("preprocess") or {}).get("hash_files") or []
        if not files or not all(os.path.exists(f) for f in files):
            files = plain_stage(input_of_kind(source, workdir, largest, "sample"), 2, config, f"{workdir}/plain-dup",
                                f"{workdir}/hashes-{largest}")["hash_files"]
        total, distance = profile["hashes_total"], int(config["preprocess"]["duplicate_distance"])
        logger.info("bench duplicates: real hashes grown to %d, max distance %d, one CPU", total, distance)
        return dict(in_process(dup_bench.on_one_cpu, files, total, distance), total=total, max_distance=distance)

    def predict_part():
        images, model = profile["predict_images"], predict_model or config["train"]["model"]
        location = sampled_input(source, os.path.join(workdir, f"input-predict-{images}"), images, seed=1)
        made = predict_bench.untrained_model_dir(model, int(config["preprocess"]["image_size"]),
                                                 os.path.join(workdir, f"model-untrained-{model}"))
        logger.info("bench predict: %d images, Spark against one plain process", images)
        return {"images": images, "input": location, "model": made,
                "result": in_process(predict_bench.bench_predict, location, made["model_dir"])}

    def epoch_part():
        summary = read_summary(None, ready_dataset())
        return {"dataset": dataset, "per_split": summary["per_split"], "epochs": [
            train_bench.one_epoch(get_spark(), dataset, summary, m, config_path, batch_size, workdir) for m in models]}

    work = {"preprocess": preprocess_part, "train": train_part, "duplicates": duplicates_part,
            "predict": predict_part, "epoch": epoch_part, "read": lambda: train_bench.run_read(
                get_spark(), ready_dataset(), config, threads, profile["read_warmup"], profile["read_batches"],
                batch_size)}
    started_all = time.time()
    os.makedirs(workdir, exist_ok=True)
    invocation = {"parts": list(parts), "sizes": [f"{n}{'c' if k == 'copies' else ''}" for n, k in sizes],
                  "models": list(models), "steps": {m: steps[m] for m in models}, "warmup_steps": profile["warmup"],
                  "ranks": list(profile["ranks"]), "engines": list(engines), "read_batches": profile["read_batches"],
                  "master": master if owned else spark.sparkContext.master, "source": os.path.abspath(source),
                  "source_images": distinct, "image_size": int(config["preprocess"]["image_size"]),
                  "git_commit": git_commit(), "loadavg_at_start": loadavg(),
                  "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    with PeakRss() as whole:
        try:
            for name in (p for p in PARTS if p in parts):
                started, load_start = time.time(), loadavg()
                results[name] = dict(work[name](), seconds=round(time.time() - started, 1),
                                     loadavg_at_start=load_start, loadavg_at_end=loadavg())
                results["verdicts"] = verdicts(results)
                if save_to:
                    save(results, save_to, profile["section"])
        finally:
            if owned and session["spark"] is not None:
                session["spark"].stop()
            if work_made:
                shutil.rmtree(workdir, ignore_errors=True)
    invocation.update(seconds=round(time.time() - started_all, 1), loadavg_at_end=loadavg(), memory={
        "driver_python_maxrss_mb": maxrss_mb(), "tree_peaks_mb": whole.peaks})
    results.setdefault("invocations", []).append(invocation)
    results["machine"]["load_avg_at_end"] = invocation["loadavg_at_end"]
    if save_to:
        save(results, save_to, profile["section"])
    return results


def format_tables(results: dict) -> str:
    """Markdown: every part measured, the whole run's memory, the goals, the time per part."""
    out = []
    if results.get("preprocess"):
        out.append("### Preprocessing\n\n" + format_preprocess(results["preprocess"]))
    if results.get("read"):
        ratios = read_ratios(results)
        out.append("### Reading\n\n" + table(
            ["read Petastorm → tf.data", "images/s", "training, 1 rank: images/s", "ratio", "goal",
             "reader peak RSS MiB"], [[v.replace("_", " "), results["read"][v]["images_per_s"], training_rate(results),
                                       fmt(ratios[v], 2), GOALS["read_vs_train"].rule, results["read"][v]["maxrss_mb"]]
                                      for v in ratios]))
    for part in ("train", "epoch"):
        split = (results.get(part) or {}).get("per_split")
        if split:
            out.append(f"### {'Training' if part == 'train' else 'One epoch'}\n\nDataset: {sum(split.values()):,} "
                       f"images ({split['train']:,} train, {split.get('val', 0):,} val).")
    if (results.get("train") or {}).get("rates"):
        out.append(train_bench.format_rates(results["train"]["rates"]))
    if (results.get("epoch") or {}).get("epochs"):
        out.append(table(["model", "train images", "steps × batch × ranks", "run_training wall s",
                          "epoch s (fit, incl. validation)", "train images / wall s", "train images / epoch s",
                          "val accuracy after 1 epoch"],
                         [[e["model"], f"{e['train_rows']:,}", f"{e['steps_per_epoch']} × {e['batch_size']} × "
                           f"{e['num_proc']}", e["run_json_wall_s"], e["epoch_s"], e["images_per_s_wall"],
                           e["images_per_s_epoch"], fmt(e["val_accuracy"], 3)] for e in results["epoch"]["epochs"]],
                         left=(0, 2)))
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
    mem = results["invocations"][-1]["memory"] if results.get("invocations") else None
    if mem:
        tree = mem["tree_peaks_mb"]
        out.append(f"Peak RSS of the whole run: bench driver {fmt(mem['driver_python_maxrss_mb'])} MiB (ru_maxrss); "
                   f"sampled, at one instant: JVM {fmt(tree['jvm'])}, Spark Python workers "
                   f"{fmt(tree['spark_python_workers'])}, the whole process tree {fmt(tree['tree'])} MiB.")
    if results.get("verdicts"):
        out.append("### Goals\n\n" + table(["goal", "measured", "target", "met"], [
            [v["goal"], fmt(float(v["measured"]), 2), f"{v['direction']} {v['target']:g}",
             "yes" if v["met"] else f"**no**, {v['miss_pct']:g} % off"] for v in results["verdicts"]], left=(0, 3)))
    out.append("Time per part: " + ", ".join(f"{p} {results[p]['seconds']:.0f} s" for p in PARTS if results.get(p)))
    return "\n\n".join(out)


def main(argv=None) -> int:
    parser = arguments("Benchmarks of preprocess, read, train, duplicates, predict and one epoch (see "
                       "docs/performance.md).", master="local[2]", config=None, workdir=None,
                       input=(None, "images: a folder or manifest (default: ../shared/data/cxr3; --xl: cxr-xl)"),
                       output=(None, "results JSON (default: bench/results.json, section 'bench'; --xl: "
                                     "bench/results-xl.json)"))
    parser.add_argument("--xl", action="store_true", help="`make bench-xl`: cxr-xl, samples and copies, memory, "
                                                          "duplicates, predict and one epoch per model")
    parser.add_argument("--quick", action="store_true", help="small sizes, compact only, few steps (no epoch)")
    parser.add_argument("--parts", help=f"comma-separated, of {','.join(PARTS)} (default: preprocess,read,train; "
                                        f"--xl all but read); fewer merge into the existing --output")
    parser.add_argument("--sizes", help="comma-separated: 'all' or a number of images, above the input's (or with "
                                        "a 'c' suffix) made of copies, with --xl, else of symlinks (default all,5000, "
                                        "--quick all; --xl 671,5000,17445,50000, --quick 200,1000,3000c)")
    parser.add_argument("--models", help=f"comma-separated, of {','.join(MODELS)} (default compact,original; --xl "
                                         f"all; --quick compact)")
    parser.add_argument("--skip-epoch", action="store_true", help="no whole training epochs (the part 'epoch')")
    parser.add_argument("--skip-rates", action="store_true", help="no timed training steps (the part 'train')")
    parser.add_argument("--steps", type=int, help="timed training steps per run (default per model)")
    parser.add_argument("--warmup-steps", dest="warmup", type=int, help="default 3 (--xl --quick 2)")
    parser.add_argument("--read-batches", type=int, help="timed batches per read run (default 20; --quick 8)")
    parser.add_argument("--engines", help="comma-separated (default: both where Horovod is installed; --xl horovod)")
    parser.add_argument("--memory-reference", type=int, help="the size memory is compared with (--xl: 5000)")
    parser.add_argument("--hashes", dest="hashes_total", type=int, help="hashes to group (default 100000; --quick "
                                                                         "5000)")
    parser.add_argument("--predict-images", type=int, help="default 17445 (all of cxr-xl; --quick 200)")
    parser.add_argument("--predict-model", help="model to score with (default: train.model)")
    args = parser.parse_args(argv)
    profile = dict(PROFILES[("xl" if args.xl else "demo") + ("-quick" if args.quick else "")])
    profile.update({k: getattr(args, k) for k in ("sizes", "warmup", "read_batches", "memory_reference",
                                                  "hashes_total", "predict_images") if getattr(args, k)})
    profile.update({k: tuple(items(getattr(args, k))) for k in ("models", "engines") if getattr(args, k)})
    if args.steps:
        profile["steps"] = {m: args.steps for m in profile["models"]}
    parts = [p for p in items(args.parts) or profile["parts"]
             if not (p == "epoch" and args.skip_epoch or p == "train" and args.skip_rates)]
    unknown = sorted(set(parts) - set(PARTS)) + sorted(set(profile["models"]) - set(MODELS))
    source, output = args.input or profile["input"], args.output or profile["output"]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}: parts are {', '.join(PARTS)}; models {', '.join(MODELS)}")
    if not os.path.exists(source):
        parser.error(f"input {source} not found")
    setup_logging("bench")  # INFO from bench and covid_spark; py4j's INFO chatter stays off
    old = load(output) if args.parts and set(parts) != set(profile["parts"]) else {}
    results = dict((old.get(profile["section"]) or {}) if profile["section"] else old, command=command("run", argv))
    try:
        results = run(source, args.workdir, profile, parts, config_path=args.config, master=args.master,
                      results=results, save_to=output, predict_model=args.predict_model)
    except ValueError as exc:
        print(f"bench.run: {exc}", file=sys.stderr)
        return 2
    last, m = results["invocations"][-1], results["machine"]
    print(f"\nMachine: {machine_line(m)}; load average {last['loadavg_at_start']} at start, {m['load_avg_at_end']} "
          f"at end; {last['seconds']:.0f} s in all\n\n{format_tables(results)}\n\nresults: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
