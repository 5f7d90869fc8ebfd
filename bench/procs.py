"""Gathering results from spawned benchmark processes without hanging on a dead one."""
from __future__ import annotations

import queue as queue_module
import time


class ChildFailed(RuntimeError):
    """A benchmark process exited without reporting."""


def collect(results, workers, timeout: float = 3600.0) -> list:
    """One item per worker from the ``results`` queue, in arrival order.

    Raises:
        ChildFailed: more workers exited than reported.
        TimeoutError: nothing complete within ``timeout`` seconds.
    """
    items = []
    deadline = time.monotonic() + timeout
    while len(items) < len(workers):
        try:
            items.append(results.get(timeout=1.0))
            continue
        except queue_module.Empty:
            pass
        dead = [w for w in workers if w.exitcode is not None]
        if len(dead) > len(items):
            # give a report already in the pipe one last chance before failing
            try:
                items.append(results.get(timeout=2.0))
                continue
            except queue_module.Empty:
                codes = ", ".join(f"pid {w.pid}: exit {w.exitcode}" for w in dead)
                raise ChildFailed(f"benchmark process(es) died without a result ({codes})") from None
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark processes gave {len(items)} of {len(workers)} results "
                               f"in {timeout:.0f} s")
    return items
