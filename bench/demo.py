"""python -m bench.demo [--run-id ID] (`make bench-demo`): `make demo` end to end, stage by stage (from the run's
pipeline.json), beside the original project's 48 minutes of training; under "demo" in bench/results.json."""
from __future__ import annotations

import os
import sys
import time

from bench.harness import REPO, RESULTS, arguments, load, machine, machine_line, save, table
from bench.treemem import measure

ORIGINAL_TRAINING_S = 48 * 60  # the university project's reported training time


def run_demo(run_id: str, make: str = "make") -> dict:
    """Run `make demo RUN_ID=run_id` in the checkout; wall time, exit status, peak memory, stage timings."""
    from covid_spark.data.rundir import RunDir

    run_dir = RunDir(os.path.join(REPO, "runs", run_id))
    measured = measure([make, "--no-print-directory", "demo", f"RUN_ID={run_id}"], interval=0.5, cwd=REPO)
    wall, status = measured["wall_s"], measured["exit"]
    timings = load(run_dir.pipeline_state).get("timings", {})
    result = {"run_id": run_id, "run_dir": run_dir.path, "exit_status": status, "wall_s": round(wall, 1),
              "peak_rss_mb": {"jvm": measured["peak_mib"].get("all jvm"), "whole_tree": measured["peak_mib"]["tree"]},
              "original_training_s": ORIGINAL_TRAINING_S, "stages_s": timings,
              "outside_stages_s": round(wall - sum(timings.values()), 1)}
    run = load(run_dir.run_json)
    if run:
        result["training"] = {k: run.get(k) for k in ("model", "num_proc", "epochs", "epochs_run", "steps_per_epoch",
                                                      "threads_per_rank", "wall_seconds")}
        result["training"]["train_images"] = run.get("dataset_summary", {}).get("per_split", {}).get("train")
    if timings.get("train", 0) > 0:
        result["original_training_vs_train_stage"] = round(ORIGINAL_TRAINING_S / timings["train"], 1)
    return result


def format_table(result: dict) -> str:
    wall = result["wall_s"]
    rows = [[stage, seconds, f"{100 * seconds / wall:.0f} %"] for stage, seconds in result["stages_s"].items()]
    rows += [["outside the stages (spark-submit, JVM, imports)", result["outside_stages_s"],
              f"{100 * result['outside_stages_s'] / wall:.0f} %"], ["**make demo, end to end**", f"**{wall:.1f}**",
                                                                     "100 %"]]
    t = result.get("training")
    if t:
        rows.append([f"(train stage: {t['model']}, {t['num_proc']} ranks × {t['threads_per_rank']} thread(s), "
                     f"{t['epochs_run']} epochs of {t['steps_per_epoch']} steps, {t['train_images']} train images)",
                     "", ""])
    if "original_training_vs_train_stage" in result:
        rows.append(["original project: training alone", f"{ORIGINAL_TRAINING_S:.0f} (48 min)",
                     f"{result['original_training_vs_train_stage']:g} × this train stage"])
    return table(["stage", "seconds", "share of wall"], rows)


def main(argv=None) -> int:
    parser = arguments("Time `make demo` stage by stage.", output=RESULTS,
                       run_id=(time.strftime("bench-demo-%Y%m%d-%H%M%S"), "the run's id, its folder under runs/"))
    args = parser.parse_args(argv)
    result = run_demo(args.run_id, os.environ.get("MAKE", "make"))
    result["machine"] = machine()
    save(result, args.output, section="demo")
    print(f"\n`make demo` on {machine_line(result['machine'])}; exit status {result['exit_status']}\n\n"
          f"{format_table(result)}\n\nresults: {args.output} (section \"demo\")")
    return result["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
