"""Progress for people: rich bars on a terminal, plain lines elsewhere."""

from __future__ import annotations

import logging
import sys
import threading
import time

from dqr.context import Reporter

log = logging.getLogger("dqr")

LABELS = {
    "query": "rows queried",
    "series": "studies listed",
    "retrieve": "series retrieved",
    "instances": "instances stored",
}


class RichReporter(Reporter):
    """Progress bars with counts, ETA, and bytes and rate for instances (terminal only)."""

    def __init__(self, console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description:>18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[extra]}"),
            console=console,
        )
        self.tasks: dict[str, int] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._started = time.monotonic()
        self._shown = 0.0

    def start(self, phase: str, total: int) -> None:
        with self._lock:
            if not self.progress.live.is_started:
                self.progress.start()
            self.tasks[phase] = self.progress.add_task(LABELS.get(phase, phase), total=total, extra="")

    def advance(self, phase: str, amount: int = 1) -> None:
        if phase in self.tasks:
            self.progress.advance(self.tasks[phase], amount)

    def grow(self, phase: str, amount: int) -> None:
        with self._lock:
            if phase in self.tasks and amount:
                task = self.tasks[phase]
                self.progress.update(task, total=(self.progress.tasks[task].total or 0) + amount)

    def instance_stored(self, size: int) -> None:
        if "instances" not in self.tasks:
            return
        with self._lock:
            self._bytes += size
            now = time.monotonic()
            show = now - self._shown > 0.25
            if show:
                self._shown = now
        task = self.tasks["instances"]
        self.progress.advance(task, 1)
        if show:
            rate = self._bytes / max(now - self._started, 1e-6) / 1e6
            self.progress.update(task, extra=f"{self._bytes / 1e6:.1f} MB, {rate:.1f} MB/s")

    def finish(self, phase: str) -> None:
        with self._lock:
            if phase in self.tasks:
                task = self.tasks[phase]
                self.progress.update(task, total=self.progress.tasks[task].completed)
                if phase == "instances":
                    self.progress.update(task, extra=f"{self._bytes / 1e6:.1f} MB")
            if all(t.finished for t in self.progress.tasks):
                self.progress.stop()

    def close(self) -> None:
        self.progress.stop()


class LineReporter(Reporter):
    """One log line per phase start/end, and at most one every few seconds."""

    def __init__(self, every: float = 5.0) -> None:
        self.every = every
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.bytes = 0
        self._last = time.monotonic()  # the first progress line comes after `every` seconds
        self._started = time.monotonic()
        self._lock = threading.Lock()

    def start(self, phase: str, total: int) -> None:
        with self._lock:
            self.totals[phase] = total
            self.done[phase] = 0
        if phase != "instances" and total:  # a total of 0 grows as the phase runs
            log.info("%s: %d to do", LABELS.get(phase, phase), total)

    def advance(self, phase: str, amount: int = 1) -> None:
        with self._lock:
            self.done[phase] = self.done.get(phase, 0) + amount
        self._maybe_log(phase)

    def grow(self, phase: str, amount: int) -> None:
        with self._lock:
            self.totals[phase] = self.totals.get(phase, 0) + amount

    def instance_stored(self, size: int) -> None:
        with self._lock:
            self.done["instances"] = self.done.get("instances", 0) + 1
            self.bytes += size
        self._maybe_log("instances")

    def _maybe_log(self, phase: str) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        done, total = self.done[phase], self.totals.get(phase, 0)
        if phase == "instances":
            rate = self.bytes / max(now - self._started, 1e-6) / 1e6
            log.info("%s: %d/%d (%.1f MB/s)", LABELS[phase], done, total, rate)
        else:
            log.info("%s: %d/%d", LABELS.get(phase, phase), done, total)

    def finish(self, phase: str) -> None:
        if phase in self.done:
            log.info("%s: %d done", LABELS.get(phase, phase), self.done[phase])

    def close(self) -> None:
        pass


def make_reporter(console, quiet: bool = False):
    if quiet:
        return None
    if console.is_terminal and sys.stderr.isatty():
        return RichReporter(console)
    return LineReporter()
