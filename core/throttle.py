"""Being gentle with a PACS: an adaptive concurrency limit, a rate limit and
retries with exponential backoff and jitter.

The limit starts at the configured maximum, halves when the PACS signals
strain (out of resources, too many associations, HTTP 429/503) and creeps
back up by one after a run of successes -- never above the maximum.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any, Protocol, TypeVar

from dqr.config import Limits
from dqr.errors import RemoteError, SourceDownError

log = logging.getLogger("dqr.throttle")
#: Longest Retry-After honoured, seconds.
MAX_RETRY_AFTER = 3600.0
T = TypeVar("T")


class AdaptiveLimit:
    """A semaphore whose size adapts to how the remote copes."""

    def __init__(self, maximum: int, name: str, successes_to_grow: int = 10, watch_latency: bool = True) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.name = name
        self.active = 0
        self.successes_to_grow = successes_to_grow
        self._successes = 0
        self._condition = threading.Condition()
        self._baseline: float | None = None
        #: a call this many times slower than usual (and slower than the floor) slows us down;
        #: off for retrievals, whose duration follows the series' size
        self.latency_factor = 5.0 if watch_latency else None
        self.latency_floor = 2.0

    @contextmanager
    def slot(self):
        with self._condition:
            while self.active >= self.limit:
                self._condition.wait()
            self.active += 1
        try:
            yield
        finally:
            with self._condition:
                self.active -= 1
                self._condition.notify_all()

    def record_latency(self, seconds: float) -> None:
        """Rising latency is strain too: a call much slower than the running
        baseline lowers the limit before the PACS starts refusing."""
        if self.latency_factor is None:
            return
        with self._condition:
            if self._baseline is None:
                self._baseline = seconds
                return
            slow = seconds > self.latency_factor * self._baseline and seconds > self.latency_floor
            self._baseline = 0.9 * self._baseline + 0.1 * seconds
        if slow:
            log.info("%s: a call took %.1f s (usual %.2f s)", self.name, seconds, self._baseline)
            self.slow_down()

    def slow_down(self) -> None:
        with self._condition:
            new = max(1, self.limit // 2)
            if new < self.limit:
                log.warning("%s: the PACS signals strain; concurrency %d -> %d", self.name, self.limit, new)
            self.limit = new
            self._successes = 0

    def succeeded(self) -> None:
        with self._condition:
            self._successes += 1
            if self.limit < self.maximum and self._successes >= self.successes_to_grow * self.limit:
                self.limit += 1
                self._successes = 0
                log.info("%s: concurrency back up to %d", self.name, self.limit)
                self._condition.notify_all()


class RateLimit:
    """At most ``per_second`` calls per second, spread evenly."""

    def __init__(self, per_second: float | None) -> None:
        self.interval = 1.0 / per_second if per_second else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def backoff_delay(attempt: int, limits: Limits) -> float:
    """Exponential backoff with full jitter: many clients retrying after the
    same fault spread out instead of hitting the PACS together."""
    ceiling = min(limits.backoff_max, limits.backoff_initial * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def call_with_retries(
    action: Callable[[], T],
    limits: Limits,
    limit: AdaptiveLimit | None = None,
    rate: RateLimit | None = None,
    breaker: CircuitBreaker | None = None,
) -> T:
    """Run ``action`` in a slot of ``limit``, retrying retriable
    :class:`RemoteError` with backoff (outside the slot, so a waiting retry
    does not hold back other work) -- at most ``limits.retries`` times.

    A final error (bad query, unknown move destination, 401...) is raised at
    once: retrying it would only hammer the PACS.

    A plain loop rather than tenacity's: it runs once per C-STORE, and
    building a retry controller for every instance was a tenth of dqr's own
    time per instance (``docs/performance.md``, stop 23).
    """
    attempt = 1
    while True:
        try:
            result = _attempt(action, limit, rate, breaker)
            break
        except RemoteError as error:
            if not error.retriable or attempt > limits.retries:
                raise
            if limit is not None and error.slow_down:
                limit.slow_down()
            log.info("retrying after: %s (attempt %d)", error, attempt)
            time.sleep(retry_delay(error, attempt, limits))
            attempt += 1
    if breaker is not None:
        breaker.record_success()
    if limit is not None:
        limit.succeeded()
    return result


def _attempt(
    action: Callable[[], T], limit: AdaptiveLimit | None, rate: RateLimit | None, breaker: CircuitBreaker | None
) -> T:
    """One try of :func:`call_with_retries`'s action, in a slot."""
    if breaker is not None:
        breaker.before_call()
    with limit.slot() if limit else nullcontext():
        if rate is not None:
            rate.wait()
        started = time.monotonic()
        try:
            result = action()
        except RemoteError as error:
            if breaker is not None:
                breaker.record_failure(error)
            raise
    if limit is not None:
        limit.record_latency(time.monotonic() - started)
    return result


def retry_delay(error: RemoteError, attempt: int, limits: Limits) -> float:
    """How long to wait after failed attempt number ``attempt``."""
    if error.retry_after is not None:
        # The server said when: waiting less would only be refused again,
        # so Retry-After wins over backoff_max (up to an hour, against nonsense).
        return min(error.retry_after, max(limits.backoff_max, MAX_RETRY_AFTER))
    return backoff_delay(attempt, limits)


class CircuitBreaker:
    """Stops hammering a source that cannot be reached.

    After ``failures`` consecutive *unreachable* errors every caller waits
    ``cooldown`` seconds; after ``max_cooldowns`` pauses in a row without a
    single success, :class:`SourceDownError` is raised.
    """

    def __init__(self, failures: int, cooldown: float, max_cooldowns: int, stop: threading.Event | None = None) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self.max_cooldowns = max_cooldowns
        self.stop = stop or threading.Event()
        self._consecutive = 0
        self._cooldowns = 0
        self._open_until = 0.0
        self._lock = threading.Lock()
        self.last_error: str = ""

    def before_call(self) -> None:
        while True:
            with self._lock:
                if self._cooldowns >= self.max_cooldowns:
                    raise SourceDownError(
                        f"the source could not be reached {self._consecutive} times in a row, through "
                        f"{self._cooldowns} pauses of {self.cooldown:g} s; giving up (last error: {self.last_error}). "
                        "Finished work is kept: run the same command again to resume.",
                        unreachable=True,
                    )
                wait = self._open_until - time.monotonic()
            if wait <= 0:
                return
            if self.stop.wait(min(wait, 1.0)):
                return

    def record_failure(self, error: RemoteError) -> None:
        if not error.unreachable:
            return
        with self._lock:
            self._consecutive += 1
            self.last_error = str(error)
            if self._consecutive % self.failures == 0:
                self._cooldowns += 1
                self._open_until = time.monotonic() + self.cooldown
                if self._cooldowns < self.max_cooldowns:
                    log.warning(
                        "the source could not be reached %d times in a row; pausing %g s (%s)",
                        self._consecutive, self.cooldown, error,
                    )

    def record_success(self) -> None:
        with self._lock:
            self._consecutive = 0
            self._cooldowns = 0


class TimeWindow:
    """A daily local-time window such as ``19:00-07:00`` (may cross midnight)."""

    def __init__(self, start: int, end: int, text: str) -> None:
        self.start, self.end, self.text = start, end, text  # seconds after midnight

    @classmethod
    def parse(cls, text: str) -> TimeWindow:
        def seconds(part: str) -> int:
            pieces = part.strip().split(":")
            if len(pieces) not in (2, 3) or not all(p.isdigit() for p in pieces):
                raise ValueError(f"{text!r}: expected HH:MM-HH:MM, e.g. 19:00-07:00")
            hours, minutes, secs = (int(p) for p in (*pieces, "0")[:3])
            if hours > 23 or minutes > 59 or secs > 59:
                raise ValueError(f"{part!r} is not a time of day")
            return hours * 3600 + minutes * 60 + secs

        start, sep, end = text.partition("-")
        if not sep:
            raise ValueError(f"{text!r}: expected HH:MM-HH:MM, e.g. 19:00-07:00")
        return cls(seconds(start), seconds(end), text)

    def seconds_until_open(self, now: float | None = None) -> float:
        """0 inside the window, else how long until it opens."""
        local = time.localtime(now if now is not None else time.time())
        current = local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec
        inside = (self.start <= current < self.end) if self.start < self.end else (
            current >= self.start or current < self.end
        )
        if inside or self.start == self.end:
            return 0.0
        return float((self.start - current) % 86400)

    def opens_at(self) -> str:
        return time.strftime("%H:%M:%S", time.localtime(time.time() + self.seconds_until_open()))


class Guard:
    """How hard dqr may push one remote, in one place: an adaptive limit for
    queries and one for retrievals, the query rate and the circuit breaker,
    with retries around every call."""

    def __init__(self, limits: Limits, stop: threading.Event | None = None) -> None:
        self.limits = limits
        self.queries = AdaptiveLimit(limits.max_queries, "queries")
        self.retrievals = AdaptiveLimit(limits.max_retrievals, "retrievals", watch_latency=False)
        self.rate = RateLimit(limits.requests_per_second)
        self.breaker = CircuitBreaker(limits.breaker_failures, limits.breaker_cooldown, limits.breaker_max_cooldowns, stop)

    def query(self, action: Callable[[], T]) -> T:
        """A query (any level), rate-limited, within ``max_queries``."""
        return call_with_retries(action, self.limits, self.queries, self.rate, self.breaker)

    def retrieve(self, action: Callable[[], T]) -> T:
        """One retrieval attempt loop, within ``max_retrievals``."""
        return call_with_retries(action, self.limits, self.retrievals, None, self.breaker)

    def retrieve_once(self, action: Callable[[], T]) -> T:
        """One retrieval attempt, within ``max_retrievals``, not retried
        (the caller has a cheaper way to finish what it leaves undone)."""
        return call_with_retries(action, self.limits.merged({"retries": 0}), self.retrievals, None, self.breaker)


class ConnectionSlots(Protocol):
    """Slots any thread may give back (``dqr.cluster_limits.ClusterSlots``
    taken with ``shared=True``): what a connection holds while it is open."""

    def acquire(self, stop: threading.Event | None = None, timeout: float | None = None) -> Any: ...

    def release(self, key: Any) -> None: ...


#: ``cap(name, capacity)``: the cluster-wide slots named ``name`` (scoped to
#: the source or destination by the executor) that a backend's or
#: destination's open connections hold. Given to ``cap_connections(cap)``.
ConnectionCapFactory = Callable[[str, int], ConnectionSlots]

#: Under a cluster-wide cap, a connection kept open idle holds a slot that
#: another process may be waiting for: it is closed after this long idle...
CAPPED_IDLE = 1.0
#: ...and given back (closed) instead of kept once it has been open this long,
#: so that a busy process cannot keep every slot while peers wait.
CAPPED_TURN = 5.0


class ConnectionCap:
    """Open connections (associations) to one remote, each holding one
    cluster-wide slot from the moment it is opened until it is closed: idle
    pooled connections count against the cap as the remote counts them.

    A pool opens through :meth:`open`, reports every close to :meth:`closed`,
    asks :meth:`keep_idle` before pooling one, and closes what
    :meth:`expired` says from a reaper (:meth:`start_reaper`)."""

    def __init__(self, slots: ConnectionSlots, idle: float = CAPPED_IDLE, turn: float = CAPPED_TURN) -> None:
        self.slots = slots
        self.idle = idle
        self.turn = turn
        self._held: dict[int, tuple[Any, float]] = {}
        self._lock = threading.Lock()

    def open(self, connect: Callable[[], T], stop: threading.Event | None = None) -> T:
        """``connect()`` holding a slot that stays with the connection."""
        key = self.slots.acquire(stop)
        if key is None:
            raise RemoteError("stopped while waiting for a connection slot", retriable=True)
        try:
            connection = connect()
        except BaseException:
            self.slots.release(key)
            raise
        with self._lock:
            self._held[id(connection)] = (key, time.monotonic())
        return connection

    def closed(self, connection: object) -> None:
        """The connection is closed (or dead): its slot goes back."""
        with self._lock:
            held = self._held.pop(id(connection), None)
        if held is not None:
            self.slots.release(held[0])

    def keep_idle(self, connection: object) -> bool:
        """Whether to pool it: not once it has had its turn."""
        with self._lock:
            held = self._held.get(id(connection))
        return held is not None and time.monotonic() - held[1] < self.turn

    def start_reaper(self, reap: Callable[[], bool]) -> None:
        """Call ``reap()`` (which closes idle connections older than
        :attr:`idle`) every half of it until ``reap`` returns False."""

        def loop() -> None:
            while True:
                time.sleep(self.idle / 2)
                if not reap():
                    return

        threading.Thread(target=loop, name="dqr-connection-reaper", daemon=True).start()


class Deadline:
    """The time one operation may take, named by the limit that set it
    (``limits.query_timeout``, ``limits.retrieve_timeout``), so that an
    operation cut short says it was dqr's own bound, not the remote's."""

    def __init__(self, seconds: float, limit: str) -> None:
        self.seconds = seconds
        self.limit = limit
        self.ends = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.ends

    def error(self, what: str) -> RemoteError:
        """The retriable error for an operation this deadline cut short."""
        return RemoteError(
            f"{what}: dqr's limits.{self.limit} ({self.seconds:g} s) passed before it finished; retried",
            retriable=True,
        )

    def check(self, what: str) -> None:
        if self.passed:
            raise self.error(what)
