"""Running one competitor as a child process: wall time, peak RSS, exit code.

Peak RSS is the kernel's own high-water mark of each process (``VmHWM`` in
``/proc/PID/status``), read every few milliseconds for the child and its
descendants while it runs; the largest single-process peak is reported.
Not ``ru_maxrss`` from ``wait4``: on Linux a child's ``ru_maxrss`` starts at
the RSS of the (big) parent it was forked from, so every child would look at
least as big as the harness.

Every child gets its own process group, so a timeout or a Ctrl-C of the
harness kills it and whatever it started, by its PID, never by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: The child running right now (at most one: runs are never overlapped).
_current: subprocess.Popen | None = None


@dataclass
class Measurement:
    seconds: float
    peak_rss_mb: float
    exit_code: int
    timed_out: bool = False
    stdout: str = ""
    stderr_tail: str = ""
    extra: dict = field(default_factory=dict)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own group (start_new_session)
    except ProcessLookupError:
        pass


def kill_current() -> None:
    """Kill the child being measured, if any (for Ctrl-C)."""
    process = _current
    if process is not None and process.returncode is None:
        _kill_group(process)


POLL_SECONDS = 0.01


def _hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:  # the bench extra is not installed: the child alone
        return []
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


class PeakRss:
    """Polls the high-water RSS of a process tree until :meth:`stop`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        rounds = 0
        while not self._done.is_set():
            pids = [self.pid]
            if rounds % 20 == 0:  # descendants less often: listing them costs more
                pids += _descendants(self.pid)
            for pid in pids:
                self.peak_kb = max(self.peak_kb, _hwm_kb(pid))
            rounds += 1
            self._done.wait(POLL_SECONDS)

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return self.peak_kb / 1024


def run_measured(argv: list[str], *, cwd: Path, env: dict[str, str], logs: Path, timeout: float) -> Measurement:
    """Run ``argv`` to completion (or ``timeout`` seconds) and measure it.

    stdout and stderr go to files in ``logs`` (never pipes: a chatty child
    cannot block), and are read back afterwards.
    """
    global _current
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )
        _current = process
        peak = PeakRss(process.pid)  # Popen returns after the exec: no parent pages counted
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            _kill_group(process)

        timer = threading.Timer(timeout, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            # wait without reaping, stop polling, then reap (the PID stays ours until then)
            os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
            seconds = time.perf_counter() - started
        finally:
            timer.cancel()
            peak_mb = peak.stop()
        _, status = os.waitpid(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        _current = None
    return Measurement(
        seconds=seconds,
        peak_rss_mb=peak_mb,
        exit_code=process.returncode,
        timed_out=timed_out.is_set(),
        stdout=out_path.read_text(errors="replace"),
        stderr_tail=err_path.read_text(errors="replace")[-2000:],
    )


def count_files(folder: Path) -> int:
    """Instances written under ``folder`` (dqr's manifest files and its
    hidden lock and temp files aside)."""
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.name != "manifest.jsonl" and not p.name.startswith("."))
