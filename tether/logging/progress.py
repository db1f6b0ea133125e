"""Live training progress: a rich progress bar in a terminal, plain periodic lines anywhere else.

When stdout is not a terminal (CI, ``nohup``, a log file) a redrawing bar turns into a mess of control codes, so
Progress prints one readable line every ``print_every`` steps instead (plus the first and the last step).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def format_stats(stats: dict[str, float], keys: Sequence[str] | None = None) -> str:
    """``{"reward": 0.51234, "kl": 0.00123}`` -> ``"reward 0.5123  kl 0.00123"``; ``keys`` picks and orders them."""
    items = [(k, stats[k]) for k in keys if k in stats] if keys is not None else list(stats.items())
    parts = []
    for key, value in items:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key} {text}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Progress display for a run of ``total`` steps.

    ``update(step, stats)`` is called after each step with the number of steps completed so far and a few key stats
    (reward, kl, beta, ...). ``initial_step`` is where a resumed run starts, so step/total and the time estimate are
    right after a resume. ``enabled=False`` (non-zero data-parallel ranks) prints nothing. ``keys`` chooses which
    stats are shown and in what order; by default all that are passed.
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool = True,
        initial_step: int = 0,
        print_every: int = 10,
        keys: Sequence[str] | None = None,
        description: str = "training",
        file: TextIO | None = None,
        force_terminal: bool | None = None,
    ) -> None:
        self.total = total
        self.enabled = enabled
        self.initial_step = initial_step
        self.print_every = max(1, print_every)
        self.keys = keys
        self.description = description
        self.file = file if file is not None else sys.stdout
        self._console = Console(file=self.file, force_terminal=force_terminal)
        # Jupyter is not a TTY but renders rich's live display fine.
        self.interactive = self._console.is_terminal or self._console.is_jupyter
        self._bar: RichProgress | None = None
        self._task = None
        self._start_time = time.monotonic()
        self._last_printed: int | None = None

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        self._start_time = time.monotonic()
        if not self.enabled or not self.interactive or self._bar is not None:
            return
        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("<"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self._console,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total, completed=self.initial_step, stats="")

    def update(self, step: int, stats: dict[str, float] | None = None) -> None:
        """Show that ``step`` steps are done, with ``stats`` from the latest step."""
        if not self.enabled:
            return
        text = format_stats(stats or {}, self.keys)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=text)
            return
        if self.interactive:  # update() without start(): make the bar now rather than fall back to plain lines
            self.start()
            self._bar.update(self._task, completed=step, stats=text)
            return
        first = self._last_printed is None
        if first or step % self.print_every == 0 or step >= self.total:
            self._print_line(step, text)

    def _print_line(self, step: int, text: str) -> None:
        elapsed = time.monotonic() - self._start_time
        done = step - self.initial_step
        eta = ""
        if done > 0 and step < self.total:
            eta = f", ~{_clock(elapsed / done * (self.total - step))} left"
        line = f"{self.description} step {step}/{self.total} [{_clock(elapsed)} elapsed{eta}]"
        if text:
            line += f" | {text}"
        print(line, file=self.file, flush=True)
        self._last_printed = step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
