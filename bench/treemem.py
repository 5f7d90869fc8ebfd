"""python -m bench.treemem COMMAND [ARGS...]: run a command, report its wall time, CPU seconds and the peak memory of
its whole process tree by kind of process, sampled every 0.2 s (`make <stage> MEASURE=1`; docs/performance.md)."""
from __future__ import annotations

import json
import subprocess
import sys
import time


def kind_of(line: str) -> str:
    """What a process of a job's tree is, from its command line."""
    return ("jvm" if "java" in line.split(" ", 1)[0] else
            "python_driver" if "jobs/" in line else
            "spark_python_worker" if "pyspark" in line else
            "horovod_rank" if "horovod" in line else
            "tf_distribute_rank" if "rank_main" in line else "other")


def measure(command: list[str], interval: float = 0.2, **popen) -> dict:
    """Run ``command`` (``popen``: subprocess.Popen's options); its exit code, wall seconds, peak MiB, and the
    CPU seconds (user + system) of its whole tree, which other users' load barely moves, unlike wall time:
    the last reading of each process seen (a process that ends between two samples loses at most one interval;
    the kernel's count for waited-for children would miss Spark's Python workers, which nobody waits for)."""
    import psutil

    cpu_seen: dict[tuple[int, float], float] = {}
    started = time.perf_counter()
    child = subprocess.Popen(command, **popen)
    root = psutil.Process(child.pid)
    peaks: dict[str, float] = {"tree": 0.0}
    while child.poll() is None:
        kinds: dict[str, float] = {}
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for proc in procs:
            try:
                rss = proc.memory_info().rss / 2 ** 20
                line = " ".join(proc.cmdline())
                times = proc.cpu_times()
                cpu_seen[(proc.pid, proc.create_time())] = times.user + times.system
            except psutil.Error:
                continue
            kind = kind_of(line)
            kinds[kind] = kinds.get(kind, 0.0) + rss
            peaks[f"largest {kind}"] = max(peaks.get(f"largest {kind}", 0.0), rss)
        for kind, total in kinds.items():
            peaks[f"all {kind}"] = max(peaks.get(f"all {kind}", 0.0), total)
        peaks["tree"] = max(peaks["tree"], sum(kinds.values()))
        time.sleep(interval)
    code = child.wait()
    return {"exit": code, "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(sum(cpu_seen.values()), 1),
            "peak_mib": {k: round(v) for k, v in sorted(peaks.items())}}


def main(argv=None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command:
        print(__doc__, file=sys.stderr)
        return 2
    report = measure(command)
    print("treemem: " + json.dumps(report), file=sys.stderr)
    return report["exit"]


if __name__ == "__main__":
    sys.exit(main())
