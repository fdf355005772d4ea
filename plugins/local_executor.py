"""The ``local`` executor: the engine's steps on a bounded thread pool in
this process. The default; a distributed executor would register another
name and run the same steps elsewhere."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import dqr


class LocalExecutor:
    """Runs steps on up to ``workers`` threads, never starting one after ``stop``."""

    def run(self, step: Callable[[Any], None], items: Sequence[Any], workers: int, stop: threading.Event) -> None:
        if not items:
            return
        workers = max(1, min(workers, len(items)))
        pending = iter(items)
        running: set[Future[None]] = set()
        # Submit lazily, keeping at most `workers` in flight: a 10,000-row job
        # holds 4 futures, not 10,000, and a stop leaves the rest unstarted.
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dqr") as pool:
            try:
                while True:
                    while len(running) < workers and not stop.is_set():
                        item = next(pending, _DONE)
                        if item is _DONE:
                            break
                        running.add(pool.submit(step, item))
                    if not running:
                        break
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()  # a bug in a step surfaces here
            finally:
                for future in running:
                    future.cancel()


_DONE = object()


@dqr.hookimpl
def dqr_register_executors(register):
    register("local", LocalExecutor)
