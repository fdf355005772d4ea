"""The driver: CSV rows -> queries -> one results table -> selection ->
series -> retrieve -> relabel -> store, over the steps of :mod:`dqr.steps`.

Every phase hands its steps to the configured executor and reads what they
did back from the job state, so the same driver serves a thread pool here or
workers elsewhere. The engine never prints: it reports through a
:class:`~dqr.context.Reporter` and returns plain values the CLI renders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from dqr.backend import VerifyMode
from dqr.config import LoadedConfig
from dqr.context import JobContext
from dqr.model import Labels, RowOutcome, RowQuery, Series, SeriesStatus, Study, StudyStatus
from dqr.pluginmanager import executor_types
from dqr.results import ResultLine, ResultsTable, build_table, flag_label_collisions, write_table
from dqr.state import SeriesCounts
from dqr.steps import Step, StepKind

log = logging.getLogger("dqr")


class FailureKind(StrEnum):
    ROW = "row"
    STUDY = "study"
    SERIES = "series"


@dataclass
class Failure:
    """Something that did not get done, and why."""

    kind: FailureKind
    row: int | None
    reason: str
    study_uid: str = ""
    series_uid: str = ""


class JobOutcome(StrEnum):
    """How a run ended, for the exit code."""

    DONE = "done"
    FAILURES = "failures"
    GAVE_UP = "gave up"
    INTERRUPTED = "interrupted"


@dataclass
class RunSummary:
    """What a retrieval did; counted from the job state, so it covers every
    process that worked on the job."""

    studies_selected: int = 0
    studies_stored: int = 0
    studies_already_stored: int = 0
    studies_nothing_selected: int = 0
    studies_unverified: int = 0
    #: stored studies the destination was not asked to confirm (``verify: false``)
    studies_unverified_at_destination: int = 0
    series_stored: int = 0
    series_excluded: int = 0
    instances_stored: int = 0
    bytes_stored: int = 0
    #: of those, stored with a warning from the destination (e.g. C-STORE 0xB000)
    instances_with_warning: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    gave_up: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "failures"}
        data["failures"] = [{**f.__dict__, "kind": str(f.kind)} for f in self.failures]
        return data


def fingerprint(kind: str, rows: Iterable[RowQuery]) -> str:
    digest = hashlib.sha256(kind.encode())
    for row in rows:
        digest.update(json.dumps([row.line, dict(row.filters), row.subject, row.session]).encode())
    return digest.hexdigest()


def table_fingerprint(path: Path) -> str:
    return "results:" + hashlib.sha256(path.read_bytes()).hexdigest()


def run_steps(ctx: JobContext, kind: StepKind, keys: Sequence[Any], workers: int) -> None:
    """Run one kind of step for every key through the configured executor."""
    executor = executor_types()[ctx.config.executor.type].factory()
    executor.run(Step(kind, ctx), keys, workers, ctx.stop)


# -- query ---------------------------------------------------------------------------


def query_rows(ctx: JobContext, rows: Sequence[RowQuery], input_path: str, kind: str = "csv") -> int:
    """Query every row of an input not yet queried (resuming); return the
    input's id in the job state."""
    state = ctx.state
    input_id = state.begin_input(kind, input_path, fingerprint(kind, rows), rows)
    pending = state.pending_rows(input_id)
    ctx.reporter.start("query", len(rows))
    ctx.reporter.advance("query", len(rows) - len(pending))
    batch = ctx.limits.batch_size
    for start in range(0, len(pending), batch):
        keys = [(input_id, line) for line in pending[start : start + batch]]
        run_steps(ctx, StepKind.QUERY_ROW, keys, ctx.limits.max_queries)
    ctx.reporter.finish("query")
    return input_id


def results_table(ctx: JobContext, input_id: int) -> ResultsTable:
    """The results table of an input, from what its rows gave so far."""
    lines = build_table(ctx.state.row_answers(input_id), select_all=ctx.options.select_all)
    return table_of(ctx, lines)


def table_of(ctx: JobContext, lines: list[ResultLine]) -> ResultsTable:
    """A table with the label rules applied (also for an edited table read back)."""
    return ResultsTable(flag_label_collisions(lines, lambda line: _label_key(ctx, line)))


def _label_key(ctx: JobContext, line: ResultLine) -> tuple[str, str]:
    labels = ctx.labels_for(line.subject, line.session, line.study)
    return labels.subject, labels.session


def begin_table_input(ctx: JobContext, path: Path) -> None:
    """Register an edited results table as the job's latest input (``dqr retry`` reads it back)."""
    ctx.state.begin_input("results", str(path), table_fingerprint(path), [])


def series_listing(ctx: JobContext, table: ResultsTable) -> list[tuple[ResultLine, list[Any]]]:
    """Each matched study's series, as ``dqr query --series`` shows them
    (through the guard; the job state is not changed)."""
    from dqr.steps import series_of

    return [(line, [series for series, _ in series_of(ctx, line.study)]) for line in table.lines if line.study]


# -- retrieve ------------------------------------------------------------------------


def retrieve(ctx: JobContext, lines: Sequence[ResultLine]) -> RunSummary:
    """Retrieve, relabel and store the selected studies of ``lines``."""
    started = time.monotonic()
    summary = RunSummary()
    state = ctx.state
    if ctx.stop.is_set():  # stopped while querying: select nothing on a partial table
        return _finish(ctx, summary, [], started)
    chosen: dict[str, ResultLine] = {}
    for line in lines:
        if line.selected and line.study is not None:
            chosen.setdefault(line.study.study_uid, line)
    summary.studies_selected = len(chosen)
    to_do: list[tuple[ResultLine, Study]] = []
    to_select: list[tuple[Study, Labels, int]] = []
    known = state.studies_labels(chosen)
    for study_uid, line in chosen.items():
        assert line.study is not None
        labels = ctx.labels_for(line.subject, line.session, line.study)
        previous, status = known.get(study_uid, (None, StudyStatus.FOUND))
        problem = _label_conflict(ctx, study_uid, labels, previous, status)
        if problem:
            summary.failures.append(Failure(FailureKind.STUDY, line.row, problem, study_uid))
            continue
        if status == StudyStatus.STORED:
            summary.studies_already_stored += 1
            continue
        to_select.append((line.study, labels, line.row))
        to_do.append((line, line.study))
    state.select_studies(to_select)

    # One step per study lists it and then fetches it -- in one request when
    # every series is wanted, else by the retrieve-series steps it returns --
    # so that listing a study overlaps retrieving the ones before it. The
    # guard holds queries to max_queries and retrievals to max_retrievals;
    # the steps at once are the larger of the two, so that the PACS never
    # sees more operations at a time than when listing and retrieving were
    # phases of their own (threads past max_retrievals list ahead, then wait).
    study_uids = [study.study_uid for _, study in to_do]
    ctx.reporter.start("series", len(study_uids))
    ctx.reporter.start("retrieve", 0)
    ctx.reporter.start("instances", 0)
    run_steps(ctx, StepKind.FETCH_STUDY, study_uids, max(ctx.limits.max_queries, ctx.limits.max_retrievals))
    for phase in ("series", "retrieve", "instances"):
        ctx.reporter.finish(phase)
    return _finish(ctx, summary, to_do, started)


def _label_conflict(
    ctx: JobContext, study_uid: str, labels: Labels, previous: Labels | None, status: StudyStatus
) -> str | None:
    """Why a study may not be stored under ``labels``, given what an earlier
    run stored it as (``previous``, its ``status``); ``None`` if it may."""
    if previous is None or status not in (StudyStatus.STORED, StudyStatus.RETRIEVING, StudyStatus.FAILED):
        return None
    if (previous.subject, previous.session) == (labels.subject, labels.session):
        return None
    if status == StudyStatus.FAILED and not _has_stored_instances(ctx, study_uid):
        return None
    # A subject derived from PatientName is a patient's name: never in a message.
    def shown(given: Labels) -> str:
        named = ctx.config.site.subject_label == "PatientName" and not given.relabel_subject
        return f"{'(the patient name)' if named else given.subject}/{given.session}"

    return (
        f"already stored as {shown(previous)} by an earlier run; not stored again as {shown(labels)} "
        "(remove it from the archive and use --new-job to relabel)"
    )


def _has_stored_instances(ctx: JobContext, study_uid: str) -> bool:
    return any(ctx.state.stored_instances(s.series_uid) for s, _ in ctx.state.known_series(study_uid))


def judge_study(
    study: Study, known: list[tuple[Series, SeriesStatus]], counts: dict[str, SeriesCounts]
) -> tuple[StudyStatus | None, str | None, bool]:
    """A study's status once its series steps ran: stored only when every
    selected series is and the PACS's own counts agree; ``None`` while some
    series are still to do (interrupted). Also whether its completeness is
    verified by counts the PACS announced. ``known``: its series as the job
    state has them; ``counts``: their instances (by series UID)."""
    statuses = [status for _, status in known]
    selected = [s for s, status in known if status != SeriesStatus.EXCLUDED]
    announced = f"announced {_count(study.n_series)} series, {_count(study.n_instances)} instances"
    if not known:
        return StudyStatus.FAILED, f"the PACS listed no series for this study ({announced}); nothing stored", True
    if not selected:
        return StudyStatus.NOTHING_SELECTED, None, True
    if SeriesStatus.FAILED in statuses:
        failed = statuses.count(SeriesStatus.FAILED)
        return StudyStatus.FAILED, f"{failed} of {len(selected)} series failed", True
    if any(status != SeriesStatus.STORED for status in statuses if status != SeriesStatus.EXCLUDED):
        return None, None, True
    none = SeriesCounts(False, 0, 0)
    stored = sum(counts.get(s.series_uid, none).stored for s in selected)
    found_instances = sum(_series_size(s, counts.get(s.series_uid, none)) for s, _ in known)
    if study.n_series is not None and len(known) < study.n_series:
        return StudyStatus.FAILED, f"incomplete: {announced}; found {len(known)} series, stored {len(selected)}", True
    if study.n_instances is not None and found_instances < study.n_instances:
        return (
            StudyStatus.FAILED,
            f"incomplete: {announced}; found {found_instances} instances, stored {stored}",
            True,
        )
    return StudyStatus.STORED, None, study.n_series is not None or study.n_instances is not None


def _series_size(series: Series, counts: SeriesCounts) -> int:
    """Instances a series has: as its listing named them, else as the PACS announced."""
    if counts.expected_known:
        return counts.known
    return series.n_instances or 0


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _finish(ctx: JobContext, summary: RunSummary, to_do: list[tuple[ResultLine, Study]], started: float) -> RunSummary:
    state = ctx.state
    uids = [study.study_uid for _, study in to_do]
    series_of_study = state.studies_series(uids)
    counts = state.studies_instance_counts(uids)
    outcomes: list[tuple[str, StudyStatus, str | None]] = []
    for line, study in to_do:
        known = series_of_study[study.study_uid]
        status, reason, verified = judge_study(study, known, counts)
        if status is not None:
            outcomes.append((study.study_uid, status, reason))
        if status == StudyStatus.STORED:
            summary.studies_stored += 1
            summary.studies_unverified += not verified
        elif status == StudyStatus.NOTHING_SELECTED:
            summary.studies_nothing_selected += 1
        elif status == StudyStatus.FAILED:
            failed_series = [(s, st) for s, st in known if st == SeriesStatus.FAILED]
            if failed_series:
                for s, _ in failed_series:
                    summary.failures.append(
                        Failure(FailureKind.SERIES, line.row, state.series_error(s.series_uid) or "", study.study_uid,
                                s.series_uid)
                    )
            else:
                summary.failures.append(Failure(FailureKind.STUDY, line.row, reason or "", study.study_uid))
        for _, series_status in known:
            summary.series_stored += series_status == SeriesStatus.STORED
            summary.series_excluded += series_status == SeriesStatus.EXCLUDED
    state.set_study_statuses(outcomes)
    if getattr(ctx.destination, "verify_mode", None) == VerifyMode.OFF:
        summary.studies_unverified_at_destination = summary.studies_stored
    summary.instances_stored, summary.bytes_stored = state.stored_by_run(ctx.run_id)
    summary.instances_with_warning = len(state.stored_with_warning(ctx.run_id))
    summary.seconds = time.monotonic() - started
    summary.interrupted = ctx.interrupted
    summary.gave_up = ctx.gave_up
    return summary


def outcome_of(table: ResultsTable, summary: RunSummary) -> JobOutcome:
    """How the run ended: the rule behind the exit code, in one place."""
    if summary.gave_up:
        return JobOutcome.GAVE_UP
    if summary.interrupted:
        return JobOutcome.INTERRUPTED
    if failed_rows(table, summary):
        return JobOutcome.FAILURES
    return JobOutcome.DONE


def failed_rows(table: ResultsTable, summary: RunSummary) -> dict[int, str]:
    """The input rows that did not get done, each with why."""
    rows: dict[int, str] = {}
    for line in table.lines:
        if line.outcome in (RowOutcome.QUERY_FAILED, RowOutcome.NOT_QUERIED):
            rows[line.row] = line.warning
    for failure in summary.failures:
        if failure.row is not None:
            rows.setdefault(failure.row, failure.reason)
    return rows


@dataclass(frozen=True)
class RetryPlan:
    """What ``dqr retry --failed`` re-runs: the latest input's table and the
    lines of its failed rows and studies."""

    table: ResultsTable
    lines: list[ResultLine]
    rows: int
    studies: int
    csv_path: Path | None


def plan_retry(ctx: JobContext) -> RetryPlan:
    """Re-query the latest input's failed rows and pick the lines to retry."""
    from dqr.csvquery import read_csv_queries
    from dqr.errors import ConfigError
    from dqr.results import read_table

    latest = ctx.state.latest_input()
    if latest is None:
        raise ConfigError("the job state has no input yet: nothing to retry", file=str(ctx.state.path))
    _, kind, input_path = latest
    failures = ctx.state.failures()  # before re-querying clears the rows' failures
    rows = {f["row"] for f in failures if f["kind"] == "row"}
    studies = {f["StudyInstanceUID"] for f in failures if f["kind"] in ("study", "series")}
    if kind == "csv":
        table = results_table(ctx, query_rows(ctx, read_csv_queries(Path(input_path)), input_path))
    else:
        table = table_of(ctx, read_table(Path(input_path)))
    chosen = [
        line for line in table.lines
        if line.row in rows or (line.study is not None and line.study.study_uid in studies)
    ]
    return RetryPlan(table, chosen, len(rows), len(studies), Path(input_path) if kind == "csv" else None)


def write_failure_report(
    config: LoadedConfig, table: ResultsTable, summary: RunSummary, csv_path: Path | None
) -> Path | None:
    """Write the failed rows beside the archive, in the input's format (the
    CSV's own rows with a ``reason``, or results-table lines), so the user
    can fix and re-run just those; remove an old report when nothing failed.
    Returns the report's path, or ``None``. Never raises for a full or
    read-only disk: the summary must still be shown (and says why)."""
    rows = failed_rows(table, summary)
    path = config.beside_archive("failures.csv")
    try:
        if rows and csv_path is not None:
            write_failures_csv(csv_path, rows, path)
        elif rows:
            write_table([line for line in table.lines if line.row in rows], path)
        else:
            path.unlink(missing_ok=True)
            return None
    except OSError as error:
        log.error("could not write the failures file %s: %s", path.name, error.strerror or error)
        return None
    return path


def write_failures_csv(input_path: Path, failed_rows: dict[int, str], output: Path) -> int:
    """Copy the input's failed rows, verbatim, with a ``reason`` column, so
    the user can fix and re-run just those. Returns how many were written."""
    from dqr.cells import neutralise_row  # opened in spreadsheets: no formula runs
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
            writer.writerow(neutralise_row([cells[i] for i in keep if i < len(cells)] + [failed_rows[line]]))
            written += 1
        line = reader.line_num + 1
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.tmp")
    try:
        temp.write_text(buffer.getvalue(), encoding="utf-8")
        temp.replace(output)
    finally:
        temp.unlink(missing_ok=True)
    return written
