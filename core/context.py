"""What a job's steps work with, built once from a validated config: the
source's backend, the destination, the job state, the hooks and the guard
that keeps dqr gentle with the PACS.

Everything is built eagerly by :meth:`JobContext.open` -- nothing is made
lazily inside a worker thread -- so a broken destination or an unreadable
job state stops the job before anything is queried. A step needs nothing
else: another process given the same config opens its own context and runs
the same steps on the same job state.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dqr.backend import Backend, Destination, DestinationContext, SourceContext
from dqr.config import Limits, LoadedConfig, SeriesFilter, SourceConfig
from dqr.labels import safe_label
from dqr.model import Labels
from dqr.pluginmanager import backend_types, destination_types, executor_types, get_plugin_manager
from dqr.state import JobState
from dqr.throttle import Guard, TimeWindow

log = logging.getLogger("dqr")


class Reporter:
    """Receives progress from the engine; the default does nothing.

    Called from worker threads: implementations must be thread-safe.
    """

    def start(self, phase: str, total: int) -> None:
        """A phase (``query``, ``series``, ``retrieve``, ``instances``) begins with ``total`` units."""

    def advance(self, phase: str, amount: int = 1) -> None:
        """``amount`` units of ``phase`` are done."""

    def grow(self, phase: str, amount: int) -> None:
        """``amount`` more units of ``phase`` became known (a phase whose
        total is learnt as it runs: the series of each study listed)."""

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


def open_backend(
    config: LoadedConfig, source_name: str, limits: Limits, learnt: dict[str, str] | None = None
) -> Backend:
    """The backend of one configured source (``learnt``: what it learnt on
    earlier runs of the job)."""
    source = config.sources[source_name]
    context = SourceContext(source_name, config.dir, limits, learnt or {})
    return backend_types()[source.type].factory(source, context)


def open_destination(config: LoadedConfig) -> Destination:
    """The configured destination."""
    context = DestinationContext(config.site.archive, config.site.project, config.state_path, config.dir)
    return destination_types()[config.destination.type].factory(config.destination, context)


def open_state(config: LoadedConfig, source_name: str, new_job: bool = False) -> JobState:
    """The job state of this config, checked to belong to it; ``new_job``
    sets an existing one aside first. An executor that keeps the job state
    elsewhere (the queue executor: in its PostgreSQL database, shared by
    every process) says so with an ``open_state(config, new_job)`` of its own."""
    state = open_existing_state(config, new_job)
    try:
        state.check_identity(
            {
                "project": config.site.project,
                "source": f"{source_name} ({config.sources[source_name].type})",
                "archive": str(config.site.archive),
            }
        )
    except BaseException:
        state.close()
        raise
    return state


def _executor_state_opener(config: LoadedConfig):
    return getattr(executor_types()[config.executor.type].factory, "open_state", None)


def executor_shares_the_job(config: LoadedConfig) -> bool:
    """Whether the configured executor's processes share one job state (the
    queue's, in its database) rather than the local file one run locks."""
    return _executor_state_opener(config) is not None


def job_state_exists(config: LoadedConfig) -> bool:
    """Whether this config has a job yet (for ``dqr status`` and ``dqr retry``)."""
    if _executor_state_opener(config) is not None:
        return True  # a database the executor owns; an empty one reads as no work
    return config.state_path.exists()


def open_existing_state(config: LoadedConfig, new_job: bool = False) -> JobState:
    """The job state of this config as it is (no identity check)."""
    opener = _executor_state_opener(config)
    if opener is not None:
        return opener(config, new_job)
    path = config.state_path
    if new_job and path.exists():
        aside = path.with_name(f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(aside)
        log.info("previous job state moved to %s", aside)
    return JobState(path)


@dataclass
class JobContext:
    """One site config, one source, one destination, one job state."""

    config: LoadedConfig
    options: JobOptions
    source_name: str
    source_config: SourceConfig
    limits: Limits
    series_filter: SeriesFilter
    backend: Backend
    destination: Destination
    state: JobState
    guard: Guard
    reporter: Reporter
    #: Set to stop: no new step starts, running retrievals stop at their next instance.
    stop: threading.Event
    run_id: int
    window: TimeWindow | None = None
    hooks: Any = field(default_factory=lambda: get_plugin_manager().hook)
    #: Why the job gave up (the source stayed unreachable), once it has.
    gave_up: str | None = None
    interrupted: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, config: LoadedConfig, options: JobOptions | None = None, reporter: Reporter | None = None) -> JobContext:
        options = options or JobOptions()
        source_name = config.source_name(options.source)
        limits = config.limits_for(source_name, options.limits)
        stop = threading.Event()
        state = open_state(config, source_name, options.new_job)
        opened: list[Any] = [state]
        try:
            destination = open_destination(config)
            opened.append(destination)
            backend = open_backend(config, source_name, limits, state.learnt(source_name))
        except BaseException:
            for resource in reversed(opened):
                _close(resource)
            raise
        return cls(
            config=config,
            options=options,
            source_name=source_name,
            source_config=config.sources[source_name],
            limits=limits,
            series_filter=SeriesFilter(
                include=options.include or config.site.series.include,
                exclude=config.site.series.exclude + (options.exclude or []),
            ),
            backend=backend,
            destination=destination,
            state=state,
            guard=Guard(limits, stop),
            reporter=reporter or Reporter(),
            stop=stop,
            run_id=state.begin_run(),
            window=TimeWindow.parse(limits.retrieve_window) if limits.retrieve_window else None,
        )

    def close(self) -> None:
        learnt = getattr(self.backend, "learnt", None)
        if callable(learnt):
            try:
                self.state.remember(self.source_name, learnt())
            except Exception as error:  # noqa: BLE001 - only a probe saved: never lose the close
                log.warning("could not keep what the backend learnt: %s", error)
        for resource in (self.backend, self.destination, self.state):
            _close(resource)

    def __enter__(self) -> JobContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stopping ------------------------------------------------------------------

    def interrupt(self) -> None:
        """Stop cleanly: no new step starts; finished work is kept."""
        self.interrupted = True
        self.stop.set()

    def give_up(self, reason: str) -> None:
        """The source stayed unreachable: stop the job, keep what is done."""
        with self._lock:
            if self.gave_up is None:
                log.error("%s", reason)
                self.gave_up = reason
        self.stop.set()

    def wait_for_window(self) -> bool:
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

    # -- labels --------------------------------------------------------------------

    def labels_for(self, subject: str, session: str, study) -> Labels:
        """The labels a study is stored under: the user's, else derived from
        its tags by the config's rules (derived ones change no DICOM)."""
        site = self.config.site
        subject_value = study.patient_id if site.subject_label == "PatientID" else study.patient_name
        session_value = {
            "StudyID": study.study_id,
            "AccessionNumber": study.accession_number,
            "StudyInstanceUID": study.study_uid,
        }[site.session_label]
        return Labels(
            subject=subject or safe_label(subject_value, "UNKNOWN"),
            session=session or safe_label(session_value, safe_label(study.study_uid, "UNKNOWN")),
            relabel_subject=bool(subject),
            relabel_session=bool(session),
        )


def _close(resource: Any) -> None:
    close = getattr(resource, "close", None)
    if close is not None:
        close()
