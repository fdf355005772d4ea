"""The DIMSE :class:`dqr.backend.Backend`: C-ECHO, C-FIND through a pool of
associations, and retrieval by C-GET or C-MOVE.

Errors are classified once (see :mod:`dqr.plugins.dimse.status`); the
engine retries. The only retry here: a query on a *reused* association that
gets no answer at all is sent once more on a fresh one, as the PACS may have
closed the idle association just before.
"""

from __future__ import annotations

import heapq
import itertools
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import StoragePresentationContexts, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from dqr.backend import SourceContext, StoreCallback
from dqr.errors import IncompleteRetrieveError, RemoteError
from dqr.model import Instance, RetrieveReport, RetrieveRequest, Series, Study, StudyQuery
from dqr.plugins.dimse import DimseSourceConfig
from dqr.plugins.dimse import queries as q
from dqr.plugins.dimse.arrivals import Arrivals, MoveReceiver
from dqr.plugins.dimse.network import Peer, tls_client_context
from dqr.plugins.dimse.pool import AssociationPool
from dqr.plugins.dimse.status import (
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    SUBOPERATION_WARNINGS,
    SUCCESS,
    DimseStatusError,
    is_refused_query,
    lost_response_error,
    move_destination_error,
    status_error,
)

MODELS = {
    "study": (
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
        StudyRootQueryRetrieveInformationModelMove,
    ),
    "patient": (
        PatientRootQueryRetrieveInformationModelFind,
        PatientRootQueryRetrieveInformationModelGet,
        PatientRootQueryRetrieveInformationModelMove,
    ),
}
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: One association carries at most 128 presentation contexts (PS3.8 9.3.2.2);
#: a C-GET needs one of them for the Get model itself.
MAX_STORAGE_CONTEXTS = 127


class DimseBackend:
    """A PACS spoken to over DIMSE; thread-safe."""

    def __init__(self, config: DimseSourceConfig, context: SourceContext) -> None:
        self.config = config
        self.limits = context.limits
        self.peer = Peer(
            config.host,
            config.port,
            config.called_aet,
            config.calling_aet,
            {
                "connect": config.connect_timeout,
                "acse": config.acse_timeout,
                "dimse": config.dimse_timeout,
                "network": config.network_timeout,
            },
            tls=_tls_context(config, context),
        )
        self.find_model, self.get_model, self.move_model = MODELS[config.query_model]
        self.ae = self.peer.new_ae()
        self.pool = AssociationPool(
            self._open_query_association,
            context.limits.max_queries,
            max_idle=min(20.0, config.network_timeout),
        )
        self._retrievals = threading.BoundedSemaphore(context.limits.max_retrievals)
        self._receiver: MoveReceiver | None = None
        self._receiver_lock = threading.Lock()
        self._message_ids = itertools.cycle(range(1, 65536))
        self._message_id_lock = threading.Lock()

    # -- associations ----------------------------------------------------------

    def _open_query_association(self) -> Association:
        return self.peer.associate(
            self.ae,
            [build_context(self.find_model), build_context(Verification)],
            evt_handlers=[(evt.EVT_DIMSE_RECV, _count_find_response)],
        )

    def _next_message_id(self) -> int:
        with self._message_id_lock:
            return next(self._message_ids)

    # -- echo ------------------------------------------------------------------

    def echo(self) -> str:
        started = time.monotonic()
        assoc = self.peer.associate(self.ae, [build_context(Verification)])
        try:
            status = assoc.send_c_echo()
        finally:
            _release(assoc)
        if not status or "Status" not in status:
            raise self._lost_response("C-ECHO", assoc, started)
        if status.Status != SUCCESS:
            raise status_error("C-ECHO", status.Status, self.peer.where)
        elapsed = (time.monotonic() - started) * 1000
        return f"C-ECHO {self.peer.where} as {self.config.calling_aet}: OK ({elapsed:.0f} ms)"

    # -- queries ---------------------------------------------------------------

    def find(
        self, level: str, filters: dict[str, str], return_keys: tuple[str, ...]
    ) -> list[Dataset]:
        """One C-FIND, all its answers (the association goes back to the
        pool at once rather than waiting for a slow consumer)."""
        request = q.identifier(level, filters, return_keys)
        with self.pool.lease() as (assoc, reused):
            try:
                return self._find_on(assoc, request)
            except RemoteError as exc:
                if not (reused and exc.retriable and not assoc.is_established):
                    raise
        with self.pool.lease(fresh=True) as (assoc, _):
            return self._find_on(assoc, request)

    def _find_on(self, assoc: Association, request: Dataset) -> list[Dataset]:
        answers: list[Dataset] = []
        started = time.monotonic()
        msg_id = self._next_message_id()
        responses = assoc.send_c_find(request, self.find_model, msg_id=msg_id)
        seen = 0
        for status, answer in responses:
            if not status or "Status" not in status:
                break
            seen += 1
            if status.Status not in PENDING:
                _final_taken(assoc, msg_id)
            if status.Status in PENDING:
                if answer is not None:
                    answers.append(answer)
                started = time.monotonic()
                continue
            if status.Status == SUCCESS:
                self._check_no_response_lost(assoc, msg_id, seen)
                return answers
            raise status_error(
                f"C-FIND ({request.QueryRetrieveLevel} level)",
                status.Status,
                self.peer.where,
                str(status.get("ErrorComment", "")),
            )
        raise self._lost_response("C-FIND", assoc, started)

    def query_studies(self, query: StudyQuery) -> Iterator[Study]:
        for filters in self._study_level_filters(query.filters):
            for answer in self.find("STUDY", filters, q.STUDY_RETURN_KEYS):
                study = q.study_from_answer(answer)
                if study is not None:
                    yield study

    def _study_level_filters(self, filters: dict[str, str]) -> Iterator[dict[str, str]]:
        """Patient Root needs one PatientID per study-level query: find the
        patients first unless the query names exactly one."""
        if self.config.query_model == "study" or q.is_single_value(filters.get("PatientID", "")):
            yield dict(filters)
            return
        patient_filters = {k: v for k, v in filters.items() if k in q.PATIENT_KEYS}
        study_filters = {k: v for k, v in filters.items() if k not in q.PATIENT_KEYS}
        patient_ids = {
            q.text(a, "PatientID") for a in self.find("PATIENT", patient_filters, ("PatientID",))
        }
        for patient_id in sorted(patient_ids - {""}):
            yield {**study_filters, "PatientID": patient_id}

    def query_series(self, study: Study) -> Iterator[Series]:
        answers = self.find("SERIES", self._study_keys(study), q.SERIES_RETURN_KEYS)
        instances = self._instances_by_series(study)
        for answer in answers:
            series_uid = q.text(answer, "SeriesInstanceUID")
            found = instances.get(series_uid, []) if instances is not None else []
            series = q.series_from_answer(study, answer, frozenset(i.sop_class_uid for i in found if i.sop_class_uid))
            if series is not None and instances is not None:
                series = replace(series, instance_uids=tuple(i.sop_instance_uid for i in found))
            if series is not None:
                yield series

    def _instances_by_series(self, study: Study) -> dict[str, list[Instance]] | None:
        """The instances of each series, from one image-level C-FIND per
        study: C-GET must propose a storage context for each SOP class, and
        the engine needs the expected instances (one query instead of one per
        series). ``None`` when the PACS refuses image-level queries."""
        try:
            answers = self.find("IMAGE", self._study_keys(study), q.IMAGE_RETURN_KEYS)
        except RemoteError as exc:
            if exc.retriable:
                raise
            return None
        found: dict[str, list[Instance]] = {}
        for answer in answers:
            series_uid = q.text(answer, "SeriesInstanceUID")
            instance = q.instance_from_answer(series_uid, answer)
            if instance is not None:
                found.setdefault(series_uid, []).append(instance)
        return found

    def query_instances(self, study: Study, series: Series) -> Iterator[Instance]:
        filters = {**self._study_keys(study), "SeriesInstanceUID": series.series_uid}
        try:
            answers = self.find("IMAGE", filters, q.IMAGE_RETURN_KEYS)
        except DimseStatusError as exc:
            if is_refused_query(exc.status):
                raise NotImplementedError(
                    f"{self.peer.where} does not answer image-level queries: {exc}"
                ) from exc
            raise
        for answer in answers:
            instance = q.instance_from_answer(series.series_uid, answer)
            if instance is not None:
                yield instance

    def _study_keys(self, study: Study) -> dict[str, str]:
        keys = {"StudyInstanceUID": study.study_uid}
        if self.config.query_model == "patient":
            keys["PatientID"] = study.patient_id
        return keys

    # -- retrieval -------------------------------------------------------------

    def retrieve(self, request: RetrieveRequest, store: StoreCallback) -> RetrieveReport:
        arrivals = Arrivals(store)
        with self._retrievals:
            try:
                if self.config.retrieve == "c-get":
                    report = self._get(request, arrivals)
                else:
                    report = self._move(request, arrivals)
            except RemoteError as exc:
                if exc.slow_down:
                    # "too many associations": dqr's own idle query
                    # associations may be what fills the PACS's limit
                    self.pool.drop_idle()
                arrivals.raise_store_failure()  # our failed C-STOREs explain the PACS's status
                raise
        arrivals.raise_store_failure()
        self._check_complete(request, arrivals, report)
        return report

    def _retrieve_identifiers(self, request: RetrieveRequest) -> list[Dataset]:
        """A series, the requested instances as one UID list, or one request
        per instance when the source cannot match UID lists."""
        keys = {**self._study_keys(request.study), "SeriesInstanceUID": request.series.series_uid}
        uids = request.sop_instance_uids
        if uids is None:
            return [q.identifier("SERIES", keys)]
        if self.config.matching.uid_lists:
            return [q.identifier("IMAGE", {**keys, "SOPInstanceUID": "\\".join(uids)})]
        return [q.identifier("IMAGE", {**keys, "SOPInstanceUID": uid}) for uid in uids]

    def _get(self, request: RetrieveRequest, arrivals: Arrivals) -> RetrieveReport:
        contexts, roles = storage_contexts(request.series)
        assoc = self.peer.associate(
            self.ae,
            [build_context(self.get_model), *contexts],
            ext_neg=roles,
            evt_handlers=[(evt.EVT_C_STORE, arrivals.handle_store)],
        )
        report = RetrieveReport(completed=0, failed=0, warning=0)
        try:
            for identifier in self._retrieve_identifiers(request):
                responses = assoc.send_c_get(
                    identifier, self.get_model, msg_id=self._next_message_id()
                )
                final = self._final_status("C-GET", responses, assoc)
                self._judge_final("C-GET", final, report, arrivals)
        finally:
            _release(assoc)
        return report

    def _move(self, request: RetrieveRequest, arrivals: Arrivals) -> RetrieveReport:
        receiver = self.move_receiver()
        move_id = self._next_message_id()
        report = RetrieveReport(completed=0, failed=0, warning=0)
        with receiver.expecting(move_id, arrivals, request.series.series_uid):
            assoc = self.peer.associate(self.ae, [build_context(self.move_model)])
            try:
                for identifier in self._retrieve_identifiers(request):
                    responses = assoc.send_c_move(
                        identifier, self.config.destination_aet, self.move_model, msg_id=move_id
                    )
                    final = self._final_status("C-MOVE", responses, assoc)
                    self._judge_final("C-MOVE", final, report, arrivals)
            finally:
                _release(assoc)
            expected = max(
                _expected_count(request), (report.completed or 0) + (report.warning or 0)
            )
            arrivals.wait_for(expected, self.config.move_timeout)
        return report

    def move_receiver(self) -> MoveReceiver:
        """dqr's storage SCP, started on the first C-MOVE, stopped in close()."""
        with self._receiver_lock:
            if self._receiver is None:
                assert self.config.store_port is not None  # the config model insists
                self._receiver = MoveReceiver(
                    self.config.destination_aet,
                    self.config.store_host,
                    self.config.store_port,
                    self.config.network_timeout,
                )
            return self._receiver

    def _check_no_response_lost(self, assoc: Association, msg_id: int, seen: int) -> None:
        """pynetdicom's reactor thread can swallow a response meant for the
        waiting request (pydicom/pynetdicom#875): a lost *pending* C-FIND
        response would silently drop a match, so compare with what the
        association actually received."""
        received = getattr(assoc, "dqr_find_responses", {}).pop(msg_id, seen)
        if received > seen:
            assoc.abort()  # its state is suspect: never reuse it
            raise RemoteError(
                f"C-FIND to {self.peer.where}: {received - seen} of {received} responses were lost "
                "inside pynetdicom (pydicom/pynetdicom#875); the query is retried",
                retriable=True,
            )

    def _lost_response(self, operation: str, assoc: Association, started: float) -> RemoteError:
        # pynetdicom aborts the association on a DIMSE timeout too, so only
        # the time waited tells a timeout from the peer's abort.
        waited = time.monotonic() - started
        aborted = assoc.is_aborted or waited < self.config.dimse_timeout
        return lost_response_error(operation, self.peer.where, self.config.dimse_timeout, aborted)

    def _final_status(
        self, operation: str, responses: Iterator[tuple[Dataset, Any]], assoc: Association
    ) -> Dataset:
        started = time.monotonic()
        for status, _ in responses:
            if not status or "Status" not in status:
                break
            if status.Status not in PENDING:
                return status
            started = time.monotonic()
        raise self._lost_response(operation, assoc, started)

    def _judge_final(
        self, operation: str, final: Dataset, report: RetrieveReport, arrivals: Arrivals
    ) -> None:
        """Add a final response's counts to the report; raise on failure."""
        completed = int(final.get("NumberOfCompletedSuboperations", 0) or 0)
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0)
        warning = int(final.get("NumberOfWarningSuboperations", 0) or 0)
        report.completed = (report.completed or 0) + completed
        report.failed = (report.failed or 0) + failed
        report.warning = (report.warning or 0) + warning
        code = int(final.Status)
        if code == SUCCESS or code in SUBOPERATION_WARNINGS:
            if code != SUCCESS:
                report.messages.append(f"{operation} ended with warning status 0x{code:04X}")
            return
        comment = str(final.get("ErrorComment", ""))
        if operation == "C-MOVE" and _is_destination_refusal(code, completed, arrivals):
            raise move_destination_error(
                code, self.peer.where, self.config.destination_aet, self._store_address()
            )
        if operation == "C-GET" and code >= 0xC000 and arrivals.count == 0:
            comment = comment or (
                "the PACS may lack a storage context for one of the series' SOP classes "
                "(it sends nothing then); an image-level query would have named them"
            )
        raise status_error(operation, code, self.peer.where, comment)

    def _store_address(self) -> str:
        port = self._receiver.port if self._receiver else self.config.store_port
        return f"{self.config.store_host}:{port}"

    def _check_complete(
        self, request: RetrieveRequest, arrivals: Arrivals, report: RetrieveReport
    ) -> None:
        expected = max(
            _expected_count(request),
            (report.completed or 0) + (report.warning or 0) + (report.failed or 0),
        )
        missing = expected - len(arrivals.received)
        if request.sop_instance_uids is not None:
            missing = len(set(request.sop_instance_uids) - arrivals.received)
        if missing <= 0 and not report.failed:
            return
        raise IncompleteRetrieveError(
            f"{self.config.retrieve.upper()} of series {request.series.series_uid} from {self.peer.where} is "
            f"incomplete: {len(arrivals.received)} of {expected} instances arrived; the PACS reported "
            f"{report.completed} completed, {report.failed} failed, {report.warning} warning sub-operations",
            missing=max(missing, report.failed or 0),
        )

    def close(self) -> None:
        self.pool.close()
        with self._receiver_lock:
            if self._receiver is not None:
                self._receiver.stop()
                self._receiver = None


#: Seconds a received final C-FIND response may take to reach the waiting
#: query before it counts as lost (pynetdicom#875) and the association is
#: aborted, so the query is retried at once instead of after dimse_timeout.
LOST_FINAL_GRACE = 2.0


def _count_find_response(event: Any) -> None:
    """EVT_DIMSE_RECV handler (DUL thread): count C-FIND responses by the
    request's message ID, on the association itself, and watch each final
    response until the query that waits for it has taken it."""
    message = event.message
    if type(message).__name__ != "C_FIND_RSP":
        return
    assoc = event.assoc
    msg_id = int(message.command_set.MessageIDBeingRespondedTo)
    assoc.__dict__.setdefault("dqr_find_responses", Counter())[msg_id] += 1
    if int(message.command_set.Status) not in PENDING:
        _final_watch.expect(assoc, msg_id, LOST_FINAL_GRACE)


class _FinalWatch:
    """One thread checking, for every final C-FIND response received, that
    its query took it in time (a thread per response would be thousands)."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Association, int]] = []
        self._order = itertools.count()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def expect(self, assoc: Association, msg_id: int, grace: float) -> None:
        with self._condition:
            heapq.heappush(self._due, (time.monotonic() + grace, next(self._order), assoc, msg_id))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dqr-final-watch", daemon=True)
                self._thread.start()
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._condition.wait(timeout=self._due[0][0] - time.monotonic() if self._due else None)
                _, _, assoc, msg_id = heapq.heappop(self._due)
            taken = assoc.__dict__.get("dqr_finals_taken", set())
            if msg_id in taken:
                taken.discard(msg_id)  # message IDs are reused: forget it once checked
            elif assoc.is_established:
                assoc.abort()  # the waiting query then fails as retriable, on a fresh association


_final_watch = _FinalWatch()


def _final_taken(assoc: Association, msg_id: int) -> None:
    assoc.__dict__.setdefault("dqr_finals_taken", set()).add(msg_id)


def _is_destination_refusal(code: int, completed: int, arrivals: Arrivals) -> bool:
    """0xA801, or 0xC000 with nothing sent (what Orthanc answers for an
    unknown move destination)."""
    return code == MOVE_DESTINATION_UNKNOWN or (
        code == 0xC000 and completed == 0 and arrivals.count == 0
    )


def _expected_count(request: RetrieveRequest) -> int:
    if request.sop_instance_uids is not None:
        return len(request.sop_instance_uids)
    return request.series.n_instances or 0


def storage_contexts(series: Series) -> tuple[list[Any], list[Any]]:
    """Storage presentation contexts and SCP role selections for a C-GET:
    the series' SOP classes when known (uncompressed, plus each transfer
    syntax seen, as its own context), else the 127 most common classes."""
    contexts = []
    for sop_class in sorted(series.sop_class_uids):
        contexts.append(build_context(sop_class, UNCOMPRESSED))
        for syntax in sorted(set(series.transfer_syntaxes) - set(UNCOMPRESSED)):
            contexts.append(build_context(sop_class, syntax))
    if not contexts:
        contexts = [
            build_context(cx.abstract_syntax, UNCOMPRESSED) for cx in StoragePresentationContexts
        ]
    contexts = contexts[:MAX_STORAGE_CONTEXTS]
    roles = [
        build_role(uid, scp_role=True) for uid in sorted({cx.abstract_syntax for cx in contexts})
    ]
    return contexts, roles


def _release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()


def _tls_context(config: DimseSourceConfig, context: SourceContext) -> ssl.SSLContext | None:
    if config.tls is None:
        return None

    def path(value: str | None) -> Path | None:
        if value is None:
            return None
        given = Path(value).expanduser()
        return given if given.is_absolute() else context.config_dir / given

    return tls_client_context(
        path(config.tls.ca_file), path(config.tls.cert_file), path(config.tls.key_file)
    )
