"""The DIMSE :class:`dqr.backend.Backend`: C-ECHO, C-FIND through a pool of
associations, and retrieval by C-GET or C-MOVE.

Errors are classified once (see :mod:`dqr.plugins.dimse.status`); the
engine retries. The only retry here: a query on a *reused* association that
gets no answer at all is sent once more on a fresh one, as the PACS may have
closed the idle association just before.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
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
from dqr.model import (
    Instance,
    RetrieveReport,
    RetrieveRequest,
    Series,
    Study,
    StudyQuery,
    StudyRetrieveRequest,
)
from dqr.plugins.dimse import DimseSourceConfig, native
from dqr.plugins.dimse import queries as q
from dqr.plugins.dimse.arrivals import Arrivals, MoveReceiver, NativeMoveReceiver
from dqr.plugins.dimse.network import (
    Peer,
    accepted_transfer_syntaxes,
    loaded_tls,
    tls_client_context,
    tls_files,
    tls_server_context,
)
from dqr.plugins.dimse.pool import AssociationPool
from dqr.plugins.dimse.status import (
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    SUBOPERATION_WARNINGS,
    SUCCESS,
    DimseStatusError,
    NoAcceptedContexts,
    describe_status,
    is_refused_query,
    lost_response_error,
    move_destination_error,
    status_error,
)
from dqr.plugins.dimse.watchdog import bounded, watchdog
from dqr.throttle import Deadline

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
log = logging.getLogger(__name__)
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
#: One association carries at most 128 presentation contexts (PS3.8 9.3.2.2);
#: a C-GET needs one of them for the Get model itself.
MAX_STORAGE_CONTEXTS = 127


class DimseBackend:
    """A PACS spoken to over DIMSE; thread-safe."""

    def __init__(
        self, config: DimseSourceConfig, context: SourceContext, retrieve_mode: str | None = None
    ) -> None:
        self.config = config
        self.limits = context.limits
        self.native = config.effective_transport == "native"
        self.timeouts = native.Timeouts(
            config.connect_timeout, config.acse_timeout, config.dimse_timeout, config.network_timeout
        )
        #: c-get or c-move; with ``retrieve: auto``, ``None`` until the first
        #: retrieval found out (an earlier run's answer may be passed back).
        self.retrieve_mode: str | None = (
            config.retrieve if config.retrieve != "auto" else _checked_mode(retrieve_mode)
        )
        self._probe_lock = threading.Lock()
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
        self._tls_server = _tls_server_context(config, context)
        self.find_model, self.get_model, self.move_model = MODELS[config.query_model]
        self.ae = self.peer.new_ae()
        self.pool = AssociationPool(
            self._open_query_association,
            context.limits.max_queries,
            max_idle=min(20.0, config.network_timeout),
        )
        self._retrievals = threading.BoundedSemaphore(context.limits.max_retrievals)
        self._receiver: MoveReceiver | NativeMoveReceiver | None = None
        self._receiver_lock = threading.Lock()
        self._message_ids = itertools.cycle(range(1, 65536))
        self._message_id_lock = threading.Lock()

    # -- associations ----------------------------------------------------------

    def _associate(
        self,
        contexts: list[Any],
        roles: list[Any] = (),  # type: ignore[assignment]
        evt_handlers: list[Any] = (),  # type: ignore[assignment]
        inbox: Any = None,
    ) -> Any:
        """An association on the configured transport (both raise classified
        :class:`RemoteError`\\ s)."""
        if self.native:
            return native.associate(
                self.config.host, self.config.port, self.config.calling_aet, self.config.called_aet,
                self.peer.where, contexts, self.timeouts, list(roles), inbox, self.peer.tls,
            )
        return self.peer.associate(self.ae, contexts, ext_neg=roles, evt_handlers=evt_handlers)

    def _open_query_association(self) -> Association:
        return self._associate(
            [build_context(self.find_model), build_context(Verification)],
            evt_handlers=[(evt.EVT_DIMSE_RECV, _count_find_response)],
        )

    def _next_message_id(self) -> int:
        with self._message_id_lock:
            return next(self._message_ids)

    # -- echo ------------------------------------------------------------------

    def echo(self) -> str:
        """C-ECHO, then what the PACS accepts: which query/retrieve models,
        C-GET (with dqr as storage SCP), C-MOVE to dqr's AE title, and which
        transfer syntaxes for images."""
        started = time.monotonic()
        assoc = self._associate([build_context(Verification)])
        try:
            status = assoc.send_c_echo()
        finally:
            _release(assoc)
        if not status or "Status" not in status:
            raise self._lost_response("C-ECHO", assoc, started)
        if status.Status != SUCCESS:
            raise status_error("C-ECHO", status.Status, self.peer.where)
        elapsed = (time.monotonic() - started) * 1000
        lines = [
            f"C-ECHO {self.peer.where} as {self.config.calling_aet}: OK ({elapsed:.0f} ms), "
            f"transport {self.config.effective_transport}"
        ]
        try:
            lines += self._capabilities()
        except RemoteError as exc:
            lines.append(f"could not ask what the PACS accepts: {exc}")
        return "\n".join(lines)

    def _capabilities(self) -> list[str]:
        """Propose every model and a few storage contexts in one association
        and report what was accepted (nothing is retrieved)."""
        from pynetdicom.sop_class import (
            CTImageStorage,
            MRImageStorage,
            SecondaryCaptureImageStorage,
        )

        proposed = [build_context(uid) for key in ("study", "patient") for uid in MODELS[key]]
        storage = [CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage]
        proposed += [build_context(uid, accepted_transfer_syntaxes()[:64]) for uid in storage]
        roles = [build_role(uid, scp_role=True) for uid in storage]
        assoc = self._associate(proposed, roles)
        try:
            accepted = list(assoc.accepted_contexts)
        finally:
            _release(assoc)
        names = {str(cx.abstract_syntax) for cx in accepted}
        lines = []
        for key, label in (("study", "Study Root"), ("patient", "Patient Root")):
            find, get, move = MODELS[key]
            lines.append(
                f"{label}: C-FIND {_yes(find in names)}, C-GET {_yes(get in names)}, "
                f"C-MOVE {_yes(move in names)}"
            )
        scp = sorted(UID(str(cx.abstract_syntax)).name for cx in accepted if cx.abstract_syntax in storage and cx.as_scp)
        lines.append(
            "C-GET can deliver to dqr: " + (", ".join(scp) if scp else "no (no storage context with dqr as SCP)")
        )
        syntaxes = sorted({UID(str(cx.transfer_syntax[0])).name for cx in accepted if cx.abstract_syntax in storage})
        lines.append("image transfer syntaxes accepted: " + (", ".join(syntaxes) or "none"))
        get_model, move_model = self.get_model, self.move_model
        if move_model in names:
            lines.append(self._probe_move())
        lines.append(
            "retrieve: auto would use "
            + ("C-GET" if get_model in names and scp else "C-MOVE" if self.config.store_port is not None else "nothing (C-GET refused, no store_port for C-MOVE)")
        )
        return lines

    def _probe_move(self) -> str:
        """C-MOVE of an empty UID to dqr's AE title: a PACS that does not
        know the destination says so (0xA801) before matching anything."""
        assoc = self._associate([build_context(self.move_model)])
        try:
            identifier = q.identifier("STUDY", {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9.0.1"})
            final = self._final_status(
                "C-MOVE",
                assoc.send_c_move(identifier, self.config.destination_aet, self.move_model, msg_id=self._next_message_id()),
                assoc,
            )
        except RemoteError as exc:
            return f"C-MOVE to {self.config.destination_aet}: could not tell ({exc})"
        finally:
            _release(assoc)
        code = int(final.Status)
        if code == MOVE_DESTINATION_UNKNOWN:
            return f"C-MOVE to {self.config.destination_aet}: refused, the PACS does not know this destination (0xA801)"
        return f"C-MOVE to {self.config.destination_aet}: destination known (status {describe_status(code)} for a study that does not exist)"

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
        what = f"C-FIND ({request.QueryRetrieveLevel} level) to {self.peer.where}"
        with bounded(assoc, Deadline(self.limits.query_timeout, "query_timeout"), what):
            return self._find_answers(assoc, request)

    def _find_answers(self, assoc: Association, request: Dataset) -> list[Dataset]:
        answers: list[Dataset] = []
        started = time.monotonic()
        msg_id = self._next_message_id()
        responses = assoc.send_c_find(request, self.find_model, msg_id=msg_id)
        seen = 0
        for status, answer in responses:
            if not status or "Status" not in status:
                break
            seen += 1
            if status.Status not in PENDING and not self.native:
                _final_taken(assoc, msg_id)
            if status.Status in PENDING:
                if answer is not None:
                    answers.append(answer)
                started = time.monotonic()
                continue
            if status.Status == SUCCESS:
                if not self.native:
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
        with self._retrievals:
            mode = self.retrieve_mode
            if mode is None:
                with self._probe_lock:  # the first retrieval finds out; the others wait for it
                    if self.retrieve_mode is None:
                        return self._probe(request, store)
                    mode = self.retrieve_mode
            return self._retrieve(mode, request, store)

    def _probe(self, request: RetrieveRequest, store: StoreCallback) -> RetrieveReport:
        """``retrieve: auto``: C-GET, and C-MOVE if the PACS refuses C-GET."""
        try:
            report = self._retrieve("c-get", request, store)
        except GetRefused as refusal:
            if self.config.store_port is None and (refusal.slow_down or refusal.retriable):
                raise  # e.g. 0xA702 may be a passing shortage: the engine retries C-GET
            if self.config.store_port is None:
                raise RemoteError(
                    f"{refusal} -- and C-MOVE is not possible without `store_port` (the port of dqr's "
                    "storage SCP, registered at the PACS with move_destination): set it, or ask the "
                    "PACS administrator to allow C-GET"
                ) from refusal
            log.info("retrieve: auto: %s; using C-MOVE", refusal)
            self.retrieve_mode = "c-move"
            return self._retrieve("c-move", request, store)
        self.retrieve_mode = "c-get"
        return report

    def _retrieve(self, mode: str, request: RetrieveRequest, store: StoreCallback) -> RetrieveReport:
        arrivals = Arrivals(store, native=self.native)
        deadline = Deadline(self.limits.retrieve_timeout, "retrieve_timeout")
        try:
            if mode == "c-get":
                report = self._get(request, arrivals, deadline)
            else:
                report = self._move(request, arrivals, deadline)
        except RemoteError as exc:
            if exc.slow_down:
                # "too many associations": dqr's own idle query
                # associations may be what fills the PACS's limit
                self.pool.drop_idle()
            arrivals.raise_store_failure()  # our failed C-STOREs explain the PACS's status
            raise
        arrivals.raise_store_failure()
        self._check_complete(mode, request, arrivals, report)
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

    def _get(self, request: RetrieveRequest, arrivals: Arrivals, deadline: Deadline) -> RetrieveReport:
        what = f"C-GET of series {request.series.series_uid} from {self.peer.where}"
        return self._c_get(self._retrieve_identifiers(request), request.series, arrivals, deadline, what)

    def _c_get(
        self, identifiers: list[Dataset], series: Series, arrivals: Arrivals, deadline: Deadline, what: str
    ) -> RetrieveReport:
        """C-GETs on one association proposing storage contexts for ``series``'s SOP classes."""
        contexts, roles = storage_contexts(series)
        try:
            assoc = self._associate(
                [build_context(self.get_model), *contexts],
                roles,
                evt_handlers=[(evt.EVT_C_STORE, arrivals.handle_store)],
                inbox=arrivals.inbox,
            )
        except NoAcceptedContexts as exc:
            raise GetRefused(f"C-GET refused by {self.peer.where}: {exc}") from exc
        report = RetrieveReport(completed=0, failed=0, warning=0)
        try:
            _check_get_contexts(assoc, self.get_model, self.peer.where)
            with bounded(assoc, deadline, what):
                for identifier in identifiers:
                    responses = assoc.send_c_get(
                        identifier, self.get_model, msg_id=self._next_message_id()
                    )
                    final = self._final_status("C-GET", responses, assoc)
                    self._judge_final("C-GET", final, report, arrivals)
        finally:
            _release(assoc)
        return report

    def retrieve_study(self, request: StudyRetrieveRequest, store: StoreCallback) -> RetrieveReport:
        """A whole study in one C-GET or one C-MOVE (the engine judges each
        series' completeness and asks series by series for what is missing).
        Only once the retrieval mode is known: ``retrieve: auto`` probes on a
        series first."""
        if self.retrieve_mode not in ("c-get", "c-move"):
            raise NotImplementedError("a whole study is fetched in one request once C-GET or C-MOVE is known to work")
        union = _study_union(request)
        identifier = q.identifier("STUDY", self._study_keys(request.study))
        what = f"{self.retrieve_mode.upper()} of study {request.study.study_uid} from {self.peer.where}"
        if self.retrieve_mode == "c-move" and union.instance_uids is None:
            raise NotImplementedError("a study is moved in one request only when its instances are known")
        with self._retrievals:
            arrivals = Arrivals(store, native=self.native)
            deadline = Deadline(self.limits.retrieve_timeout, "retrieve_timeout")
            try:
                if self.retrieve_mode == "c-get":
                    report = self._c_get([identifier], union, arrivals, deadline, what)
                else:
                    moved = RetrieveRequest(request.study, union, union.instance_uids)
                    report = self._c_move([identifier], moved, arrivals, deadline, what)
            except RemoteError as exc:
                if exc.slow_down:
                    self.pool.drop_idle()
                arrivals.raise_store_failure()
                raise
        arrivals.raise_store_failure()
        return report

    def _move(self, request: RetrieveRequest, arrivals: Arrivals, deadline: Deadline) -> RetrieveReport:
        what = f"C-MOVE of series {request.series.series_uid} from {self.peer.where}"
        return self._c_move(self._retrieve_identifiers(request), request, arrivals, deadline, what)

    def _c_move(
        self, identifiers: list[Dataset], request: RetrieveRequest, arrivals: Arrivals, deadline: Deadline, what: str
    ) -> RetrieveReport:
        """C-MOVEs on one association; dqr's storage SCP accepts only
        ``request``'s instances (and SOP classes) meanwhile, and they are
        waited for up to ``move_timeout`` after the final response."""
        receiver = self.move_receiver()
        move_id = self._next_message_id()
        report = RetrieveReport(completed=0, failed=0, warning=0)
        with receiver.expecting(move_id, arrivals, request):
            assoc = self._associate([build_context(self.move_model)], inbox=arrivals.inbox)
            try:
                with bounded(assoc, deadline, what):
                    for identifier in identifiers:
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
            arrivals.wait_for(expected, max(0.0, min(self.config.move_timeout, deadline.remaining())))
        return report

    def move_receiver(self) -> MoveReceiver | NativeMoveReceiver:
        """dqr's storage SCP, started on the first C-MOVE, stopped in close()."""
        with self._receiver_lock:
            if self._receiver is None:
                if self.config.store_port is None:
                    raise RemoteError("C-MOVE needs `store_port`, the port of dqr's storage SCP")
                receiver = NativeMoveReceiver if self.native else MoveReceiver
                self._receiver = receiver(
                    self.config.destination_aet,
                    self.store_host,
                    self.config.store_port,
                    self.config.network_timeout,
                    self.config.source_aets,
                    self._tls_server,
                )
            return self._receiver

    @property
    def store_host(self) -> str:
        """Where the storage SCP listens: ``store_host``, else the local
        address that reaches the PACS (loopback for a PACS on 127.0.0.1),
        never every interface unless configured so."""
        if self.config.store_host:
            return self.config.store_host
        return local_address_towards(self.config.host, self.config.port)

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
        # the time waited tells dqr's own timeout from the peer's abort.
        waited = time.monotonic() - started
        aborted = waited < self.config.dimse_timeout * 0.9
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
        error = status_error(operation, code, self.peer.where, comment)
        if operation == "C-GET" and _is_get_refusal(code, completed, arrivals):
            raise GetRefused(
                str(error), code, retriable=error.retriable, slow_down=error.slow_down
            ) from None
        raise error

    def _store_address(self) -> str:
        port = self._receiver.port if self._receiver else self.config.store_port
        return f"{self.store_host}:{port}"

    def _check_complete(
        self, mode: str, request: RetrieveRequest, arrivals: Arrivals, report: RetrieveReport
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
            f"{mode.upper()} of series {request.series.series_uid} from {self.peer.where} is "
            f"incomplete: {len(arrivals.received)} of {expected} instances arrived; the PACS reported "
            f"{report.completed} completed, {report.failed} failed, {report.warning} warning sub-operations",
            missing=max(missing, report.failed or 0),
        )

    def cap_connections(self, cap) -> None:
        """Cluster-wide: the pooled query associations, idle ones included,
        hold one of the cluster's ``max_queries`` slots each while open."""
        from dqr.throttle import ConnectionCap

        self.pool.cap(ConnectionCap(cap("query-associations", self.limits.max_queries)))

    def learnt(self) -> dict[str, str]:
        """What ``retrieve: auto`` found, kept in the job state for the next run."""
        return {"retrieve_mode": self.retrieve_mode} if self.config.retrieve == "auto" and self.retrieve_mode else {}

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
        watchdog.after(LOST_FINAL_GRACE, lambda: _check_final_taken(assoc, msg_id))


def _check_final_taken(assoc: Association, msg_id: int) -> None:
    taken = assoc.__dict__.get("dqr_finals_taken", set())
    if msg_id in taken:
        taken.discard(msg_id)  # message IDs are reused: forget it once checked
    elif assoc.is_established:
        assoc.abort()  # the waiting query then fails as retriable, on a fresh association


def _final_taken(assoc: Association, msg_id: int) -> None:
    assoc.__dict__.setdefault("dqr_finals_taken", set()).add(msg_id)


class GetRefused(DimseStatusError):
    """The PACS will not do C-GET for dqr (``retrieve: auto`` then moves)."""

    def __init__(self, message: str, status: int = 0, **flags: bool) -> None:
        super().__init__(message, status, **flags)


def _checked_mode(mode: str | None) -> str | None:
    if mode not in (None, "c-get", "c-move"):
        raise ValueError(f"retrieve_mode must be c-get, c-move or None, not {mode!r}")
    return mode


def _check_get_contexts(assoc: Any, get_model: str, where: str) -> None:
    """An association for C-GET is of use only if the PACS accepted the Get
    model and at least one storage context with dqr as SCP."""
    accepted = list(assoc.accepted_contexts)
    if not any(str(cx.abstract_syntax) == get_model for cx in accepted):
        raise GetRefused(f"C-GET refused by {where}: it did not accept the presentation context for {UID(get_model).name}")
    if not any(str(cx.abstract_syntax) != get_model and cx.as_scp for cx in accepted):
        raise GetRefused(
            f"C-GET refused by {where}: it accepted no storage context with dqr in the SCP role "
            "(SCP/SCU role selection), so it could not send the instances back"
        )


def _is_get_refusal(code: int, completed: int, arrivals: Arrivals) -> bool:
    """A C-GET answered with a refusal before anything was sent: 0xA702
    (cannot perform sub-operations), 0x0122 / 0x0124 (SOP class not
    supported / not authorised), 0xC000-0xCFFF (unable to process)."""
    return (
        completed == 0
        and arrivals.count == 0
        and (code in (0xA702, 0x0122, 0x0124) or 0xC000 <= code <= 0xCFFF)
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def local_address_towards(host: str, port: int) -> str:
    """The local address of a socket connected to ``host`` (UDP: nothing is
    sent), i.e. the address the PACS reaches this machine at."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return probe.getsockname()[0]
    except OSError:
        return "0.0.0.0"


def _is_destination_refusal(code: int, completed: int, arrivals: Arrivals) -> bool:
    """0xA801, or 0xC000 with nothing sent (what Orthanc answers for an
    unknown move destination)."""
    return code == MOVE_DESTINATION_UNKNOWN or (
        code == 0xC000 and completed == 0 and arrivals.count == 0
    )


def _study_union(request: StudyRetrieveRequest) -> Series:
    """The series of a study as one: every SOP class (none, meaning any,
    when one series' classes are unknown), transfer syntax and instance
    (``None`` when one series' instances are unknown)."""
    series = request.series
    classes = (
        frozenset().union(*(s.sop_class_uids for s in series))
        if all(s.sop_class_uids for s in series)
        else frozenset()
    )
    instances = (
        tuple(uid for s in series for uid in s.instance_uids or ())
        if all(s.instance_uids is not None for s in series)
        else None
    )
    return Series(
        study_uid=request.study.study_uid,
        series_uid="",
        sop_class_uids=classes,
        transfer_syntaxes=frozenset().union(*(s.transfer_syntaxes for s in series)),
        instance_uids=instances or None,
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


def _tls_files(config: DimseSourceConfig, context: SourceContext) -> tuple[Path | None, Path | None, Path | None]:
    assert config.tls is not None
    return tls_files(config.tls, context.resolve, f"sources.{context.name}.tls")


def _tls_context(config: DimseSourceConfig, context: SourceContext) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    files = _tls_files(config, context)
    return _loaded(context, lambda: tls_client_context(*files))


def _tls_server_context(config: DimseSourceConfig, context: SourceContext) -> ssl.SSLContext | None:
    if config.tls is None or not config.tls.storage_scp:
        return None
    ca_file, cert_file, key_file = _tls_files(config, context)
    assert cert_file is not None and key_file is not None  # checked by TlsOptions
    return _loaded(context, lambda: tls_server_context(ca_file, cert_file, key_file))


def _loaded(context: SourceContext, build: Any) -> ssl.SSLContext:
    return loaded_tls(build, f"sources.{context.name}.tls")
