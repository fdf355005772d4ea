"""``verify: commitment``: DICOM Storage Commitment (Push Model, PS3.4 J).

dqr asks with an N-ACTION (a transaction UID and the SOP Class/Instance UIDs
of the series) on an association of the destination's pool; the destination
answers later with an N-EVENT-REPORT, usually on an association it opens to
dqr (Orthanc always does). So dqr runs a small SCP of its own, under its
calling AE title on ``commitment_host:commitment_port``, which the
destination must know as a DICOM node (Orthanc: ``DicomModalities``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from dqr.errors import RemoteError
from dqr.model import Series, Study

if TYPE_CHECKING:
    from dqr.plugins.destinations.dimse_store import DimseDestination

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


class _Transaction:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.committed: set[str] = set()
        self.failed: dict[str, str] = {}


class CommitmentReceiver:
    """Receives N-EVENT-REPORTs and hands each to the transaction waiting for it."""

    def __init__(self, ae_title: str, host: str, port: int) -> None:
        from pynetdicom import AE, evt

        from dqr.plugins.dimse.network import NODELAY_SERVER_HANDLERS

        self._transactions: dict[str, _Transaction] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        # The destination is the requestor here, in the SCP role: accept either role it proposes.
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        handlers = [(evt.EVT_N_EVENT_REPORT, self._on_report), *NODELAY_SERVER_HANDLERS]
        self._server = ae.start_server((host, port), block=False, evt_handlers=handlers)
        self.port: int = self._server.server_address[1]

    def expect(self, transaction_uid: str) -> _Transaction:
        transaction = _Transaction()
        with self._lock:
            self._transactions[transaction_uid] = transaction
        return transaction

    def forget(self, transaction_uid: str) -> None:
        with self._lock:
            self._transactions.pop(transaction_uid, None)

    def _on_report(self, event: Any) -> tuple[int, None]:
        report = event.event_information
        uid = str(report.get("TransactionUID", ""))
        with self._lock:
            transaction = self._transactions.get(uid)
        if transaction is None:
            return 0x0000, None  # a late report of a transaction given up on
        for item in report.get("ReferencedSOPSequence", []):
            transaction.committed.add(str(item.ReferencedSOPInstanceUID))
        for item in report.get("FailedSOPSequence", []):
            reason = item.get("FailureReason")
            transaction.failed[str(item.ReferencedSOPInstanceUID)] = (
                f"FailureReason 0x{int(reason):04X}" if reason is not None else "failed"
            )
        transaction.done.set()
        return 0x0000, None

    def stop(self) -> None:
        self._server.shutdown()


def request_commitment(destination: DimseDestination, uids: list[str], study: Study, series: Series) -> list[str]:
    """Ask the destination to commit ``uids``; those it did not commit."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    config = destination.config
    receiver = destination.commitment_receiver()
    transaction_uid = generate_uid()
    request = Dataset()
    request.TransactionUID = transaction_uid
    # An instance sent by an earlier run: its class is the series' (one class per series, nearly always).
    known = [found for uid in uids if (found := destination.sop_class_of(uid))]
    fallback = known[0] if known else next(iter(sorted(series.sop_class_uids)), "")
    if not fallback:
        raise RemoteError(
            f"Storage Commitment needs the SOP Class UID of each instance and none of series "
            f"{series.series_uid} is known in this run: use `verify: true` to check it by C-FIND"
        )
    references = []
    for uid in uids:
        item = Dataset()
        item.ReferencedSOPClassUID = destination.sop_class_of(uid) or fallback
        item.ReferencedSOPInstanceUID = uid
        references.append(item)
    request.ReferencedSOPSequence = references
    transaction = receiver.expect(transaction_uid)
    where = destination.peer.where
    try:
        connection = destination.pool.acquire(None)
        broken = False
        try:
            if STORAGE_COMMITMENT_PUSH not in connection.abstract:
                raise RemoteError(
                    f"{where} does not accept Storage Commitment (Push Model): use `verify: true` or false"
                )
            status, _ = connection.assoc.send_n_action(
                request, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            if "Status" not in status:
                broken = True
                raise RemoteError(f"N-ACTION (Storage Commitment) to {where} got no answer", retriable=True)
            if int(status.Status) != 0x0000:
                raise RemoteError(f"{where} refused the Storage Commitment request: status 0x{int(status.Status):04X}")
        finally:
            destination.pool.release(connection, broken)
        if not transaction.done.wait(config.commitment_timeout):
            raise RemoteError(
                f"{where} sent no Storage Commitment result (N-EVENT-REPORT) within {config.commitment_timeout:g} s: "
                f"it must know dqr as AE {config.calling_aet!r} at this host, port {receiver.port} "
                "(commitment_port), e.g. in Orthanc's DicomModalities",
                retriable=True,
            )
    finally:
        receiver.forget(transaction_uid)
    return [uid for uid in uids if uid not in transaction.committed]
