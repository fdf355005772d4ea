"""Hook specifications: what a dqr plugin can implement.

A plugin is a module or object with functions decorated by
:data:`dqr.hookimpl`, found either among dqr's built-in plugins or through
the ``dqr`` entry-point group of an installed package. The built-in backends
(``memory``, ``dimse``, ``dicomweb``), the archive destination, the XNAT
relabeling rules and the series filter are ordinary plugins that use exactly
these hooks.

Backends and destinations are *registered by name* and chosen by the
``type:`` in the site config; they are never chosen by which plugin answers
a hook first. Two plugins registering the same name is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import typer

    from dqr.config import SeriesFilter, SourceConfig
    from dqr.model import Series, Study, StudyQuery
    from dqr.relabel import RelabelContext

hookspec = pluggy.HookspecMarker("dqr")


@hookspec
def dqr_register_backends(register: Callable[..., None]) -> None:
    """Register query/retrieve backend types.

    Call ``register(type_name, factory, config_model)`` once per type:

    - ``type_name`` is what users write as ``type:`` under ``sources:``;
    - ``config_model`` is a pydantic model subclassing
      :class:`dqr.config.SourceConfig` that validates that source's keys
      (unknown keys are errors);
    - ``factory(config, context)`` returns an object implementing
      :class:`dqr.backend.Backend` (``query_studies``, ``query_series``,
      ``query_instances``, ``retrieve``, ``echo``, ``close``).

    :param register: The registration callback.

    Called once, when the plugin manager is first asked for backend types.
    The factory is only called for the source a job uses, so heavy imports
    belong inside it.
    """


@hookspec
def dqr_register_destinations(register: Callable[..., None]) -> None:
    """Register destination types: where retrieved instances are stored.

    Call ``register(type_name, factory, config_model)`` once per type:

    - ``type_name`` is what users write as ``destination: {type: ...}``;
    - ``config_model`` is a pydantic model subclassing
      :class:`dqr.config.DestinationConfig` that validates the
      ``destination:`` section (unknown keys are errors); when omitted, the
      section may hold only ``type:``;
    - ``factory(config, context)`` returns a :class:`dqr.backend.Destination`
      given the validated model and a :class:`dqr.backend.DestinationContext`.

    The built-in ``archive`` destination writes
    ``<archive>/<project>/<subject>/<session>/...``.

    :param register: The registration callback.

    Called once, when the config is first loaded: the section is validated
    then, so a typo stops the job before anything is queried.
    """


@hookspec
def dqr_register_executors(register: Callable[..., None]) -> None:
    """Register executors: what runs the engine's steps.

    Call ``register(name, factory, config_model)``; ``config_model``
    (optional) subclasses :class:`dqr.config.ExecutorConfig` and validates
    an ``executor: {type: name, ...}`` section (``executor: name`` is short
    for ``{type: name}``). ``factory()`` returns an object with
    ``run(step, items, workers, stop)`` that calls ``step(item)`` once for
    every item, at most ``workers`` at a time, starts no new step once the
    ``stop`` event is set, and returns when all started steps are done.
    A step may return *follow-ups*, ``[(kind, key), ...]``: the executor
    runs each as ``step.then(kind)(key)`` too (within the same ``workers``)
    before it returns -- a ``fetch-study`` step returns its study's
    ``retrieve-series`` steps when the study cannot be fetched in one
    request, and they are lost if ignored. The config's ``executor:`` key
    chooses one (default ``local``: a thread pool). Steps are idempotent
    and keyed by UIDs -- query one CSV row, list and fetch one study,
    retrieve one series -- and keep their progress in the job state, so an
    executor may run them anywhere and retry them.

    :param register: The registration callback.
    """


@hookspec
def dqr_register_commands(app: typer.Typer) -> None:
    """Add commands to the ``dqr`` command line.

    :param app: The root :class:`typer.Typer`; add commands with
        ``@app.command()``.

    Called once while the CLI is built, before arguments are parsed.
    """


@hookspec
def dqr_prepare_study_query(query: StudyQuery, source: str, config: SourceConfig) -> None:
    """Adjust a study-level query before it is sent to the source.

    Edit ``query.filters`` (DICOM keyword -> match value) in place, e.g. to
    work around a PACS's matching quirks. Every implementation is called, in
    plugin order. Filters a plugin adds are AND-ed like CSV columns.

    :param query: The planned query; ``query.line`` is its CSV line.
    :param source: The name of the source under ``sources:``.
    :param config: That source's validated config.

    Called for every planned query, after list fan-out and before the query
    is sent.
    """


@hookspec(firstresult=True)
def dqr_select_series(study: Study, series: Series, series_filter: SeriesFilter) -> bool | None:
    """Decide whether a series of a selected study is retrieved.

    :param study: The study the series belongs to.
    :param series: The series, as the series-level query answered it.
    :param series_filter: The ``series:`` section of the config with the
        command line's ``--include``/``--exclude`` merged in.
    :return: ``True`` to retrieve, ``False`` to skip, ``None`` to let the next
        plugin decide. The first non-``None`` answer wins (``firstresult``);
        the built-in filter applies the include/exclude globs to the
        SeriesDescription, case-insensitively.

    Called once per series of every selected study, before retrieval.
    """


@hookspec
def dqr_relabel(context: RelabelContext) -> None:
    """Relabel one received instance before it is stored.

    Change elements with ``context.set(keyword, value)``, which records the
    original value in the session manifest, so provenance is never lost.
    ``context.labels`` holds the subject/session labels and whether each was
    asked for by the user; ``context.study`` and ``context.series`` describe
    where the instance came from. Every implementation is called, in plugin
    order; the built-in one applies the XNAT rules (Subject -> PatientName and
    PatientID; Session -> StudyID and AccessionNumber).

    :param context: The instance being relabeled.

    Called once per received instance, in the retrieving thread. Must not
    change pixel data or UIDs.
    """


def hook_names() -> list[str]:
    """Names of every hook defined here (the docs test checks each is documented)."""
    return sorted(name for name, value in globals().items() if name.startswith("dqr_") and callable(value))


