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
``retrieve-study``  ``study_uid``          the same for every series of a
                                           study fetched in one request
``fetch-study``     ``study_uid``          ``list-study``, then
                                           ``retrieve-study`` when it can;
                                           else it returns one
                                           ``retrieve-series`` per series
==================  =====================  ==================================

A step may return *follow-up steps*, ``[(kind, key), ...]``, that the
executor runs as well before its ``run`` returns (:data:`FollowUps`): that
is how ``fetch-study`` lets one study's listing overlap other studies'
retrievals while each series stays a step of its own.

:func:`store_instance` is the store path every backend feeds (also used by
``bench/``): check, relabel, encode, write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from dqr.acceptance import accept_arrival
from dqr.backend import SeriesWriter, VerifyMode, WholeStudyBackend
from dqr.context import JobContext
from dqr.errors import (
    DestinationRefusedError,
    IncompleteRetrieveError,
    Interrupted,
    RemoteError,
    SourceDownError,
)
from dqr.matching import matches
from dqr.model import (
    Labels,
    ReceivedInstance,
    RetrieveRequest,
    RowQuery,
    Series,
    SeriesStatus,
    Study,
    StudyQuery,
    StudyRetrieveRequest,
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
    RETRIEVE_STUDY = "retrieve-study"
    FETCH_STUDY = "fetch-study"


#: What a step may return: more steps for the executor to run, ``(kind, key)``.
FollowUps = list[tuple[StepKind, Any]]


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
    known = state.known_series(study.study_uid)
    if not known:
        state.record_listing(series_of(ctx, study))
    else:
        for series, status in known:
            if status in (SeriesStatus.PENDING, SeriesStatus.EXCLUDED):
                state.record_series(series, _selects(ctx, study, series))
    return state.known_series(study.study_uid)


def list_study_step(ctx: JobContext, study_uid: str) -> None:
    """The ``list-study`` step: list one selected study's series."""
    _list_selected(ctx, study_uid)


def _list_selected(ctx: JobContext, study_uid: str) -> tuple[Study, Labels, list[tuple[Series, SeriesStatus]] | None]:
    """List a selected study (:func:`list_study`), recording a failure
    instead of raising it: the study, its labels and its series as the job
    state now has them (``None`` if the listing failed)."""
    study, labels, line = ctx.state.selected_study(study_uid)
    known = None
    try:
        known = list_study(ctx, study)
    except SourceDownError as error:
        ctx.give_up(str(error))
    except RemoteError as error:
        log.warning("row %d: series query of study %s failed: %s", line, study_uid, error)
        ctx.state.set_study_status(study_uid, StudyStatus.FAILED, f"series query failed: {error}")
    ctx.reporter.advance("series")
    return study, labels, known


# -- retrieve one series ----------------------------------------------------------


def retrieve_series_step(ctx: JobContext, series_uid: str) -> None:
    """The ``retrieve-series`` step: make one series complete in the
    destination, recording a failure instead of raising it."""
    state = ctx.state
    series = state.series(series_uid)
    study, labels, _ = state.selected_study(series.study_uid)
    if not ctx.wait_for_window():
        return
    _settle_series(ctx, study, series, lambda: retrieve_series(ctx, study, series, labels))


def _settle_series(ctx: JobContext, study: Study, series: Series, make_complete: Callable[[], None]) -> None:
    """Run what makes a series complete, recording a failure instead of raising it."""
    state = ctx.state
    series_uid = series.series_uid
    try:
        make_complete()
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
    writer = ctx.destination.open_series(study, series, labels.subject, labels.session, labels=labels)
    expected = _expected_instances(ctx, study, series)
    if expected is not None:
        stored = _adopt_found(ctx, series, writer, expected)
        if all(uid in stored for uid in expected):
            _stored(ctx, study, series, expected)
            return
    state.set_series_status(series.series_uid, SeriesStatus.RETRIEVING)

    def attempt() -> None:
        now = state.stored_instances(series.series_uid)
        missing = None if expected is None else [uid for uid in expected if uid not in now]
        if missing == []:
            return
        request = RetrieveRequest(study, series, tuple(missing) if missing is not None and now else None)
        target = StoreTarget(request, labels, writer, expected)
        try:
            try:
                report = ctx.backend.retrieve(request, lambda received: store_instance(ctx, received, target))
            finally:
                _commit(ctx, series, writer, target.sizes)
        except SourceDownError:
            raise  # the source, or the destination, stayed unreachable: the job stops
        except RemoteError as error:
            if not target.errors:
                raise
            # A failure to store, not to reach the source: it must not feed the source's breaker.
            raise _store_failure(target, error.retriable) from None
        if target.errors:
            raise _store_failure(target, False)
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
    _stored(ctx, study, series, expected)


def _store_failure(target: StoreTarget, retriable: bool) -> RemoteError:
    more = f" (and {len(target.errors) - 1} more)" if len(target.errors) > 1 else ""
    return RemoteError(f"could not store an instance: {target.errors[0]}{more}", retriable=retriable)


def _stored(
    ctx: JobContext, study: Study, series: Series, expected: list[str] | None, sent: bool = False
) -> None:
    """The series is in the destination: confirmed there first, when it was
    sent by this step (a series already stored was confirmed then; ``sent``:
    this step sent it, no need to read its status). A mismatch fails the
    series naming what is missing, and those instances are to be sent again."""
    state = ctx.state
    if (sent or state.series_status(series.series_uid) != SeriesStatus.STORED) and expected:
        mode = getattr(ctx.destination, "verify_mode", VerifyMode.LOCAL)
        if mode not in (VerifyMode.LOCAL, VerifyMode.OFF):
            missing = ctx.destination.verify(study, series, expected)
            if missing:
                state.unmark_stored(series.series_uid, missing)
                shown = ", ".join(missing[:5]) + (f" … (+{len(missing) - 5})" if len(missing) > 5 else "")
                raise RemoteError(
                    f"{len(missing)} of {len(expected)} instances are not held by {ctx.destination.describe()} "
                    f"after they were sent ({mode} verification): {shown}",
                    retriable=True,
                )
    state.set_series_status(series.series_uid, SeriesStatus.STORED)


def _adopt_found(
    ctx: JobContext, series: Series, writer: SeriesWriter, expected: list[str], stored: set[str] | None = None
) -> set[str]:
    """Record the expected instances the destination already holds that the
    job state does not know (an interrupted run's, or a set-aside state's
    files: the destination checks each is that instance, as asked); return
    what is stored now. ``stored``: what the job state has stored, if just read."""
    if stored is None:
        stored = ctx.state.stored_instances(series.series_uid)
    for uid in expected:
        if uid not in stored:
            writer.exists(uid)  # registers a proven file for the commit
    if not _commit(ctx, series, writer, None):
        return stored
    return ctx.state.stored_instances(series.series_uid)


def _commit(ctx: JobContext, series: Series, writer: SeriesWriter, sizes: dict[str, int] | None) -> list[str]:
    """What the destination made durable (and, when remote, acknowledged) is
    stored -- only that, also when it refused the rest; returned. ``sizes``
    are of what this run stored; ``None`` for files found from an earlier
    run (not counted as this run's)."""
    run = None if sizes is None else ctx.run_id
    warnings = getattr(writer, "warnings", None)
    try:
        committed = writer.commit()
    except DestinationRefusedError as error:
        ctx.state.mark_stored(series.series_uid, error.stored, run, sizes, warnings)
        raise
    ctx.state.mark_stored(series.series_uid, committed, run, sizes, warnings)
    return committed


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
    #: every SOP Instance UID of the series, when known: nothing else is accepted
    expected: Collection[str] | None = None
    errors: list[str] = field(default_factory=list)
    #: bytes written per SOP Instance UID, for the summary
    sizes: dict[str, int] = field(default_factory=dict)


def store_instance(ctx: JobContext | Any, received: ReceivedInstance, target: StoreTarget) -> int:
    """Check, relabel, encode and write one arriving instance; return the
    bytes written. Raises when it could not be stored, so the backend can
    refuse it; the reason is kept in ``target``.

    ``ctx`` needs only ``hooks``, ``stop`` and ``reporter`` (bench/ passes a
    small stand-in).
    """
    return _store(ctx, received, lambda decoded: target)


def store_study_instance(ctx: JobContext | Any, received: ReceivedInstance, targets: dict[str, StoreTarget]) -> int:
    """:func:`store_instance` for a whole-study request: the instance goes to
    the target of its own series (one of another series is refused as not
    of the series asked for)."""
    first = next(iter(targets.values()))
    return _store(ctx, received, lambda decoded: targets.get(raw_text(decoded, SERIES_INSTANCE_UID) or "", first))


def _store(ctx: Any, received: ReceivedInstance, target_of: Callable[[Any], StoreTarget]) -> int:
    if ctx.stop.is_set():
        raise Interrupted("stopping: instance not stored")
    target: StoreTarget | None = None
    try:
        decoded = decode(received)
        target = target_of(decoded)
        # Before anything is written: only the request's own instances. (An
        # instance already stored is not skipped here: the destination
        # compares it, so a twin with other content is a conflict.)
        accept_arrival(decoded, received, target.request, target.expected)
        context = RelabelContext(
            decoded.dataset, target.labels, target.request.study, target.request.series,
            destination=getattr(ctx, "destination", None),
        )
        ctx.hooks.dqr_relabel(context=context)
        part10 = encode_part10(decoded, received)
        target.writer.write(received.sop_instance_uid, part10, context.replaced)
    except DestinationRefusedError as error:
        target.errors.append(str(error))
        if error.retriable:
            raise
        return 0  # refused for good: the source goes on with the others (the series fails after)
    except Exception as error:
        if target is not None:
            target.errors.append(str(error))
        raise
    target.sizes[received.sop_instance_uid] = len(part10)
    ctx.reporter.instance_stored(len(part10))
    return len(part10)


# -- retrieve one study in one request -------------------------------------------


@dataclass(frozen=True)
class WholeStudy:
    """A study to fetch in one request (:func:`whole_study_series`): its
    series, and each one's expected instances (none of them stored yet)."""

    series: list[Series]
    expected: dict[str, list[str]]


def whole_study_series(
    ctx: JobContext, study_uid: str, known: list[tuple[Series, SeriesStatus]] | None = None
) -> WholeStudy | None:
    """The series of a study when it can be fetched in one request: the
    backend can, every series is selected and pending, each one's instances
    are known and none is stored. ``None`` otherwise (series by series).
    ``known``: the study's series as the job state has them, if just read."""
    if not isinstance(ctx.backend, WholeStudyBackend):
        return None
    if known is None:
        known = ctx.state.known_series(study_uid)
    if not known or any(status != SeriesStatus.PENDING for _, status in known):
        return None
    instances = ctx.state.study_instances(study_uid)
    expected: dict[str, list[str]] = {}
    for series, _ in known:
        listed, stored = instances.get(series.series_uid, (None, set()))
        if listed is None or stored:
            return None
        expected[series.series_uid] = listed
    return WholeStudy([series for series, _ in known], expected)


def retrieve_study_step(
    ctx: JobContext, study_uid: str, whole: WholeStudy | None = None, selected: tuple[Study, Labels] | None = None
) -> None:
    """The ``retrieve-study`` step: one request for the whole study; then a
    series it completed is confirmed (verified at a network destination)
    and the others are made complete by :func:`retrieve_series_step`, which
    asks only for what is missing. ``whole``: what :func:`whole_study_series`
    found, and ``selected``: the study and its labels, if just read."""
    study, labels = selected or ctx.state.selected_study(study_uid)[:2]
    series = whole.series if whole is not None else [s for s, _ in ctx.state.known_series(study_uid)]
    if not ctx.wait_for_window():
        return
    refused: dict[str, str] = {}
    complete: dict[str, list[str]] = {}
    try:
        refused, complete = retrieve_whole_study(ctx, study, series, labels, whole.expected if whole else None)
    except SourceDownError as error:
        ctx.give_up(str(error))
        return
    except Exception as error:  # noqa: BLE001 - the series-by-series retrieval below is the fallback
        log.info("study %s in one request: %s; retrieving it series by series", study_uid, error)
    for one in series:
        if ctx.stop.is_set():
            return
        if one.series_uid in refused:  # as series by series: an instance that could not be stored fails its series
            reason = f"could not store an instance: {refused[one.series_uid]}"
            log.warning("series %s of study %s failed: %s", one.series_uid, study_uid, reason)
            ctx.state.set_series_status(one.series_uid, SeriesStatus.FAILED, reason, attempt=True)
            ctx.reporter.advance("retrieve")
            continue
        if one.series_uid in complete:
            # every expected instance was committed just now: what
            # retrieve-series would find, without reading it all back
            expected = complete[one.series_uid]
            _settle_series(
                ctx, study, one, lambda one=one, expected=expected: _stored(ctx, study, one, expected, sent=True)
            )
            continue
        retrieve_series_step(ctx, one.series_uid)


def retrieve_whole_study(
    ctx: JobContext, study: Study, series: list[Series], labels: Labels,
    expected: dict[str, list[str]] | None = None,
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """One attempt to fetch a study in one request; what arrived is stored
    (committed per series) whatever happens, the rest is left to do.
    Returns, per series, the first instance that could not be stored; and
    the series that are complete (every expected instance committed, none
    refused), with their expected instances. ``expected``: each series'
    expected instances, none stored, if just read (else read here)."""
    state = ctx.state
    instances = None if expected is not None else state.study_instances(study.study_uid)
    targets: dict[str, StoreTarget] = {}
    for one in series:
        if expected is not None:
            listed, stored = expected.get(one.series_uid) or [], set()
        else:
            found, stored = instances.get(one.series_uid, (None, set()))
            listed = found or []
        writer = ctx.destination.open_series(study, one, labels.subject, labels.session, labels=labels)
        if _adopt_found(ctx, one, writer, listed, stored):
            # some of it is in the destination already: fetch only what is missing
            raise RemoteError("part of the study is in the destination already")
        targets[one.series_uid] = StoreTarget(RetrieveRequest(study, one), labels, writer, listed)
    state.set_series_statuses([one.series_uid for one in series], SeriesStatus.RETRIEVING)
    # with the expected instances: a C-MOVE's storage SCP accepts only those
    request = StudyRetrieveRequest(
        study, tuple(replace(one, instance_uids=tuple(targets[one.series_uid].expected or ())) for one in series)
    )
    failure: Exception | None = None
    committed: dict[str, list[str]] = {}
    try:
        ctx.guard.retrieve_once(
            lambda: ctx.backend.retrieve_study(request, lambda received: store_study_instance(ctx, received, targets))  # type: ignore[attr-defined]
        )
    except SourceDownError:
        raise
    except Exception as error:  # noqa: BLE001 - judged below, with what was refused
        failure = error
    finally:
        for one in series:
            target = targets[one.series_uid]
            try:
                committed[one.series_uid] = _commit(ctx, one, target.writer, target.sizes)
            except DestinationRefusedError as error:  # refused for good at commit (a STOW batch)
                if error.retriable:
                    raise
                target.errors.append(str(error))
    refused = {uid: target.errors[0] for uid, target in targets.items() if target.errors}
    if failure is not None and not refused:
        raise failure
    complete: dict[str, list[str]] = {}
    for uid, target in targets.items():
        if not target.errors and target.expected:
            # as committed (what the job state now has stored; nothing was
            # before, or the study would not be fetched in one request), not as sent
            stored = set(committed.get(uid, ()))
            if all(sop in stored for sop in target.expected):
                complete[uid] = list(target.expected)
    return refused, complete


# -- list and retrieve one study ---------------------------------------------------


def fetch_study_step(ctx: JobContext, study_uid: str) -> FollowUps:
    """The ``fetch-study`` step: list a selected study's series, then fetch
    the study in one request when it can be (:func:`whole_study_series`);
    otherwise return one ``retrieve-series`` step per wanted series, for the
    executor to run alongside the other studies' steps. Either way the study
    is listed as soon as a worker is free, not after every other study."""
    study, labels, known = _list_selected(ctx, study_uid)
    if ctx.stop.is_set() or known is None:  # stopped, or the listing failed (recorded)
        return []
    wanted = [series for series, status in known if status != SeriesStatus.EXCLUDED]
    ctx.reporter.grow("retrieve", len(wanted))
    ctx.reporter.grow("instances", sum(series.n_instances or 0 for series in wanted))
    whole = whole_study_series(ctx, study_uid, known)
    if whole is not None:
        retrieve_study_step(ctx, study_uid, whole, (study, labels))
        return []
    return [(StepKind.RETRIEVE_SERIES, series.series_uid) for series in wanted]


#: step kind -> ``step(context, key)``, which may return :data:`FollowUps`
STEPS: dict[StepKind, Callable[[JobContext, Any], FollowUps | None]] = {
    StepKind.QUERY_ROW: query_row_step,
    StepKind.LIST_STUDY: list_study_step,
    StepKind.RETRIEVE_SERIES: retrieve_series_step,
    StepKind.RETRIEVE_STUDY: retrieve_study_step,
    StepKind.FETCH_STUDY: fetch_study_step,
}


@dataclass(frozen=True)
class Step:
    """One kind of step bound to a context: what an executor calls with
    each key. A distributed executor queues ``(kind, key)`` instead and its
    workers call ``STEPS[kind]`` with their own context."""

    kind: StepKind
    ctx: JobContext

    def __call__(self, key: Any) -> FollowUps:
        return STEPS[self.kind](self.ctx, key) or []

    def then(self, kind: StepKind) -> Step:
        """The step a follow-up of ``kind`` runs, on the same context."""
        return Step(kind, self.ctx)
