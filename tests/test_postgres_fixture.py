"""The private-PostgreSQL launcher and its pytest fixtures (dqr.testing.postgres,
dqr.testing.fixtures_postgres)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from dqr.testing import fixtures_postgres
from dqr.testing import postgres as postgres_module
from dqr.testing.postgres import PostgresServer


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _database(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_postgres_url_is_a_database_that_answers_queries(
    postgres: PostgresServer, postgres_url: str
) -> None:
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres.port}/")

    assert postgres.psql(_database(postgres_url), "SELECT current_database()") == _database(
        postgres_url
    )


def test_postgres_url_is_a_fresh_empty_database(
    postgres: PostgresServer, postgres_url: str
) -> None:
    tables = postgres.psql(
        _database(postgres_url),
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )

    assert tables == "0"


def test_postgres_listens_on_loopback_only(postgres: PostgresServer) -> None:
    assert postgres.psql("postgres", "SHOW listen_addresses") == "127.0.0.1"


def test_postgres_runs_as_the_postgres_user_when_we_are_root(postgres: PostgresServer) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root needs runuser")  # the non-root path runs as ourselves
    owner = os.stat(f"/proc/{postgres.pid}").st_uid

    assert owner == postgres_module.pwd.getpwnam("postgres").pw_uid


def test_drop_database_removes_it(postgres: PostgresServer) -> None:
    postgres.create_database("to_drop")

    postgres.drop_database("to_drop")

    assert (
        postgres.psql("postgres", "SELECT count(*) FROM pg_database WHERE datname = 'to_drop'")
        == "0"
    )


def test_stop_ends_the_server_and_removes_its_directory(busy_port: int, monkeypatch) -> None:
    fixtures_postgres.require_postgres()
    # Hand start() a taken port first, as if another process had won the race
    # for it: it must retry on another one.
    real_free_port = postgres_module.free_port
    handed_out = [busy_port]
    monkeypatch.setattr(
        postgres_module, "free_port", lambda: handed_out.pop(0) if handed_out else real_free_port()
    )
    server = PostgresServer.start()
    assert server.running and server.port != busy_port

    server.stop()

    assert not postgres_module._alive(server.pid)
    assert not server.workdir.exists()


def test_find_postgres_bin_prefers_the_newest_debian_version(tmp_path, monkeypatch) -> None:
    for version in ("9.6", "15", "16"):
        folder = tmp_path / version / "bin"
        folder.mkdir(parents=True)
        for name in ("initdb", "pg_ctl", "createdb"):
            (folder / name).write_text("#!/bin/sh\n")
            (folder / name).chmod(0o755)
    monkeypatch.setattr(postgres_module, "DEBIAN_ROOT", tmp_path)
    monkeypatch.delenv(postgres_module.POSTGRES_BIN_ENV, raising=False)

    assert postgres_module.find_postgres_bin() == tmp_path / "16" / "bin"
