"""python -m bench.treemem COMMAND [ARGS...]: run a command, report its wall time and peak memory.

The memory of the whole process tree (spark-submit's JVM, the Python driver, Spark's Python workers,
Horovod ranks) is sampled every 0.2 s with psutil: the peak of the sum at one instant, and the peaks of
each kind of process, seen from the outside. `make <stage> MEASURE=1` runs a job under it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time


def _kind(line: str) -> str:
    return ("jvm" if "java" in line.split(" ", 1)[0] else "python_driver" if "jobs/" in line else
            "spark_python_worker" if "pyspark" in line else "horovod_rank" if "horovod" in line else "other")


def main(argv=None) -> int:
    import psutil

    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    started, child = time.perf_counter(), subprocess.Popen(command)
    root, peaks = psutil.Process(child.pid), {"tree": 0.0}
    while child.poll() is None:
        kinds: dict[str, float] = {}
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for proc in procs:
            try:
                rss, kind = proc.memory_info().rss / 2 ** 20, _kind(" ".join(proc.cmdline()))
            except psutil.Error:
                continue
            kinds[kind] = kinds.get(kind, 0.0) + rss
            peaks[f"largest {kind}"] = max(peaks.get(f"largest {kind}", 0.0), rss)
        for kind, total in kinds.items():
            peaks[f"all {kind}"] = max(peaks.get(f"all {kind}", 0.0), total)
        peaks["tree"] = max(peaks["tree"], sum(kinds.values()))
        time.sleep(0.2)
    code = child.wait()
    print("treemem: " + json.dumps({"exit": code, "wall_s": round(time.perf_counter() - started, 1),
                                    "peak_mib": {k: round(v) for k, v in sorted(peaks.items())}}), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
