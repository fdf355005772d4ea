"""One thread that calls things when their time comes: the association
aborts behind dqr's own time limits (``limits.query_timeout``,
``limits.retrieve_timeout``) and the check that a received final C-FIND
response reached its query (pynetdicom#875). A thread per timer would be
thousands of threads on a 100,000-row job."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dqr.errors import RemoteError
from dqr.throttle import Deadline


class Watchdog:
    def __init__(self) -> None:
        self._due: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def after(self, seconds: float, action: Callable[[], None]) -> int:
        """Call ``action`` (on the watchdog's thread) in ``seconds``; returns
        a token for :meth:`cancel`."""
        with self._condition:
            token = next(self._order)
            heapq.heappush(self._due, (time.monotonic() + seconds, token, action))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dqr-dimse-watchdog", daemon=True)
                self._thread.start()
            self._condition.notify()
            return token

    def cancel(self, token: int) -> None:
        with self._condition:
            self._cancelled.add(token)

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._condition.wait(timeout=self._due[0][0] - time.monotonic() if self._due else None)
                _, token, action = heapq.heappop(self._due)
                if token in self._cancelled:
                    self._cancelled.discard(token)
                    continue
            try:
                action()
            except Exception:  # noqa: BLE001 - a failing action must not stop the others
                pass


watchdog = Watchdog()


@contextmanager
def bounded(assoc, deadline: Deadline, what: str) -> Iterator[None]:
    """Abort ``assoc`` when ``deadline`` passes; an error raised because of
    that names dqr's limit, not "the PACS aborted"."""
    token = watchdog.after(deadline.remaining(), assoc.abort)
    try:
        yield
    except RemoteError:
        if deadline.passed:
            raise deadline.error(what) from None
        raise
    finally:
        watchdog.cancel(token)
