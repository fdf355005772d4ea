"""pytest fixtures: a private PostgreSQL cluster (see :mod:`dqr.testing.postgres`).

- ``postgres`` (session): one cluster for the whole session (initdb + start
  take ~3 s), stopped with ``pg_ctl stop`` at the end. Do not put test data in
  its ``postgres`` database: ask for ``postgres_url``.
- ``postgres_url`` (function): a fresh, empty database of the test's own on
  that cluster, as ``postgresql://postgres@127.0.0.1:PORT/<name>``; dropped
  after the test.

Without PostgreSQL installed these fixtures skip the test, except under
``CI=true``, where a skip would hide that the cluster tests never ran: there
they fail.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from dqr.testing import require
from dqr.testing.postgres import INSTALL_HINT, PostgresServer, find_postgres_bin

__all__ = ["postgres", "postgres_url"]

_database_numbers = itertools.count(1)


def require_postgres() -> None:
    """Skip the current test when the PostgreSQL server binaries are not
    installed; fail it instead when running in CI."""
    require(find_postgres_bin() is not None, f"PostgreSQL is not installed; {INSTALL_HINT}", "the cluster tests")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One private PostgreSQL cluster for the session, on a free loopback port."""
    require_postgres()
    with PostgresServer.start() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """The URL of a new empty database on ``postgres``, dropped after the test."""
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    url = postgres.create_database(name)
    yield url
    postgres.drop_database(name)
