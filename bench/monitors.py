"""Memory and CPU monitors: of this process, of its process tree (JVM, Spark workers, ranks), of the machine
and of the Spark driver's JVM heap."""
from __future__ import annotations

import os
import resource
import sys
import threading
import time

from bench.harness import MB


def maxrss_mb() -> float:
    """Peak RSS of the calling process so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (MB if sys.platform == "darwin" else 1024), 1)


KINDS = ("driver", "jvm", "spark_python_workers", "ranks", "other_children")


def process_kind(proc, root) -> str:
    """Which of ``KINDS`` a process of ``root``'s tree is, by its command line (a job's driver runs jobs/…)."""
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - the process may have exited meanwhile
        return "other_children"
    if "java" in os.path.basename(cmdline.split(" ", 1)[0]) or "org.apache.spark" in cmdline:
        return "jvm"
    if proc.pid == root.pid or "jobs/" in cmdline:
        return "driver"
    if "pyspark.daemon" in cmdline or "pyspark.worker" in cmdline or "pyspark/daemon" in cmdline:
        return "spark_python_workers"
    return "ranks" if "horovod" in cmdline or "rank_main" in cmdline else "other_children"


def others_share(busy_core_s: float, ours_core_s: float, seconds: float) -> float | None:
    """The share of the machine's cores that other users kept busy over ``seconds``."""
    return round(max(0.0, busy_core_s - ours_core_s) / (seconds * (os.cpu_count() or 1)), 3) if seconds > 0 else None


class Sampler:
    """Calls ``sample()`` on entering the block, every ``interval`` s in a thread, and on leaving it if asked."""

    sample_on_exit = False

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - what it watches may be stopping; the readings so far stand
                return

    def __enter__(self):
        self.sample()
        self._thread = threading.Thread(target=self._loop, name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.sample_on_exit:
            self.sample()


class PeakRss(Sampler):
    """Peak RSS in MiB of ``root`` (default: this process) and its descendants, polled every ``interval`` s."""

    def __init__(self, interval: float = 0.2, root=None):
        import psutil

        super().__init__(interval)
        self.root = root or psutil.Process()
        self.peaks = dict.fromkeys((*KINDS, "tree"), 0.0)  # sums by kind and of the whole tree, at one instant
        self.largest = dict.fromkeys(KINDS, 0.0)  # the largest single process of each kind
        self.workers: dict[int, dict] = {}  # each Spark Python process's peak, by pid, with its role
        self.timeline: list[tuple[float, float]] = []  # (wall-clock time, the tree's MiB) at each poll
        self.cpu: dict[tuple[int, float], float] = {}  # the last CPU seconds read of each process seen

    def at(self, moment: float) -> float | None:
        """The whole tree's MiB at the last poll before the wall-clock time ``moment``."""
        before = [mib for when, mib in self.timeline if when <= moment]
        return round(before[-1], 1) if before else None

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        sums, python_workers = dict.fromkeys(self.peaks, 0.0), {}
        for proc in procs:
            try:
                rss, times = proc.memory_info().rss / MB, proc.cpu_times()
                self.cpu[(proc.pid, proc.create_time())] = times.user + times.system
                kind = process_kind(proc, self.root)  # not cached: spark-submit exec()s the JVM under its pid
                if kind == "spark_python_workers":
                    python_workers[proc.pid] = (proc.ppid(), rss)
            except psutil.Error:
                continue
            sums[kind] += rss
            self.largest[kind] = max(self.largest[kind], round(rss, 1))
        for pid, (parent, rss) in python_workers.items():  # the daemon forks the workers
            entry = self.workers.setdefault(pid, {"role": "worker" if parent in python_workers else "daemon",
                                                  "peak_mb": 0.0})
            entry["peak_mb"] = max(entry["peak_mb"], round(rss, 1))
        sums["tree"] = sum(sums.values())
        self.timeline.append((time.time(), sums["tree"]))
        for key, value in sums.items():
            self.peaks[key] = max(self.peaks[key], round(value, 1))


def _tree_cpu(me) -> dict[str, float]:
    """CPU seconds so far of this process and its descendants by kind, reaped children included."""
    import psutil

    sums = dict.fromkeys(KINDS, 0.0)
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            sums[process_kind(proc, me)] += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return sums


class CpuUse(Sampler):
    """Core-seconds during a block: ours by kind (``ours_core_s``), the machine's, other users' (``result``); the
    machine's busy core-seconds sampled every ``interval`` s, for :meth:`busy_between`."""

    sample_on_exit = True

    def __init__(self, interval: float = 0.25):
        import psutil

        super().__init__(interval)
        self.samples: list[tuple[float, float]] = []  # (wall-clock time, the machine's busy core-seconds)
        self._me = psutil.Process()

    def sample(self) -> None:
        """Records the machine's busy core-seconds since boot, with the time."""
        import psutil

        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        self.samples.append((time.time(), busy))

    def __enter__(self) -> CpuUse:
        self._tree, self._started = _tree_cpu(self._me), time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        wall, busy = time.perf_counter() - self._started, self.samples[-1][1] - self.samples[0][1]
        end = _tree_cpu(self._me)
        ours = {k: round(max(0.0, end[k] - self._tree[k]), 2) for k in end}
        ours["total"] = round(sum(ours.values()), 2)
        self.result = {"wall_s": round(wall, 2), "ours_core_s": ours, "machine_busy_core_s": round(busy, 2),
                       "others_core_s": round(max(0.0, busy - ours["total"]), 2),
                       "others_share": others_share(busy, ours["total"], wall)}

    def busy_between(self, start: float, end: float) -> float | None:
        """Busy core-seconds of the whole machine between two wall-clock times within the block (interpolated)."""
        import numpy as np

        times, busy = [t for t, _ in self.samples], [b for _, b in self.samples]
        if not times or not times[0] <= start <= end <= times[-1]:
            return None
        return float(np.interp(end, times, busy) - np.interp(start, times, busy))


class JvmHeap(Sampler):
    """The driver JVM's heap after a forced full GC (and before it, committed, max), sampled."""

    sample_on_exit = True

    def __init__(self, spark, interval: float = 2.0):
        super().__init__(interval)
        self._jvm = spark.sparkContext._jvm
        self.result = {"jvm_heap_after_gc_mb": 0.0, "jvm_heap_before_gc_mb": 0.0, "jvm_heap_committed_mb": 0.0,
                       "jvm_max_heap_mb": None, "forced_gc_samples": 0, "forced_gc_s": 0.0}

    def sample(self) -> None:
        runtime = self._jvm.java.lang.Runtime.getRuntime()
        before = (runtime.totalMemory() - runtime.freeMemory()) / MB
        started = time.perf_counter()
        self._jvm.java.lang.System.gc()
        r = self.result
        r["forced_gc_s"] = round(r["forced_gc_s"] + time.perf_counter() - started, 4)
        total = runtime.totalMemory() / MB
        r["jvm_max_heap_mb"] = round(runtime.maxMemory() / MB, 1)
        for key, value in (("after_gc", total - runtime.freeMemory() / MB), ("before_gc", before),
                           ("committed", total)):
            r[f"jvm_heap_{key}_mb"] = max(r[f"jvm_heap_{key}_mb"], round(value, 1))
        r["forced_gc_samples"] += 1
