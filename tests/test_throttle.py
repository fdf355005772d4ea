"""Being gentle with a PACS: the adaptive limit, backoff, the circuit
breaker and the availability window, through dqr.throttle's public API."""

from __future__ import annotations

import threading
import time

import pytest

from dqr.config import Limits
from dqr.errors import RemoteError
from dqr.throttle import (
    AdaptiveLimit,
    CircuitBreaker,
    SourceDownError,
    TimeWindow,
    backoff_delay,
    call_with_retries,
)


def test_strain_halves_the_limit_but_never_below_one():
    limit = AdaptiveLimit(4, "queries")
    limit.slow_down()
    assert limit.limit == 2
    limit.slow_down()
    limit.slow_down()
    assert limit.limit == 1


def test_the_limit_creeps_back_up_after_successes_and_never_above_the_maximum():
    limit = AdaptiveLimit(2, "queries", successes_to_grow=3)
    limit.slow_down()
    for _ in range(3):
        limit.succeeded()
    assert limit.limit == 2
    for _ in range(100):
        limit.succeeded()
    assert limit.limit == 2


def test_a_call_much_slower_than_usual_lowers_the_limit():
    limit = AdaptiveLimit(4, "queries")
    limit.latency_floor = 0.0
    for _ in range(5):
        limit.record_latency(0.01)
    limit.record_latency(1.0)
    assert limit.limit == 2


def test_retrieval_limits_ignore_latency():
    limit = AdaptiveLimit(4, "retrievals", watch_latency=False)
    limit.record_latency(0.01)
    limit.record_latency(100.0)
    assert limit.limit == 4


def test_slots_never_exceed_the_limit():
    limit = AdaptiveLimit(2, "retrievals")
    active, peak, lock = [0], [0], threading.Lock()

    def work():
        with limit.slot():
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.02)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == 2


@pytest.mark.parametrize("attempt", [1, 2, 3, 10])
def test_backoff_grows_exponentially_with_jitter_up_to_the_maximum(attempt):
    limits = Limits(backoff_initial=1.0, backoff_max=5.0)
    ceiling = min(5.0, 2 ** (attempt - 1))
    assert all(ceiling / 2 <= backoff_delay(attempt, limits) <= ceiling for _ in range(50))


def test_a_final_error_is_not_retried():
    calls = []

    def refuse():
        calls.append(1)
        raise RemoteError("refused query")

    with pytest.raises(RemoteError):
        call_with_retries(refuse, Limits(retries=5, backoff_initial=0.001))
    assert len(calls) == 1


def test_a_retriable_error_is_retried_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RemoteError("timeout", retriable=True)
        return "ok"

    assert call_with_retries(flaky, Limits(retries=5, backoff_initial=0.001, backoff_max=0.002)) == "ok"
    assert len(calls) == 3


def test_a_retriable_error_is_tried_once_plus_the_configured_retries_then_raised():
    calls = []

    def down():
        calls.append(1)
        raise RemoteError("timeout", retriable=True)

    with pytest.raises(RemoteError, match="timeout"):
        call_with_retries(down, Limits(retries=2, backoff_initial=0.001, backoff_max=0.002))
    assert len(calls) == 3


def test_a_server_s_retry_after_is_waited_instead_of_the_backoff():
    calls = []

    def busy():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RemoteError("503", retriable=True, retry_after=0.2)
        return "ok"

    assert call_with_retries(busy, Limits(retries=1, backoff_initial=0.001, backoff_max=0.002)) == "ok"
    assert calls[1] - calls[0] >= 0.2


def test_the_breaker_pauses_then_gives_up_when_the_source_stays_unreachable():
    breaker = CircuitBreaker(failures=2, cooldown=0.05, max_cooldowns=2)
    refused = RemoteError("connection refused", retriable=True, unreachable=True)
    started = time.monotonic()
    with pytest.raises(SourceDownError, match="could not be reached"):
        for _ in range(10):
            breaker.before_call()
            breaker.record_failure(refused)
    assert time.monotonic() - started >= 0.05


def test_a_success_closes_the_breaker():
    breaker = CircuitBreaker(failures=2, cooldown=0.01, max_cooldowns=1)
    refused = RemoteError("connection refused", unreachable=True)
    breaker.record_failure(refused)
    breaker.record_success()
    breaker.record_failure(refused)
    breaker.before_call()  # one failure since the success: still closed


def test_errors_that_are_not_about_reaching_the_source_do_not_trip_the_breaker():
    breaker = CircuitBreaker(failures=1, cooldown=10, max_cooldowns=1)
    breaker.record_failure(RemoteError("0xC000 refused query"))
    breaker.before_call()


def at(hours: int, minutes: int = 0) -> float:
    """A timestamp today at the given local time."""
    now = time.localtime()
    return time.mktime((now.tm_year, now.tm_mon, now.tm_mday, hours, minutes, 0, 0, 0, -1))


def test_a_window_across_midnight_is_open_at_night_and_closed_by_day():
    window = TimeWindow.parse("19:00-07:00")
    assert window.seconds_until_open(at(23)) == 0 and window.seconds_until_open(at(3)) == 0
    assert window.seconds_until_open(at(12)) == 7 * 3600


def test_a_daytime_window_says_how_long_until_it_opens():
    window = TimeWindow.parse("09:30-17:00")
    assert window.seconds_until_open(at(9)) == 1800
    assert window.seconds_until_open(at(18)) == (24 - 18) * 3600 + 9.5 * 3600


@pytest.mark.parametrize("text", ["7pm-7am", "19:00", "25:00-07:00", "19:60-07:00"])
def test_a_malformed_window_is_refused(text):
    with pytest.raises(ValueError):
        TimeWindow.parse(text)
