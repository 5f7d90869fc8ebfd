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


def process_kind(proc) -> str:
    """``jvm``, ``spark_python_workers`` or ``other_children``: a descendant of the driver, by its command line."""
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - the process may have exited meanwhile
        return "other_children"
    if "java" in os.path.basename(cmdline.split(" ", 1)[0]) or "org.apache.spark" in cmdline:
        return "jvm"
    if "pyspark.daemon" in cmdline or "pyspark.worker" in cmdline or "pyspark/daemon" in cmdline:
        return "spark_python_workers"
    return "other_children"


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
    """Peak RSS in MiB of this process and its descendants, polled every ``interval`` s: ``peaks`` of ``driver``
    (this process), ``jvm``, ``spark_python_workers``, ``other_children`` and ``tree`` (sums at one instant),
    ``workers``, each Spark Python process's peak by pid with its role (``daemon`` forks the ``worker``s), and
    ``timeline``, the tree's sum at each poll (:meth:`at`)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        super().__init__(interval)
        self._me = psutil.Process()
        self.peaks = dict.fromkeys(("driver", "jvm", "spark_python_workers", "other_children", "tree"), 0.0)
        self.workers: dict[int, dict] = {}
        self.timeline: list[tuple[float, float]] = []

    def at(self, moment: float) -> float | None:
        """The whole tree's MiB at the last poll before the wall-clock time ``moment``."""
        before = [mib for when, mib in self.timeline if when <= moment]
        return round(before[-1], 1) if before else None

    def sample(self) -> None:
        import psutil

        try:
            sums = dict.fromkeys(self.peaks, 0.0)
            sums["driver"] = self._me.memory_info().rss / MB
            python_workers = {}
            for child in self._me.children(recursive=True):
                try:
                    rss = child.memory_info().rss / MB
                    kind = process_kind(child)  # not cached: spark-submit's shell exec()s the JVM under its pid
                    if kind == "spark_python_workers":
                        python_workers[child.pid] = (child.ppid(), rss)
                except psutil.Error:
                    continue
                sums[kind] += rss
        except psutil.Error:
            return
        for pid, (parent, rss) in python_workers.items():
            entry = self.workers.setdefault(pid, {"role": "worker" if parent in python_workers else "daemon",
                                                  "peak_mb": 0.0})
            entry["peak_mb"] = max(entry["peak_mb"], round(rss, 1))
        sums["tree"] = sum(v for k, v in sums.items() if k != "tree")
        self.timeline.append((time.time(), sums["tree"]))
        for key, value in sums.items():
            self.peaks[key] = max(self.peaks[key], round(value, 1))


def _tree_cpu(me) -> dict[str, float]:
    """CPU seconds so far of this process and its descendants by kind, reaped children included."""
    import psutil

    sums = {"driver": 0.0, "jvm": 0.0, "spark_python_workers": 0.0, "other_children": 0.0}
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
            kind = "driver" if proc.pid == me.pid else process_kind(proc)
        except psutil.Error:
            continue
        sums[kind] += t.user + t.system + t.children_user + t.children_system
    return sums


def machine_busy() -> float:
    """Busy core-seconds of the whole machine since boot."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


class CpuUse:
    """Core-seconds used during a block by this process tree (``ours_core_s``, by kind and ``total``), by the
    machine (``machine_busy_core_s``) and by other users (``others_core_s``; ``others_share`` of its capacity)."""

    def __enter__(self) -> CpuUse:
        import psutil

        self._me = psutil.Process()
        self._tree, self._busy = _tree_cpu(self._me), machine_busy()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._started
        busy = machine_busy() - self._busy
        end = _tree_cpu(self._me)
        ours = {k: round(max(0.0, end[k] - self._tree[k]), 2) for k in end}
        ours["total"] = round(sum(ours.values()), 2)
        others = max(0.0, busy - ours["total"])
        self.result = {"wall_s": round(wall, 2), "ours_core_s": ours, "machine_busy_core_s": round(busy, 2),
                       "others_core_s": round(others, 2),
                       "others_share": round(others / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None}


class MachineCpu(Sampler):
    """The machine's busy core-seconds every ``interval`` s, to ask afterwards how busy it was between two
    wall-clock times, such as a training window stamped inside the ranks."""

    sample_on_exit = True

    def __init__(self, interval: float = 0.25):
        super().__init__(interval)
        self.samples: list[tuple[float, float]] = []

    def sample(self) -> None:
        self.samples.append((time.time(), machine_busy()))

    def busy_between(self, start: float, end: float) -> float | None:
        """Busy core-seconds of the whole machine between two wall-clock times (interpolated)."""
        def at(when):
            for (t0, b0), (t1, b1) in zip(self.samples, self.samples[1:]):
                if t0 <= when <= t1:
                    return b0 + (b1 - b0) * (when - t0) / (t1 - t0) if t1 > t0 else b0
            return None

        first, last = at(start), at(end)
        return None if first is None or last is None else last - first


class JvmHeap(Sampler):
    """Heap the Spark driver JVM holds after a full GC (``System.gc()`` through py4j; live data), sampled every
    ``interval`` s and on entering and leaving: ``jvm_heap_after_gc_mb``, ``jvm_heap_before_gc_mb``,
    ``jvm_heap_committed_mb`` (peaks), ``jvm_max_heap_mb``, ``forced_gc_samples`` and ``forced_gc_s`` (the forced
    collections pause the JVM)."""

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
