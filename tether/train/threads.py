"""How many CPU threads torch uses, chosen so that a step does not collapse when another process takes a core.

OpenMP threads wait for each other at every parallel region's barrier. When another process holds one of the
cores, the thread scheduled behind it arrives late at every barrier and the others spin meanwhile: on a
2-core machine a ~1M-parameter PPO step went from 0.36 s on two threads to 4-7 s beside one busy process,
while one thread took 0.48 s alone and 0.48-0.52 s beside it (benchmarks/threads.py; benchmarks/README.md
has the table). A passive wait policy (OMP_WAIT_POLICY=PASSIVE) avoids the collapse (0.54-0.65 s) but
doubles the time alone (0.74-0.76 s), and shorter spin counts sit in between on both.

So `threads=auto` (the default) uses as many threads as there are cores that other processes leave idle,
measured between steps from the system's CPU time less this process's own: all of them on a quiet machine,
one fewer per busy core. A fixed integer keeps that count (and its float summation order) for the whole run.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger("tether")

MIN_WINDOW_S = 0.2  # shorter windows measure scheduler noise rather than load


def parse_threads(value) -> int | None:
    """`threads`: None (torch's default), 'auto', or a positive integer (also given as a string)."""
    if value is None or value == "auto":
        return None
    n = int(value)
    if n < 1:
        raise ValueError(f"threads must be 'auto' or a positive integer, not {value!r}")
    return n


class AutoThreads:
    """Between steps, set torch's thread count to the cores of this process's affinity that other processes
    leave idle (at least one). `adjust()` returns the count in force."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(
            range(os.cpu_count() or 1))
        self._me = psutil.Process()
        self._last = self._sample()
        time.sleep(0.1)  # a first window, so the first step already sees the load
        self.adjust(min_window=0.05)

    def _sample(self) -> tuple[float, float, float]:
        per_cpu = self._psutil.cpu_times(percpu=True)
        busy = sum(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
                   for i, t in enumerate(per_cpu) if i in self.cores)
        own = self._me.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def others_busy(self, min_window: float = MIN_WINDOW_S) -> float | None:
        """Cores' worth of CPU time that other processes used since the last call; None if too soon."""
        now = self._sample()
        wall = now[0] - self._last[0]
        if wall < min_window:
            return None
        others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now
        return others

    def adjust(self, min_window: float = MIN_WINDOW_S) -> int:
        others = self.others_busy(min_window)
        if others is not None:
            n = max(1, min(len(self.cores), round(len(self.cores) - others)))
            if n != torch.get_num_threads():
                log.info("threads=auto: %d thread(s) (other processes use %.1f of %d cores)", n, others,
                         len(self.cores))
                torch.set_num_threads(n)
        return torch.get_num_threads()


_active: AutoThreads | None = None  # the process's policy under threads=auto, set by apply_threads


def apply_threads(value) -> AutoThreads | None:
    """Set this process's torch CPU threads for `threads`. Under 'auto' the policy is kept for
    `adjust_between_steps`, which the job runner calls before every step; returns it (else None)."""
    global _active
    n = parse_threads(value)
    _active = AutoThreads() if value == "auto" else None
    if n is not None:
        torch.set_num_threads(n)
    return _active


def adjust_between_steps() -> None:
    """Re-measure the load and set the thread count, when the process runs threads=auto (else nothing)."""
    if _active is not None:
        _active.adjust()
