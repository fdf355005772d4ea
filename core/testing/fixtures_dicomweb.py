"""pytest fixtures: the in-memory PACS over QIDO-RS/WADO-RS, and DICOMweb
backends pointed at any server (see :mod:`dqr.plugins.testpacs.mockpacs.http_server`).

- ``dicomweb_cohort_spec`` (session): the :class:`CohortSpec` the mock serves
  (the same default cohort the ``orthanc`` fixture is seeded with).
- ``dicomweb_memory_pacs`` (session): that cohort as a :class:`MemoryPacs`;
  shared, treat it as read-only.
- ``mock_dicomweb_pacs`` (function): a running mock serving it, with fresh
  counters and no faults; change ``server.faults`` to inject some.
- ``mock_dicomweb_factory`` (function): ``mock_dicomweb_factory(pacs=None,
  **config)`` starts a mock with a :class:`Config` of your own (``auth=``,
  ``faults=``, ``decode_percent_escapes=``...). All are stopped after the test.
- ``dicomweb_backend_factory`` (function): ``dicomweb_backend_factory(url,
  limits=None, **source_keys)`` builds a ``type: dicomweb`` backend (source
  name ``web``) from config keys; all are closed after the test.
- ``dqr_log`` (function): pytest's ``caplog``, also attached to the ``dqr``
  logger, so that it sees dqr's records even after an in-process CLI run
  set ``propagate = False`` on that logger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dqr.plugins.testpacs.memory.synthetic import DEFAULT_COHORT, CohortSpec

__all__ = [
    "dqr_log",
    "dicomweb_backend_factory",
    "dicomweb_cohort_spec",
    "dicomweb_memory_pacs",
    "mock_dicomweb_factory",
    "mock_dicomweb_pacs",
]

DICOMWEB_COHORT = DEFAULT_COHORT


@pytest.fixture(scope="session")
def dicomweb_cohort_spec() -> CohortSpec:
    """The synthetic cohort the mock DICOMweb PACS serves."""
    return DICOMWEB_COHORT


@pytest.fixture(scope="session")
def dicomweb_memory_pacs(dicomweb_cohort_spec: CohortSpec):  # -> MemoryPacs
    """The cohort as an in-memory PACS (shared: do not add to it)."""
    from dqr.plugins.testpacs.memory.pacs import MemoryPacs
    from dqr.plugins.testpacs.memory.synthetic import generate_cohort

    return MemoryPacs.from_datasets(generate_cohort(dicomweb_cohort_spec))


@pytest.fixture
def mock_dicomweb_factory(dicomweb_memory_pacs) -> Iterator[Callable[..., Any]]:
    """Start mock DICOMweb servers: ``mock_dicomweb_factory(pacs=None, **config)``."""
    from dqr.plugins.testpacs.mockpacs.http_server import Config, serve

    started = []

    def start(pacs=None, **config: Any):
        server = serve(dicomweb_memory_pacs if pacs is None else pacs, Config.model_validate(config))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def mock_dicomweb_pacs(mock_dicomweb_factory):  # -> MockDicomwebServer
    """The default cohort served over QIDO-RS/WADO-RS on a free loopback port."""
    return mock_dicomweb_factory()


@pytest.fixture
def dicomweb_backend_factory(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Build DICOMweb backends: ``dicomweb_backend_factory(url, limits=None, **keys)``.

    ``limits`` is a dict of :class:`dqr.config.Limits` fields; relative paths
    in ``keys`` (``password_file``, ``ca_bundle``) are relative to ``tmp_path``.
    """
    from dqr.backend import SourceContext
    from dqr.config import Limits
    from dqr.plugins.dicomweb import DicomwebSourceConfig, make_backend

    built = []

    def build(url: str, limits: dict[str, Any] | None = None, **keys: Any):
        config = DicomwebSourceConfig.model_validate({"type": "dicomweb", "url": url, **keys})
        context = SourceContext(name="web", config_dir=tmp_path, limits=Limits().merged(limits or {}))
        backend = make_backend(config, context)
        built.append(backend)
        return backend

    yield build
    for backend in built:
        backend.close()


@pytest.fixture
def dqr_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """``caplog`` that sees the ``dqr`` loggers whatever their propagation."""
    logger = logging.getLogger("dqr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG, logger="dqr")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
