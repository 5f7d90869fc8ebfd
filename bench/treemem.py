"""python -m bench.treemem COMMAND [ARGS...]: run a command, report its wall time, CPU seconds and the peak memory of
its whole process tree by kind of process, sampled every 0.2 s (`make <stage> MEASURE=1`; docs/performance.md)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from bench.monitors import PeakRss


def measure(command: list[str], interval: float = 0.2, **popen) -> dict:
    """Exit code, wall and CPU seconds, peak MiB (by kind, ``tree``) of ``command`` (``popen``: Popen's)."""
    import psutil

    started = time.perf_counter()
    child = subprocess.Popen(command, **popen)
    with PeakRss(interval, root=psutil.Process(child.pid)) as rss:
        code = child.wait()
    peaks = {"tree": rss.peaks["tree"], **{f"all {k}": v for k, v in rss.peaks.items() if v and k != "tree"},
             **{f"largest {k}": v for k, v in rss.largest.items() if v}}
    return {"exit": code, "wall_s": round(time.perf_counter() - started, 1), "cpu_s": round(sum(rss.cpu.values()), 1),
            "peak_mib": {k: round(v) for k, v in sorted(peaks.items())}}


def main(argv=None) -> int:
    command = list(sys.argv[1:] if argv is None else argv)
    if not command or command[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 0 if command else 2
    report = measure(command)
    print("treemem: " + json.dumps(report), file=sys.stderr)
    return report["exit"]


if __name__ == "__main__":
    sys.exit(main())
