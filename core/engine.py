"""The pipeline: CSV rows -> queries -> one results table -> selection ->
series -> retrieve -> relabel -> store.

Work is split into idempotent steps keyed by UIDs -- query one row, list the
series of one study, retrieve one series -- whose progress lives in the job
state, so a run can stop anywhere and the next one resumes. The engine never
prints: it reports through a :class:`Reporter`, and the CLI renders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dqr.backend import Backend, DestinationContext, SeriesWriter, SourceContext
from dqr.config import LoadedConfig, SeriesFilter
from dqr.errors import DestinationRefusedError, IncompleteRetrieveError, RemoteError
from dqr.labels import safe_label
from dqr.matching import matches
from dqr.model import (
    Instance,
    Labels,
    ReceivedInstance,
    RetrieveRequest,
    RowQuery,
    Series,
    Study,
    StudyQuery,
)
from dqr.planner import plan_queries
from dqr.pluginmanager import backend_types, destination_types, executor_types, get_plugin_manager
from dqr.relabel import RelabelContext, decode, encode_part10, raw_text
from dqr.results import ResultLine, build_table, flag_label_collisions
from dqr.state import JobState
from dqr.throttle import (
    AdaptiveLimit,
    CircuitBreaker,
    RateLimit,
    SourceDownError,
    TimeWindow,
    call_with_retries,
)

log = logging.getLogger("dqr")
SERIES_INSTANCE_UID = 0x0020000E


class Reporter:
    """Receives progress from the engine; the default does nothing.

    Called from worker threads: implementations must be thread-safe.
    """

    def start(self, phase: str, total: int) -> None:
        """A phase (``query``, ``series``, ``retrieve``) begins with ``total`` units."""

    def advance(self, phase: str, amount: int = 1) -> None:
        """``amount`` units of ``phase`` are done."""

    def instance_stored(self, size: int) -> None:
        """One instance of ``size`` bytes was written (durable at series end)."""

    def finish(self, phase: str) -> None:
        """The phase is over."""


@dataclass
class JobOptions:
    """Per-run choices from the command line."""

    source: str | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    select_all: bool = False
    include: list[str] | None = None
    exclude: list[str] | None = None
    new_job: bool = False


@dataclass
class Failure:
    """Something that did not get done, and why."""

    kind: str  # "row", "study" or "series"
    row: int | None
    reason: str
    study_uid: str = ""
    series_uid: str = ""


@dataclass
class RunSummary:
    """What a retrieval did (what the query phase found is in :class:`Plan`)."""

    studies_selected: int = 0
    studies_stored: int = 0
    studies_already_stored: int = 0
    series_stored: int = 0
    series_excluded: int = 0
    instances_stored: int = 0
    bytes_stored: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    gave_up: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "failures"}
        data["failures"] = [f.__dict__ for f in self.failures]
        return data


@dataclass
class Plan:
    """What a retrieval would do, for the summary shown before it starts."""

    lines: list[ResultLine]
    rows: int
    rows_without_match: list[int]
    rows_not_queried: list[int]
    rows_ambiguous: list[int]
    label_collisions: list[int]
    studies: int
    series: int | None
    instances: int | None


def fingerprint(kind: str, rows: Iterable[RowQuery]) -> str:
    digest = hashlib.sha256(kind.encode())
    for row in rows:
        digest.update(json.dumps([row.line, dict(row.filters), row.subject, row.session]).encode())
    return digest.hexdigest()


class Job:
    """One site config, one source, one destination, one job state."""

    def __init__(self, config: LoadedConfig, options: JobOptions | None = None, reporter: Reporter | None = None) -> None:
        self.config = config
        self.options = options or JobOptions()
        self.reporter = reporter or Reporter()
        self.source_name = config.source_name(self.options.source)
        self.source_config = config.sources[self.source_name]
        self.limits = config.limits_for(self.source_name, self.options.limits)
        self.series_filter = SeriesFilter(
            include=self.options.include or config.site.series.include,
            exclude=(config.site.series.exclude + (self.options.exclude or [])),
        )
        self.hooks = get_plugin_manager().hook
        self.query_limit = AdaptiveLimit(self.limits.max_queries, "queries")
        self.retrieve_limit = AdaptiveLimit(self.limits.max_retrievals, "retrievals", watch_latency=False)
        self.rate = RateLimit(self.limits.requests_per_second)
        #: Set to stop: no new step starts, running retrievals stop at their next instance.
        self.stop = threading.Event()
        self.breaker = CircuitBreaker(
            self.limits.breaker_failures, self.limits.breaker_cooldown, self.limits.breaker_max_cooldowns, self.stop
        )
        self.window = TimeWindow.parse(self.limits.retrieve_window) if self.limits.retrieve_window else None
        self.executor = executor_types()[config.executor.type].factory()
        self._backend: Backend | None = None
        self._state: JobState | None = None
        self._destination = None
        self._lock = threading.Lock()
        self._summary = RunSummary()

    # -- resources ---------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                backend_type = backend_types()[self.source_config.type]
                context = SourceContext(self.source_name, self.config.dir, self.limits)
                self._backend = backend_type.factory(self.source_config, context)
            return self._backend

    @property
    def state(self) -> JobState:
        with self._lock:
            if self._state is None:
                path = self.config.state_path
                if self.options.new_job and path.exists():
                    aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
                    path.rename(aside)
                    log.info("previous job state moved to %s", aside)
                state = JobState(path)
                state.check_identity(
                    {
                        "project": self.config.site.project,
                        "source": f"{self.source_name} ({self.source_config.type})",
                        "archive": str(self.config.site.archive),
                    }
                )
                self._state = state
            return self._state

    @property
    def destination(self):
        with self._lock:  # series steps run on several threads: build it once
            return self._make_destination()

    def _make_destination(self):
        if self._destination is None:
            section = self.config.destination
            context = DestinationContext(
                self.config.site.archive, self.config.site.project, self.config.state_path, self.config.dir
            )
            self._destination = destination_types()[section.type].factory(section, context)
        return self._destination

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        if self._destination is not None:
            self._destination.close()
        if self._state is not None:
            self._state.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- query ---------------------------------------------------------------------

    def query_study_row(self, row: RowQuery) -> tuple[list[Study], list[str]]:
        """Every study matching one CSV row, de-duplicated, in answer order,
        and the backend's warnings about the answers."""
        found: dict[str, Study] = {}
        warnings: list[str] = []
        for query in plan_queries(row, self.source_config.matching):
            self.hooks.dqr_prepare_study_query(query=query, source=self.source_name, config=self.source_config)
            for study in self._retrying(lambda q=query: self._run_query(q), self.query_limit):
                found.setdefault(study.study_uid, study)
            warnings += query.warnings
        return list(found.values()), warnings

    def _run_query(self, query: StudyQuery) -> list[Study]:
        modality = query.filters.get("ModalitiesInStudy")
        sent = query
        if modality and not self.source_config.matching.modalities_in_study:
            sent = StudyQuery(query.line, {k: v for k, v in query.filters.items() if k != "ModalitiesInStudy"})
        studies = list(self.backend.query_studies(sent))
        if modality:
            # Some PACSes accept ModalitiesInStudy but ignore it for matching.
            studies = [s for s in studies if self._has_modality(s, modality)]
        return studies

    def _has_modality(self, study: Study, pattern: str) -> bool:
        modalities = study.modalities
        if not modalities:
            modalities = tuple({s.modality for s in self.backend.query_series(study)})
        return matches("ModalitiesInStudy", pattern, modalities)

    def query(self, rows: Sequence[RowQuery], input_path: str, kind: str = "csv") -> Plan:
        """Query every row not yet queried (resuming), then build the table."""
        state = self.state
        input_id = state.begin_input(kind, input_path, fingerprint(kind, rows), rows)
        by_line = {row.line: row for row in rows}
        pending = [by_line[line] for line in state.pending_rows(input_id)]
        self.reporter.start("query", len(rows))
        self.reporter.advance("query", len(rows) - len(pending))

        def step(row: RowQuery) -> None:
            try:
                studies, warnings = self.query_study_row(row)
            except SourceDownError as error:
                self.give_up(error)
                return
            except RemoteError as error:
                log.warning("row %d: query failed: %s", row.line, error)
                # An unreachable source is not the row's fault: it stays to do.
                state.record_row_failure(input_id, row.line, str(error), still_pending=error.unreachable)
            else:
                log.debug("row %d: %d studies", row.line, len(studies))
                state.record_row_matches(input_id, row.line, studies, warnings)
            self.reporter.advance("query")

        for start in range(0, len(pending), self.limits.batch_size):
            self._run_steps(step, pending[start : start + self.limits.batch_size], self.limits.max_queries)
        self.reporter.finish("query")
        return self.plan(input_id)

    def plan(self, input_id: int) -> Plan:
        results = self.state.row_results(input_id)
        failed = {row.line: error for row, status, error, _ in results if status == "failed"}
        not_done = {row.line: error or "interrupted" for row, status, error, _ in results if status == "pending"}
        noted = {row.line: note for row, status, note, _ in results if status == "queried" and note}
        lines = build_table(
            ((row.line, row.subject, row.session, studies) for row, _, _, studies in results),
            select_all=self.options.select_all,
        )
        lines = [
            replace(line, warning=f"query failed: {failed[line.row]}") if line.row in failed
            else replace(line, warning=f"not queried yet: {not_done[line.row]}") if line.row in not_done
            else replace(line, warning="; ".join(w for w in (line.warning, noted[line.row]) if w)) if line.row in noted
            else line
            for line in lines
        ]
        return self.make_plan(lines)

    def make_plan(self, lines: list[ResultLine]) -> Plan:
        lines = flag_label_collisions(lines, lambda line: astuple(self.labels_for(line)))
        selected = [line for line in lines if line.selected and line.study]
        n_series = [line.study.n_series for line in selected]  # type: ignore[union-attr]
        n_instances = [line.study.n_instances for line in selected]  # type: ignore[union-attr]
        return Plan(
            lines=lines,
            rows=len({line.row for line in lines}),
            rows_without_match=sorted({line.row for line in lines if line.warning == "no study matched"}),
            rows_not_queried=sorted({line.row for line in lines if line.warning.startswith("not queried")}),
            rows_ambiguous=sorted({line.row for line in lines if "ambiguous" in line.warning}),
            label_collisions=sorted({line.row for line in lines if "label collision" in line.warning}),
            studies=len(selected),
            series=None if None in n_series else sum(n_series),  # type: ignore[arg-type]
            instances=None if None in n_instances else sum(n_instances),  # type: ignore[arg-type]
        )

    # -- labels --------------------------------------------------------------------

    def labels_for(self, line: ResultLine) -> Labels:
        """The labels a study is stored under: the user's, else derived from
        its tags by the config's rules (derived ones change no DICOM)."""
        study = line.study
        assert study is not None
        fallback = safe_label(study.study_uid, "UNKNOWN")
        subject_value = study.patient_id if self.config.site.subject_label == "PatientID" else study.patient_name
        session_value = {
            "StudyID": study.study_id,
            "AccessionNumber": study.accession_number,
            "StudyInstanceUID": study.study_uid,
        }[self.config.site.session_label]
        return Labels(
            subject=line.subject or safe_label(subject_value, "UNKNOWN"),
            session=line.session or safe_label(session_value, fallback),
            relabel_subject=bool(line.subject),
            relabel_session=bool(line.session),
        )

    # -- retrieve ------------------------------------------------------------------

    def retrieve(self, lines: Sequence[ResultLine]) -> RunSummary:
        """Retrieve, relabel and store the selected studies."""
        started = time.monotonic()
        summary = self._summary
        if self.stop.is_set():  # stopped while querying: select nothing on a partial table
            return summary
        chosen: dict[str, tuple[ResultLine, Labels]] = {}
        for line in lines:
            if line.selected and line.study and line.study.study_uid not in chosen:
                chosen[line.study.study_uid] = (line, self.labels_for(line))
        summary.studies_selected = len(chosen)
        to_do = []
        for study_uid, (line, labels) in chosen.items():
            problem = self._label_conflict(study_uid, labels)
            if problem:
                summary.failures.append(Failure("study", line.row, problem, study_uid))
                continue
            if self.state.study_status(study_uid) == "stored":
                summary.studies_already_stored += 1
                continue
            self.state.select_study(line.study, labels, line.row)  # type: ignore[arg-type]
            to_do.append((line, labels))

        series_work = self._list_series(to_do)
        self.reporter.start("retrieve", sum(len(s) for _, _, s in series_work))
        self.reporter.start("instances", sum(x.n_instances or 0 for _, _, s in series_work for x in s))
        flat = [(line, labels, series) for line, labels, many in series_work for series in many]
        self._run_steps(lambda item: self._retrieve_series_step(*item), flat, self.limits.max_retrievals)
        self.reporter.finish("retrieve")
        self.reporter.finish("instances")
        self._close_studies(series_work)
        summary.seconds = time.monotonic() - started
        return summary

    def _label_conflict(self, study_uid: str, labels: Labels) -> str | None:
        previous, status = self.state.study_labels(study_uid)
        if previous is None or status not in ("stored", "retrieving", "failed"):
            return None
        if (previous.subject, previous.session) == (labels.subject, labels.session):
            return None
        if status == "failed" and not self._has_stored_instances(study_uid):
            return None
        return (
            f"already stored as {previous.subject}/{previous.session} by an earlier run; not stored again as "
            f"{labels.subject}/{labels.session} (remove it from the archive and use --new-job to relabel)"
        )

    def _has_stored_instances(self, study_uid: str) -> bool:
        return any(self.state.stored_instances(s.series_uid) for s, _ in self.state.known_series(study_uid))

    def _list_series(self, to_do: list[tuple[ResultLine, Labels]]) -> list[tuple[ResultLine, Labels, list[Series]]]:
        """The series to retrieve for each study, from state or a series query."""
        result: list[tuple[ResultLine, Labels, list[Series]]] = []
        lock = threading.Lock()
        self.reporter.start("series", len(to_do))

        def step(item: tuple[ResultLine, Labels]) -> None:
            line, labels = item
            study = line.study
            assert study is not None
            try:
                pending = self._series_of(study)
            except SourceDownError as error:
                self.give_up(error)
                pending = None
            except RemoteError as error:
                self._fail_study(line, f"series query failed: {error}")
                pending = None
            if pending is not None:
                with lock:
                    result.append((line, labels, pending))
            self.reporter.advance("series")

        self._run_steps(step, to_do, self.limits.max_queries)
        self.reporter.finish("series")
        order = {line.study.study_uid: i for i, (line, _) in enumerate(to_do)}  # type: ignore[union-attr]
        return sorted(result, key=lambda item: order[item[0].study.study_uid])  # type: ignore[union-attr]

    def _series_of(self, study: Study) -> list[Series]:
        known = self.state.known_series(study.study_uid)
        if not known:
            listed = self._retrying(lambda: list(self.backend.query_series(study)), self.query_limit)
            for series in listed:
                chosen = self.hooks.dqr_select_series(study=study, series=series, series_filter=self.series_filter)
                self.state.record_series(series, bool(chosen))
                if chosen and series.instance_uids is not None:  # saves an image-level query per series
                    self.state.record_expected(
                        series.series_uid, [Instance(series.series_uid, uid) for uid in series.instance_uids]
                    )
            known = self.state.known_series(study.study_uid)
        else:  # re-apply the filter: it may have changed since the last run
            for series, status in known:
                if status in ("pending", "excluded"):
                    chosen = self.hooks.dqr_select_series(study=study, series=series, series_filter=self.series_filter)
                    self.state.record_series(series, bool(chosen))
            known = self.state.known_series(study.study_uid)
        with self._lock:  # steps run on several threads
            self._summary.series_excluded += sum(1 for _, status in known if status == "excluded")
        return [series for series, status in known if status != "excluded"]

    def _retrieve_series_step(self, line: ResultLine, labels: Labels, series: Series) -> None:
        study = line.study
        assert study is not None
        if not self._wait_for_window():
            return
        try:
            self.retrieve_series(study, series, labels)
        except SourceDownError as error:
            self.give_up(error)
            self.state.set_series_status(series.series_uid, "pending")
        except Exception as error:  # noqa: BLE001 - one failing series never stops the others
            if self.stop.is_set():  # interrupted, not failed: the next run resumes it
                self.state.set_series_status(series.series_uid, "pending")
                return
            reason = str(error) if isinstance(error, RemoteError) else f"{type(error).__name__}: {error}"
            log.warning("series %s of study %s failed: %s", series.series_uid, study.study_uid, reason)
            self.state.set_series_status(series.series_uid, "failed", reason, attempt=True)
            with self._lock:
                self._summary.failures.append(Failure("series", line.row, reason, study.study_uid, series.series_uid))
        self.reporter.advance("retrieve")

    def retrieve_series(self, study: Study, series: Series, labels: Labels) -> None:
        """Make one series complete in the destination: the idempotent
        retrieval step, keyed by (study, series UID)."""
        state = self.state
        writer = self.destination.open_series(study, series, labels.subject, labels.session)
        expected = self._expected_instances(study, series)
        stored = state.stored_instances(series.series_uid)
        if expected is not None:
            for uid in expected:  # files an interrupted run wrote but did not report
                if uid not in stored and writer.exists(uid):
                    stored.add(uid)
            state.mark_stored(series.series_uid, writer.commit())
            missing = [uid for uid in expected if uid not in stored]
            if not missing:
                state.set_series_status(series.series_uid, "stored")
                return
        state.set_series_status(series.series_uid, "retrieving")
        store, store_errors = self._store_callback(study, series, labels, writer)

        def attempt() -> None:
            # Every attempt asks only for what is still missing: a retry after
            # an abort mid-series must not fetch the instances that arrived.
            now = state.stored_instances(series.series_uid)
            missing = None if expected is None else [uid for uid in expected if uid not in now]
            if missing == []:
                return
            request = RetrieveRequest(study, series, tuple(missing) if missing is not None and now else None)
            store_errors.clear()
            try:
                report = self.backend.retrieve(request, store)
            finally:
                self._commit(series, writer)
            if store_errors:
                more = f" (and {len(store_errors) - 1} more)" if len(store_errors) > 1 else ""
                raise RemoteError(f"could not store an instance: {store_errors[0]}{more}")
            now = state.stored_instances(series.series_uid)
            if expected is not None:
                still = [uid for uid in expected if uid not in now]
                if still:
                    raise IncompleteRetrieveError(
                        f"{len(still)} of {len(expected)} instances did not arrive"
                        + (f" ({report.failed} sub-operations failed)" if report.failed else ""),
                        missing=len(still),
                    )
            elif series.n_instances is not None and len(now) < series.n_instances:
                raise IncompleteRetrieveError(
                    f"{series.n_instances - len(now)} of {series.n_instances} instances did not arrive",
                    missing=series.n_instances - len(now),
                )

        self._retrying(attempt, self.retrieve_limit, rate=False)
        state.set_series_status(series.series_uid, "stored")
        with self._lock:
            self._summary.series_stored += 1

    def _commit(self, series: Series, writer: SeriesWriter) -> None:
        """Record what the destination acknowledged -- also when it refused
        the rest (those it acknowledged in the same exchange are stored)."""
        try:
            self.state.mark_stored(series.series_uid, writer.commit())
        except DestinationRefusedError as error:
            self.state.mark_stored(series.series_uid, error.stored)
            raise

    def _expected_instances(self, study: Study, series: Series) -> list[str] | None:
        expected = self.state.expected_instances(series.series_uid)
        if expected is not None:
            return expected
        try:
            instances = self._retrying(lambda: list(self.backend.query_instances(study, series)), self.query_limit)
        except NotImplementedError:
            return None
        self.state.record_expected(series.series_uid, instances)
        return [i.sop_instance_uid for i in instances]

    def _store_callback(
        self, study: Study, series: Series, labels: Labels, writer: SeriesWriter
    ) -> tuple[Callable[[ReceivedInstance], None], list[str]]:
        errors: list[str] = []
        destination = self.destination

        def store(received: ReceivedInstance) -> None:
            if self.stop.is_set():
                raise Interrupted("stopping: instance not stored")
            try:
                if writer.exists(received.sop_instance_uid):
                    return
                decoded = decode(received)
                if raw_text(decoded, SERIES_INSTANCE_UID) != series.series_uid:
                    raise ValueError(f"instance {received.sop_instance_uid} is not of series {series.series_uid}")
                context = RelabelContext(decoded.dataset, labels, study, series, destination=destination)
                self.hooks.dqr_relabel(context=context)
                part10 = encode_part10(decoded, received)
                writer.write(received.sop_instance_uid, part10, context.replaced)
            except DestinationRefusedError as error:
                if error.retriable:
                    errors.append(str(error))
                    raise
                # Refused for good: the others of the series are still sent.
                errors.append(str(error))
                return
            except Exception as error:
                errors.append(str(error))
                raise
            with self._lock:
                self._summary.instances_stored += 1
                self._summary.bytes_stored += len(part10)
            self.reporter.instance_stored(len(part10))

        return store, errors

    def _fail_study(self, line: ResultLine, reason: str) -> None:
        assert line.study is not None
        self.state.set_study_status(line.study.study_uid, "failed", reason)
        with self._lock:
            self._summary.failures.append(Failure("study", line.row, reason, line.study.study_uid))

    def _close_studies(self, series_work: list[tuple[ResultLine, Labels, list[Series]]]) -> None:
        for line, _, _ in series_work:
            study = line.study
            assert study is not None
            statuses = [status for _, status in self.state.known_series(study.study_uid) if status != "excluded"]
            if all(status == "stored" for status in statuses):
                self.state.set_study_status(study.study_uid, "stored")
                self._summary.studies_stored += 1
            elif "failed" in statuses:
                failed = statuses.count("failed")
                self.state.set_study_status(study.study_uid, "failed", f"{failed} of {len(statuses)} series failed")
            # else: interrupted with series still pending; the next run resumes it

    # -- execution -----------------------------------------------------------------

    def _run_steps(self, step: Callable[[Any], None], items: Sequence[Any], workers: int) -> None:
        """Run independent steps through the configured executor."""
        self.executor.run(step, items, workers, self.stop)

    def _retrying(self, action: Callable[[], Any], limit: AdaptiveLimit, rate: bool = True) -> Any:
        return call_with_retries(action, self.limits, limit, self.rate if rate else None, self.breaker)

    def interrupt(self) -> None:
        """Stop cleanly: no new step starts; finished work is kept."""
        self._summary.interrupted = True
        self.stop.set()

    def give_up(self, error: SourceDownError) -> None:
        """The source stayed unreachable: stop the job, keep what is done."""
        with self._lock:
            if self._summary.gave_up is None:
                log.error("%s", error)
                self._summary.gave_up = str(error)
        self.stop.set()

    @property
    def stopped(self) -> bool:
        return self.stop.is_set()

    def _wait_for_window(self) -> bool:
        """Wait while retrievals are outside the availability window; False if stopped meanwhile."""
        if self.window is None:
            return not self.stop.is_set()
        announced = False
        while (wait := self.window.seconds_until_open()) > 0:
            if not announced:
                log.warning(
                    "outside the retrieval window %s: waiting until %s", self.window.text, self.window.opens_at()
                )
                announced = True
            if self.stop.wait(min(wait, 5.0)):
                return False
        return not self.stop.is_set()


class Interrupted(RemoteError):
    """The job is stopping; the instance was not stored."""


def astuple(labels: Labels) -> tuple[str, str]:
    return labels.subject, labels.session


def write_failures_csv(input_path: Path, failed_rows: dict[int, str], output: Path) -> int:
    """Copy the input's failed rows, verbatim, with a ``reason`` column, so
    the user can fix and re-run just those. Returns how many were written."""
    from dqr.csvquery import read_text

    reader = csv.reader(io.StringIO(read_text(input_path), newline=""))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    line = 1
    written = 0
    keep: list[int] = []
    for index, cells in enumerate(reader):
        if index == 0:  # an earlier failures file already has a reason column: replace it
            keep = [i for i, cell in enumerate(cells) if cell.strip() != "reason"]
            writer.writerow([cells[i] for i in keep] + ["reason"])
        elif line in failed_rows:
            writer.writerow([cells[i] for i in keep if i < len(cells)] + [failed_rows[line]])
            written += 1
        line = reader.line_num + 1
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp")
    temp.write_text(buffer.getvalue(), encoding="utf-8")
    temp.replace(output)
    return written
