"""The in-memory PACS served as a real DIMSE Query/Retrieve SCP (pynetdicom):
C-ECHO, C-FIND (Study and Patient Root, every level), C-GET and C-MOVE to the
destinations of its config, with fault injection for reliability tests.

Faults live in ``server.faults`` and may be changed while it runs (``hostile``:
hostile content, see :mod:`dqr.plugins.testpacs.memory.hostile`); the
``times`` of a fault counts down as it fires (``None``: every time).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from io import BytesIO
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dqr.plugins.testpacs.memory.hostile import HostileFaults, deliveries, rewrite
from dqr.plugins.testpacs.memory.pacs import MemoryPacs, StoredInstance
from dqr.plugins.testpacs.mockpacs.associations import CountedAssociations

#: Reject reason -> (source, diagnostic) of the A-ASSOCIATE-RJ.
REJECT_REASONS = {
    "no-reason": (1, 1),
    "calling-aet": (1, 3),
    "called-aet": (1, 7),
    "congestion": (3, 1),
    "local-limit": (3, 2),
}
#: Seconds a retrieval waits for the others of a ``meet`` fault before it goes on alone.
MEET_TIMEOUT = 10.0
#: Keys of an identifier that are not matching or return keys.
NOT_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})


class _Mutable(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RejectFault(_Mutable):
    times: int | None = Field(None, description="associations to reject; None = all")
    transient: bool = True
    reason: Literal["no-reason", "calling-aet", "called-aet", "congestion", "local-limit"] = (
        "congestion"
    )


class StatusFault(_Mutable):
    service: Literal["C-FIND", "C-GET", "C-MOVE"]
    status: int = Field(0xA702, description="final status sent instead of answering")
    times: int | None = Field(None, description="requests answered so; None = all")


class AbortFault(_Mutable):
    after_stores: int = Field(1, ge=0, description="C-STORE sub-operations sent before the A-ABORT")
    times: int | None = 1


class TransportFaults(_Mutable):
    """Faults of the association itself (issue 13), kept apart from the
    content faults: how the PACS negotiates, not what it sends."""

    refuse_get: Literal["context", "role"] | None = Field(
        None,
        description="C-GET refused at negotiation: its presentation context (context), "
        "or dqr's SCP role for the storage contexts (role)",
    )
    max_pdu: int | None = Field(
        None, ge=4096, description="largest PDU the PACS receives (A-ASSOCIATE max length)"
    )


class Faults(_Mutable):
    transport: TransportFaults = Field(default_factory=TransportFaults)
    delay: float = Field(0.0, ge=0, description="seconds before each response / sub-operation")
    reject: RejectFault | None = None
    abort: AbortFault | None = None
    statuses: list[StatusFault] = Field(default_factory=list)
    max_associations: int | None = Field(None, ge=1, description="reject beyond this many at once")
    meet: int | None = Field(
        None,
        ge=1,
        description="retrievals (C-GET/C-MOVE) hold their first sub-operation until this many are "
        "in progress at once (or MEET_TIMEOUT passed); then none waits again until reset. "
        "Retrievals dqr may overlap then do overlap, however loaded the machine",
    )
    hostile: HostileFaults = Field(default_factory=HostileFaults, description="hostile content (UID rewrites apply at start)")


class Destination(_Mutable):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)


class Config(_Mutable):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 = any free port")
    aet: str = "MOCKPACS"
    destinations: dict[str, Destination] = Field(
        default_factory=dict, description="C-MOVE: AE title -> address"
    )
    faults: Faults = Field(default_factory=Faults)


def _take(fault: Any) -> bool:
    """Whether a fault with a ``times`` budget fires now (and spend one)."""
    if fault is None:
        return False
    if fault.times is None:
        return True
    if fault.times <= 0:
        return False
    fault.times -= 1
    return True


class MockDimseServer(CountedAssociations):
    """A running Query/Retrieve SCP over a :class:`MemoryPacs`."""

    def __init__(self, pacs: MemoryPacs, config: Config) -> None:
        super().__init__()
        self.pacs = rewrite(pacs, config.faults.hostile)
        self.config = config
        self.faults = config.faults
        self.aet = config.aet
        self.requests: Counter[str] = Counter()
        self._retrieving = 0
        self._met = False
        self._meeting = threading.Condition()
        self._initial = config.model_copy(deep=True)
        self._server = self._new_ae().start_server(
            (config.host, config.port), block=False, evt_handlers=self._handlers()
        )
        self.port: int = self._server.server_address[1]

    # -- setup -------------------------------------------------------------------

    def _new_ae(self) -> Any:
        from pynetdicom import AE, AllStoragePresentationContexts
        from pynetdicom.sop_class import (
            PatientRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelGet,
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
            Verification,
        )

        from dqr.plugins.dimse.network import accepted_transfer_syntaxes

        ae = AE(ae_title=self.config.aet)
        ae.maximum_associations = 1000  # the limit fault is ours, counted exactly
        ae.network_timeout = 30
        for model in (
            Verification,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelGet,
            PatientRootQueryRetrieveInformationModelMove,
        ):
            ae.add_supported_context(model)
        # C-GET: the requestor is the storage SCP, so accept its SCP role.
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(
                context.abstract_syntax, accepted_transfer_syntaxes(), scu_role=False, scp_role=True
            )
        return ae

    def _handlers(self) -> list[tuple[Any, Any]]:
        from pynetdicom import evt

        from dqr.plugins.dimse.network import NODELAY_SERVER_HANDLERS

        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
            *NODELAY_SERVER_HANDLERS,
        ]

    # -- associations --------------------------------------------------------------

    def _accepted(self, assoc: Any) -> None:
        self._apply_transport_faults(assoc)

    def _apply_transport_faults(self, assoc: Any) -> None:
        """Negotiation faults, on this association's copy of the contexts
        (EVT_REQUESTED comes before the acceptor negotiates)."""
        from pynetdicom.sop_class import (
            PatientRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelGet,
        )

        faults = self.faults.transport
        if faults.max_pdu is not None:
            assoc.acceptor.maximum_length = faults.max_pdu
        if faults.refuse_get == "context":
            get_models = {StudyRootQueryRetrieveInformationModelGet, PatientRootQueryRetrieveInformationModelGet}
            assoc.acceptor.supported_contexts = [
                cx for cx in assoc.acceptor.supported_contexts if cx.abstract_syntax not in get_models
            ]
        elif faults.refuse_get == "role":
            for cx in assoc.acceptor.supported_contexts:
                if cx.scp_role:
                    cx.scu_role, cx.scp_role = None, None  # no role selection: dqr stays SCU

    def _reject_for(self, active: int) -> tuple[int, int, int] | None:
        limited = super()._reject_for(active)
        if limited is not None:
            return limited
        fault = self.faults.reject
        if _take(fault):
            assert fault is not None
            return (2 if fault.transient else 1, *REJECT_REASONS[fault.reason])
        return None

    # -- services ------------------------------------------------------------------

    def _count(self, service: str) -> None:
        with self._lock:
            self.requests[service] += 1

    def _status_fault(self, service: str) -> int | None:
        with self._lock:
            for fault in self.faults.statuses:
                if fault.service == service and _take(fault):
                    return fault.status
        return None

    def _delay(self) -> None:
        if self.faults.delay:
            time.sleep(self.faults.delay)

    def _on_echo(self, event: Any) -> int:
        self._count("C-ECHO")
        self._delay()
        return 0x0000

    def _on_find(self, event: Any) -> Iterator[tuple[int, Any]]:
        self._count("C-FIND")
        status = self._status_fault("C-FIND")
        if status is not None:
            self._delay()
            yield status, None
            return
        identifier = event.identifier
        level = str(identifier.QueryRetrieveLevel)
        keys = [
            elem.keyword for elem in identifier if elem.keyword and elem.keyword not in NOT_KEYS
        ]
        for attributes in self.pacs.find(level, _filters(identifier)):
            if event.is_cancelled:
                yield 0xFE00, None
                return
            self._delay()
            yield 0xFF00, _answer(level, keys, attributes)

    def _selected(self, identifier: Any) -> list[StoredInstance]:
        filters = _filters(identifier)
        uids = filters.get("SOPInstanceUID")
        study_uid, series_uid = filters.get("StudyInstanceUID", ""), filters.get("SeriesInstanceUID") or None
        asked = list(self.pacs.instances(study_uid, series_uid, uids.split("\\") if uids else None))
        return deliveries(self.pacs, self.faults.hostile, study_uid, series_uid, asked)

    def _sub_operations(
        self, event: Any, instances: list[StoredInstance]
    ) -> Iterator[tuple[int, Any]]:
        """C-STORE sub-operations, with the meet and abort faults."""
        with self._meeting:
            self._retrieving += 1
            self._meeting.notify_all()
        try:
            self._meet()
            yield from self._stores(event, instances)
        finally:
            with self._meeting:
                self._retrieving -= 1

    def _meet(self) -> None:
        with self._meeting:
            wanted = self.faults.meet
            if wanted is None or self._met:
                return
            self._meeting.wait_for(lambda: self._retrieving >= wanted, timeout=MEET_TIMEOUT)
            self._met = True  # met or waited out: the later retrievals go straight on

    def _stores(self, event: Any, instances: list[StoredInstance]) -> Iterator[tuple[int, Any]]:
        abort = self.faults.abort
        abort_after = abort.after_stores if abort is not None and _take(abort) else None
        for sent, instance in enumerate(instances):
            if abort_after is not None and sent >= abort_after:
                event.assoc.abort()
                return
            if event.is_cancelled:
                yield 0xFE00, None
                return
            self._delay()
            self._count("C-STORE")
            yield 0xFF00, _dataset(instance)

    def _on_get(self, event: Any) -> Iterator[Any]:
        self._count("C-GET")
        status = self._status_fault("C-GET")
        instances = self._selected(event.identifier)
        if status is not None:
            yield 1
            yield status, None
            return
        yield len(instances)
        yield from self._sub_operations(event, instances)

    def _on_move(self, event: Any) -> Iterator[Any]:
        from dqr.plugins.dimse.network import NODELAY_SERVER_HANDLERS

        self._count("C-MOVE")
        destination = self.config.destinations.get(str(event.move_destination).strip())
        if destination is None:
            yield None, None  # pynetdicom answers 0xA801
            return
        instances = self._selected(event.identifier)
        yield (
            destination.host,
            destination.port,
            {
                "evt_handlers": [*NODELAY_SERVER_HANDLERS, *_sub_association_handlers()],
                "contexts": _storage_contexts(instances),
            },
        )
        status = self._status_fault("C-MOVE")
        if status is not None:
            yield 1
            yield status, None
            return
        yield len(instances)
        yield from self._sub_operations(event, instances)

    # -- the server ----------------------------------------------------------------

    def reset(self) -> None:
        """Back to the configured faults and destinations, counters at zero
        (lets tests share one server: stopping one takes ~0.5 s)."""
        with self._lock:
            initial = self._initial.model_copy(deep=True)
            self.config.destinations = initial.destinations
            self.faults = initial.faults
            self.requests.clear()
            self.max_concurrent_associations = len(self._active)
        with self._meeting:
            self._met = False

    def add_destination(self, aet: str, host: str, port: int) -> None:
        """Make ``aet`` a known C-MOVE destination."""
        self.config.destinations[aet] = Destination(host=host, port=port)

    def describe(self) -> str:
        return (
            f"DIMSE Query/Retrieve SCP {self.aet} on {self.config.host}:{self.port} "
            f"({len(self.pacs)} instances of {len(self.pacs.study_uids())} studies)"
        )

    def stop(self) -> None:
        self._server.shutdown()


def _filters(identifier: Any) -> dict[str, str]:
    filters = {}
    for elem in identifier:
        if not elem.keyword or elem.keyword in NOT_KEYS or elem.value in (None, ""):
            continue
        value = elem.value
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            filters[elem.keyword] = "\\".join(str(v) for v in value)
        else:
            filters[elem.keyword] = str(value)
    return filters


def _answer(level: str, keys: list[str], attributes: dict[str, Any]) -> Any:
    from pydicom import config
    from pydicom.dataset import Dataset

    answer = Dataset()
    answer.SpecificCharacterSet = "ISO_IR 192"
    answer.QueryRetrieveLevel = level
    with config.disable_value_validation():  # the mock answers what it holds, hostile values included
        for keyword in keys:
            value = attributes.get(keyword, "")
            setattr(answer, keyword, list(value) if isinstance(value, tuple) else value)
    return answer


def _storage_contexts(instances: list[StoredInstance]) -> list[Any]:
    """What to propose to a move destination: each SOP class being sent, in
    its stored transfer syntax or uncompressed."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import build_context
    from pynetdicom.sop_class import Verification

    syntaxes: dict[str, set[str]] = {}
    for instance in instances:
        syntaxes.setdefault(
            instance.sop_class_uid, {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
        ).add(instance.transfer_syntax)
    contexts = [
        build_context(sop_class, sorted(found)) for sop_class, found in sorted(syntaxes.items())
    ]
    return contexts[:128] or [build_context(Verification)]


def _keep_responses_for_the_sender(event: Any) -> None:
    """Work around a race in pynetdicom's requestor (3.0): ``send_c_store``
    pauses the association's reactor thread by clearing an event and
    waiting for a flag the reactor sets *before* it checks that event, so
    the reactor may run one more turn after the request went out. A storage
    SCP that answers within that turn (dqr's native transport answers on
    its event loop, in microseconds) has its C-STORE-RSP taken by the
    reactor, which drops it as "unexpected C-STORE service message"; the
    sub-operation then waits dimse_timeout and dqr's C-MOVE times out
    (seen as a rare flake of test_c_move_delivers_the_series[native]).

    Bound to the C-MOVE sub-association (EVT_ESTABLISHED fires before its
    reactor starts): a response the reactor takes is put back where
    ``send_c_store`` waits for it."""
    assoc = event.assoc
    serve_request = assoc._serve_request

    def serve_requests_only(msg: Any, context_id: int) -> None:
        if msg.is_valid_response:
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve_request(msg, context_id)

    assoc._serve_request = serve_requests_only


def _sub_association_handlers() -> list[tuple[Any, Any]]:
    from pynetdicom import evt

    return [(evt.EVT_ESTABLISHED, _keep_responses_for_the_sender)]


def _dataset(instance: StoredInstance) -> Any:
    from pydicom import dcmread

    return dcmread(BytesIO(instance.read_part10()))


def serve(pacs: MemoryPacs, config: Config) -> MockDimseServer:
    """Start serving ``pacs`` (returns at once; call ``.stop()``)."""
    return MockDimseServer(pacs, config)
