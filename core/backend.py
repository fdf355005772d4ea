"""What a backend and a destination must provide.

A backend type is registered by a plugin (see
:func:`dqr.hookspecs.dqr_register_backends`) with a factory that builds one
:class:`Backend` per configured source. Backends are called from several
engine threads at once: they own their connection pools (associations, HTTP
sessions) and keep them within ``context.limits``: at most ``max_queries``
queries and ``max_retrievals`` retrievals at once, a query (every page of
it) within ``query_timeout`` seconds and a retrieval request within
``retrieve_timeout`` -- a remote that stops answering fails the attempt with
a retriable error naming dqr's limit (:class:`dqr.throttle.Deadline`), and
the engine retries it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from dqr.model import (
    Instance,
    Labels,
    ReceivedInstance,
    RetrieveReport,
    RetrieveRequest,
    Series,
    Study,
    StudyQuery,
    StudyRetrieveRequest,
)

if TYPE_CHECKING:
    from pydantic import BaseModel

    from dqr.config import Limits

#: Called by a backend for every instance it receives; thread-safe. It
#: relabels and stores the instance and raises if that failed (a DIMSE
#: backend then answers the C-STORE with a failure status).
StoreCallback = Callable[[ReceivedInstance], None]


@dataclass(frozen=True)
class SourceContext:
    """What a backend factory gets besides its own config."""

    name: str
    """The source's name under ``sources:``."""
    config_dir: Path
    """Directory of the site config: relative paths are relative to it."""
    limits: Limits
    """Effective limits for this source (global, then source, then CLI)."""
    learnt: Mapping[str, str] = field(default_factory=dict)
    """What this source's backend learnt on earlier runs of the job (its
    ``learnt()``, kept in the job state), e.g. which retrieval a PACS
    accepts, so it is not probed again."""

    def resolve(self, value: str | os.PathLike[str]) -> Path:
        """A path from the source's config, relative to the site config's directory."""
        from dqr.config import resolve_path

        return resolve_path(value, self.config_dir)


@runtime_checkable
class Backend(Protocol):
    """A source of studies: a PACS reached over some protocol."""

    def echo(self) -> str:
        """Check the source answers; return a short human description.

        Raises :class:`dqr.errors.RemoteError` saying why it does not.
        """

    def query_studies(self, query: StudyQuery) -> Iterator[Study]:
        """Yield the studies matching ``query.filters`` (study level).

        Filter values follow DICOM matching (wildcards, date ranges, UID
        lists). Duplicate answers are allowed; the engine de-duplicates.
        """

    def query_series(self, study: Study) -> Iterator[Series]:
        """Yield the series of a study (series level)."""

    def query_instances(self, study: Study, series: Series) -> Iterator[Instance]:
        """Yield the instances of a series (image level).

        Raise :class:`NotImplementedError` when the source cannot answer;
        the engine then relies on ``Series.n_instances``.
        """

    def retrieve(self, request: RetrieveRequest, store: StoreCallback) -> RetrieveReport:
        """Fetch the requested instances and hand each to ``store``.

        Streams: every instance goes to ``store`` as it arrives and is not
        kept. Returns when the remote says the retrieval is over (or a
        timeout passed); raises :class:`dqr.errors.RemoteError` on failure.
        """

    def close(self) -> None:
        """Release connections and servers; called once at the end of a job.

        A backend may also have ``learnt() -> dict[str, str]``: facts about
        the source worth keeping for the next run (given back as
        ``SourceContext.learnt``); the engine saves them before ``close``.
        """


@runtime_checkable
class WholeStudyBackend(Protocol):
    """A backend that can also fetch a whole study in one request.

    Optional: the engine uses it when a backend has ``retrieve_study`` and
    every series of a study is selected with nothing stored yet; otherwise,
    and for whatever such a request did not deliver, it retrieves series by
    series (asking only for the missing instances). Completeness is judged
    per instance either way.
    """

    def retrieve_study(self, request: StudyRetrieveRequest, store: StoreCallback) -> RetrieveReport:
        """Fetch every instance of ``request.study`` and hand each to ``store``
        as it arrives (any series, any order). Raises :class:`NotImplementedError`
        when the remote cannot (the engine then asks series by series)."""


#: ``factory(config, context) -> Backend``
BackendFactory = Callable[["BaseModel", SourceContext], Backend]


class SeriesWriter(Protocol):
    """Stores the instances of one series for a destination."""

    def exists(self, sop_instance_uid: str) -> bool:
        """Whether this instance is already durably stored (a network
        destination answers from its local manifest of acknowledged
        instances: what a run killed after the acknowledgement but before
        the job state recorded it already sent)."""

    def write(self, sop_instance_uid: str, part10: bytes, replaced: dict[str, str]) -> None:
        """Store one relabeled instance (a complete DICOM Part-10 file).

        ``replaced`` maps each keyword relabeling changed to its original
        value (kept as provenance). Thread-safe for one series.

        A network destination sends now (C-STORE) or adds the instance to
        the series' batch (STOW-RS, sent when the batch is full). A refusal
        raises :class:`dqr.errors.DestinationRefusedError` (``.failed``
        names the refused instances; those it acknowledged meanwhile are
        still returned by the next :meth:`commit`).
        """

    #: Optional: SOP Instance UID -> the warning the destination stored it
    #: with (e.g. C-STORE 0xB000), kept in the job state at each commit. A
    #: writer without it (the archive, an older plugin's) has no warnings.
    warnings: dict[str, str]

    def commit(self) -> list[str]:
        """Make everything written so far durable; return the SOP Instance
        UIDs made durable since the last commit. Only then are they stored.

        Only acknowledged instances are ever returned. A refusal raises
        :class:`dqr.errors.DestinationRefusedError` whose ``.stored`` holds
        the UIDs acknowledged since the last commit (the engine must record
        them) and ``.failed`` the refused ones with their reasons."""


class VerifyMode(StrEnum):
    """How a destination confirms it holds a series after it was sent."""

    QUERY = "query"
    """Ask it what it holds (C-FIND at IMAGE level, QIDO-RS, a folder listing)."""
    COMMITMENT = "commitment"
    """DICOM Storage Commitment: it accepts responsibility for the instances."""
    OFF = "off"
    """Not verified (``verify: false``): the summary says "unverified"."""
    LOCAL = "local"
    """A local folder: every file is checked and made durable at commit
    (the archive), so there is nothing to ask afterwards."""


class Destination(Protocol):
    """Where relabeled instances end up.

    A destination owns its connections, its limits (simultaneous
    associations or requests, shared by every writer), its retries and
    circuit breaker: the engine only calls these methods.
    """

    #: How :meth:`verify` checks; the engine skips it for ``VerifyMode.OFF``.
    verify_mode: VerifyMode

    def open_series(
        self, study: Study, series: Series, subject: str, session: str, labels: Labels | None = None
    ) -> SeriesWriter:
        """Prepare to store one series under the given labels (``labels``:
        the same with their relabel flags, so a destination can tell a file
        relabeled otherwise from one already stored as asked)."""

    def describe(self) -> str:
        """Short human description naming where it is (path, address, AE
        title): used in failure messages."""

    def echo(self) -> str:
        """Check the destination answers; return a short description.

        Raises :class:`dqr.errors.RemoteError` saying why it does not.
        """

    def verify(self, study: Study, series: Series, sop_instance_uids: list[str]) -> list[str]:
        """The SOP Instance UIDs of ``sop_instance_uids`` the destination
        does NOT hold (empty: all verified). Raises
        :class:`dqr.errors.RemoteError` when it cannot be asked."""

    def close(self) -> None:
        """Release connections; called once at the end of a job."""


@dataclass(frozen=True)
class DestinationContext:
    """What a destination factory gets besides its own config section."""

    archive: Path
    """The ``archive:`` directory of the site config (absolute)."""
    project: str
    """The project label: the archive's first level."""
    state_path: Path | None = None
    """The job state file: a network destination keeps its manifests in
    ``<state dir>/<state stem>-manifest/`` (``None``: beside the archive)."""
    config_dir: Path | None = None
    """Directory of the site config: relative paths (secret files, TLS
    files) are relative to it (``None``: the archive's parent)."""


#: ``factory(config, context) -> Destination``
DestinationFactory = Callable[..., Destination]


__all__ = [
    "Backend",
    "BackendFactory",
    "Destination",
    "DestinationContext",
    "DestinationFactory",
    "Instance",
    "SeriesWriter",
    "SourceContext",
    "StoreCallback",
    "VerifyMode",
    "WholeStudyBackend",
]
