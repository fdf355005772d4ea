"""The site config (``site.yaml``): parsing, validation and error locations.

Every problem is reported at once with the YAML file's line, and unknown keys
get the closest valid key suggested, so that a typo never silently does
nothing. Source sections are validated by the config model their backend
type registered.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dqr.errors import ConfigError, Problem
from dqr.labels import validate_label
from dqr.yamlsafe import load_yaml_file

#: Keys that would put a secret into the YAML itself: refused outright.
SECRET_KEYS = frozenset({"password", "token", "secret", "api_key", "apikey", "bearer"})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(Strict):
    """How hard dqr may push a source. ``limits:`` at the top level sets the
    defaults; a source's own ``limits:`` overrides them; CLI flags override
    both."""

    max_queries: int = Field(4, ge=1, le=64, description="simultaneous queries")
    max_retrievals: int = Field(2, ge=1, le=64, description="simultaneous retrievals")
    batch_size: int = Field(100, ge=1, description="CSV rows planned and queried per batch")
    requests_per_second: float | None = Field(None, gt=0, description="query rate cap")
    retries: int = Field(3, ge=0, le=20, description="retries of a retriable failure")
    backoff_initial: float = Field(1.0, ge=0, description="first retry delay, seconds")
    backoff_max: float = Field(60.0, ge=0, description="longest retry delay, seconds")
    query_timeout: float = Field(60.0, gt=0, description="one query, seconds")
    retrieve_timeout: float = Field(600.0, gt=0, description="one series retrieval, seconds")
    retrieve_window: str | None = Field(
        None, description="local time when retrievals may run, e.g. '19:00-07:00' (queries always may)"
    )
    breaker_failures: int = Field(5, ge=1, description="consecutive failures to reach the source that pause work")
    breaker_cooldown: float = Field(30.0, ge=0, description="pause after the source could not be reached, seconds")
    breaker_max_cooldowns: int = Field(5, ge=1, description="pauses in a row before giving up")

    @field_validator("retrieve_window")
    @classmethod
    def _check_window(cls, value: str | None) -> str | None:
        if value is not None:
            from dqr.throttle import TimeWindow

            TimeWindow.parse(value)  # raises ValueError with the expected format
        return value

    def merged(self, overrides: dict[str, Any]) -> Limits:
        data = self.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return Limits.model_validate(data)


class MatchingOptions(Strict):
    """How a source's matching differs from the DICOM standard.

    Kept in one place so that the engine, not each backend, adapts queries.
    """

    uid_lists: bool = Field(True, description="send a UID list as one query (else one query per UID)")
    value_lists: bool = Field(False, description="send non-UID lists as one query (not standard)")
    modalities_in_study: bool = Field(
        True, description="the source matches ModalitiesInStudy (else dqr checks series modalities)"
    )


class SourceConfig(Strict):
    """Keys every source has; a backend type's config model extends this."""

    type: str
    limits: dict[str, Any] = Field(default_factory=dict)
    matching: MatchingOptions = MatchingOptions()

    @field_validator("limits")
    @classmethod
    def _check_limits(cls, value: dict[str, Any]) -> dict[str, Any]:
        Limits().merged(value)  # raises on unknown keys or bad values
        return value


class DestinationConfig(Strict):
    """Keys every destination has; a destination type's config model extends this."""

    type: str = "archive"


class ExecutorConfig(Strict):
    """Keys every executor has; an executor type's config model extends this."""

    type: str = "local"


class SeriesFilter(Strict):
    """Which series of a selected study are retrieved, by SeriesDescription."""

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)


SessionRule = Literal["StudyID", "AccessionNumber", "StudyInstanceUID"]
SubjectRule = Literal["PatientID", "PatientName"]


class SiteConfig(Strict):
    """The validated site config. Paths are absolute (resolved against the
    config file's directory)."""

    project: str = "dqr"
    source: str | None = None
    sources: dict[str, dict[str, Any]]
    archive: Path = Path("archive")
    csv: Path | None = None
    series: SeriesFilter = SeriesFilter()
    session_label: SessionRule = "StudyID"
    subject_label: SubjectRule = "PatientID"
    limits: Limits = Limits()
    state: Path | None = Field(None, description="job database; default <archive>-job.sqlite beside the archive")
    destination: dict[str, Any] = Field(
        default_factory=lambda: {"type": "archive"}, description="validated by its type's registered model"
    )
    executor: str | dict[str, Any] = Field(
        "local", description="how steps run: a type registered by dqr_register_executors, or a mapping with `type:`"
    )

    @field_validator("project")
    @classmethod
    def _check_project(cls, value: str) -> str:
        problem = validate_label(value)
        if problem:
            raise ValueError(problem)
        return value.strip()


class LoadedConfig:
    """A site config with its sources validated by their backend models."""

    def __init__(
        self,
        path: Path,
        site: SiteConfig,
        sources: dict[str, SourceConfig],
        destination: DestinationConfig | None = None,
        executor: ExecutorConfig | None = None,
    ) -> None:
        self.path = path
        self.dir = path.parent
        self.site = site
        self.sources = sources
        #: ``destination:`` validated by the model its type registered.
        self.destination = destination or DestinationConfig()
        #: ``executor:`` validated by the model its type registered.
        self.executor = executor or ExecutorConfig()

    def source_name(self, override: str | None = None) -> str:
        name = override or self.site.source
        if name is None:
            if len(self.sources) == 1:
                return next(iter(self.sources))
            raise ConfigError(
                f"several sources are configured ({', '.join(self.sources)}): "
                "choose one with `source:` or --source",
                file=str(self.path),
            )
        if name not in self.sources:
            raise ConfigError(
                f"unknown source {name!r}; configured sources: {', '.join(self.sources)}",
                file=str(self.path),
            )
        return name

    def limits_for(self, source: str, cli_overrides: dict[str, Any] | None = None) -> Limits:
        limits = self.site.limits.merged(self.sources[source].limits)
        return limits.merged(cli_overrides or {})

    def beside_archive(self, suffix: str) -> Path:
        """A file next to the archive directory: ``<archive>-<suffix>``."""
        archive = self.site.archive
        return archive.with_name(f"{archive.name}-{suffix}")

    @property
    def state_path(self) -> Path:
        """The job database: ``state:``, else ``<archive>-job.sqlite``."""
        return self.site.state or self.beside_archive("job.sqlite")


# -- loading -------------------------------------------------------------------


def _line_for(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``loc``, if any."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        # `Fault | None`: the model inside the optional
        candidates = [annotation, *typing.get_args(annotation)]
        models = [a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)]
        if not models:
            return None
        model = models[0]
    return model


def unknown_key_problem(
    key: str, valid: list[str], file: str, line: int | None, where: tuple[Any, ...] = ()
) -> Problem:
    """``unknown key 'x'; did you mean 'y'?`` (or the valid keys)."""
    message = f"unknown key {'.'.join(str(p) for p in (*where, key))!r}"
    close = difflib.get_close_matches(str(key), valid, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    elif valid:
        message += f"; valid keys here: {', '.join(valid)}"
    return Problem(file, message, line)


def validation_problems(
    error: ValidationError,
    model: type[BaseModel],
    file: str,
    lines: dict[tuple[Any, ...], int],
    prefix: tuple[Any, ...] = (),
) -> list[Problem]:
    """A pydantic error of ``model`` (validating the mapping at ``prefix``)
    as problems with their YAML lines, unknown keys with the nearest valid
    key and wrong values with what was found."""
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in prefix + loc)
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            valid = sorted(owner.model_fields) if owner else []
            problems.append(unknown_key_problem(str(loc[-1]), valid, file, _line_for(lines, prefix + loc), prefix + loc[:-1]))
            continue
        if item["type"] == "missing":
            message = f"missing key {key!r}"
        else:
            message = f"{key}: {_found(item, str(loc[-1]) if loc else '')}"
        problems.append(Problem(file=file, line=_line_for(lines, prefix + loc), message=message))
    return problems


def _found(item: Any, key: str) -> str:
    """A pydantic error with the value that was found and, for a choice,
    the nearest valid one: "Input should be 'a' or 'b'; got 'c'"."""
    message = str(item["msg"]).removeprefix("Value error, ")
    value = item.get("input")
    if key.lower() in SECRET_KEYS or key.lower().removesuffix("_env").removesuffix("_file") in SECRET_KEYS:
        return message  # never echo what may be a secret
    if isinstance(value, dict):
        return f"{message}; got a mapping"
    if isinstance(value, list):
        return f"{message}; got a list"
    shown = repr(value if not isinstance(value, str) or len(value) <= 60 else value[:60] + "…")
    if shown not in message:
        message += f"; got {shown}"
    expected = (item.get("ctx") or {}).get("expected")
    if isinstance(expected, str) and value is not None:
        close = difflib.get_close_matches(str(value), re.findall(r"'([^']*)'", expected), n=1, cutoff=0.6)
        if not close:  # `studyid` for `StudyID`: the same word in another case
            close = [c for c in re.findall(r"'([^']*)'", expected) if c.lower() == str(value).lower()][:1]
        if close:
            message += f"; did you mean {close[0]!r}?"
    return message


def _secret_problems(data: Any, file: str, lines: dict, path: tuple = ()) -> list[Problem]:
    problems: list[Problem] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if str(key).lower() in SECRET_KEYS:
                problems.append(
                    Problem(
                        file=file,
                        line=lines.get(path + (key,)),
                        message=(
                            f"{'.'.join(map(str, path + (key,)))}: secrets never go in the YAML; "
                            f"name an environment variable ({key}_env) or a file ({key}_file)"
                        ),
                    )
                )
            else:
                problems += _secret_problems(value, file, lines, path + (key,))
    return problems


def _typed_section(
    raw: Any,
    where: tuple[str, ...],
    types: dict[str, Any],
    kind: str,
    file: str,
    lines: dict[tuple[Any, ...], int],
    problems: list[Problem],
) -> Any:
    """Validate a section whose ``type:`` picks a registered model (a
    source, the destination, the executor); add its problems, return the
    model instance or ``None``."""
    key = ".".join(where)
    if not isinstance(raw, dict):
        problems.append(Problem(file, f"{key} must be a mapping with a `type:`", lines.get(where)))
        return None
    type_name = raw.get("type")
    if type_name not in types:
        available = ", ".join(sorted(types))
        message = f"{key}: missing `type:`" if type_name is None else f"{key}.type: unknown {kind} type {type_name!r}"
        close = difflib.get_close_matches(str(type_name), list(types), n=1)
        hint = f"; did you mean {close[0]!r}?" if close and type_name else ""
        problems.append(
            Problem(file, f"{message}{hint} (available: {available})", lines.get(where + ("type",), lines.get(where)))
        )
        return None
    model = types[type_name].config_model
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems += validation_problems(exc, model, file, lines, prefix=where)
        return None


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (base / path).resolve()


def load_config(path: str | os.PathLike[str]) -> LoadedConfig:
    """Read and validate a site config, reporting every problem at once."""
    from dqr.pluginmanager import (  # late: loads plugins
        backend_types,
        destination_types,
        executor_types,
    )

    path = Path(path)
    file = str(path)
    document = load_yaml_file(path)
    data, lines = document.data, document.lines
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(file, "the config must be a mapping of keys to values", 1))

    problems = [*document.problems, *_secret_problems(data, file, lines)]
    site: SiteConfig | None = None
    try:
        site = SiteConfig.model_validate(data)
    except ValidationError as exc:
        problems += validation_problems(exc, SiteConfig, file, lines)

    sources: dict[str, SourceConfig] = {}
    raw_sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
    if isinstance(data.get("sources"), dict) and not raw_sources:
        problems.append(Problem(file, "`sources:` is empty: configure at least one source", lines.get(("sources",))))
    for name, raw in raw_sources.items():
        model = _typed_section(raw, ("sources", name), backend_types(), "backend", file, lines, problems)
        if model is not None:
            sources[name] = model
    raw_executor = data.get("executor", "local")
    if isinstance(raw_executor, str):  # `executor: local` is short for `executor: {type: local}`
        raw_executor = {"type": raw_executor}
    destination = _typed_section(
        data.get("destination", {"type": "archive"}), ("destination",), destination_types(), "destination",
        file, lines, problems,
    )
    executor = _typed_section(raw_executor, ("executor",), executor_types(), "executor", file, lines, problems)

    if site is not None and site.source is not None and raw_sources and site.source not in raw_sources:
        problems.append(
            Problem(file, f"source: {site.source!r} is not among sources ({', '.join(raw_sources)})", lines.get(("source",)))
        )
    if problems:
        raise ConfigError(problems)
    assert site is not None
    base = path.resolve().parent
    site = site.model_copy(
        update={
            "archive": _resolve(site.archive, base),
            "csv": _resolve(site.csv, base),
            "state": _resolve(site.state, base),
        }
    )
    return LoadedConfig(path.resolve(), site, sources, destination, executor)


def resolve_path(config: LoadedConfig, value: str | os.PathLike[str]) -> Path:
    """Resolve a path from a source config relative to the config file."""
    resolved = _resolve(Path(value), config.dir)
    assert resolved is not None
    return resolved
