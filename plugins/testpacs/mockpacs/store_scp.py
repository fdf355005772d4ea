"""A Storage SCP for destination tests (pynetdicom): keeps what it receives
in memory, answers C-ECHO and IMAGE-level C-FIND over it (so dqr can verify),
and injects faults.

Faults (``server.faults``, changeable while it runs): ``delay`` seconds
before each C-STORE response (slow acknowledgements); ``statuses`` maps a
SOP Instance UID to the status answered for it (a warning status still
stores it); ``abort_after`` aborts an association after that many C-STOREs
(``abort_times`` times); ``max_associations`` rejects associations beyond
that many at once; ``sop_classes`` accepts only those SOP classes.

Counters: ``stores`` (C-STORE requests per SOP Instance UID, refused ones
included), ``received`` (UID -> Part-10 bytes as stored),
``max_concurrent_associations``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dqr.plugins.testpacs.mockpacs.associations import CountedAssociations
from dqr.relabel import PREAMBLE, file_meta_bytes

WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


class _Mutable(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StoreFaults(_Mutable):
    delay: float = Field(0.0, ge=0, description="seconds before each C-STORE response")
    statuses: dict[str, int] = Field(default_factory=dict, description="SOP Instance UID -> status answered")
    abort_after: int | None = Field(None, ge=0, description="abort an association after this many C-STOREs")
    abort_times: int = Field(1, ge=0, description="how many associations the abort fault hits")
    max_associations: int | None = Field(None, ge=1, description="reject beyond this many at once")
    sop_classes: list[str] | None = Field(None, description="accept only these SOP classes (None: all storage)")


class Config(_Mutable):
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 = any free port")
    aet: str = "MOCKSTORE"
    faults: StoreFaults = Field(default_factory=StoreFaults)


class MockStorageScp(CountedAssociations):
    """A running Storage SCP; ``stop()`` when done."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.faults = config.faults
        self.aet = config.aet
        self.stores: Counter[str] = Counter()
        self.received: dict[str, bytes] = {}
        self._series: dict[str, tuple[str, str]] = {}
        self._per_association: Counter[int] = Counter()
        self._server = self._new_ae().start_server(
            (config.host, config.port), block=False, evt_handlers=self._handlers()
        )
        self.port: int = self._server.server_address[1]

    def _new_ae(self) -> Any:
        from pynetdicom import AE, AllStoragePresentationContexts
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

        from dqr.plugins.dimse.network import accepted_transfer_syntaxes

        ae = AE(ae_title=self.config.aet)
        ae.maximum_associations = 1000  # the limit fault is ours, counted exactly
        ae.network_timeout = 30
        ae.add_supported_context(Verification)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        allowed = self.faults.sop_classes
        for context in AllStoragePresentationContexts:
            if allowed is None or context.abstract_syntax in allowed:
                ae.add_supported_context(context.abstract_syntax, accepted_transfer_syntaxes())
        return ae

    def _handlers(self) -> list[tuple[Any, Any]]:
        from pynetdicom import evt

        from dqr.plugins.dimse.network import NODELAY_SERVER_HANDLERS

        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            *NODELAY_SERVER_HANDLERS,
        ]

    def _on_store(self, event: Any) -> int:
        request = event.request
        uid = str(request.AffectedSOPInstanceUID)
        with self._lock:
            self.stores[uid] += 1
            self._per_association[id(event.assoc)] += 1
            sent = self._per_association[id(event.assoc)]
            abort = (
                self.faults.abort_after is not None and self.faults.abort_times > 0 and sent > self.faults.abort_after
            )
            if abort:
                self.faults.abort_times -= 1
            status = self.faults.statuses.get(uid, 0x0000)
        if abort:
            event.assoc.abort()
            return 0xC000
        if self.faults.delay:
            time.sleep(self.faults.delay)
        if status == 0x0000 or status in WARNINGS:
            syntax = str(event.context.transfer_syntax)
            meta = file_meta_bytes(str(request.AffectedSOPClassUID), uid, syntax)
            dataset = request.DataSet.getvalue()
            identity = event.dataset  # decoded only for the C-FIND index
            with self._lock:
                self.received[uid] = PREAMBLE + meta + dataset
                self._series[uid] = (str(identity.StudyInstanceUID), str(identity.SeriesInstanceUID))
        return status

    def _on_find(self, event: Any):
        from pydicom.dataset import Dataset

        identifier = event.identifier
        study = str(identifier.get("StudyInstanceUID", ""))
        series = str(identifier.get("SeriesInstanceUID", ""))
        with self._lock:
            held = [uid for uid, (st, se) in self._series.items() if st == study and (not series or se == series)]
        for uid in held:
            answer = Dataset()
            answer.QueryRetrieveLevel = "IMAGE"
            answer.StudyInstanceUID = study
            answer.SeriesInstanceUID = self._series[uid][1]
            answer.SOPInstanceUID = uid
            yield 0xFF00, answer

    def forget(self, uids: list[str]) -> None:
        """Drop received instances (a destination that lost them)."""
        with self._lock:
            for uid in uids:
                self.received.pop(uid, None)
                self._series.pop(uid, None)

    def describe(self) -> str:
        return f"Storage SCP {self.aet} on {self.config.host}:{self.port} ({len(self.received)} instances received)"

    def stop(self) -> None:
        self._server.shutdown()


def serve(pacs: Any, config: Config) -> MockStorageScp:
    """Start a Storage SCP (``pacs`` is unused: it stores what it receives)."""
    return MockStorageScp(config)
