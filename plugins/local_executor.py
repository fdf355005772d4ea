"""The ``local`` executor: the engine's steps on a bounded thread pool in
this process. The default; a distributed executor would register another
name and run the same steps elsewhere."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import dqr


class LocalExecutor:
    """Runs steps on up to ``workers`` threads, never starting one after ``stop``.

    The follow-up steps a step returns (``[(kind, key), ...]``, see
    :mod:`dqr.steps`) run on the same threads, before the keys not started
    yet: a listed study is retrieved before the next ones are listed."""

    def run(self, step: Callable[[Any], Any], items: Sequence[Any], workers: int, stop: threading.Event) -> None:
        if not items:
            return
        workers = max(1, workers)
        pending = iter(items)
        follow_ups: deque[tuple[Callable[[Any], Any], Any]] = deque()
        running: dict[Future[Any], Callable[[Any], Any]] = {}
        # Submit lazily, keeping at most `workers` in flight: a 10,000-row job
        # holds 4 futures, not 10,000, and a stop leaves the rest unstarted.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dqr") as pool:
            try:
                while True:
                    while len(running) < workers and not stop.is_set():
                        if follow_ups:
                            runs, item = follow_ups.popleft()
                        else:
                            item = next(pending, _DONE)
                            if item is _DONE:
                                break
                            runs = step
                        running[pool.submit(runs, item)] = runs
                    if not running:
                        break
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        runs = running.pop(future)
                        more = future.result()  # a bug in a step surfaces here
                        for kind, key in more or ():
                            follow_ups.append((runs.then(kind), key))
            finally:
                for future in running:
                    future.cancel()


_DONE = object()


@dqr.hookimpl
def dqr_register_executors(register):
    register("local", LocalExecutor)
