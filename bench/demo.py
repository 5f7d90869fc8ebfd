"""python -m bench.demo [--run-id ID]   (what `make bench-demo` runs)

Times `make demo` end to end, stage by stage (from the run's pipeline.json), next to the
original project's 48 minutes of training, and writes the figures under "demo" in
bench/results.json. Stage times come from the pipeline itself; the rest of the wall time is
spark-submit, the JVM and the driver's imports.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.memory import PeakRss
from covid_spark.data.rundir import RunDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_TRAINING_S = 48 * 60  # the university project's reported training time


def run_demo(run_id: str, make: str = "make") -> dict:
    """Run `make demo RUN_ID=run_id` in the checkout; wall time, exit status, stage timings."""
    run_dir = os.path.join(REPO, "runs", run_id)
    with PeakRss(interval=0.5) as rss:
        started = time.perf_counter()
        status = subprocess.call([make, "--no-print-directory", "demo", f"RUN_ID={run_id}"], cwd=REPO)
        wall = time.perf_counter() - started
    result = {"run_id": run_id, "run_dir": run_dir, "exit_status": status, "wall_s": round(wall, 1),
              "peak_rss_mb": {"jvm": rss.peaks["jvm"], "whole_tree": rss.peaks["tree"]},
              "original_training_s": ORIGINAL_TRAINING_S}
    state_path = RunDir(run_dir).pipeline_state
    timings = {}
    if os.path.exists(state_path):
        with open(state_path, encoding="utf-8") as handle:
            timings = json.load(handle).get("timings", {})
    result["stages_s"] = timings
    result["outside_stages_s"] = round(wall - sum(timings.values()), 1)
    run_path = RunDir(run_dir).run_json
    if os.path.exists(run_path):
        with open(run_path, encoding="utf-8") as handle:
            run = json.load(handle)
        result["training"] = {k: run.get(k) for k in ("model", "num_proc", "epochs", "epochs_run", "steps_per_epoch",
                                                      "threads_per_rank", "wall_seconds")}
        result["training"]["train_images"] = run.get("dataset_summary", {}).get("per_split", {}).get("train")
    if "train" in timings and timings["train"] > 0:
        result["original_training_vs_train_stage"] = round(ORIGINAL_TRAINING_S / timings["train"], 1)
    return result


def format_table(result: dict) -> str:
    wall = result["wall_s"]
    rows = ["| stage | seconds | share of wall |", "|---|---:|---:|"]
    for stage, seconds in result["stages_s"].items():
        rows.append(f"| {stage} | {seconds:.1f} | {100 * seconds / wall:.0f} % |")
    rows.append(f"| outside the stages (spark-submit, JVM, imports) | {result['outside_stages_s']:.1f} | "
                f"{100 * result['outside_stages_s'] / wall:.0f} % |")
    rows.append(f"| **make demo, end to end** | **{wall:.1f}** | 100 % |")
    training = result.get("training")
    if training:
        rows.append(f"| (train stage: {training['model']}, {training['num_proc']} ranks × "
                    f"{training['threads_per_rank']} thread(s), {training['epochs_run']} epochs of "
                    f"{training['steps_per_epoch']} steps, {training['train_images']} train images) | | |")
    if "original_training_vs_train_stage" in result:
        rows.append(f"| original project: training alone | {ORIGINAL_TRAINING_S:.0f} (48 min) | "
                    f"{result['original_training_vs_train_stage']:g} × this train stage |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Time `make demo` stage by stage.")
    parser.add_argument("--run-id", default=time.strftime("bench-demo-%Y%m%d-%H%M%S"))
    parser.add_argument("--output", default=os.path.join(REPO, "bench", "results.json"))
    args = parser.parse_args(argv)
    from bench.run import machine, save

    result = run_demo(args.run_id, os.environ.get("MAKE", "make"))
    result["machine"] = machine()
    save(result, args.output, section="demo")
    print(f"\n`make demo` on {result['machine']['nproc']} CPUs ({result['machine']['cpu_model']}), "
          f"{result['machine']['ram_gib']} GiB RAM; exit status {result['exit_status']}\n")
    print(format_table(result))
    print(f"\nresults: {args.output} (section \"demo\")")
    return 0 if result["exit_status"] == 0 else result["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
