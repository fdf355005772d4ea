"""Limits that hold across every dqr process sharing one PostgreSQL database.

A source's ``max_queries`` / ``max_retrievals`` and ``requests_per_second``
bound what *all* workers together do to that PACS (three processes with
``max_retrievals: 2`` hold at most two retrieval associations between them).
The per-process :class:`dqr.throttle.AdaptiveLimit` still slows one process
down when the PACS strains; :class:`CappedLimit` runs it inside the global cap.

- :class:`ClusterSlots`: at most ``capacity`` holders at once. A holder owns
  one of ``capacity`` PostgreSQL *session-level advisory locks*. PostgreSQL
  drops a session's locks the moment its connection ends, so a worker killed
  with SIGKILL gives its slots back at once: no lease to expire, no heartbeat.
- :class:`ClusterRate`: calls start at least ``1/per_second`` apart, cluster-
  wide. One row per limit holds the next free start time, on the database's
  clock (so workers' clocks need not agree); each call books the next start
  in one ``UPDATE ... RETURNING`` and sleeps until then.

Each thread uses its own connection (a lock belongs to the session that took
it, and a waiting thread must not block the others). Slots that belong to an
object rather than a thread -- an open association, taken by one thread and
closed by another -- are taken on one session per process shared by all its
threads (``slots(..., shared=True)``). Needs ``psycopg`` (the
``queue`` extra). The database URL is a secret: it is never put into an
error or a log line (see :func:`mask_url`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dqr.throttle import AdaptiveLimit

log = logging.getLogger("dqr.cluster_limits")

#: Waiting for a free slot polls the locks; the pause grows to this much.
MAX_POLL = 0.05
_FIRST_POLL = 0.002

RATE_TABLE = "dqr_rate_limits"
_CREATE_RATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {RATE_TABLE} (
    name text PRIMARY KEY,
    next_start double precision NOT NULL
)
"""
_BOOK_START = f"""
INSERT INTO {RATE_TABLE} AS r (name, next_start)
VALUES (%(name)s, extract(epoch FROM clock_timestamp()) + %(interval)s)
ON CONFLICT (name) DO UPDATE
    SET next_start = greatest(r.next_start, extract(epoch FROM clock_timestamp())) + %(interval)s
RETURNING next_start - %(interval)s - extract(epoch FROM clock_timestamp())
"""
# Try the slots in array order and stop at the first one taken: LIMIT 1 stops
# the scan there, so at most one lock is acquired. (No ORDER BY: a sort would
# evaluate the filter, and so take a lock, for every row first.)
_TAKE_ONE = """
SELECT k FROM unnest(%(keys)s::bigint[]) AS t(k) WHERE pg_try_advisory_lock(k) LIMIT 1
"""


class ClusterLimitError(RuntimeError):
    """The database behind the cluster-wide limits could not be used."""


_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^@/\s]*@", re.IGNORECASE)


def mask_url(text: str) -> str:
    """``text`` with the user and password of every URL in it replaced by ``***``
    (libpq puts the URL into some of its messages)."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def advisory_key(*parts: str) -> int:
    """A stable signed 64-bit advisory-lock key for a name (PostgreSQL's
    ``bigint``). Different names collide with negligible probability; a
    collision only makes two limits share slots (stricter, never looser)."""
    digest = hashlib.blake2b("\0".join(("dqr", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class ClusterLimits:
    """The connections to the shared database, one per thread, for every slot
    set and rate of one process. Close it when the process is done."""

    def __init__(self, url: str, *, namespace: str = "dqr") -> None:
        self._url = url
        self.namespace = namespace
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._rate_table_ready = False
        self._shared = _SharedSession(self)

    def slots(self, name: str, capacity: int, *, shared: bool = False) -> ClusterSlots:
        """``capacity`` slots named ``name``; ``shared``: held on this process's
        shared session, so any thread may give back a slot another took."""
        return ClusterSlots(self, name, capacity, session=self._shared if shared else self)

    def rate(self, name: str, per_second: float | None) -> ClusterRate:
        return ClusterRate(self, name, per_second)

    # -- connections ---------------------------------------------------------

    def connection(self) -> Any:
        """This thread's connection (autocommit), opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn
        conn = self.connect()
        self._local.conn = conn
        self._local.held = set()
        return conn

    def connect(self) -> Any:
        """A new connection (autocommit), closed with the others by :meth:`close`."""
        import psycopg

        try:
            # Keepalives: a worker cut off from the database (not closed, just
            # gone) has its locks dropped by the server within ~30 s.
            conn = psycopg.connect(
                self._url,
                autocommit=True,
                application_name="dqr-limits",
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        except psycopg.Error as error:
            raise ClusterLimitError(
                f"cannot connect to the queue database: {mask_url(str(error))}"
            ) from None
        with self._lock:
            self._all.append(conn)
        return conn

    def held(self) -> set[int]:
        """The slot keys this thread's session holds (opening it if need be:
        a new session holds none)."""
        self.connection()
        return self._local.held

    def exclusive(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()  # a thread's own session: nobody else uses it

    def execute(self, sql: str, params: dict[str, Any]) -> Any:
        import psycopg

        conn = self.connection()
        try:
            return conn.execute(sql, params).fetchone()
        except psycopg.OperationalError as error:
            # A broken connection has lost its locks too: open a new one next time.
            self._local.conn = None
            self._local.held = set()
            conn.close()
            raise ClusterLimitError(f"the queue database failed: {mask_url(str(error))}") from None

    def ensure_rate_table(self) -> None:
        if self._rate_table_ready:
            return
        conn = self.connection()
        # CREATE TABLE IF NOT EXISTS races with itself across sessions; a
        # transaction-level advisory lock serialises the first ones.
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (advisory_key("ddl", RATE_TABLE),))
            conn.execute(_CREATE_RATE_TABLE)
        self._rate_table_ready = True

    def close(self) -> None:
        """Close every connection (which releases every slot still held)."""
        with self._lock:
            connections, self._all = self._all, []
        for conn in connections:
            conn.close()

    def __enter__(self) -> ClusterLimits:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _SharedSession:
    """One connection of the process shared by all its threads (one statement
    at a time), for slots held by objects that outlive the thread that took
    them. The same ``held``/``execute`` as :class:`ClusterLimits`' per-thread ones."""

    def __init__(self, limits: ClusterLimits) -> None:
        self._limits = limits
        self._conn: Any = None
        self._held: set[int] = set()
        self._mutex = threading.RLock()

    def held(self) -> set[int]:
        return self._held

    def exclusive(self) -> threading.RLock:
        """Held across "which keys are mine" and taking one, so that two threads
        cannot both get the same key (advisory locks are re-entrant per session)."""
        return self._mutex

    def execute(self, sql: str, params: dict[str, Any]) -> Any:
        import psycopg

        with self._mutex:
            if self._conn is None or self._conn.closed:
                self._conn = self._limits.connect()
                self._held.clear()
            try:
                return self._conn.execute(sql, params).fetchone()
            except psycopg.OperationalError as error:
                self._conn.close()
                self._conn = None
                self._held.clear()
                raise ClusterLimitError(f"the queue database failed: {mask_url(str(error))}") from None


class ClusterSlots:
    """At most ``capacity`` holders of :meth:`slot` at once, over every process
    using the same database and name."""

    def __init__(self, limits: ClusterLimits, name: str, capacity: int, *, session: Any = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.name = name
        self.capacity = capacity
        # Where the locks are taken: this thread's session, or the shared one.
        self._session = session or limits
        self._limits = limits
        self._keys = [advisory_key(limits.namespace, "slot", name, str(i)) for i in range(capacity)]

    def try_acquire(self) -> int | None:
        """Take a free slot now: its key, or None if all are held."""
        # Start at a random slot: waiters spread over the slots instead of all
        # testing slot 0 first.
        start = random.randrange(self.capacity)
        # Advisory locks are re-entrant within a session: skip the slots this
        # thread's session holds already, or a second acquire would "get" one.
        with self._session.exclusive():
            held = self._session.held()
            order = [key for key in self._keys[start:] + self._keys[:start] if key not in held]
            if not order:
                return None
            row = self._session.execute(_TAKE_ONE, {"keys": order})
            if row is None:
                return None
            held.add(row[0])
            return row[0]

    def acquire(
        self, stop: threading.Event | None = None, timeout: float | None = None
    ) -> int | None:
        """Wait for a free slot; its key, or None when ``stop`` was set or
        ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = _FIRST_POLL
        while True:
            key = self.try_acquire()
            if key is not None:
                return key
            if deadline is not None and time.monotonic() >= deadline:
                return None
            wait = pause * random.uniform(0.5, 1.0)
            if stop is not None:
                if stop.wait(wait):
                    return None
            else:
                time.sleep(wait)
            pause = min(MAX_POLL, pause * 2)

    def release(self, key: int) -> None:
        try:
            with self._session.exclusive():
                self._session.held().discard(key)
                row = self._session.execute("SELECT pg_advisory_unlock(%(key)s)", {"key": key})
        except ClusterLimitError as error:
            log.warning(
                "%s: giving back a slot failed (%s); the server drops it with the connection",
                self.name,
                error,
            )
            return
        if not row[0]:
            # The session was replaced (the database restarted): the lock went with it.
            log.warning("%s: a slot was no longer held when given back", self.name)

    @contextmanager
    def slot(self, stop: threading.Event | None = None) -> Iterator[bool]:
        """Hold one slot for the block. Yields True, or False if ``stop`` was
        set while waiting (then nothing is held: skip the work)."""
        key = self.acquire(stop)
        if key is None:
            yield False
            return
        try:
            yield True
        finally:
            self.release(key)

    def holders(self) -> int:
        """How many slots are held right now, by anyone (for tests and status)."""
        row = self._limits.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1 "
            "AND ((classid::bigint << 32) | objid::bigint) = ANY(%(keys)s::bigint[])",
            {"keys": self._keys},
        )
        return int(row[0])


class ClusterRate:
    """Calls start at least ``1 / per_second`` apart over every process using
    the same database and name (``per_second`` None: no limit)."""

    def __init__(self, limits: ClusterLimits, name: str, per_second: float | None) -> None:
        self.name = name
        self.interval = 1.0 / per_second if per_second else 0.0
        self._limits = limits
        self._key = f"{limits.namespace}:{name}"

    def wait(self) -> None:
        if not self.interval:
            return
        self._limits.ensure_rate_table()
        delay = self._limits.execute(_BOOK_START, {"name": self._key, "interval": self.interval})[0]
        if delay > 0:
            time.sleep(delay)


class CappedLimit:
    """A per-process :class:`AdaptiveLimit` inside a cluster-wide cap: the
    drop-in the engine passes where it passes an AdaptiveLimit. A thread first
    waits for the local (adaptive) slot, then for a cluster slot, so a process
    never holds a cluster slot for a thread its own slow-down keeps waiting."""

    def __init__(self, local: AdaptiveLimit, cluster: ClusterSlots) -> None:
        self.local = local
        self.cluster = cluster
        self.name = local.name
        self.maximum = local.maximum

    @property
    def limit(self) -> int:
        return self.local.limit

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self.local.slot():
            key = self.cluster.acquire()
            try:
                yield
            finally:
                self.cluster.release(key)

    def record_latency(self, seconds: float) -> None:
        self.local.record_latency(seconds)

    def slow_down(self) -> None:
        self.local.slow_down()

    def succeeded(self) -> None:
        self.local.succeeded()
