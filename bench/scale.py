"""python -m bench.scale --data DIR [--sizes 17445,100000] [--master local[2] | --cluster]: cost per image by size,
each job a spark-submit of its own under bench.treemem (`make bench-100k`; docs/performance.md, "100,000 images")."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from bench.harness import REPO, arguments, command, decode_rate, items, loadavg, read_json, save, table
from bench.inputs import manifest_rows, write_manifest
from bench.treemem import measure

DEFAULT_OUTPUT = os.path.join(REPO, "bench", "results-scale.json")
JOBS = ("preprocess", "train", "predict")


def sized_manifest(data: str, size: int, folder: str) -> str:
    """A manifest of the first ``size`` rows of ``data``'s, with absolute paths (nothing copied)."""
    rows = manifest_rows(data, size, absolute=True)
    if len(rows) < size:
        raise SystemExit(f"bench.scale: {data} lists {len(rows)} images, fewer than the size {size}")
    name = f"manifest-{size}.csv"
    return os.path.join(write_manifest(folder, rows, list(rows[0]), name), name)


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
            subprocess.run(["bash", os.path.join(REPO, "scripts", "cluster.sh"), "down"], env=self.cluster_env,
                       check=False)

    def run(self, job: str, args: list[str], log: str) -> dict:
        command = [os.path.join(sys.prefix, "bin", "spark-submit"), "--master", self.master,
                   "--properties-file", self.properties, *self.extra, os.path.join(REPO, "jobs", f"{job}.py"), *args]
        env = dict(os.environ, PATH=os.path.join(sys.prefix, "bin") + os.pathsep + os.environ.get("PATH", ""),
                   PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
                   SPARK_LOCAL_IP="127.0.0.1", TF_CPP_MIN_LOG_LEVEL="2")
        load_before = loadavg()[0]
        with open(log, "w", encoding="utf-8") as out:
            result = measure(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        result["loadavg"] = [load_before, loadavg()[0]]
        if result["exit"] != 0:
            with open(log, encoding="utf-8") as handle:
                tail = handle.read()[-4000:]
            raise SystemExit(f"bench.scale: {job} failed ({result['exit']}); log {log}:\n{tail}")
        return result


def run_size(submit: Submitter, data: str, size: int, work: str, model: str, record, jobs=JOBS,
             model_dir: str | None = None) -> dict:
    """``jobs`` on the first ``size`` images, ``record`` called after each (train needs preprocess, which then
    runs). Predict scores with ``model_dir``, before this size's training, or else with the model trained here."""
    from covid_spark.data.dataset import SUMMARY_FILE
    from covid_spark.data.rundir import RunDir

    folder = os.path.join(work, str(size))
    os.makedirs(folder, exist_ok=True)
    manifest, dataset, trained = sized_manifest(data, size, folder), f"{folder}/dataset", f"{folder}/model"
    predictions, scorer = f"{folder}/predictions.parquet", model_dir or trained
    job_args = {"preprocess": ["--input", manifest, "--output", dataset],
                "train": ["--dataset", dataset, "--model-dir", trained, "--epochs", "1", "--model", model,
                          "--num-proc", "2"],
                "predict": ["--input", manifest, "--model-dir", scorer, "--output", predictions]}
    wanted = set(jobs) | ({"preprocess"} if "train" in jobs else set())
    if not model_dir and "train" not in jobs:
        wanted.discard("predict")  # no model to score with
    out: dict = {"images": size}
    for job in (j for j in (("preprocess", "predict", "train") if model_dir else JOBS) if j in wanted):
        out[job] = submit.run(job, job_args[job], os.path.join(folder, f"{job}.log"))
        if job == "preprocess":
            summary = read_json(os.path.join(dataset, SUMMARY_FILE))
            groups = summary.get("duplicates", [])
            out["dataset"] = {"written": summary["written"], "per_split": summary["per_split"],
                              "duplicate_groups": len(groups), "images_in_duplicate_groups": sum(map(len, groups)),
                              "summary_bytes": os.path.getsize(os.path.join(dataset, SUMMARY_FILE))}
        elif job == "train":
            out["train"]["train_images"] = read_json(RunDir(trained).run_json)["dataset_summary"]["per_split"]["train"]
        else:
            written = [predictions] if os.path.isfile(predictions) else glob.glob(f"{predictions}/**", recursive=True)
            out["predict"].update(output_bytes=sum(os.path.getsize(p) for p in written if os.path.isfile(p)),
                                  model_dir=scorer)
        record(out)
    return out


def tables(results: dict) -> str:
    """Markdown: seconds per 1,000 images and peak MiB per job and size; the largest size against the first."""
    sizes = results["sizes"]

    def images(entry, job):
        return entry["train"]["train_images"] if job == "train" and "train_images" in entry[job] else entry["images"]

    rows = []
    for job in JOBS:
        for entry in (e for e in sizes if job in e):
            got, n = entry[job], images(entry, job)
            peak = got["peak_mib"]
            rows.append([job, f"{n:,}", got["wall_s"], f"{1000 * got['wall_s'] / n:.2f}",
                         f"{1000 * got['cpu_s'] / n:.2f}" if "cpu_s" in got else "",
                         peak.get("largest driver", ""), peak.get("largest jvm", ""), peak["tree"],
                         " → ".join(f"{v:.1f}" for v in got.get("loadavg", []))])
    out = [table(["job", "images", "wall s", "s per 1,000 images", "CPU s per 1,000 images", "Python driver peak MiB",
                  "JVM peak MiB", "whole tree peak MiB", "load before → after"], rows, left=(0, 8))]
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        rows = []
        for job in (j for j in JOBS if j in first and j in last):
            a, b, n0, n1 = first[job], last[job], images(first, job), images(last, job)
            rows.append([job, f"{(b['wall_s'] / n1) / (a['wall_s'] / n0):.2f}",
                         f"{(b['cpu_s'] / n1) / (a['cpu_s'] / n0):.2f}" if a.get("cpu_s") and b.get("cpu_s") else ""]
                        + [f"{b['peak_mib'].get(k, 0) / max(1, a['peak_mib'].get(k, 1)):.2f}"
                           for k in ("largest driver", "largest jvm")])
        out.append(table(["job", f"time per image, {last['images']:,} / {first['images']:,}", "CPU per image, ratio",
                          "Python driver peak, ratio", "JVM peak, ratio"], rows))
    return "\n\n".join(out)


def main(argv=None) -> int:
    parser = arguments(__doc__, model="compact", master="local[2]", output=DEFAULT_OUTPUT, workdir=None,
                       sizes=("17445,100000", "comma-separated; each the first N manifest rows"),
                       jobs=(",".join(JOBS), "which to run (train needs preprocess, which then runs)"),
                       predict_model=(None, "the model dir predict scores with at every size (default: the one "
                                            "trained at the first size)"))
    parser.add_argument("--data", required=True, help="a folder written by python -m bench.expand")
    parser.add_argument("--cluster", action="store_true", help="start a 2-worker standalone cluster and use it")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in items(args.sizes)]
    work = args.workdir or tempfile.mkdtemp(prefix="covid-spark-scale-")
    os.makedirs(work, exist_ok=True)
    submit = Submitter(args.master, work)
    results = {"command": command("scale", argv),
               "data": os.path.abspath(args.data), "model": args.model, "machine_before": decode_rate(),
               "sizes": []}

    def record(entry: dict) -> None:
        if entry not in results["sizes"]:
            results["sizes"].append(entry)
        save(results, args.output)

    try:
        if args.cluster:
            submit.start_cluster()
        results["master"] = submit.master
        jobs, model_dir = tuple(items(args.jobs)), args.predict_model
        for size in sizes:
            print(f"bench.scale: {size:,} images on {submit.master} …", flush=True)
            entry = run_size(submit, args.data, size, work, args.model, record, jobs, model_dir)
            model_dir = model_dir or entry.get("predict", {}).get("model_dir")
        results["machine_after"] = decode_rate()
        record(results["sizes"][-1])
    finally:
        submit.stop_cluster()
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
