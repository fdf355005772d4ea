"""pytest fixtures: servers that receive what dqr sends (see
:mod:`dqr.plugins.testpacs.mockpacs.store_scp` and :mod:`dqr.plugins.testpacs.mockpacs.stow_server`).

- ``mock_store_scp_factory`` (function): ``mock_store_scp_factory(**config)``
  starts a Storage SCP on a free loopback port; stopped after the test.
- ``mock_stow_factory`` (function): the same for a STOW-RS server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["mock_store_scp_factory", "mock_stow_factory"]


@pytest.fixture
def mock_store_scp_factory() -> Iterator[Callable[..., Any]]:
    from dqr.plugins.testpacs.mockpacs.store_scp import Config, MockStorageScp

    started: list[MockStorageScp] = []

    def start(**config: Any) -> MockStorageScp:
        server = MockStorageScp(Config.model_validate(config))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def mock_stow_factory() -> Iterator[Callable[..., Any]]:
    from dqr.plugins.testpacs.mockpacs.stow_server import Config, serve

    started: list[Any] = []

    def start(**config: Any) -> Any:
        server = serve(None, Config.model_validate(config))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
