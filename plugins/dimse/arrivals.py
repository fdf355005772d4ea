"""Receiving instances: C-STORE requests (on a C-GET association or on dqr's
own storage SCP for C-MOVE) handed straight to the store callback, encoded.

The dataset is never decoded here: the raw bytes and the transfer syntax of
the accepted context go to ``store``, which decodes only what relabeling
needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from typing import Any

from pydicom.tag import Tag
from pydicom.uid import UID

from dqr.backend import StoreCallback
from dqr.model import ReceivedInstance

STORE_SUCCESS = 0x0000
STORE_OUT_OF_RESOURCES = 0xA700  # the store failed for a local reason (disk, ...)
STORE_CANNOT_UNDERSTAND = 0xC000  # the store refused this instance
SERIES_UID_TAG = Tag("SeriesInstanceUID")


class Arrivals:
    """The instances one retrieval has received so far."""

    def __init__(self, store: StoreCallback) -> None:
        self._store = store
        self._changed = threading.Condition()
        self.received: set[str] = set()
        self.failures: list[BaseException] = []
        self.last_arrival = time.monotonic()

    def handle_store(self, event: Any) -> int:
        """The C-STORE handler: store the instance, answer with a status."""
        request = event.request
        instance = ReceivedInstance(
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax=str(event.context.transfer_syntax),
            dataset=request.DataSet.getvalue(),
        )
        try:
            self._store(instance)
        except Exception as exc:  # noqa: BLE001 - answered as a failure, raised after the retrieve
            self._note(failure=exc)
            return STORE_OUT_OF_RESOURCES if isinstance(exc, OSError) else STORE_CANNOT_UNDERSTAND
        self._note(uid=instance.sop_instance_uid)
        return STORE_SUCCESS

    def _note(self, uid: str | None = None, failure: BaseException | None = None) -> None:
        with self._changed:
            if uid is not None:
                self.received.add(uid)
            if failure is not None:
                self.failures.append(failure)
            self.last_arrival = time.monotonic()
            self._changed.notify_all()

    @property
    def count(self) -> int:
        """Instances that arrived, stored or not."""
        with self._changed:
            return len(self.received) + len(self.failures)

    def wait_for(self, expected: int, idle_timeout: float) -> None:
        """Wait until ``expected`` instances arrived or none came for
        ``idle_timeout`` seconds (asynchronous C-MOVE: the C-STOREs may
        follow the final C-MOVE response)."""
        with self._changed:
            while len(self.received) + len(self.failures) < expected:
                left = self.last_arrival + idle_timeout - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)

    def raise_store_failure(self) -> None:
        """Surface the first failure of ``store`` (the C-STOREs were already
        answered with a failure status)."""
        if self.failures:
            first = self.failures[0]
            first.add_note(f"dqr could not store {len(self.failures)} of the instances it received")
            raise first


class MoveReceiver:
    """dqr's storage SCP for C-MOVE: one per backend, started on first use.

    Each C-STORE is routed to the retrieval that asked for it, by the Move
    Originator Message ID the PACS copies from the C-MOVE request; PACSes
    that omit it are routed by the only retrieval running, else by the
    instance's SeriesInstanceUID (read from the first bytes only).
    """

    def __init__(self, aet: str, host: str, port: int, network_timeout: float) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        from dqr.plugins.dimse.network import NODELAY_SERVER_HANDLERS, accepted_transfer_syntaxes

        self.aet = aet
        ae = AE(ae_title=aet)
        ae.network_timeout = network_timeout
        ae.maximum_associations = 64
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, accepted_transfer_syntaxes())
        self._lock = threading.Lock()
        self._by_move_id: dict[int, tuple[Arrivals, str]] = {}
        self._server = ae.start_server(
            (host, port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), *NODELAY_SERVER_HANDLERS],
        )
        self.host = host
        self.port = self._server.server_address[1]

    @contextmanager
    def expecting(self, move_id: int, arrivals: Arrivals, series_uid: str) -> Iterator[None]:
        with self._lock:
            self._by_move_id[move_id] = (arrivals, series_uid)
        try:
            yield
        finally:
            with self._lock:
                self._by_move_id.pop(move_id, None)

    def _on_store(self, event: Any) -> int:
        arrivals = self._route(event)
        if arrivals is None:
            return STORE_CANNOT_UNDERSTAND  # no retrieval waits for it (late, or not ours)
        return arrivals.handle_store(event)

    def _route(self, event: Any) -> Arrivals | None:
        move_id = event.request.MoveOriginatorMessageID
        with self._lock:
            if move_id in self._by_move_id:
                return self._by_move_id[move_id][0]
            if len(self._by_move_id) == 1:
                return next(iter(self._by_move_id.values()))[0]
            waiting = list(self._by_move_id.values())
        if not waiting:
            return None
        try:
            series_uid = _series_uid(
                event.request.DataSet.getvalue(), event.context.transfer_syntax
            )
        except Exception:  # noqa: BLE001 - e.g. deflated: unroutable, answered as a failure
            return None
        return next((arrivals for arrivals, uid in waiting if uid == series_uid), None)

    @property
    def active_associations(self) -> list[Any]:
        return self._server.active_associations

    def stop(self) -> None:
        self._server.shutdown()


def _series_uid(dataset: bytes, transfer_syntax: str) -> str:
    from pydicom.filereader import read_dataset

    syntax = UID(transfer_syntax)
    partial = read_dataset(
        BytesIO(dataset),
        syntax.is_implicit_VR,
        syntax.is_little_endian,
        stop_when=lambda tag, vr, length: tag > SERIES_UID_TAG,
    )
    return str(partial.get("SeriesInstanceUID", ""))
