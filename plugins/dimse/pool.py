"""A thread-safe pool of query associations, at most ``size`` open at once.

Opening an association costs a TCP connect plus an A-ASSOCIATE round trip
(~3x the time of a C-FIND on a fast PACS), so queries reuse them; the bound
is the source's ``limits.max_queries``, which is also what the PACS sees.

Under a cluster-wide cap (:meth:`AssociationPool.cap`, the queue executor)
every open association -- idle ones included -- holds one of the cluster's
``max_queries`` slots, so all processes together never have more query
associations open to the PACS; idle ones are closed within about a second so
that a peer waiting for a slot gets it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pynetdicom.association import Association

from dqr.throttle import ConnectionCap


class AssociationPool:
    def __init__(
        self, open_association: Callable[[], Association], size: int, max_idle: float
    ) -> None:
        self._open = open_association
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[tuple[Association, float]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._in_use = 0
        #: An association idle for longer may have been closed by the PACS
        #: (Orthanc: 30 s by default); using it would lose a request.
        self.max_idle = max_idle
        self._cap: ConnectionCap | None = None

    def cap(self, cap: ConnectionCap) -> None:
        """Hold one of ``cap``'s slots per open association (before any is open)."""
        self._cap = cap
        self.max_idle = min(self.max_idle, cap.idle)
        cap.start_reaper(self._reap)

    def _reap(self) -> bool:
        """Close the associations idle for longer than ``max_idle``; False once closed."""
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return False
            stale = [entry for entry in self._idle if now - entry[1] >= self.max_idle or not entry[0].is_established]
            self._idle = [entry for entry in self._idle if entry not in stale]
        for assoc, _ in stale:
            self._discard(assoc)
        return True

    def _discard(self, assoc: Association) -> None:
        _release_quietly(assoc)
        if self._cap is not None:
            self._cap.closed(assoc)

    @contextmanager
    def lease(self, fresh: bool = False) -> Iterator[tuple[Association, bool]]:
        """Borrow an association: ``(association, reused)``. It returns to
        the pool only if it is still established afterwards."""
        self._slots.acquire()
        assoc = None
        try:
            assoc = None if fresh else self._take_idle()
            reused = assoc is not None
            if assoc is None:
                assoc = self._open() if self._cap is None else self._cap.open(self._open)
            with self._lock:
                self._in_use += 1
            try:
                yield assoc, reused
            finally:
                with self._lock:
                    self._in_use -= 1
        finally:
            if assoc is not None:
                self._give_back(assoc)
            self._slots.release()

    def _take_idle(self) -> Association | None:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                assoc, since = self._idle.pop()
                if assoc.is_established and now - since < self.max_idle:
                    return assoc
                self._discard(assoc)
        return None

    def _give_back(self, assoc: Association) -> None:
        surplus: list[Association] = []
        with self._lock:
            had_turn = self._cap is not None and not self._cap.keep_idle(assoc)
            if assoc.is_established and not self._closed and not had_turn:
                self._idle.append((assoc, time.monotonic()))
                # Keep as many idle as are busy now (they will be wanted
                # back soon), at least one. Idle associations still hold a
                # worker of the PACS: Orthanc serves 4 at once by default and
                # queues a retrieval's association behind idle ones (~1 s).
                keep = max(1, self._in_use)
                while len(self._idle) > keep:
                    surplus.append(self._idle.pop(0)[0])
            else:
                surplus.append(assoc)
        for extra in surplus:
            self._discard(extra)

    def drop_idle(self) -> None:
        """Release the idle associations now: the PACS counts them against
        its limit of simultaneous associations."""
        with self._lock:
            idle, self._idle = self._idle, []
        for assoc, _ in idle:
            self._discard(assoc)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for assoc, _ in idle:
            self._discard(assoc)


def _release_quietly(assoc: Association) -> None:
    # A dead association needs nothing: pynetdicom stopped its thread when
    # the abort or timeout happened.
    if assoc.is_established:
        assoc.release()
