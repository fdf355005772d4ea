"""The ``dqr`` command line: a thin layer over :mod:`dqr.engine`.

Exit codes: 0 all done; 1 some studies failed (the rest are done and the
failures are listed) or the source could not be reached; 2 invalid input or
config (nothing was queried); 130 interrupted (run again to resume).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import signal
import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

import dqr
from dqr.errors import DqrError, InputError, PluginError

EXIT_OK, EXIT_FAILURES, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
#: How a run ended (dqr.engine.JobOutcome's values) -> exit code.
EXIT_CODES = {"done": EXIT_OK, "failures": EXIT_FAILURES, "gave up": EXIT_FAILURES, "interrupted": EXIT_INTERRUPTED}

app = typer.Typer(
    name="dqr",
    rich_markup_mode="rich",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    help=(
        "Bulk DICOM query/retrieve: find the studies of a CSV on a PACS, pick, pull, relabel "
        "(Subject/Session) and store them.\n\n"
        "Example: [bold]dqr run --config site.yaml --csv studies.csv[/bold]"
    ),
)
out = Console()
# soft_wrap: an error line must stay one line (scripts grep "line 11"), not fold at 80 columns
err = Console(stderr=True, soft_wrap=True)
log = logging.getLogger("dqr")


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class Selection(StrEnum):
    default = "default"
    all = "all"


ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Site config (YAML).", show_default=False)]
CsvOption = Annotated[
    Path | None, typer.Option("--csv", help="CSV of queries (overrides `csv:` in the config).", show_default=False)
]
SourceOption = Annotated[str | None, typer.Option("--source", help="Which entry of `sources:` to use.")]
MaxQueries = Annotated[int | None, typer.Option("--max-queries", min=1, help="Simultaneous queries (overrides limits).")]
MaxRetrievals = Annotated[
    int | None, typer.Option("--max-retrievals", min=1, help="Simultaneous retrievals (overrides limits).")
]
SelectOption = Annotated[
    Selection,
    typer.Option("--select", help="'all' also selects every study of an ambiguous row (a labelled row matching several)."),
]
IncludeOption = Annotated[
    list[str] | None, typer.Option("--include", help="SeriesDescription glob to retrieve (repeatable; replaces config).")
]
ExcludeOption = Annotated[
    list[str] | None, typer.Option("--exclude", help="SeriesDescription glob to skip (repeatable; adds to config).")
]
RequestsPerSecond = Annotated[
    float | None, typer.Option("--requests-per-second", min=0.01, help="Cap on the query rate (overrides limits).")
]
Retries = Annotated[int | None, typer.Option("--retries", min=0, help="Retries of a retriable failure (overrides limits).")]
JsonSummary = Annotated[bool, typer.Option("--json", help="Print a machine-readable summary at the end.")]
NewJob = Annotated[bool, typer.Option("--new-job", help="Set the previous job state aside and start afresh.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dqr {dqr.__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging. May show patient names and birth dates.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """dqr: bulk DICOM query/retrieve from a CSV."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    _setup_logging(level)
    if verbose:
        log.warning("verbose logging is on: logs may contain patient names and birth dates")


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now, not what it was when the
    handler was made (in-process runs swap it, e.g. CliRunner)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(level: int) -> None:
    root = logging.getLogger("dqr")
    root.setLevel(level)
    for old in [h for h in root.handlers if h.get_name() == "dqr-cli"]:
        root.removeHandler(old)
    if err.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False, show_time=False)
    else:
        handler = _CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.set_name("dqr-cli")
    root.addHandler(handler)
    # pynetdicom logs every PDU (with identifiers) at INFO/DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == logging.DEBUG else logging.WARNING)


def handle_errors(command):
    """Render dqr's errors once, here at the edge, with the documented exit codes."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except InputError as error:
            count = len(error.problems)
            err.print(f"[bold red]error[/]: {count} problem{'s' if count != 1 else ''} found; nothing was queried")
            for problem in error.problems:
                err.print(f"  {problem}", markup=False, highlight=False)
            raise typer.Exit(EXIT_INVALID) from None
        except PluginError as error:
            err.print(f"[bold red]plugin error[/]: {error}", highlight=False)
            raise typer.Exit(EXIT_INVALID) from None
        except DqrError as error:
            err.print(f"[bold red]error[/]: {error}", highlight=False)
            raise typer.Exit(EXIT_FAILURES) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished work is kept; run the same command again to resume")
            raise typer.Exit(130) from None

    return wrapper


def _limits(
    max_queries: int | None, max_retrievals: int | None, requests_per_second: float | None = None, retries: int | None = None
) -> dict[str, Any]:
    return {
        "max_queries": max_queries,
        "max_retrievals": max_retrievals,
        "requests_per_second": requests_per_second,
        "retries": retries,
    }


def _csv_path(config, csv: Path | None) -> Path:
    from dqr.errors import ConfigError

    path = csv or config.site.csv
    if path is None:
        raise ConfigError("no CSV: give --csv FILE or set `csv:` in the config", file=str(config.path))
    return path


# -- run / query / retrieve ------------------------------------------------------


@app.command()
@handle_errors
def run(
    config: ConfigOption,
    csv: CsvOption = None,
    source: SourceOption = None,
    select: SelectOption = Selection.default,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    max_queries: MaxQueries = None,
    max_retrievals: MaxRetrievals = None,
    requests_per_second: RequestsPerSecond = None,
    retries: Retries = None,
    json_summary: JsonSummary = False,
    new_job: NewJob = False,
) -> None:
    """Query, select, retrieve, relabel and store: the whole job.

    The results table is written beside the archive ([italic]<archive>-results.csv[/]). Running
    the same command again resumes: finished work is skipped.

    Example: [bold]dqr run --config site.yaml --csv studies.csv[/bold]
    """
    from dqr import engine
    from dqr.config import load_config
    from dqr.context import JobOptions
    from dqr.csvquery import read_csv_queries
    from dqr.results import write_table

    loaded = load_config(config)
    csv_path = _csv_path(loaded, csv)
    rows = read_csv_queries(csv_path)
    limits = _limits(max_queries, max_retrievals, requests_per_second, retries)
    options = JobOptions(source, limits, select == Selection.all, include, exclude, new_job)
    with _job(loaded, options) as ctx:
        table = engine.results_table(ctx, engine.query_rows(ctx, rows, str(csv_path)))
        write_table(table.lines, loaded.beside_archive("results.csv"))
        _print_plan(table, loaded.beside_archive("results.csv"))
        summary = engine.retrieve(ctx, table.lines)
    _finish(loaded, summary, table, csv_path, json_summary)


@app.command()
@handle_errors
def query(
    config: ConfigOption,
    csv: CsvOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the table to this file.")] = None,
    format: Annotated[OutputFormat, typer.Option("--format", help="table, csv or json.")] = OutputFormat.table,
    series: Annotated[bool, typer.Option("--series", help="Also list the series of each matched study.")] = False,
    source: SourceOption = None,
    select: SelectOption = Selection.default,
    max_queries: MaxQueries = None,
    requests_per_second: RequestsPerSecond = None,
) -> None:
    """Query the PACS and show the results table; retrieve nothing.

    Edit the table's [bold]selected[/], [bold]subject[/] and [bold]session[/] columns in a spreadsheet, then
    feed it back with [bold]dqr retrieve --results[/].

    Example: [bold]dqr query --config site.yaml --csv studies.csv -o results.csv[/bold]
    """
    from dqr import engine
    from dqr.config import load_config
    from dqr.context import JobOptions
    from dqr.csvquery import read_csv_queries
    from dqr.results import to_csv, to_json, write_table

    loaded = load_config(config)
    csv_path = _csv_path(loaded, csv)
    rows = read_csv_queries(csv_path)
    options = JobOptions(source, _limits(max_queries, None, requests_per_second), select == Selection.all)
    with _job(loaded, options) as ctx:
        table = engine.results_table(ctx, engine.query_rows(ctx, rows, str(csv_path)))
        listing = engine.series_listing(ctx, table) if series else None
    if output is not None:
        write_table(table.lines, output, "json" if format == OutputFormat.json else "csv")
        err.print(f"results table written to {output}", highlight=False)
    elif format == OutputFormat.csv:
        sys.stdout.write(to_csv(table.lines))
    elif format == OutputFormat.json:
        sys.stdout.write(to_json(table.lines))
    if format == OutputFormat.table or output is not None:
        _print_table(table.lines, output)
        _print_plan(table, output)
    if listing is not None:
        _print_series(listing, format)


@app.command()
@handle_errors
def retrieve(
    config: ConfigOption,
    results: Annotated[Path, typer.Option("--results", help="A results table (CSV), possibly edited.")],
    source: SourceOption = None,
    include: IncludeOption = None,
    exclude: ExcludeOption = None,
    max_retrievals: MaxRetrievals = None,
    json_summary: JsonSummary = False,
    new_job: NewJob = False,
) -> None:
    """Retrieve the lines of a results table whose [bold]selected[/] is true.

    [bold]selected[/] is written as true/false; yes/no, 1/0 and x are accepted too.

    Example: [bold]dqr retrieve --config site.yaml --results results.csv[/bold]
    """
    from dqr import engine
    from dqr.config import load_config
    from dqr.context import JobOptions
    from dqr.results import read_table

    loaded = load_config(config)
    lines = read_table(results)
    options = JobOptions(source, _limits(None, max_retrievals), False, include, exclude, new_job)
    with _job(loaded, options) as ctx:
        engine.begin_table_input(ctx, results)
        table = engine.table_of(ctx, lines)
        _print_plan(table, None)
        summary = engine.retrieve(ctx, table.lines)
    _finish(loaded, summary, table, None, json_summary)


def _exit_now(signum: int, frame: Any) -> None:
    os._exit(EXIT_INTERRUPTED)


class _job:  # noqa: N801 - used as a context manager
    """A job context with a progress reporter, both closed on exit.

    The first Ctrl-C (or SIGTERM) stops the job cleanly: no new step starts,
    running retrievals stop at their next instance, the summary is printed.
    A second one stops at once -- safe too, since files are written
    atomically and the job state transactionally.
    """

    def __init__(self, loaded, options) -> None:
        from dqr.context import JobContext, executor_shares_the_job
        from dqr.joblock import job_lock, no_lock
        from dqr.progress import make_reporter

        # First: a second run is refused before it touches anything. An
        # executor whose processes share the job (the queue) coordinates them
        # itself: every one of them is meant to work on it at once.
        self.lock = no_lock() if executor_shares_the_job(loaded) else job_lock(loaded)
        self.lock.acquire()
        self.reporter = make_reporter(err)
        try:
            self.ctx = JobContext.open(loaded, options, self.reporter)
        except BaseException:
            self.reporter.close()
            self.lock.release()
            raise
        self._previous: dict[int, Any] = {}
        self._signalled = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.ctx.stop.is_set():
            err.print("stopping now")
            os._exit(EXIT_INTERRUPTED)
        self._signalled = True
        self.ctx.interrupt()
        err.print("[yellow]stopping[/] after the current steps (Ctrl-C again to stop at once)…")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self.ctx

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            # Once stopping, another Ctrl-C still means "now", also while the
            # summary is printed: keep a handler that exits at once.
            signal.signal(signum, _exit_now if self._signalled else handler)
        self.reporter.close()
        self.ctx.close()
        self.lock.release()


# -- rendering -------------------------------------------------------------------


#: Lines of the results table shown on the terminal; the files have them all.
TERMINAL_TABLE_LINES = 100
#: The terminal table's columns, most important first: on a narrow terminal
#: the last ones are left out (record key, header, widest it is shown).
TERMINAL_COLUMNS = (
    ("row", "row", 6),
    ("selected", "sel", 3),
    ("subject", "subject", 16),
    ("session", "session", 16),
    ("warning", "warning", 24),
    ("AccessionNumber", "Accession", 16),
    ("StudyDate", "StudyDate", 9),
    ("ModalitiesInStudy", "Mod", 8),
    ("NumberOfStudyRelatedSeries", "Ser", 4),
    ("NumberOfStudyRelatedInstances", "Inst", 5),
    ("PatientID", "PatientID", 16),
    ("StudyDescription", "Description", 24),
)
GAP = 2


def _fit(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"


def _print_table(lines, full_table: Path | None = None) -> None:
    """One line per study, whatever the terminal's width: columns that do
    not fit are left out from the end of :data:`TERMINAL_COLUMNS`, long cells
    end in "…", and the warning column takes the room that is left. Patient
    names and birth dates stay in the files, off the terminal."""
    hidden = max(0, len(lines) - TERMINAL_TABLE_LINES)
    lines = lines[:TERMINAL_TABLE_LINES]
    records = [line.as_record() for line in lines]
    for record, line in zip(records, lines, strict=True):
        record["selected"] = "✔" if line.selected else ""
    width = err.width
    chosen: list[list] = []  # [key, header, shown width, natural width]
    used = 0
    for key, header, widest in TERMINAL_COLUMNS:
        natural = max([len(header), *(len(r[key]) for r in records)])
        shown = min(natural, widest)
        if used + shown + (GAP if chosen else 0) > width:
            continue
        chosen.append([key, header, shown, natural])
        used += shown + (GAP if len(chosen) > 1 else 0)
    for column in chosen:  # room left over widens the warning first
        if column[0] == "warning":
            column[2] += min(column[3] - column[2], max(0, width - used))
    def render(cells: list[str]) -> str:
        return (" " * GAP).join(_fit(cell, column[2]) for cell, column in zip(cells, chosen, strict=True)).rstrip()

    err.print(render([c[1] for c in chosen]), markup=False, highlight=False, style="bold")
    for record in records:
        err.print(render([record[c[0]] for c in chosen]), markup=False, highlight=False)
    dropped = [header for key, header, _ in TERMINAL_COLUMNS if key not in {c[0] for c in chosen}]
    where = f"in {full_table}" if full_table else "written by -o FILE"
    if dropped:
        err.print(f"(left out to fit: {', '.join(dropped)}; the full table is {where})", highlight=False)
    if hidden:
        err.print(f"… and {hidden} more lines (the full table is {where})", highlight=False)


def _print_plan(table, table_path: Path | None) -> None:
    from dqr.model import RowOutcome

    def rows(lines: list[int]) -> str:
        shown = ", ".join(map(str, lines[:20]))
        return shown + (f" … (+{len(lines) - 20})" if len(lines) > 20 else "")

    series = "?" if table.expected_series is None else str(table.expected_series)
    instances = "?" if table.expected_instances is None else str(table.expected_instances)
    err.print(
        f"[bold]{table.rows}[/] rows → [bold]{len(table.selected)}[/] studies selected "
        f"({series} series, {instances} instances on the PACS)",
        highlight=False,
    )
    without = table.rows_with(RowOutcome.NO_MATCH)
    not_queried = table.rows_with(RowOutcome.NOT_QUERIED)
    ambiguous = table.rows_with(RowOutcome.AMBIGUOUS)
    collisions = table.rows_with(RowOutcome.LABEL_COLLISION)
    if without:
        err.print(f"  [yellow]rows with no match[/] ({len(without)}): {rows(without)}")
    if not_queried:
        err.print(f"  [red]rows not queried[/] ({len(not_queried)}): {rows(not_queried)}")
    if ambiguous:
        err.print(
            f"  [yellow]ambiguous rows[/] ({len(ambiguous)}; several studies for one Subject/Session, "
            f"not selected): {rows(ambiguous)}"
        )
    if collisions:
        err.print(f"  [yellow]label collisions[/] (not selected): rows {rows(collisions)}")
    if table_path is not None:
        err.print(f"  results table: {table_path}", highlight=False)


def _print_series(listing, format: OutputFormat) -> None:
    if format == OutputFormat.json:
        data = [
            {
                "row": line.row,
                "StudyInstanceUID": line.study.study_uid,
                "series": [
                    {"SeriesInstanceUID": s.series_uid, "SeriesNumber": s.number, "SeriesDescription": s.description,
                     "Modality": s.modality, "NumberOfSeriesRelatedInstances": s.n_instances}
                    for s in series
                ],
            }
            for line, series in listing
        ]
        err.print_json(json.dumps(data))
        return
    for line, series in listing:
        table = Table(title=f"row {line.row}: {line.study.study_uid}", header_style="bold", title_justify="left")
        for column in ("#", "SeriesDescription", "Modality", "instances", "SeriesInstanceUID"):
            table.add_column(column)
        for s in series:
            table.add_row(s.number, s.description, s.modality, "" if s.n_instances is None else str(s.n_instances), s.series_uid)
        err.print(table)


def _finish(loaded, summary, table, csv_path: Path | None, json_summary: bool) -> None:
    from dqr import engine
    from dqr.model import RowOutcome

    failures_path = engine.write_failure_report(loaded, table, summary, csv_path)
    failed_rows = engine.failed_rows(table, summary)
    err.print(
        f"[bold]{summary.studies_stored}[/] studies stored ({summary.instances_stored} instances, "
        f"{summary.bytes_stored / 1e6:.1f} MB) in {summary.seconds:.1f} s"
        + (f"; {summary.studies_already_stored} already stored" if summary.studies_already_stored else "")
        + (f"; {summary.studies_nothing_selected} with no series selected" if summary.studies_nothing_selected else "")
        + (f"; {summary.series_excluded} series left out by the series filter" if summary.series_excluded else ""),
        highlight=False,
    )
    if summary.studies_unverified:
        err.print(
            f"  {summary.studies_unverified} stored studies are unverified: the PACS announced no series or "
            "instance counts to check them against",
            highlight=False,
        )
    if summary.studies_unverified_at_destination:
        err.print(
            f"  {summary.studies_unverified_at_destination} stored studies were not verified at the destination "
            "(verify: false): it acknowledged each instance, but was not asked afterwards what it holds",
            highlight=False,
        )
    if summary.instances_with_warning:
        err.print(
            f"  {summary.instances_with_warning} instances were stored with a warning from the destination "
            "(`dqr status` lists them)",
            highlight=False,
        )
    not_done = table.rows_with(RowOutcome.QUERY_FAILED) + table.rows_with(RowOutcome.NOT_QUERIED)
    if not_done:
        err.print(f"[red]{len(not_done)} rows could not be queried[/] (see the failures file)")
    for failure in summary.failures:
        where = f"row {failure.row}: " if failure.row is not None else ""
        what = failure.series_uid or failure.study_uid
        err.print(f"  [red]failed[/] {where}{failure.kind} {what}: {failure.reason}", highlight=False)
    if failed_rows and failures_path is not None:
        err.print(f"  failed rows written to {failures_path} (fix them and run that file)", highlight=False)
    outcome = engine.outcome_of(table, summary)
    if summary.gave_up:
        err.print(f"[bold red]gave up[/]: {summary.gave_up}", highlight=False)
    elif summary.interrupted:
        err.print("[yellow]interrupted[/]: finished work is kept; run the same command again to resume")
    if json_summary:
        data = summary.as_dict()
        data.update(rows=table.rows, **table.counts(), archive=str(loaded.site.archive))
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    raise typer.Exit(EXIT_CODES[outcome])


@app.command()
@handle_errors
def status(
    config: ConfigOption,
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Summarise the job: counts per state, and every failure with its reason.

    Example: [bold]dqr status --config site.yaml[/bold]
    """
    from dqr.config import load_config
    from dqr.context import job_state_exists, open_existing_state

    loaded = load_config(config)
    if not job_state_exists(loaded):
        err.print(f"no job yet: {loaded.state_path} does not exist", highlight=False)
        raise typer.Exit(EXIT_OK)
    state = open_existing_state(loaded)
    path = state.path
    try:
        counts, failures, latest = state.counts(), state.failures(), state.latest_input()
        warned = state.stored_with_warning()
    finally:
        state.close()
    if json_output:
        data = {"state": str(path), "input": latest[2] if latest else None, "counts": counts, "failures": failures,
                "warnings": [{"SeriesInstanceUID": series, "SOPInstanceUID": sop, "warning": warning}
                             for series, sop, warning in warned]}
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    if latest:
        out.print(f"job: {path}  (latest input: {latest[1]} {latest[2]})", highlight=False)
    table = Table("what", "by state", header_style="bold")
    for kind, by_status in counts.items():
        table.add_row(kind, ", ".join(f"{status}: {n}" for status, n in sorted(by_status.items())) or "-")
    out.print(table)
    if failures:
        failed = Table("kind", "row", "UID", "attempts", "reason", header_style="bold red")
        for f in failures:
            uid = f.get("SeriesInstanceUID") or f.get("StudyInstanceUID") or ""
            failed.add_row(f["kind"], str(f.get("row") or ""), uid, str(f["attempts"]), f["error"] or "")
        out.print(failed)
    if warned:
        stored_with = Table("SOPInstanceUID", "stored with a warning from the destination", header_style="bold yellow")
        for _, sop, warning in warned:
            stored_with.add_row(sop, warning)
        out.print(stored_with)


@app.command()
@handle_errors
def retry(
    config: ConfigOption,
    failed: Annotated[bool, typer.Option("--failed", help="Re-run the failures of the latest input (required).")] = False,
    source: SourceOption = None,
    max_queries: MaxQueries = None,
    max_retrievals: MaxRetrievals = None,
    json_summary: JsonSummary = False,
) -> None:
    """Re-run only what failed: rows whose query failed and studies whose retrieval failed.

    Example: [bold]dqr retry --config site.yaml --failed[/bold]
    """
    from dqr import engine
    from dqr.config import load_config
    from dqr.context import JobOptions
    from dqr.errors import ConfigError

    if not failed:
        raise ConfigError("say what to retry: --failed")
    loaded = load_config(config)
    from dqr.context import job_state_exists

    if not job_state_exists(loaded):
        raise ConfigError(f"no job to retry: {loaded.state_path} does not exist", file=str(config))
    with _job(loaded, JobOptions(source, _limits(max_queries, max_retrievals))) as ctx:
        plan = engine.plan_retry(ctx)
        err.print(f"retrying {plan.rows} rows and {plan.studies} studies", highlight=False)
        summary = engine.retrieve(ctx, plan.lines)
    _finish(loaded, summary, plan.table, plan.csv_path, json_summary)


@app.command()
@handle_errors
def worker(config: ConfigOption) -> None:
    """Join the job of a config with [bold]executor: {type: queue}[/bold] and work on its steps.

    Runs until SIGTERM or Ctrl-C, then stops cleanly: no new step starts, running ones stop at
    their next instance and are taken over by another process. Exit 0 on SIGTERM, 130 on Ctrl-C.

    Example: [bold]DQR_QUEUE_URL=postgresql://dqr@db/dqr dqr worker --config site.yaml[/bold]
    """
    from dqr.config import load_config
    from dqr.plugins.queue_executor import run_worker

    loaded = load_config(config)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)

    def on_ready(here: Any) -> None:
        # The line a supervisor (or a script starting workers before the
        # driver) waits for: from now on this process takes steps.
        err.print(
            f"worker {here.executor_id} is on the job: {here.live_nodes()} dqr processes "
            f"share the queue database (${loaded.executor.database_url_env}); SIGTERM stops it",
            highlight=False,
        )

    here = run_worker(loaded, stop, on_ready)
    err.print(f"worker stopped after {here.steps_run} steps", highlight=False)
    # Abandoned steps hold threads that never return (their workflows stay
    # PENDING for a peer): leave without waiting for them (the node closes
    # with the exit functions).
    here.close_contexts()
    _leave(EXIT_INTERRUPTED if signal.SIGINT in received else EXIT_OK)


# -- checks and information ------------------------------------------------------


@app.command()
@handle_errors
def validate(
    csv: Annotated[Path, typer.Option("--csv", help="CSV of queries to check.")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Also check this site config.")] = None,
) -> None:
    """Check a CSV (and optionally a config) and list every problem; query nothing.

    Example: [bold]dqr validate --csv studies.csv --config site.yaml[/bold]
    """
    from dqr.config import MatchingOptions, load_config
    from dqr.csvquery import read_csv_queries
    from dqr.errors import InputError
    from dqr.planner import plan_queries

    problems = []
    matching = MatchingOptions()
    if config is not None:
        try:
            loaded = load_config(config)
            matching = loaded.sources[loaded.source_name()].matching
        except InputError as error:
            problems += error.problems
    try:
        rows = read_csv_queries(csv)
    except InputError as error:
        problems += error.problems
        rows = []
    if problems:
        raise InputError(problems)
    queries = sum(len(plan_queries(row, matching)) for row in rows)
    labelled = sum(1 for row in rows if row.subject or row.session)
    err.print(f"{csv}: OK — {len(rows)} rows, {queries} queries, {labelled} rows with Subject/Session", highlight=False)


@app.command()
@handle_errors
def echo(config: ConfigOption, source: SourceOption = None) -> None:
    """Check that the source and the destination answer (C-ECHO for DIMSE, a QIDO request for DICOMweb).

    Example: [bold]dqr echo --config site.yaml[/bold]
    """
    from dqr.config import load_config
    from dqr.context import open_backend, open_destination
    from dqr.errors import RemoteError

    loaded = load_config(config)
    name = loaded.source_name(source)
    failed = False
    for what, opener in ((f"source {name}", lambda: open_backend(loaded, name, loaded.limits_for(name))),
                         (f"destination ({loaded.destination.type})", lambda: open_destination(loaded))):
        remote = opener()
        try:
            err.print(f"[green]ok[/]: {what}: {remote.echo()}", highlight=False)
        except RemoteError as error:
            err.print(f"[bold red]error[/]: {what}: {error}", highlight=False)
            failed = True
        finally:
            remote.close()
    if failed:
        raise typer.Exit(EXIT_FAILURES)


@app.command()
@handle_errors
def plugins() -> None:
    """List the loaded plugins, backend types, destination types and executors."""
    from dqr.pluginmanager import (
        backend_types,
        destination_types,
        executor_types,
        get_plugin_manager,
    )

    manager = get_plugin_manager()
    table = Table("plugin", "hooks", header_style="bold")
    for name, plugin in manager.list_name_plugin():
        hooks = sorted(impl.name for impl in manager.get_hookcallers(plugin) or [])
        table.add_row(name, ", ".join(hooks))
    out.print(table)
    types = Table("backend type", "registered by", header_style="bold")
    for name, backend in sorted(backend_types().items()):
        types.add_row(name, backend.plugin)
    out.print(types)
    destinations = Table("destination type", "registered by", header_style="bold")
    for name, destination in sorted(destination_types().items()):
        destinations.add_row(name, destination.plugin)
    out.print(destinations)
    executors = Table("executor", "registered by", header_style="bold")
    for name, executor in sorted(executor_types().items()):
        executors.add_row(name, executor.plugin)
    out.print(executors)


def _register_plugin_commands() -> None:
    from dqr.pluginmanager import get_plugin_manager

    try:
        get_plugin_manager().hook.dqr_register_commands(app=app)
    except PluginError as error:
        err.print(f"[bold red]plugin error[/]: {error}", highlight=False)
        raise SystemExit(EXIT_INVALID) from None


def main() -> None:
    """Entry point of the ``dqr`` script."""
    from dqr.allocator import keep_freed_buffers

    keep_freed_buffers()
    try:
        app()
    except SystemExit as done:
        _leave(done.code)


def _leave(code: int | str | None) -> NoReturn:
    """End the process once its command has finished, as the interpreter
    would -- exit functions run (logging's, a plugin's, a queue node's),
    output flushed, a string code printed and exit status 1 -- but without
    its teardown of every module and object. By then every file, the job
    state and the manifests are closed and durable; the teardown took
    0.1-0.2 s after a 2,000-instance job (``python -m bench --cases cstore``),
    and a queue node's DBOS threads held it for a second or two more."""
    atexit._run_exitfuncs()
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`dqr query | head`): nothing left to say
            pass
    os._exit(code or 0)


# Plugin commands are part of the app's interface (CliRunner tests use `app`).
_register_plugin_commands()
