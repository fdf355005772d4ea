"""A private PostgreSQL cluster for tests and benchmarks, run from the Debian packages.

Each :class:`PostgresServer` is its own cluster (``initdb``) in a fresh temp
directory, listening on a free loopback port and a Unix socket in that
directory; it never touches the system service or ``/var/lib/postgresql``. A
plain library (no pytest): the fixtures in :mod:`dqr.testing.fixtures_postgres`
and the benchmark harness both use it.

``initdb`` refuses to run as root, so when we are root the server binaries run
as the ``postgres`` user (``runuser -u postgres --``) in a directory that user
owns; as anyone else they run as that user. Authentication is ``trust``: a
test cluster on loopback, never a real one.

Example::

    with PostgresServer.start() as pg:
        url = pg.create_database("job1")   # postgresql://postgres@127.0.0.1:PORT/job1

Install PostgreSQL with ``apt-get install -y postgresql`` (its service is not needed).
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

#: Where the Debian packages put the server binaries: one folder per major version.
DEBIAN_ROOT = Path("/usr/lib/postgresql")

#: Overrides the folder holding ``initdb``/``pg_ctl``/``createdb`` (e.g. a source build).
POSTGRES_BIN_ENV = "DQR_POSTGRES_BIN"

INSTALL_HINT = "install it with: apt-get install -y postgresql (or run scripts/test.sh)"

#: The user the server runs as when we are root (the Debian package creates it).
SERVER_USER = "postgres"
#: The superuser ``initdb`` creates; URLs log in as it.
SUPERUSER = "postgres"

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
_PORT_ATTEMPTS = 5
# The server's words when the port was taken between our pick and its bind.
_PORT_IN_USE = "Address already in use"
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresError(RuntimeError):
    """PostgreSQL could not be started, or a command against it failed."""


def find_postgres_bin() -> Path | None:
    """The folder with the server binaries: ``$DQR_POSTGRES_BIN``, else the
    newest ``/usr/lib/postgresql/<version>/bin``, else the folder of ``pg_ctl``
    on PATH; None if there is none."""
    candidates: list[Path] = []
    if os.environ.get(POSTGRES_BIN_ENV):
        candidates.append(Path(os.environ[POSTGRES_BIN_ENV]))
    if DEBIAN_ROOT.is_dir():
        versions = [p for p in DEBIAN_ROOT.iterdir() if p.name.replace(".", "").isdigit()]
        # Numeric order: 9.6 < 15 < 16 (as strings "9.6" would sort last).
        for version in sorted(
            versions, key=lambda p: [int(x) for x in p.name.split(".")], reverse=True
        ):
            candidates.append(version / "bin")
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "createdb")):
            return folder
    return None


def free_port() -> int:
    """A TCP port free on loopback right now. Another process may take it
    before the server binds it; :meth:`PostgresServer.start` retries then."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _as_server_user() -> list[str]:
    """The command prefix that runs a server binary as a user it accepts."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresError(
            f"running as root, and there is no {SERVER_USER!r} user to run initdb as; {INSTALL_HINT}"
        ) from None
    return ["runuser", "-u", SERVER_USER, "--"]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has: pg_ctl's
    daemonized postmaster is reaped by init, not by us)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


# Clusters still running at interpreter exit (a crashed test run, a benchmark
# interrupted by Ctrl-C) are stopped then, not left listening.
_running: set[PostgresServer] = set()


def stop_all(servers: Iterable[PostgresServer]) -> None:
    for server in list(servers):
        server.stop()


@atexit.register
def _stop_running() -> None:
    stop_all(_running)


class PostgresServer:
    """One running cluster. Start with :meth:`start`; stop with :meth:`stop` or
    by leaving a ``with`` block (which also removes its directory)."""

    port: int
    pid: int
    workdir: Path
    data_dir: Path
    log_path: Path
    bin_dir: Path

    def __init__(self, *, bin_dir: Path, workdir: Path, port: int, prefix: list[str]) -> None:
        self.bin_dir = bin_dir
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "server.log"
        self.port = port
        self.pid = 0
        self._prefix = prefix

    # ------------------------------------------------------------------ start

    @classmethod
    def start(cls, *, fsync: bool = False, max_connections: int = 200) -> PostgresServer:
        """initdb a new cluster in a fresh temp directory and start it on a free
        loopback port; return once it accepts connections.

        :param fsync: keep ``fsync`` on. Off by default (a throw-away cluster is
            faster without it); turn it on where a test kills the server to prove
            what survives.
        :param max_connections: the server's ``max_connections`` (every worker of
            a queue engine holds a small pool).
        :raises PostgresError: PostgreSQL is missing, initdb fails, or the server
            does not come up in time (the message carries the tail of its log).
        """
        bin_dir = find_postgres_bin()
        if bin_dir is None:
            raise PostgresError(f"PostgreSQL server binaries not found; {INSTALL_HINT}")
        prefix = _as_server_user()
        # Not under pytest's tmp_path: that is private to root (0700), and the
        # server user must reach the socket directory and the data directory.
        workdir = Path(tempfile.mkdtemp(prefix="dqr-pg-"))
        if prefix:
            shutil.chown(workdir, user=SERVER_USER)
        server = cls(bin_dir=bin_dir, workdir=workdir, port=0, prefix=prefix)
        try:
            server._run(
                "initdb", "-D", str(server.data_dir), "-A", "trust", "-U", SUPERUSER,
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                server.port = free_port()
                try:
                    server._start_server(fsync=fsync, max_connections=max_connections)
                    return server
                except PostgresError:
                    if _PORT_IN_USE not in _tail(server.log_path) or attempt == _PORT_ATTEMPTS:
                        raise
                    server.log_path.unlink(missing_ok=True)
        except BaseException:
            server.stop()
            raise
        raise AssertionError("unreachable")

    def _start_server(self, *, fsync: bool, max_connections: int) -> None:
        options = [
            f"-p {self.port}",
            f"-k {self.workdir}",
            f"-c listen_addresses={LOOPBACK}",
            f"-c max_connections={max_connections}",
            f"-c fsync={'on' if fsync else 'off'}",
        ]
        if not fsync:
            options += ["-c synchronous_commit=off", "-c full_page_writes=off"]
        _running.add(self)
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_path), "-w",
            "-t", str(int(START_TIMEOUT)), "-o", " ".join(options), "start",
        )  # fmt: skip
        self.pid = self._postmaster_pid() or 0

    def _run(self, binary: str, *args: str) -> subprocess.CompletedProcess:
        command = [*self._prefix, str(self.bin_dir / binary), *args]
        result = subprocess.run(
            command,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT + 10,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).strip()[-2000:]
            log = (
                f"; end of {self.log_path}:\n{_tail(self.log_path)}"
                if self.log_path.exists()
                else ""
            )
            raise PostgresError(f"{binary} exited with code {result.returncode}: {output}{log}")
        return result

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    # ---------------------------------------------------------------- clients

    @property
    def socket_dir(self) -> Path:
        return self.workdir

    def url(self, database: str = "postgres") -> str:
        """A libpq/SQLAlchemy URL for ``database`` as the superuser (no password)."""
        return f"postgresql://{SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """``createdb name`` and return its URL."""
        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")
        self._run("createdb", "-h", LOOPBACK, "-p", str(self.port), "-U", SUPERUSER, name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """``dropdb --force name`` (disconnecting whoever is still connected)."""
        self._run(
            "dropdb", "-h", LOOPBACK, "-p", str(self.port), "-U", SUPERUSER,
            "--force", "--if-exists", name,
        )  # fmt: skip

    def psql(self, database: str, sql: str) -> str:
        """Run ``sql`` with ``psql`` (unaligned, tuples only) and return its output."""
        result = self._run(
            "psql", "-h", LOOPBACK, "-p", str(self.port), "-U", SUPERUSER, "-d", database,
            "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql,
        )  # fmt: skip
        return result.stdout.strip()

    # ------------------------------------------------------------------- stop

    @property
    def running(self) -> bool:
        # A reaped postmaster's PID may be reused: ours holds postmaster.pid.
        return _alive(self.pid) and self._postmaster_pid() == self.pid

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; if that fails, SIGQUIT then SIGKILL the
        postmaster by its PID. Then remove the directory. Idempotent."""
        _running.discard(self)
        if self.running:
            try:
                self._run(
                    "pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w",
                    "-t", str(int(STOP_TIMEOUT)), "stop",
                )  # fmt: skip
            except (PostgresError, subprocess.TimeoutExpired):
                self._kill()
        # pg_ctl returns once postmaster.pid is gone, a moment before the
        # process itself has exited: wait for that, so "stopped" means it.
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.pid and _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill(self) -> None:
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            if not self.running:
                return
            os.kill(self.pid, sig)
            deadline = time.monotonic() + 5
            while _alive(self.pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PostgresServer pid={self.pid} {LOOPBACK}:{self.port} {state}>"
