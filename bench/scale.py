"""python -m bench.scale --data DIR [--sizes 17445,100000] [--master local[2] | --cluster]: cost per image by size.

What ``make bench-100k`` runs (docs/performance.md, "100,000 images"). ``DIR`` is a collection written by
``python -m bench.expand`` (its manifest lists cxr-xl's 17,445 images first, then their variants). For each
size N, in one run and one after the other, the first N rows of that manifest go through the real jobs, each a
``spark-submit`` of its own as a user runs them (``conf/spark-local.conf``, or a standalone cluster of two
1-core workers started by ``scripts/cluster.sh`` with ``--cluster``, the code shipped as a wheel):

1. ``jobs/preprocess.py`` on the N images;
2. ``jobs/train.py``: one epoch of the compact model (``--model``) with 2 ranks on that dataset;
3. ``jobs/predict.py`` on the same N images, to Parquet, with the model trained at the first size (every size
   scored by the same model; at the larger sizes predict runs before their training).

Each job runs under ``bench.treemem.measure``: wall seconds, the CPU seconds of its whole process tree (which
other users' load barely moves, unlike wall time) and the peak RSS of every kind of process in its tree (the
Python driver, the JVM, Spark's Python workers, the ranks), sampled every 0.2 s; and the load average before
and after it. The table gives
seconds per 1,000 images and each job's figure at the largest size against the first (the goals: preprocess
and predict time per image ≤ 1.15 ×, the Python driver's peak ≤ 1.3 ×). The preprocess summary's duplicate
groups are counted too. A machine rate (one plain process decoding and resizing cxr-xl images) and the load
average are taken before and after, so runs on other days or machines can be compared.

Writes ``--output`` (default bench/results-scale.json, git-ignored) after every job, and Markdown tables.
The work folder (datasets, models, predictions; a few GB at 100,000) is removed unless ``--keep``.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.treemem import measure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXR_XL = os.path.abspath(os.path.join(REPO, "..", "shared", "data", "cxr-xl"))
DEFAULT_OUTPUT = os.path.join(REPO, "bench", "results-scale.json")
JOBS = ("preprocess", "train", "predict")


def machine_rate(images: int = 400) -> dict:
    """How fast this machine decodes and resizes cxr-xl images in one plain process (images/s), and its load."""
    from covid_spark.constants import DEFAULT_IMAGE_SIZE
    from covid_spark.inputs.images import decode_image  # noqa: F401  (imported before the clock)

    paths = sorted(glob.glob(os.path.join(CXR_XL, "*", "*.jpg")))[:images]
    blobs = []
    for path in paths:
        with open(path, "rb") as handle:
            blobs.append(handle.read())
    started = time.perf_counter()
    for blob in blobs:
        decode_image(blob, DEFAULT_IMAGE_SIZE)
    seconds = time.perf_counter() - started
    with open("/proc/loadavg", encoding="utf-8") as handle:
        load = handle.read().split()[:3]
    return {"decode_images_per_s": round(len(blobs) / seconds, 1), "loadavg": load,
            "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def loadavg() -> float:
    """The machine's load over the last minute (other users' work shows here)."""
    with open("/proc/loadavg", encoding="utf-8") as handle:
        return float(handle.read().split()[0])


def sized_manifest(data: str, size: int, folder: str) -> str:
    """A manifest of the first ``size`` rows of ``data``'s, with absolute paths (nothing copied)."""
    path = os.path.join(folder, f"manifest-{size}.csv")
    with open(os.path.join(data, "manifest.csv"), newline="", encoding="utf-8") as src, \
            open(path, "w", newline="", encoding="utf-8") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames)
        writer.writeheader()
        for i, row in enumerate(reader):
            if i == size:
                break
            writer.writerow({**row, "path": os.path.join(os.path.abspath(data), row["path"])})
        else:
            if i + 1 < size:
                raise SystemExit(f"bench.scale: {data} lists {i + 1} images, fewer than the size {size}")
    return path


class Submitter:
    """spark-submit on local[2], or on a standalone cluster of two workers with the code as a wheel."""

    def __init__(self, master: str | None, work: str):
        self.work, self.master, self.cluster_env, self.extra = work, master or "local[2]", None, []
        self.properties = os.path.join(REPO, "conf", "spark-local.conf")

    def start_cluster(self) -> None:
        self.cluster_env = dict(os.environ, CLUSTER_DIR=os.path.join(self.work, "cluster"), VENV=sys.prefix)
        subprocess.run(["bash", os.path.join(REPO, "scripts", "cluster.sh"), "up"], env=self.cluster_env, check=True)
        with open(os.path.join(self.work, "cluster", "master-url"), encoding="utf-8") as handle:
            self.master = handle.read().strip()
        self.properties = os.path.join(REPO, "conf", "spark-standalone.conf")
        dist = os.path.join(self.work, "dist")
        shutil.rmtree(os.path.join(REPO, "build"), ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", REPO,
                        "-w", dist], check=True)
        (wheel,) = glob.glob(os.path.join(dist, "covid_spark-*.whl"))
        shipped = wheel[:-len(".whl")] + ".zip"  # PySpark puts only .zip/.egg/.jar files on sys.path
        shutil.copy(wheel, shipped)
        self.extra = ["--py-files", shipped, "--conf", f"spark.pyspark.python={sys.executable}",
                      "--conf", f"spark.pyspark.driver.python={sys.executable}"]

    def stop_cluster(self) -> None:
        if self.cluster_env:
            subprocess.run(["bash", os.path.join(REPO, "scripts", "cluster.sh"), "down"], env=self.cluster_env)

    def run(self, job: str, args: list[str], log: str) -> dict:
        command = [os.path.join(sys.prefix, "bin", "spark-submit"), "--master", self.master,
                   "--properties-file", self.properties, *self.extra, os.path.join(REPO, "jobs", f"{job}.py"), *args]
        env = dict(os.environ, PATH=os.path.join(sys.prefix, "bin") + os.pathsep + os.environ.get("PATH", ""),
                   PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
                   SPARK_LOCAL_IP="127.0.0.1", TF_CPP_MIN_LOG_LEVEL="2")
        load_before = loadavg()
        with open(log, "w", encoding="utf-8") as out:
            result = measure(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        result["loadavg"] = [load_before, loadavg()]
        if result["exit"] != 0:
            with open(log, encoding="utf-8") as handle:
                tail = handle.read()[-4000:]
            raise SystemExit(f"bench.scale: {job} failed ({result['exit']}); log {log}:\n{tail}")
        return result


def run_size(submit: Submitter, data: str, size: int, work: str, model: str, record, jobs=JOBS,
             model_dir: str | None = None) -> dict:
    """``jobs`` on the first ``size`` images; ``record`` is called after each.

    Predict scores with ``model_dir`` where one is given (the first size's model, so every size is scored by the
    same model) and then this size's training runs, last; at the first size, training comes first.
    """
    folder = os.path.join(work, str(size))
    os.makedirs(folder, exist_ok=True)
    manifest = sized_manifest(data, size, folder)
    dataset = os.path.join(folder, "dataset")
    out: dict = {"images": size}
    if "preprocess" in jobs or "train" in jobs:
        out["preprocess"] = submit.run("preprocess", ["--input", manifest, "--output", dataset],
                                       os.path.join(folder, "preprocess.log"))
        from covid_spark.data.dataset import SUMMARY_FILE

        with open(os.path.join(dataset, SUMMARY_FILE), encoding="utf-8") as handle:
            summary = json.load(handle)
        groups = summary.get("duplicates", [])
        out["dataset"] = {"written": summary["written"], "per_split": summary["per_split"],
                          "duplicate_groups": len(groups), "images_in_duplicate_groups": sum(len(g) for g in groups),
                          "summary_bytes": os.path.getsize(os.path.join(dataset, SUMMARY_FILE))}
        record(out)
    if "train" in jobs and model_dir is None:
        model_dir = train(submit, out, folder, dataset, model, record)
    if "predict" in jobs and model_dir is not None:
        predictions = os.path.join(folder, "predictions.parquet")
        out["predict"] = submit.run("predict", ["--input", manifest, "--model-dir", model_dir,
                                                "--output", predictions], os.path.join(folder, "predict.log"))
        out["predict"]["output_bytes"] = sum(os.path.getsize(p) for p in glob.glob(
            os.path.join(predictions, "**"), recursive=True) if os.path.isfile(p)) \
            if os.path.isdir(predictions) else os.path.getsize(predictions)
        out["predict"]["model_dir"] = model_dir
        record(out)
    if "train" in jobs and "train" not in out:
        train(submit, out, folder, dataset, model, record)
    return out


def train(submit: Submitter, out: dict, folder: str, dataset: str, model: str, record) -> str:
    """One epoch of ``model`` with 2 ranks on ``dataset``; returns the model dir."""
    model_dir = os.path.join(folder, "model")
    out["train"] = submit.run("train", ["--dataset", dataset, "--model-dir", model_dir, "--epochs", "1",
                                        "--model", model, "--num-proc", "2"], os.path.join(folder, "train.log"))
    from covid_spark.data.rundir import RunDir

    with open(RunDir(model_dir).run_json, encoding="utf-8") as handle:
        out["train"]["train_images"] = json.load(handle)["dataset_summary"]["per_split"]["train"]
    record(out)
    return model_dir


def tables(results: dict) -> str:
    """Markdown: seconds per 1,000 images and peak MiB per job and size; the largest size against the first."""
    sizes = results["sizes"]
    lines = ["| job | images | wall s | s per 1,000 images | CPU s per 1,000 images | Python driver peak MiB | "
             "JVM peak MiB | whole tree peak MiB | load before → after |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for job in JOBS:
        for entry in sizes:
            if job not in entry:
                continue
            got = entry[job]
            images = entry["train"]["train_images"] if job == "train" and "train_images" in got else entry["images"]
            peak = got["peak_mib"]
            cpu = f"{1000 * got['cpu_s'] / images:.2f}" if "cpu_s" in got else ""
            load = " → ".join(f"{v:.1f}" for v in got["loadavg"]) if "loadavg" in got else ""
            lines.append(f"| {job} | {images:,} | {got['wall_s']} | {1000 * got['wall_s'] / images:.2f} | {cpu} | "
                         f"{peak.get('largest python_driver', '')} | {peak.get('largest jvm', '')} | {peak['tree']} | "
                         f"{load} |")
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        lines += ["", f"| job | time per image, {last['images']:,} / {first['images']:,} | CPU per image, ratio | "
                      "Python driver peak, ratio | JVM peak, ratio |", "|---|---:|---:|---:|---:|"]
        for job in (j for j in JOBS if j in first and j in last):
            n0 = first["train"]["train_images"] if job == "train" else first["images"]
            n1 = last["train"]["train_images"] if job == "train" else last["images"]
            a, b = first[job], last[job]
            ratio = (b["wall_s"] / n1) / (a["wall_s"] / n0)
            drv = b["peak_mib"].get("largest python_driver", 0) / max(1, a["peak_mib"].get("largest python_driver", 1))
            jvm = b["peak_mib"].get("largest jvm", 0) / max(1, a["peak_mib"].get("largest jvm", 1))
            cpu = (f"{(b['cpu_s'] / n1) / (a['cpu_s'] / n0):.2f}" if a.get("cpu_s") and b.get("cpu_s") else "")
            lines.append(f"| {job} | {ratio:.2f} | {cpu} | {drv:.2f} | {jvm:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a folder written by python -m bench.expand")
    parser.add_argument("--sizes", default="17445,100000", help="comma-separated; each the first N manifest rows")
    parser.add_argument("--model", default="compact")
    parser.add_argument("--jobs", default=",".join(JOBS),
                        help="which of preprocess,train,predict to run (train needs preprocess, which then runs)")
    parser.add_argument("--predict-model", help="the model dir predict scores with at every size (default: the one "
                                                "trained at the first size)")
    parser.add_argument("--master", help="a Spark master (default local[2])")
    parser.add_argument("--cluster", action="store_true", help="start a 2-worker standalone cluster and use it")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--workdir", help="where datasets, models and predictions go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    work = args.workdir or tempfile.mkdtemp(prefix="covid-spark-scale-")
    os.makedirs(work, exist_ok=True)
    submit = Submitter(args.master, work)
    results = {"command": " ".join(["python -m bench.scale"] + list(sys.argv[1:] if argv is None else argv)),
               "data": os.path.abspath(args.data), "model": args.model, "machine_before": machine_rate(),
               "sizes": []}

    def record(entry: dict) -> None:
        if entry not in results["sizes"]:
            results["sizes"].append(entry)
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)

    try:
        if args.cluster:
            submit.start_cluster()
        results["master"] = submit.master
        jobs, model_dir = tuple(args.jobs.split(",")), args.predict_model
        for size in sizes:
            print(f"bench.scale: {size:,} images on {submit.master} …", flush=True)
            entry = run_size(submit, args.data, size, work, args.model, record, jobs, model_dir)
            model_dir = model_dir or entry.get("predict", {}).get("model_dir")
        results["machine_after"] = machine_rate()
        record(results["sizes"][-1])
    finally:
        submit.stop_cluster()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
