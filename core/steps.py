"""The pipeline's steps: query one CSV row, list one study's series,
retrieve one series, store one instance.

Each takes its inputs as arguments -- a :class:`~dqr.context.JobContext`
and a key -- and keeps its progress in the job state, so it is idempotent
and can run in a thread, another process or another machine: a worker
given the same config opens its own context and calls ``STEPS[kind](context,
key)`` with a key read from a queue. The keys are plain JSON values:

==================  =====================  ==================================
step                key                    what it records
==================  =====================  ==================================
``query-row``       ``[input_id, line]``   the row's matches or its failure
``list-study``      ``study_uid``          the study's series, selected or not
``retrieve-series`` ``series_uid``         each instance stored, the series'
                                           status
==================  =====================  ==================================

:func:`store_instance` is the store path every backend feeds (also used by
``bench/``): check, relabel, encode, write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dqr.backend import SeriesWriter
from dqr.context import JobContext
from dqr.errors import IncompleteRetrieveError, Interrupted, RemoteError, SourceDownError
from dqr.matching import matches
from dqr.model import (
    Instance,
    Labels,
    ReceivedInstance,
    RetrieveRequest,
    RowQuery,
    Series,
    SeriesStatus,
    Study,
    StudyQuery,
    StudyStatus,
)
from dqr.planner import plan_queries
from dqr.relabel import RelabelContext, decode, encode_part10, raw_text

log = logging.getLogger("dqr")
SERIES_INSTANCE_UID = 0x0020000E


class StepKind(StrEnum):
    """The engine's steps, by the name an executor may queue them under."""

    QUERY_ROW = "query-row"
    LIST_STUDY = "list-study"
    RETRIEVE_SERIES = "retrieve-series"


# -- query one row ----------------------------------------------------------------


def query_row(ctx: JobContext, row: RowQuery) -> tuple[list[Study], list[str]]:
    """Every study matching one CSV row, de-duplicated, in answer order,
    and the backend's remarks about the answers."""
    found: dict[str, Study] = {}
    notes: list[str] = []
    for query in plan_queries(row, ctx.source_config.matching):
        ctx.hooks.dqr_prepare_study_query(query=query, source=ctx.source_name, config=ctx.source_config)
        for study in ctx.guard.query(lambda q=query: _send_study_query(ctx, q)):
            found.setdefault(study.study_uid, study)
        notes += query.warnings
    return list(found.values()), notes


def _send_study_query(ctx: JobContext, query: StudyQuery) -> list[Study]:
    modality = query.filters.get("ModalitiesInStudy")
    sent = query
    if modality and not ctx.source_config.matching.modalities_in_study:
        sent = StudyQuery(query.line, {k: v for k, v in query.filters.items() if k != "ModalitiesInStudy"})
    studies = list(ctx.backend.query_studies(sent))
    if sent is not query:
        query.warnings.extend(sent.warnings)
    if modality:
        # The one place ModalitiesInStudy is checked: some PACSes accept it
        # but ignore it for matching, others leave it out of the answers.
        studies = [s for s in studies if matches("ModalitiesInStudy", modality, _modalities(ctx, s))]
    return studies


def _modalities(ctx: JobContext, study: Study) -> tuple[str, ...]:
    if study.modalities:
        return study.modalities
    return tuple({s.modality for s in ctx.guard.query(lambda: list(ctx.backend.query_series(study)))})


def query_row_step(ctx: JobContext, key: tuple[int, int]) -> None:
    """The ``query-row`` step: query one registered row and record the answer."""
    input_id, line = key
    row = ctx.state.row_query(input_id, line)
    try:
        studies, notes = query_row(ctx, row)
    except SourceDownError as error:
        ctx.give_up(str(error))
        return
    except RemoteError as error:
        log.warning("row %d: query failed: %s", row.line, error)
        # An unreachable source is not the row's fault: it stays to do.
        ctx.state.record_row_failure(input_id, row.line, str(error), still_pending=error.unreachable)
    else:
        log.debug("row %d: %d studies", row.line, len(studies))
        ctx.state.record_row_matches(input_id, row.line, studies, notes)
    ctx.reporter.advance("query")


# -- list one study ---------------------------------------------------------------


def series_of(ctx: JobContext, study: Study) -> list[tuple[Series, bool]]:
    """A study's series as the source lists them, each with whether the
    series filter (the ``dqr_select_series`` hook) selects it. Records nothing."""
    listed = ctx.guard.query(lambda: list(ctx.backend.query_series(study)))
    return [(series, _selects(ctx, study, series)) for series in listed]


def _selects(ctx: JobContext, study: Study, series: Series) -> bool:
    return bool(ctx.hooks.dqr_select_series(study=study, series=series, series_filter=ctx.series_filter))


def list_study(ctx: JobContext, study: Study) -> list[tuple[Series, SeriesStatus]]:
    """Make the job state know a study's series (querying the source the
    first time, re-applying the filter later: it may have changed)."""
    state = ctx.state
    if not state.known_series(study.study_uid):
        for series, selected in series_of(ctx, study):
            state.record_series(series, selected)
            if selected and series.instance_uids is not None:  # saves an image-level query per series
                state.record_expected(series.series_uid, [Instance(series.series_uid, uid) for uid in series.instance_uids])
    else:
        for series, status in state.known_series(study.study_uid):
            if status in (SeriesStatus.PENDING, SeriesStatus.EXCLUDED):
                state.record_series(series, _selects(ctx, study, series))
    return state.known_series(study.study_uid)


def list_study_step(ctx: JobContext, study_uid: str) -> None:
    """The ``list-study`` step: list one selected study's series."""
    study, _, line = ctx.state.selected_study(study_uid)
    try:
        list_study(ctx, study)
    except SourceDownError as error:
        ctx.give_up(str(error))
    except RemoteError as error:
        log.warning("row %d: series query of study %s failed: %s", line, study_uid, error)
        ctx.state.set_study_status(study_uid, StudyStatus.FAILED, f"series query failed: {error}")
    ctx.reporter.advance("series")


# -- retrieve one series ----------------------------------------------------------


def retrieve_series_step(ctx: JobContext, series_uid: str) -> None:
    """The ``retrieve-series`` step: make one series complete in the
    destination, recording a failure instead of raising it."""
    state = ctx.state
    series = state.series(series_uid)
    study, labels, _ = state.selected_study(series.study_uid)
    if not ctx.wait_for_window():
        return
    try:
        retrieve_series(ctx, study, series, labels)
    except SourceDownError as error:
        ctx.give_up(str(error))
        state.set_series_status(series_uid, SeriesStatus.PENDING)
    except Exception as error:  # noqa: BLE001 - one failing series never stops the others
        if ctx.stop.is_set():  # interrupted, not failed: the next run resumes it
            state.set_series_status(series_uid, SeriesStatus.PENDING)
            return
        reason = str(error) if isinstance(error, RemoteError) else f"{type(error).__name__}: {error}"
        log.warning("series %s of study %s failed: %s", series_uid, study.study_uid, reason)
        state.set_series_status(series_uid, SeriesStatus.FAILED, reason, attempt=True)
    ctx.reporter.advance("retrieve")


def retrieve_series(ctx: JobContext, study: Study, series: Series, labels: Labels) -> None:
    """Make one series complete in the destination; idempotent, keyed by
    the series UID. Every attempt asks only for what is still missing."""
    state = ctx.state
    writer = ctx.destination.open_series(study, series, labels.subject, labels.session)
    expected = _expected_instances(ctx, study, series)
    if expected is not None:
        stored = state.stored_instances(series.series_uid)
        for uid in expected:
            if uid not in stored:
                writer.exists(uid)  # a file an interrupted run wrote but did not record: committed below
        _commit(ctx, series, writer, None)
        stored = state.stored_instances(series.series_uid)
        if all(uid in stored for uid in expected):
            state.set_series_status(series.series_uid, SeriesStatus.STORED)
            return
    state.set_series_status(series.series_uid, SeriesStatus.RETRIEVING)

    def attempt() -> None:
        now = state.stored_instances(series.series_uid)
        missing = None if expected is None else [uid for uid in expected if uid not in now]
        if missing == []:
            return
        request = RetrieveRequest(study, series, tuple(missing) if missing is not None and now else None)
        target = StoreTarget(request, labels, writer)
        try:
            report = ctx.backend.retrieve(request, lambda received: store_instance(ctx, received, target))
        finally:
            _commit(ctx, series, writer, target.sizes)
        if target.errors:
            raise RemoteError(f"could not store an instance: {target.errors[0]}")
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

    ctx.guard.retrieve(attempt)
    state.set_series_status(series.series_uid, SeriesStatus.STORED)


def _commit(ctx: JobContext, series: Series, writer: SeriesWriter, sizes: dict[str, int] | None) -> None:
    """What the destination made durable is stored -- only that. ``sizes``
    are of what this run stored; ``None`` for files found from an earlier
    run (not counted as this run's)."""
    ctx.state.mark_stored(series.series_uid, writer.commit(), None if sizes is None else ctx.run_id, sizes)


def _expected_instances(ctx: JobContext, study: Study, series: Series) -> list[str] | None:
    expected = ctx.state.expected_instances(series.series_uid)
    if expected is not None:
        return expected
    try:
        instances = ctx.guard.query(lambda: list(ctx.backend.query_instances(study, series)))
    except NotImplementedError:
        return None
    ctx.state.record_expected(series.series_uid, instances)
    return [i.sop_instance_uid for i in instances]


# -- store one instance -----------------------------------------------------------


@dataclass
class StoreTarget:
    """Where the instances of one retrieval request go, and what went wrong
    storing them (a backend may swallow the exception: DIMSE answers the
    C-STORE with a failure status instead)."""

    request: RetrieveRequest
    labels: Labels
    writer: SeriesWriter
    errors: list[str] = field(default_factory=list)
    #: bytes written per SOP Instance UID, for the summary
    sizes: dict[str, int] = field(default_factory=dict)


def store_instance(ctx: JobContext | Any, received: ReceivedInstance, target: StoreTarget) -> int:
    """Check, relabel, encode and write one arriving instance; return the
    bytes written (0 when already stored). Raises when it could not be
    stored, so the backend can refuse it; the reason is kept in ``target``.

    ``ctx`` needs only ``hooks``, ``stop`` and ``reporter`` (bench/ passes a
    small stand-in).
    """
    series = target.request.series
    if ctx.stop.is_set():
        raise Interrupted("stopping: instance not stored")
    try:
        if target.writer.exists(received.sop_instance_uid):
            return 0
        decoded = decode(received)
        if raw_text(decoded, SERIES_INSTANCE_UID) != series.series_uid:
            raise ValueError(f"instance {received.sop_instance_uid} is not of series {series.series_uid}")
        context = RelabelContext(decoded.dataset, target.labels, target.request.study, series)
        ctx.hooks.dqr_relabel(context=context)
        part10 = encode_part10(decoded, received)
        target.writer.write(received.sop_instance_uid, part10, context.replaced)
    except Exception as error:
        target.errors.append(str(error))
        raise
    target.sizes[received.sop_instance_uid] = len(part10)
    ctx.reporter.instance_stored(len(part10))
    return len(part10)


#: step kind -> ``step(context, key)``
STEPS: dict[StepKind, Callable[[JobContext, Any], None]] = {
    StepKind.QUERY_ROW: query_row_step,
    StepKind.LIST_STUDY: list_study_step,
    StepKind.RETRIEVE_SERIES: retrieve_series_step,
}


@dataclass(frozen=True)
class Step:
    """One kind of step bound to a context: what an executor calls with
    each key. A distributed executor queues ``(kind, key)`` instead and its
    workers call ``STEPS[kind]`` with their own context."""

    kind: StepKind
    ctx: JobContext

    def __call__(self, key: Any) -> None:
        STEPS[self.kind](self.ctx, key)
