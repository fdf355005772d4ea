"""``destination: {type: dimse}``: C-STORE to a Storage SCP.

Every instance is sent as it arrives, on a pool of at most
``limits.max_associations`` associations shared by all series. An
association proposes one presentation context per (SOP class, transfer
syntax) pair actually received, so files go out exactly as they are (no
transcoding); a pair the SCP does not accept is a final error naming the
SOP class. A new pair closes an idle association and opens one proposing
every pair seen so far.

The dataset bytes are sent as they are, without decoding. Two DIMSE stacks
(``transport:``): ``native`` (the default) is dqr's own blocking-socket
requestor (:mod:`dqr.plugins.dimse.native_store`: one write and one read per
C-STORE, in the sending thread); ``pynetdicom`` builds the C-STORE request
on pynetdicom's association internals (:func:`_send_raw`: its
``send_c_store`` only sends undecoded bytes for a file on disk), and is the
default with ``tls:``.
"""

from __future__ import annotations

import logging
import threading
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from dqr.backend import DestinationContext, VerifyMode
from dqr.config import resolve_path
from dqr.errors import DestinationRefusedError, RemoteError
from dqr.model import Series, Study
from dqr.plugins.destinations import DimseDestinationConfig
from dqr.plugins.destinations.common import (
    STORE_WARNINGS,
    AcknowledgingWriter,
    NetworkDestination,
    Part10,
    describe_store_status,
    parse_part10,
)
from dqr.plugins.dimse.network import Peer, loaded_tls, tls_client_context, tls_files
from dqr.plugins.dimse.status import lost_response_error, status_error

log = logging.getLogger(__name__)

SUCCESS = 0x0000
#: Presentation contexts an association may carry (PS3.8: odd IDs 1..255).
MAX_CONTEXTS = 128


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


class DestinationPeer(Peer):
    @property
    def where(self) -> str:
        return f"destination {self.called_aet} at {self.host}:{self.port}"


class _Connection:
    """One open association and the (SOP class, transfer syntax) pairs it accepted."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.contexts: dict[tuple[str, str], int] = {}
        self.abstract: dict[str, int] = {}
        for context in assoc.accepted_contexts:
            if context.as_scu:
                self.contexts[(str(context.abstract_syntax), str(context.transfer_syntax[0]))] = context.context_id
                self.abstract.setdefault(str(context.abstract_syntax), context.context_id)
        self._message_id = 0

    def next_message_id(self) -> int:
        self._message_id = self._message_id % 65535 + 1
        return self._message_id

    @property
    def alive(self) -> bool:
        return bool(self.assoc.is_established)


class AssociationPool:
    """At most ``size`` associations to one peer, opened on demand with the
    pairs seen so far, kept open between series."""

    def __init__(
        self, peer: DestinationPeer, size: int, service_classes: list[str] = (), native: bool = False
    ) -> None:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

        self.peer = peer
        self.size = size
        self.native = native
        self._service_classes = [str(Verification), str(StudyRootQueryRetrieveInformationModelFind), *service_classes]
        self._known: dict[tuple[str, str], None] = {}
        self._idle: list[_Connection] = []
        self._open = 0
        self._condition = threading.Condition()
        self._ae = None if native else peer.new_ae()
        #: Cluster-wide (the queue executor): each open association holds a slot.
        self.cap: Any = None  # a dqr.throttle.ConnectionCap
        self._idle_since: dict[int, float] = {}
        self._closed = False

    def capped(self, cap: Any) -> None:
        """Hold one of ``cap``'s slots per open association; idle ones are
        closed after ``cap.idle`` seconds so that peers waiting get the slot."""
        self.cap = cap
        cap.start_reaper(self._reap)

    def _reap(self) -> bool:
        now = time.monotonic()
        with self._condition:
            if self._closed:
                return False
            stale = [c for c in self._idle if now - self._idle_since.get(id(c), now) >= self.cap.idle]
            for connection in stale:
                self._idle.remove(connection)
                self._open -= 1
            self._condition.notify_all()
        for connection in stale:
            self._close(connection)
        return True

    def acquire(self, pair: tuple[str, str] | None) -> _Connection:
        """An association carrying ``pair`` (any, for ``None``); waits while all are busy."""
        victim = None
        with self._condition:
            if pair is not None:
                self._known.setdefault(pair)
            while True:
                # Only the connection handed out is probed (a select(2) each):
                # a peer may have closed an idle one; the others wait their turn.
                for connection in [c for c in self._idle if pair is None or pair in c.contexts]:
                    self._idle.remove(connection)
                    if connection.alive:
                        return connection
                    self._forget(connection)
                if self._open < self.size:
                    self._open += 1
                    break
                if self._idle:  # all open ones lack the pair: replace an idle one
                    victim = self._idle.pop(0)
                    break
                self._condition.wait()
        if victim is not None:
            self._close(victim)
        try:
            return self._new_connection()
        except BaseException:
            with self._condition:
                self._open -= 1
                self._condition.notify_all()
            raise

    def _forget(self, connection: _Connection) -> bool:
        self._open -= 1
        if self.cap is not None:
            self.cap.closed(connection)
        return False

    def _new_connection(self) -> _Connection:
        from pynetdicom import build_context

        with self._condition:
            pairs = list(self._known)[-(MAX_CONTEXTS - len(self._service_classes)) :]
        contexts = [build_context(uid) for uid in self._service_classes]
        contexts += [build_context(sop_class, [syntax]) for sop_class, syntax in pairs]
        if self.native:
            from dqr.plugins.dimse.native import Timeouts
            from dqr.plugins.dimse.native_store import associate

            peer = self.peer

            def open_association() -> _Connection:
                return _Connection(
                    associate(peer.host, peer.port, peer.calling_aet, peer.called_aet, peer.where, contexts,
                              Timeouts(**peer.timeouts), peer.tls)
                )
        else:

            def open_association() -> _Connection:
                return _Connection(self.peer.associate(self._ae, contexts))

        if self.cap is not None:
            return self.cap.open(open_association)
        return open_association()

    def release(self, connection: _Connection, broken: bool = False) -> None:
        # One that was not broken has just answered: whether it is still
        # alive is asked when it is next acquired, not here as well.
        if self.cap is not None and not broken and not self.cap.keep_idle(connection):
            self._close(connection)  # it had its turn: the slot goes back to the cluster
            broken = True
        if broken:
            if connection.alive:
                connection.assoc.abort()
            if self.cap is not None:
                self.cap.closed(connection)
            with self._condition:
                self._open -= 1
                self._condition.notify_all()
            return
        with self._condition:
            self._idle.append(connection)
            self._idle_since[id(connection)] = time.monotonic()
            self._condition.notify_all()

    def _close(self, connection: _Connection) -> None:
        try:
            connection.assoc.release()
        except Exception:  # noqa: BLE001 - closing a connection the peer already dropped
            connection.assoc.abort()
        if self.cap is not None:
            self.cap.closed(connection)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for connection in idle:
            self._close(connection)


def _send(connection: _Connection, context_id: int, part: Part10, data: bytes, where: str, timeout: float) -> tuple[int, str]:
    """One C-STORE of a dataset's encoded bytes, on either transport: (status, error comment)."""
    from dqr.plugins.dimse.native_store import StoreAssociation

    assoc = connection.assoc
    if isinstance(assoc, StoreAssociation):
        return assoc.send_c_store(
            context_id, part.sop_class_uid, part.sop_instance_uid, memoryview(data)[part.dataset_offset :],
            connection.next_message_id(),
        )
    status = _send_raw(connection, context_id, part, data, where, timeout)
    if "Status" not in status:
        raise lost_response_error("C-STORE", where, timeout, aborted=True)
    return int(status.Status), str(status.get("ErrorComment", "") or "")


def _send_raw(connection: _Connection, context_id: int, part: Part10, data: bytes, where: str, timeout: float) -> Any:
    """One C-STORE on pynetdicom's association internals; the response's status Dataset."""
    from pynetdicom.dimse_primitives import C_STORE

    request = C_STORE()
    request.MessageID = connection.next_message_id()
    request.AffectedSOPClassUID = part.sop_class_uid
    request.AffectedSOPInstanceUID = part.sop_instance_uid
    request.Priority = 2  # low: a bulk transfer
    request.DataSet = BytesIO(data[part.dataset_offset :])
    assoc = connection.assoc
    # As send_c_store: pause the reactor so that it cannot take the response.
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused:
            if not assoc.is_established:
                raise lost_response_error("C-STORE", where, timeout, aborted=True)
            time.sleep(0.0001)
        assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        raise lost_response_error("C-STORE", where, timeout, aborted=assoc.is_aborted)
    return assoc._check_received_status(response)


class DimseDestination(NetworkDestination):
    """A :class:`dqr.backend.Destination` sending by C-STORE."""

    def __init__(self, config: DimseDestinationConfig, context: DestinationContext) -> None:
        self.config = config
        self.xnat_routing = config.xnat_routing
        self.verify_mode = (
            VerifyMode.COMMITMENT if config.verify == "commitment" else VerifyMode.QUERY if config.verify else VerifyMode.OFF
        )
        base = Path(context.config_dir or Path(context.archive).parent)
        tls = None
        if config.tls is not None:
            files = tls_files(config.tls, lambda value: resolve_path(value, base), "destination.tls")
            tls = loaded_tls(lambda: tls_client_context(*files), "destination.tls")
        timeouts = {
            "connect": config.connect_timeout,
            "acse": config.acse_timeout,
            "dimse": config.dimse_timeout,
            "network": config.network_timeout,
        }
        self.peer = DestinationPeer(config.host, config.port, config.called_aet, config.calling_aet, timeouts, tls)
        from dqr.plugins.destinations.commitment import STORAGE_COMMITMENT_PUSH

        commitment = [STORAGE_COMMITMENT_PUSH] if self.verify_mode is VerifyMode.COMMITMENT else []
        self.pool = AssociationPool(
            self.peer, config.limits.max_associations, commitment, native=config.effective_transport == "native"
        )
        self._share(context, config.limits, config.limits.max_associations, f"{self.peer.where} C-STOREs")
        self._refused_pairs: dict[tuple[str, str], str] = {}
        self._commitment: Any = None
        self._sop_classes: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- the Destination protocol ----------------------------------------------------

    def describe(self) -> str:
        return f"{self.peer.where} (C-STORE)"

    def echo(self) -> str:
        def once() -> str:
            connection = self.pool.acquire(None)
            broken = False
            try:
                if "1.2.840.10008.1.1" not in connection.abstract:
                    raise RemoteError(f"{self.peer.where} does not accept C-ECHO (Verification)")
                status = connection.assoc.send_c_echo()
                if not connection.alive or "Status" not in status:
                    broken = True
                    raise lost_response_error("C-ECHO", self.peer.where, self.config.dimse_timeout, aborted=True)
                if status.Status != SUCCESS:
                    raise status_error("C-ECHO", int(status.Status), self.peer.where)
            finally:
                self.pool.release(connection, broken)
            return f"{self.describe()}: C-ECHO answered"

        return self._call(once)

    def verify(self, study: Study, series: Series, sop_instance_uids: list[str]) -> list[str]:
        if self.verify_mode is VerifyMode.OFF or not sop_instance_uids:
            return []
        if self.verify_mode is VerifyMode.COMMITMENT:
            from dqr.plugins.destinations.commitment import request_commitment

            missing = self._call(lambda: request_commitment(self, sop_instance_uids, study, series))
        else:
            held = self._call(lambda: self._find_instances(study, series))
            missing = [uid for uid in sop_instance_uids if uid not in held]
        return self._note_missing(study, series, missing)

    def cap_connections(self, cap) -> None:
        """Cluster-wide: every open association, idle ones included, holds one
        of the cluster's ``max_associations`` slots."""
        from dqr.throttle import ConnectionCap

        self.pool.capped(ConnectionCap(cap("associations", self.config.limits.max_associations)))

    def close(self) -> None:
        self.pool.close()
        if self._commitment is not None:
            self._commitment.stop()

    def commitment_receiver(self):
        """dqr's N-EVENT-REPORT receiver, started on first use."""
        from dqr.plugins.destinations.commitment import CommitmentReceiver

        with self._lock:
            if self._commitment is None:
                self._commitment = CommitmentReceiver(
                    self.config.calling_aet, self.config.commitment_host, self.config.commitment_port
                )
            return self._commitment

    def sop_class_of(self, sop_instance_uid: str) -> str | None:
        return self._sop_classes.get(sop_instance_uid)

    # -- sending -----------------------------------------------------------------------

    def store(self, data: bytes) -> str | None:
        """C-STORE one Part-10 file; its warning, if any. Retries what may
        pass later; raises :class:`DestinationRefusedError` on a refusal."""
        part = parse_part10(data)
        self._sop_classes[part.sop_instance_uid] = part.sop_class_uid
        return self._call(lambda: self._store_once(part, data))

    def _store_once(self, part: Part10, data: bytes) -> str | None:
        pair = (part.sop_class_uid, part.transfer_syntax)
        if pair in self._refused_pairs:
            raise self._refusal(part, self._refused_pairs[pair])
        connection = self.pool.acquire(pair)
        broken = False
        try:
            context_id = connection.contexts.get(pair)
            if context_id is None:
                reason = (
                    f"{self.peer.where} does not accept {_uid_name(part.sop_class_uid)} in "
                    f"{_uid_name(part.transfer_syntax)} (presentation context not accepted); "
                    "its administrator must allow that SOP class and transfer syntax"
                )
                self._refused_pairs[pair] = reason
                raise self._refusal(part, reason)
            try:
                code, comment = _send(connection, context_id, part, data, self.peer.where, self.config.dimse_timeout)
            except RemoteError:
                broken = True
                raise
        finally:
            self.pool.release(connection, broken)
        if code == SUCCESS:
            return None
        if code in STORE_WARNINGS:
            return f"{describe_store_status(code)}" + (f": {comment}" if comment else "")
        reason = f"{self.peer.where} refused the instance: C-STORE status {describe_store_status(code)}"
        if comment:
            reason += f" -- {comment}"
        if 0xA700 <= code <= 0xA7FF:
            raise DestinationRefusedError(reason, failed={part.sop_instance_uid: reason}, slow_down=True)
        raise self._refusal(part, reason)

    def _refusal(self, part: Part10, reason: str) -> DestinationRefusedError:
        return DestinationRefusedError(reason, failed={part.sop_instance_uid: reason})

    def _find_instances(self, study: Study, series: Series) -> set[str]:
        from pydicom.dataset import Dataset
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = study.study_uid
        identifier.SeriesInstanceUID = series.series_uid
        identifier.SOPInstanceUID = ""
        connection = self.pool.acquire(None)
        broken = False
        held: set[str] = set()
        try:
            if str(StudyRootQueryRetrieveInformationModelFind) not in connection.abstract:
                raise RemoteError(
                    f"{self.peer.where} does not answer C-FIND (Study Root) to verify what it holds: "
                    "set `verify: false` (or `verify: commitment` if it supports Storage Commitment)"
                )
            for status, answer in connection.assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
                if "Status" not in status:
                    broken = True
                    raise lost_response_error("C-FIND", self.peer.where, self.config.dimse_timeout, aborted=True)
                code = int(status.Status)
                if code in (0xFF00, 0xFF01):
                    if answer is not None and "SOPInstanceUID" in answer:
                        held.add(str(answer.SOPInstanceUID))
                elif code != SUCCESS:
                    raise status_error("C-FIND", code, self.peer.where)
        finally:
            self.pool.release(connection, broken)
        return held


class DimseSeriesWriter(AcknowledgingWriter):
    """Sends one series' instances as they come (a :class:`dqr.backend.SeriesWriter`)."""

    def write(self, sop_instance_uid: str, part10: bytes, replaced: dict[str, str]) -> None:
        warning = self.destination.store(part10)
        if warning:
            log.warning("%s stored %s with a warning: %s", self.destination.describe(), sop_instance_uid, warning)
        self.acknowledged.acknowledged(
            [(sop_instance_uid, len(part10), replaced)], {sop_instance_uid: warning} if warning else None
        )

    def commit(self) -> list[str]:
        return self.acknowledged.take()


DimseDestination.writer = DimseSeriesWriter
