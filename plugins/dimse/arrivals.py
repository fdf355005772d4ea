"""Receiving instances: C-STORE requests (on a C-GET association or on dqr's
own storage SCP for C-MOVE) handed straight to the store callback, encoded.

The dataset is never decoded here: the raw bytes and the transfer syntax of
the accepted context go to ``store``, which decodes only what relabeling
needs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.tag import Tag
from pydicom.uid import UID

from dqr.backend import StoreCallback
from dqr.model import ReceivedInstance, RetrieveRequest

log = logging.getLogger(__name__)

STORE_SUCCESS = 0x0000
STORE_OUT_OF_RESOURCES = 0xA700  # the store failed for a local reason (disk, ...)
STORE_CANNOT_UNDERSTAND = 0xC000  # the store refused this instance
#: Answer to a C-STORE that no C-MOVE in flight asked for (PS3.4 C.4.2.1.5:
#: "Refused: not authorized" is 0x0124 for N-services; C-STORE has 0xA7xx
#: "out of resources", 0xA9xx "data set does not match" and 0xCxxx "cannot
#: understand": a PACS retries none of them).
STORE_REFUSED = 0xC001
SERIES_UID_TAG = Tag("SeriesInstanceUID")
VERIFICATION = "1.2.840.10008.1.1"


class Arrivals:
    """The instances one retrieval has received so far.

    On the native transport, ``inbox`` is where the event loop leaves this
    retrieval's C-STOREs; the thread waiting for the retrieval answers them
    (see :class:`dqr.plugins.dimse.native.Inbox`).
    """

    def __init__(self, store: StoreCallback, native: bool = False) -> None:
        self._store = store
        self._changed = threading.Condition()
        self.received: set[str] = set()
        self.failures: list[BaseException] = []
        self.last_arrival = time.monotonic()
        self.inbox: Any = None
        if native:
            from dqr.plugins.dimse.native import Inbox

            self.inbox = Inbox(self.store_encoded)

    def handle_store(self, event: Any) -> int:
        """The pynetdicom C-STORE handler: store the instance, answer with a status."""
        request = event.request
        return self.store_encoded(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            request.DataSet.getvalue(),
        )

    def store_encoded(
        self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, dataset: bytes
    ) -> int:
        """Store one received instance; the C-STORE status to answer."""
        instance = ReceivedInstance(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            transfer_syntax=transfer_syntax,
            dataset=dataset,
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
        from dqr.plugins.dimse import native

        if self.inbox is not None and not native.STORE_ON_LOOP:
            while self.count < expected:
                left = self.last_arrival + idle_timeout - time.monotonic()
                if left <= 0:
                    return
                self.inbox.get(left)  # answers C-STOREs; anything else is over
            return
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


@dataclass(frozen=True)
class ExpectedMove:
    """A C-MOVE in flight: what its C-STOREs may carry."""

    arrivals: Arrivals
    series_uid: str
    #: The SOP Instance UIDs asked for, when known (else: any of the series).
    instance_uids: frozenset[str] | None
    #: The series' SOP classes, when known (else: any storage class).
    sop_classes: frozenset[str]


def expected_move(arrivals: Arrivals, request: RetrieveRequest) -> ExpectedMove:
    uids = request.sop_instance_uids or request.series.instance_uids
    return ExpectedMove(
        arrivals,
        request.series.series_uid,
        frozenset(uids) if uids else None,
        frozenset(request.series.sop_class_uids),
    )


class MoveRouting:
    """Which incoming C-STORE belongs to which C-MOVE in flight, and which
    are refused: dqr's storage SCP accepts associations only from the PACS's
    AE titles (``move_source_aets``) and instances only of a move in flight
    (its expected SOP Instance UIDs when known, else its series).

    Each C-STORE is routed by the Move Originator Message ID the PACS copies
    from the C-MOVE request; PACSes that omit it are routed by the instance.
    """

    def __init__(self, source_aets: frozenset[str]) -> None:
        self.source_aets = source_aets
        self._lock = threading.Lock()
        self._by_move_id: dict[int, ExpectedMove] = {}

    @contextmanager
    def expecting(self, move_id: int, arrivals: Arrivals, request: RetrieveRequest) -> Iterator[None]:
        with self._lock:
            self._by_move_id[move_id] = expected_move(arrivals, request)
        try:
            yield
        finally:
            with self._lock:
                self._by_move_id.pop(move_id, None)

    def allows(self, calling_aet: str) -> bool:
        return calling_aet.strip() in self.source_aets

    def sop_classes(self) -> frozenset[str] | None:
        """The SOP classes of the moves in flight; ``None``: any (one of them
        does not know its classes)."""
        with self._lock:
            moves = list(self._by_move_id.values())
        if any(not move.sop_classes for move in moves):
            return None
        return frozenset().union(*(move.sop_classes for move in moves))

    def route(
        self, move_id: int | None, sop_instance_uid: str, series_uid: Callable[[], str]
    ) -> tuple[Arrivals | None, str]:
        """``(arrivals, "")`` for an instance of a move in flight, else
        ``(None, why not)``."""
        with self._lock:
            moves = list(self._by_move_id.values())
            named = self._by_move_id.get(move_id) if move_id is not None else None
        if not moves:
            return None, "no C-MOVE is in flight"
        candidates = [named] if named is not None else moves
        for move in candidates:
            if move.instance_uids is not None and sop_instance_uid in move.instance_uids:
                return move.arrivals, ""
        unknown = [move for move in candidates if move.instance_uids is None]
        if unknown:
            try:
                found = series_uid()
            except Exception:  # noqa: BLE001 - e.g. deflated: cannot be checked, refused
                return None, "its series could not be read"
            for move in unknown:
                if move.series_uid == found:
                    return move.arrivals, ""
            return None, "it is not in a series being moved"
        return None, "it is not one of the instances being moved"


def refused(sop_instance_uid: str, calling_aet: str, peer: tuple[str, int] | Any, why: str) -> int:
    """Log a refused C-STORE (UIDs and addresses only: no PHI) and return
    the failure status to answer with."""
    host, port = (tuple(peer) + ("", 0))[:2] if peer else ("", 0)
    log.warning(
        "storage SCP: refused instance %s from AE %r at %s:%s: %s",
        sop_instance_uid, calling_aet, host, port, why,
    )
    return STORE_REFUSED


class MoveReceiver:
    """dqr's storage SCP for C-MOVE over pynetdicom: one per backend,
    started on first use; see :class:`MoveRouting` for what it accepts."""

    def __init__(
        self, aet: str, host: str, port: int, network_timeout: float, source_aets: frozenset[str],
        tls: Any = None,
    ) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        from dqr.plugins.dimse.network import NODELAY_SERVER_HANDLERS, accepted_transfer_syntaxes

        self.aet = aet
        self.routing = MoveRouting(source_aets)
        ae = AE(ae_title=aet)
        ae.network_timeout = network_timeout
        ae.maximum_associations = 64
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, accepted_transfer_syntaxes())
        self._server = ae.start_server(
            (host, port),
            block=False,
            ssl_context=tls,
            evt_handlers=[
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_C_STORE, self._on_store),
                *NODELAY_SERVER_HANDLERS,
            ],
        )
        self.host = host
        self.port = self._server.server_address[1]

    def expecting(self, move_id: int, arrivals: Arrivals, request: RetrieveRequest) -> Any:
        return self.routing.expecting(move_id, arrivals, request)

    def _on_requested(self, event: Any) -> None:
        requestor = event.assoc.requestor
        primitive = requestor.primitive  # ae_title is filled in only after negotiation
        calling = str(primitive.calling_ae_title if primitive else requestor.ae_title).strip()
        if not self.routing.allows(calling):
            log.warning(
                "storage SCP: rejected an association from AE %r at %s:%s: not one of move_source_aets",
                calling, requestor.address, requestor.port,
            )
            event.assoc.acse.send_reject(1, 1, 3)  # permanent, calling AE title not recognised
            event.assoc.kill()

    def _on_store(self, event: Any) -> int:
        request = event.request
        uid = str(request.AffectedSOPInstanceUID)
        calling = str(event.assoc.requestor.ae_title).strip()
        if not self.routing.allows(calling):
            return refused(uid, calling, event.assoc.requestor.address_info, "calling AE not allowed")
        arrivals, why = self.routing.route(
            request.MoveOriginatorMessageID,
            uid,
            lambda: _series_uid(request.DataSet.getvalue(), event.context.transfer_syntax),
        )
        if arrivals is None:
            address = (event.assoc.requestor.address, event.assoc.requestor.port)
            return refused(uid, calling, address, why)
        return arrivals.handle_store(event)

    @property
    def active_associations(self) -> list[Any]:
        return self._server.active_associations

    @property
    def sockets(self) -> list[Any]:
        return [a.dul.socket.socket for a in self._server.active_associations]

    def stop(self) -> None:
        self._server.shutdown()


class NativeMoveReceiver:
    """dqr's storage SCP for C-MOVE on the native transport's event loop.

    Negotiation accepts only the SOP classes of the moves in flight (plus
    Verification), so an association costs a handful of contexts rather
    than every storage class times every transfer syntax."""

    def __init__(
        self, aet: str, host: str, port: int, network_timeout: float, source_aets: frozenset[str],
        tls: Any = None,
    ) -> None:
        from dqr.plugins.dimse.native import StorageServer

        self.aet = aet
        self.routing = MoveRouting(source_aets)
        self.host = host
        self._server = StorageServer(host, port, self, network_timeout, tls)
        self.port = self._server.port

    def expecting(self, move_id: int, arrivals: Arrivals, request: RetrieveRequest) -> Any:
        return self.routing.expecting(move_id, arrivals, request)

    @property
    def sockets(self) -> list[Any]:
        return [
            link.transport.get_extra_info("socket")
            for link in list(self._server.links)
            if link.transport is not None and not link.closed
        ]

    # loop thread -------------------------------------------------------------
    def negotiate(self, link: Any, request: Any) -> None:
        from dqr.plugins.dimse import native
        from dqr.plugins.dimse.network import accepted_transfer_syntaxes

        calling = str(request.calling_ae_title).strip()
        if not self.routing.allows(calling):
            log.warning(
                "storage SCP: rejected an association from AE %r at %s:%s: not one of move_source_aets",
                calling, *link.peer[:2],
            )
            native.reject(link, 1, 1, 3)  # permanent, calling AE title not recognised
            return
        link.state = calling
        classes = self.routing.sop_classes()
        syntaxes = accepted_transfer_syntaxes()

        def accepted(abstract_syntax: str) -> list[str]:
            if abstract_syntax == VERIFICATION or classes is None or abstract_syntax in classes:
                return syntaxes
            return []

        native.accept(link, request, accepted)

    def route_store(self, link: Any, message: Any) -> None:
        from dqr.plugins.dimse import native

        uid = message.text(native.AFFECTED_SOP_INSTANCE)
        _, syntax = link.contexts.get(message.context_id, ("", ""))
        arrivals, why = self.routing.route(
            message.us(native.MOVE_ORIGINATOR_ID),
            uid,
            lambda: _series_uid(message.data or b"", syntax),
        )
        if arrivals is None or arrivals.inbox is None:
            native.answer_store(link, message, refused(uid, str(link.state), link.peer, why))
            return
        arrivals.inbox.put(link, "message", message)

    def stop(self) -> None:
        self._server.stop()


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
