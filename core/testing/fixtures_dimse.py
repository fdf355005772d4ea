"""pytest fixtures: the in-memory PACS over DIMSE (see
:mod:`dqr.plugins.testpacs.mockpacs.dimse_server`) and dimse backends pointed at it.

- ``mock_dimse_pacs``: a running mock Query/Retrieve SCP over the default
  synthetic cohort (4 patients x 2 studies, 3 instances per series),
  127.0.0.1 on a free port, AE title ``MOCKPACS``; its faults may be changed
  by the test (``mock_dimse_pacs.faults.delay = 0.1``). One server per
  session, reset (faults, destinations, counters) before each test.
- ``mock_dimse_factory``: ``mock_dimse_factory(pacs=None, spec=None, **config)``
  starts more of them (custom cohort, destinations, faults). Stopped after.
- ``free_loopback_port`` / ``closed_loopback_port``: a 127.0.0.1 port that
  was free a moment ago (for a storage SCP the PACS must be told about
  first), and one where nothing listens (connection refused).
- ``dimse_transport``: ``"native"`` and ``"pynetdicom"``: every test using it
  (or ``dimse_backend_factory``, which passes it as the source's
  ``transport``) runs once per DIMSE stack. A test for one stack only
  parametrizes it directly: ``@pytest.mark.parametrize("dimse_transport", ["pynetdicom"])``.
- ``dimse_backend_factory``: ``dimse_backend_factory(port, called_aet=...,
  limits={...}, **source_keys)`` builds a ``dimse`` backend (a
  :class:`DimseBackend`) with ``calling_aet: DQR``; closed after.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dqr.plugins.testpacs.memory.pacs import MemoryPacs
from dqr.plugins.testpacs.memory.synthetic import DEFAULT_COHORT, CohortSpec, generate_cohort

__all__ = [
    "dimse_backend_factory",
    "mock_dimse_cohort",
    "mock_dimse_factory",
    "mock_dimse_pacs",
    "mock_dimse_pacs_session",
    "closed_loopback_port",
    "dimse_transport",
    "free_loopback_port",
]

DIMSE_TRANSPORTS = ("native", "pynetdicom")

DEFAULT_COHORT = DEFAULT_COHORT


@pytest.fixture(scope="session")
def mock_dimse_cohort() -> MemoryPacs:
    """The default cohort, indexed once per session (servers only read it)."""
    return MemoryPacs.from_datasets(generate_cohort(DEFAULT_COHORT))


@pytest.fixture
def mock_dimse_factory(mock_dimse_cohort: MemoryPacs) -> Iterator[Callable[..., Any]]:
    from dqr.plugins.testpacs.mockpacs.dimse_server import Config, serve

    started: list[Any] = []

    def start(pacs: MemoryPacs | None = None, spec: CohortSpec | None = None, **config: Any) -> Any:
        if pacs is None:
            pacs = MemoryPacs.from_datasets(generate_cohort(spec)) if spec else mock_dimse_cohort
        server = serve(pacs, Config.model_validate({"host": "127.0.0.1", "port": 0, **config}))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def mock_dimse_pacs_session(mock_dimse_cohort: MemoryPacs) -> Iterator[Any]:
    """The server behind ``mock_dimse_pacs`` (use that one: it is reset)."""
    from dqr.plugins.testpacs.mockpacs.dimse_server import Config, serve

    server = serve(mock_dimse_cohort, Config(host="127.0.0.1", port=0))
    yield server
    server.stop()


@pytest.fixture
def mock_dimse_pacs(mock_dimse_pacs_session: Any) -> Any:
    mock_dimse_pacs_session.reset()
    return mock_dimse_pacs_session


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_loopback_port() -> int:
    return _unused_port()


@pytest.fixture
def closed_loopback_port() -> int:
    return _unused_port()


@pytest.fixture(params=DIMSE_TRANSPORTS)
def dimse_transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def dimse_backend_factory(tmp_path: Path, dimse_transport: str) -> Iterator[Callable[..., Any]]:
    from dqr.backend import SourceContext
    from dqr.config import Limits
    from dqr.plugins.dimse import DimseSourceConfig, make_backend

    made: list[Any] = []

    def make(
        port: int, called_aet: str = "MOCKPACS", limits: dict[str, Any] | None = None, **keys: Any
    ) -> Any:
        config = DimseSourceConfig.model_validate(
            {
                "type": "dimse",
                "host": "127.0.0.1",
                "port": port,
                "called_aet": called_aet,
                "calling_aet": "DQR",
                "transport": dimse_transport,
                "dimse_timeout": 10,
                "acse_timeout": 10,
                **keys,
            }
        )
        backend = make_backend(
            config, SourceContext("pacs", tmp_path, Limits().merged(limits or {}))
        )
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
