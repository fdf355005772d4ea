"""Errors a user can cause or meet, each rendered once at the CLI edge.

Library code raises these and never prints or exits. The CLI maps
:class:`InputError` to exit code 2 (nothing was queried) and reports
:class:`RemoteError` per study (exit code 1 when any study failed).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input file, located as precisely as we can."""

    file: str
    message: str
    line: int | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f", line {self.line}"
        if self.column:
            where += f", column {self.column!r}"
        return f"{where}: {self.message}"


class DqrError(Exception):
    """Base class of every error dqr raises on purpose."""


class InputError(DqrError):
    """Invalid user input (CSV, results table, config): exit code 2.

    Carries *every* problem found, so that a user can fix them in one pass.
    """

    def __init__(self, problems: list[Problem] | Problem | str, file: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem(file=file, message=problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigError(InputError):
    """Invalid site configuration."""


class PluginError(DqrError):
    """A plugin is broken or two plugins claim the same name."""


class UnknownBackendError(ConfigError):
    """The config names a backend ``type:`` that no plugin registered."""


class RemoteError(DqrError):
    """A PACS (or other remote) refused or failed an operation.

    ``retriable`` says whether the same request may succeed later (timeouts,
    out-of-resources, transient rejects, HTTP 429/503, connection resets).
    ``slow_down`` says the remote signalled strain: the engine lowers its
    concurrency rather than counting a failure against the study.
    ``retry_after`` is the delay in seconds the remote asked for, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        retriable: bool = False,
        slow_down: bool = False,
        retry_after: float | None = None,
        unreachable: bool = False,
    ) -> None:
        super().__init__(message)
        self.retriable = retriable or slow_down
        self.slow_down = slow_down
        self.retry_after = retry_after
        #: The remote could not be reached at all (refused, no route, DNS):
        #: feeds the circuit breaker.
        self.unreachable = unreachable


class DestinationRefusedError(RemoteError):
    """The destination refused some instances (or the whole request).

    ``stored`` lists the SOP Instance UIDs it acknowledged in the same
    exchange (they *are* stored), ``failed`` maps each refused one to the
    destination's reason (status in hex and its meaning, or FailureReason).
    """

    def __init__(
        self,
        message: str,
        *,
        stored: list[str] | None = None,
        failed: dict[str, str] | None = None,
        retriable: bool = False,
        slow_down: bool = False,
        retry_after: float | None = None,
        unreachable: bool = False,
    ) -> None:
        super().__init__(
            message, retriable=retriable, slow_down=slow_down, retry_after=retry_after, unreachable=unreachable
        )
        self.stored = list(stored or [])
        self.failed = dict(failed or {})


class IncompleteRetrieveError(RemoteError):
    """Fewer instances arrived than the PACS said it had (retriable)."""

    def __init__(self, message: str, missing: int) -> None:
        super().__init__(message, retriable=True)
        self.missing = missing


class SourceDownError(RemoteError):
    """The source stayed unreachable through every cool-down: the job stops
    (finished work is kept; the next run resumes)."""


class Interrupted(RemoteError):
    """The job is stopping; the instance was not stored."""


class UntrustedValueError(RemoteError):
    """A remote sent a value dqr refuses to use: a UID that is no UID (it
    would become a path in the archive), an instance of another study.
    Final: asking again gets the same answer."""
