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
from typing import TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_attempt

from dqr.config import Limits
from dqr.errors import RemoteError

log = logging.getLogger("dqr.throttle")
T = TypeVar("T")


class AdaptiveLimit:
    """A semaphore whose size adapts to how the remote copes."""

    def __init__(self, maximum: int, name: str, successes_to_grow: int = 10) -> None:
        self.maximum = maximum
        self.limit = maximum
        self.name = name
        self.active = 0
        self.successes_to_grow = successes_to_grow
        self._successes = 0
        self._condition = threading.Condition()

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


def is_retriable(error: BaseException) -> bool:
    return isinstance(error, RemoteError) and error.retriable


def call_with_retries(
    action: Callable[[], T], limits: Limits, limit: AdaptiveLimit | None = None, rate: RateLimit | None = None
) -> T:
    """Run ``action`` in a slot of ``limit``, retrying retriable
    :class:`RemoteError` with backoff (outside the slot, so a waiting retry
    does not hold back other work).

    A final error (bad query, unknown move destination, 401...) is raised at
    once: retrying it would only hammer the PACS.
    """

    def wait(retry_state) -> float:
        error = retry_state.outcome.exception()
        if isinstance(error, RemoteError) and error.retry_after is not None:
            return min(error.retry_after, limits.backoff_max)
        return backoff_delay(retry_state.attempt_number, limits)

    def before_sleep(retry_state) -> None:
        error = retry_state.outcome.exception()
        if limit is not None and isinstance(error, RemoteError) and error.slow_down:
            limit.slow_down()
        log.info("retrying after: %s (attempt %d)", error, retry_state.attempt_number)

    for attempt in Retrying(
        retry=retry_if_exception(is_retriable),
        stop=stop_after_attempt(limits.retries + 1),
        wait=wait,
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt, (limit.slot() if limit else nullcontext()):
            if rate is not None:
                rate.wait()
            result = action()
    if limit is not None:
        limit.succeeded()
    return result
