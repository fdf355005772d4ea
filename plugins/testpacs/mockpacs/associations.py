"""What the mock DIMSE servers share: counting their open associations (the
limits tests read ``max_concurrent_associations``) and refusing one past
``faults.max_associations`` as a busy PACS does."""

from __future__ import annotations

import threading
from typing import Any

#: A-ASSOCIATE-RJ (result, source, reason): transient, local limit exceeded
LIMIT_EXCEEDED = (2, 3, 2)

#: marks an association whose connection closed (EVT_CONN_CLOSE), on the
#: association object itself: ids are reused once an association is freed
_CLOSED = "_mock_connection_closed"


class CountedAssociations:
    """A base for a mock SCP with ``faults.max_associations``; its handlers
    route EVT_REQUESTED to :meth:`_on_requested` and EVT_CONN_CLOSE to
    :meth:`_on_closed`."""

    faults: Any

    def __init__(self) -> None:
        self.max_concurrent_associations = 0
        self._active: set[int] = set()
        self._lock = threading.Lock()

    @property
    def current_associations(self) -> int:
        with self._lock:
            return len(self._active)

    def _reject_for(self, active: int) -> tuple[int, int, int] | None:
        """Why a new association is refused with ``active`` open (None: accepted)."""
        limit = self.faults.max_associations
        return LIMIT_EXCEEDED if limit is not None and active >= limit else None

    def _accepted(self, assoc: Any) -> None:
        """Called for each association accepted (a subclass's faults)."""

    def _on_requested(self, event: Any) -> None:
        with self._lock:
            if getattr(event.assoc, _CLOSED, False):
                # pynetdicom's reader thread saw the connection close before
                # the association thread got to the A-ASSOCIATE-RQ (a client
                # killed or timing out right after sending it): counting it
                # now would count it for ever
                return
            reject = self._reject_for(len(self._active))
            if reject is None:
                self._active.add(id(event.assoc))
                self.max_concurrent_associations = max(self.max_concurrent_associations, len(self._active))
        if reject is not None:
            event.assoc.acse.send_reject(*reject)
            event.assoc.kill()  # waits until the A-ASSOCIATE-RJ is sent, before the socket closes
            return
        self._accepted(event.assoc)

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            setattr(event.assoc, _CLOSED, True)
            self._active.discard(id(event.assoc))
