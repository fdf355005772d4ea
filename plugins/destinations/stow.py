"""``destination: {type: dicomweb}``: STOW-RS to a DICOMweb server.

Each series is sent in batches: instances are buffered until the next one
would take the batch past ``batch_bytes`` (or the series is committed), then
one ``POST <url>/studies`` carries the batch as ``multipart/related;
type="application/dicom"``. The body is streamed from the buffered parts (no
joined copy). An instance counts as stored only when the answer lists it in
ReferencedSOPSequence; those in FailedSOPSequence fail with their
FailureReason; HTTP errors are classified as for a DICOMweb source
(:mod:`dqr.plugins.dicomweb.http_errors`).
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from dqr.backend import DestinationContext, VerifyMode
from dqr.config import resolve_path
from dqr.errors import DestinationRefusedError, RemoteError
from dqr.model import Series, Study
from dqr.plugins.destinations import DicomwebDestinationConfig
from dqr.plugins.destinations.common import (
    AcknowledgedSeries,
    AcknowledgingWriter,
    NetworkDestination,
    describe_store_status,
)
from dqr.plugins.dicomweb.credentials import credential_keys, make_auth
from dqr.plugins.dicomweb.http_errors import Operation, error_for_exception, error_for_status

log = logging.getLogger(__name__)

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
SOP_INSTANCE_UID = "00080018"
QIDO_PAGE = 1000
CHUNK = 1024 * 1024


class MultipartBody:
    """A ``multipart/related`` body read part by part: requests sends it with
    a Content-Length (some servers refuse chunked uploads) without a joined copy."""

    def __init__(self, parts: list[bytes], boundary: str) -> None:
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        self._pieces: list[bytes | memoryview] = []
        for part in parts:
            self._pieces += [head, memoryview(part), b"\r\n"]
        self._pieces.append(f"--{boundary}--\r\n".encode())
        self.len = sum(len(piece) for piece in self._pieces)
        self._index = 0
        self._offset = 0

    def __len__(self) -> int:
        return self.len

    def read(self, size: int = -1) -> bytes:
        out = []
        wanted = self.len if size is None or size < 0 else size
        while wanted > 0 and self._index < len(self._pieces):
            piece = self._pieces[self._index]
            chunk = piece[self._offset : self._offset + wanted]
            out.append(bytes(chunk))
            wanted -= len(chunk)
            self._offset += len(chunk)
            if self._offset >= len(piece):
                self._index += 1
                self._offset = 0
        return b"".join(out)


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    element = item.get(tag)
    return element.get("Value", []) if isinstance(element, dict) else []


def parse_stow_answer(body: Any) -> tuple[set[str], dict[str, str], dict[str, str]]:
    """(acknowledged UIDs, failed UID -> reason, acknowledged UID -> warning) from a STOW-RS answer."""
    if isinstance(body, list):  # some servers wrap the one dataset in a list
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return set(), {}, {}
    acked, failed, warnings = set(), {}, {}
    for item in _values(body, REFERENCED_SOP_SEQUENCE):
        uids = _values(item, REFERENCED_SOP_INSTANCE_UID)
        if uids:
            acked.add(str(uids[0]))
            reason = _values(item, WARNING_REASON)
            if reason:
                warnings[str(uids[0])] = describe_store_status(int(reason[0]))
    for item in _values(body, FAILED_SOP_SEQUENCE):
        uids = _values(item, REFERENCED_SOP_INSTANCE_UID)
        if uids:
            reason = _values(item, FAILURE_REASON)
            failed[str(uids[0])] = (
                f"FailureReason {describe_store_status(int(reason[0]))}" if reason else "in FailedSOPSequence"
            )
    return acked, failed, warnings


class StowDestination(NetworkDestination):
    """A :class:`dqr.backend.Destination` sending by STOW-RS."""

    def __init__(self, config: DicomwebDestinationConfig, context: DestinationContext) -> None:
        self.config = config
        self.url = config.url
        self.xnat_routing = config.xnat_routing
        self.verify_mode = VerifyMode.QUERY if config.verify else VerifyMode.OFF
        base = Path(context.config_dir or Path(context.archive).parent)
        self.session = requests.Session()
        self.session.auth = make_auth(config.auth, "", base, section="destination")
        self.credentials = credential_keys(config.auth, "", section="destination")
        if config.ca_bundle is not None:
            self.session.verify = str(resolve_path(config.ca_bundle, base))
        else:
            self.session.verify = config.verify_tls
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=config.limits.max_requests)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.timeout = (config.connect_timeout, config.read_timeout)
        self._share(context, config.limits, config.limits.max_requests, f"{self.describe()} requests")

    def _operation(self, what: str, path: str) -> Operation:
        return Operation(what, f"{self.url}{path}", "", self.credentials, section="destination")

    # -- the Destination protocol ----------------------------------------------------

    def describe(self) -> str:
        return f"DICOMweb destination {self.url} (STOW-RS)"

    def echo(self) -> str:
        self._call(lambda: self._get("QIDO-RS echo", "/studies", {"limit": "1"}))
        return f"{self.describe()}: QIDO-RS answered"

    def verify(self, study: Study, series: Series, sop_instance_uids: list[str]) -> list[str]:
        if self.verify_mode is VerifyMode.OFF or not sop_instance_uids:
            return []
        held = self._call(lambda: self._instances_of(study, series))
        return self._note_missing(study, series, [uid for uid in sop_instance_uids if uid not in held])

    def cap_connections(self, cap) -> None:
        """Cluster-wide: each request in flight holds one of the cluster's
        ``max_requests`` slots (inside this process's adaptive limit)."""
        from dqr.cluster_limits import CappedLimit

        self.limit = CappedLimit(self.limit, cap("requests", self.config.limits.max_requests))

    def close(self) -> None:
        self.session.close()

    # -- requests ----------------------------------------------------------------------

    def _get(self, what: str, path: str, params: dict[str, str]) -> requests.Response:
        op = self._operation(what, path)
        try:
            response = self.session.get(
                self.url + path, params=params, headers={"Accept": "application/dicom+json"}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise error_for_exception(exc, op) from None
        if response.status_code not in (200, 204) and not (response.status_code == 404 and "/series/" in path):
            raise error_for_status(response, op)
        return response

    def _instances_of(self, study: Study, series: Series) -> set[str]:
        path = f"/studies/{study.study_uid}/series/{series.series_uid}/instances"
        held: set[str] = set()
        offset = 0
        while True:
            params = {"includefield": SOP_INSTANCE_UID, "limit": str(QIDO_PAGE), "offset": str(offset)}
            response = self._get("QIDO-RS verify", path, params)
            if response.status_code != 200 or not response.content:
                return held
            try:
                answers = response.json()
            except ValueError:
                raise RemoteError(f"QIDO-RS verify: {self.url}{path} answered something that is not JSON") from None
            for item in answers if isinstance(answers, list) else []:
                uids = _values(item, SOP_INSTANCE_UID) if isinstance(item, dict) else []
                if uids:
                    held.add(str(uids[0]))
            if not isinstance(answers, list) or len(answers) < QIDO_PAGE:
                return held
            offset += QIDO_PAGE

    def post(self, batch: list[tuple[str, bytes]]) -> tuple[set[str], dict[str, str], dict[str, str]]:
        """One STOW-RS request; (acknowledged, failed -> reason, warnings).
        Retries what may pass later (connection lost, 5xx, 429/503)."""
        return self._call(lambda: self._post_once(batch))

    def _post_once(self, batch: list[tuple[str, bytes]]) -> tuple[set[str], dict[str, str], dict[str, str]]:
        boundary = f"dqr-{uuid.uuid4().hex}"
        body = MultipartBody([data for _, data in batch], boundary)
        op = self._operation("STOW-RS", "/studies")
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            response = self.session.post(self.url + "/studies", data=body, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            error = error_for_exception(exc, op)
            raise DestinationRefusedError(
                str(error), failed={uid: str(error) for uid, _ in batch}, retriable=error.retriable,
                unreachable=error.unreachable,
            ) from None
        try:
            answer = response.json() if response.content else {}
        except ValueError:
            answer = {}
        acked, failed, warnings = parse_stow_answer(answer)
        if response.status_code not in (200, 202):
            error = error_for_status(response, op)
            reasons = {uid: failed.get(uid, str(error)) for uid, _ in batch}
            raise DestinationRefusedError(
                str(error), failed=reasons, retriable=error.retriable, slow_down=error.slow_down,
                retry_after=error.retry_after,
            )
        sent = {uid for uid, _ in batch}
        for uid in sent - acked - set(failed):
            failed[uid] = f"HTTP {response.status_code}: not in the answer's ReferencedSOPSequence"
        return acked & sent, {uid: reason for uid, reason in failed.items() if uid in sent}, warnings


class StowSeriesWriter(AcknowledgingWriter):
    """Batches one series' instances into STOW-RS requests (a :class:`dqr.backend.SeriesWriter`)."""

    def __init__(self, destination: StowDestination, acknowledged: AcknowledgedSeries) -> None:
        super().__init__(destination, acknowledged)
        self.limit = destination.config.batch_bytes
        self._batch: list[tuple[str, bytes, dict[str, str]]] = []
        self._batch_bytes = 0
        self._lock = threading.Lock()

    def write(self, sop_instance_uid: str, part10: bytes, replaced: dict[str, str]) -> None:
        full = None
        with self._lock:
            if self._batch and self._batch_bytes + len(part10) > self.limit:
                full, self._batch, self._batch_bytes = self._batch, [], 0
            self._batch.append((sop_instance_uid, part10, replaced))
            self._batch_bytes += len(part10)
        if full:
            self._send(full)

    def commit(self) -> list[str]:
        with self._lock:
            rest, self._batch, self._batch_bytes = self._batch, [], 0
        try:
            if rest:
                self._send(rest)
        except DestinationRefusedError as error:
            error.stored = self.acknowledged.take()
            raise
        return self.acknowledged.take()

    def _send(self, batch: list[tuple[str, bytes, dict[str, str]]]) -> None:
        """Send a batch; acknowledged instances are recorded whatever happens to the others."""
        acked, failed, warnings = self.destination.post([(uid, data) for uid, data, _ in batch])
        self.acknowledged.acknowledged(
            [(uid, len(data), replaced) for uid, data, replaced in batch if uid in acked],
            {uid: text for uid, text in warnings.items() if uid in acked},
        )
        for uid, text in warnings.items():
            if uid in acked:
                log.warning("%s stored %s with a warning: %s", self.destination.describe(), uid, text)
        if failed:
            first = next(iter(failed.items()))
            raise DestinationRefusedError(
                f"{self.destination.describe()} refused {len(failed)} of {len(batch)} instances "
                f"(e.g. {first[0]}: {first[1]})",
                stored=sorted(acked),
                failed=failed,
            )


StowDestination.writer = StowSeriesWriter
