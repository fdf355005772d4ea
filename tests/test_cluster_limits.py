"""Cluster-wide limits (dqr.cluster_limits) hold across real processes sharing
a private PostgreSQL, counted at one shared point (a counting TCP sink)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("psycopg", reason="the queue extra (pip install 'dqr[queue]') is not installed")

from dqr.cluster_limits import CappedLimit, ClusterLimits, advisory_key, mask_url  # noqa: E402
from dqr.testing.tcp_counter import CountingProxy  # noqa: E402
from dqr.throttle import AdaptiveLimit  # noqa: E402

# A worker process: N threads, each taking a cluster slot (or a rate start)
# and being counted at the sink while it "works".
WORKER = """
import sys, threading
from dqr.cluster_limits import ClusterLimits
from dqr.testing.tcp_counter import hold

url, port, mode, capacity, threads, rounds, seconds = sys.argv[1:8]
limits = ClusterLimits(url)
slots = limits.slots("pacs:retrieve", int(capacity))
rate = limits.rate("pacs:requests", float(capacity))

def work(t):
    for r in range(int(rounds)):
        if mode == "slots":
            with slots.slot():
                hold(int(port), f"{t}", float(seconds))
        else:
            rate.wait()
            hold(int(port), f"{t}", 0.0)

workers = [threading.Thread(target=work, args=(t,)) for t in range(int(threads))]
for w in workers: w.start()
for w in workers: w.join()
limits.close()
"""

# Holds the only slot until killed; says so on stdout first.
HOLDER = """
import sys, time
from dqr.cluster_limits import ClusterLimits
limits = ClusterLimits(sys.argv[1])
key = limits.slots("pacs:retrieve", 1).acquire()
print("holding", flush=True)
time.sleep(600)
"""


@pytest.fixture
def sink() -> Iterator[CountingProxy]:
    with CountingProxy() as proxy:
        yield proxy


@pytest.fixture
def limits(postgres_url: str) -> Iterator[ClusterLimits]:
    with ClusterLimits(postgres_url) as limits:
        yield limits


def run_workers(
    url: str,
    port: int,
    mode: str,
    *,
    processes: int,
    capacity: float,
    threads: int,
    rounds: int,
    seconds: float,
) -> None:
    started = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                url,
                str(port),
                mode,
                str(capacity),
                str(threads),
                str(rounds),
                str(seconds),
            ],
            stdin=subprocess.DEVNULL,
        )
        for _ in range(processes)
    ]
    try:
        for process in started:
            assert process.wait(timeout=120) == 0
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.mark.slow
def test_slots_bound_holders_summed_over_processes(postgres_url: str, sink: CountingProxy) -> None:
    # 3 processes x 4 threads all want the PACS; capacity 2 for all of them.
    run_workers(
        postgres_url, sink.port, "slots", processes=3, capacity=2, threads=4, rounds=3, seconds=0.05
    )

    assert len(sink.connections) == 36
    assert sink.maximum == 2


def test_a_killed_holder_gives_its_slot_back_at_once(
    postgres_url: str, limits: ClusterLimits
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, postgres_url],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        slots = limits.slots("pacs:retrieve", 1)
        assert slots.try_acquire() is None

        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        key = slots.acquire(timeout=10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()

    assert key is not None
    assert time.monotonic() - killed < 2.0
    slots.release(key)


@pytest.mark.slow
def test_rate_spaces_starts_summed_over_processes(postgres_url: str, sink: CountingProxy) -> None:
    # 3 processes x 2 threads x 4 calls at 20 calls/s in total.
    run_workers(
        postgres_url, sink.port, "rate", processes=3, capacity=20, threads=2, rounds=4, seconds=0
    )

    starts = sorted(c.opened for c in sink.connections)
    assert len(starts) == 24
    # 24 starts at least 50 ms apart take at least 23 x 50 ms; the sink's own
    # clock adds scheduling jitter, so allow a little under the exact bound.
    assert starts[-1] - starts[0] >= 23 * 0.05 * 0.9
    in_any_second = max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts)
    assert in_any_second <= 21


def test_slots_are_per_name(limits: ClusterLimits) -> None:
    pacs_a = limits.slots("a:retrieve", 1)
    pacs_b = limits.slots("b:retrieve", 1)

    key = pacs_a.acquire()

    assert pacs_b.try_acquire() is not None
    assert pacs_a.try_acquire() is None
    pacs_a.release(key)


def test_holders_counts_the_slots_held(limits: ClusterLimits) -> None:
    slots = limits.slots("pacs:retrieve", 3)
    held = [slots.acquire(), slots.acquire()]

    assert slots.holders() == 2
    for key in held:
        slots.release(key)
    assert slots.holders() == 0


def test_waiting_for_a_slot_ends_when_stopped(limits: ClusterLimits) -> None:
    slots = limits.slots("pacs:retrieve", 1)
    key = slots.acquire()
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()

    with slots.slot(stop) as got_one:
        assert got_one is False
    slots.release(key)


def test_capped_limit_holds_a_cluster_slot_inside_the_local_one(limits: ClusterLimits) -> None:
    capped = CappedLimit(AdaptiveLimit(4, "retrievals"), limits.slots("pacs:retrieve", 1))

    with capped.slot():
        assert capped.local.active == 1
        assert capped.cluster.holders() == 1
    assert capped.cluster.holders() == 0


def test_a_shared_slot_is_given_back_by_another_thread(limits: ClusterLimits) -> None:
    slots = limits.slots("pacs:associations", 1, shared=True)
    key = slots.acquire()
    assert slots.try_acquire() is None  # held once, by the process, not per thread

    releaser = threading.Thread(target=slots.release, args=(key,))
    releaser.start()
    releaser.join()

    assert slots.holders() == 0
    assert slots.try_acquire() is not None


def test_shared_slots_taken_by_many_threads_at_once_never_exceed_the_capacity(limits: ClusterLimits) -> None:
    slots = limits.slots("pacs:associations", 2, shared=True)
    got: list[int | None] = []
    threads = [threading.Thread(target=lambda: got.append(slots.try_acquire())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    taken = [key for key in got if key is not None]
    assert len(taken) == 2 and len(set(taken)) == 2
    assert slots.holders() == 2


def test_closing_releases_every_slot(postgres_url: str, limits: ClusterLimits) -> None:
    other = ClusterLimits(postgres_url)
    other.slots("pacs:retrieve", 1).acquire()

    other.close()

    assert limits.slots("pacs:retrieve", 1).try_acquire() is not None


def test_advisory_keys_differ_by_name_and_slot() -> None:
    keys = {advisory_key("dqr", "slot", name, str(i)) for name in ("a", "b") for i in range(3)}

    assert len(keys) == 6
    assert all(-(2**63) <= key < 2**63 for key in keys)


def test_mask_url_hides_user_and_password() -> None:
    message = 'connection to "postgresql://dqr:s3cret@db.example:5432/jobs" failed'

    assert mask_url(message) == 'connection to "postgresql://***@db.example:5432/jobs" failed'


def test_a_connection_error_does_not_show_the_password(postgres) -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{postgres.port}/no_such_database"
    limits = ClusterLimits(url)

    with pytest.raises(Exception) as raised:
        limits.slots("pacs:retrieve", 1).try_acquire()

    assert "s3cret" not in str(raised.value)
    assert "queue database" in str(raised.value)
