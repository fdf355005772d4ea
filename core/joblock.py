"""One dqr at a time per job: an exclusive lock on the job state and on the
archive, held for the whole run.

Two runs of one job would each "store" everything (instances recorded
twice, manifest lines duplicated), and ``--new-job`` during a live run would
set the live database aside under it. So a run takes ``flock(2)`` locks on
``.<state>.lock`` (beside the state) and on ``<archive>/.dqr-lock`` before it opens the state,
and writes who holds them (pid, host, start time) into both files. A second
run is refused at once, naming the holder, before it touches anything.

A lock of a killed process is no obstacle: the kernel releases ``flock``
locks when their holder dies, whatever is left in the file. (The lock is
for runs on one machine or on a file system with working ``flock``; the
scale-out executors share a job through their queue instead.)
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dqr.errors import InputError, Problem

ARCHIVE_LOCK = ".dqr-lock"


class JobLockedError(InputError):
    """Another dqr holds this job's lock (exit 2: nothing was done)."""


def _holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
        return f"pid {data['pid']} on {data['host']}, running since {data['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not said who it is yet"


class JobLock:
    """The locks of one job: ``.<state>.lock`` and ``<archive>/.dqr-lock``."""

    def __init__(self, state_path: Path, archive: Path | None) -> None:
        self.paths = [state_path.with_name(f".{state_path.name}.lock")]
        if archive is not None:
            self.paths.append(archive / ARCHIVE_LOCK)
        self._fds: list[int] = []

    def acquire(self) -> None:
        """Take every lock or none; raise :class:`JobLockedError` naming the holder."""
        me = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        ).encode()
        try:
            for path in self.paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise JobLockedError(
                        Problem(
                            str(path),
                            f"another dqr is running this job ({holder}); wait for it to finish or stop it "
                            "(a killed one leaves no lock behind)",
                        )
                    ) from None
                self._fds.append(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, me, 0)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        # The files stay: removing one another run has opened would let a
        # third lock a fresh file beside it. Closing releases the lock.
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def job_lock(config) -> JobLock:  # config: dqr.config.LoadedConfig
    """The lock of the job ``config`` describes (its state and archive)."""
    return JobLock(config.state_path, config.site.archive)


class _NoLock:
    """What a job whose executor coordinates its processes holds instead."""

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


def no_lock() -> _NoLock:
    return _NoLock()
