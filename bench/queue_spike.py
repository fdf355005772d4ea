"""Spike: the two candidate queue engines for scale-out, measured the same way.

    python -m bench.queue_spike --engine dbos          # or procrastinate; all three measures
    python -m bench.queue_spike --engine dbos --poll 0.1 --measure latency

It starts a private PostgreSQL cluster (dqr.testing.postgres) and worker
*processes* of this same module, and counts at one shared point: every job
opens a TCP connection to a counting listener in this (parent) process, says
which job and which PID it is, holds the connection for its duration and
closes it. The listener sees what a PACS would see: how many jobs run at
once, when each started (its clock, so no clock skew) and from which process.

- latency: one idle worker; a 100 ms job enqueued every 0.3 s; pickup =
  listener arrival - enqueue time.
- cap: 3 workers (each could run 4 at once), 24 jobs of 0.2 s in one
  partition capped at 2 cluster-wide; the listener's maximum of simultaneous
  connections must be 2.
- kill: 2 workers; a 3 s job; when it arrives, SIGKILL its process; takeover =
  the job's next arrival (from the other process) - the kill.

DBOS has no executor heartbeat of its own: a dead executor's PENDING
workflows stay PENDING until someone recovers them by executor id. Here each
worker holds a session-level advisory lock named after its executor id for
its whole life; PostgreSQL releases it the moment the worker's connection
drops (SIGKILL closes the socket), so a live worker that *can* take a peer's
lock knows the peer is dead and recovers its workflows. procrastinate has
worker heartbeats and ``get_stalled_jobs``; someone must call it and
``retry_job`` periodically (here: each worker, every second).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

LOOPBACK = "127.0.0.1"
PARTITION = "pacsA"


# ----------------------------------------------------------------- the shared point


@dataclass
class Arrival:
    job: str
    pid: int
    at: float
    left: float | None = None


@dataclass
class CountingListener:
    """Counts simultaneous connections; each client's first line is ``job pid``."""

    sock: socket.socket = field(default_factory=lambda: socket.create_server((LOOPBACK, 0)))
    arrivals: list[Arrival] = field(default_factory=list)
    current: int = 0
    maximum: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.current += 1
            self.maximum = max(self.maximum, self.current)
        try:
            line = conn.makefile("r").readline().split()
            arrival = Arrival(line[0], int(line[1]), time.time()) if len(line) == 2 else None
            if arrival:
                with self.lock:
                    self.arrivals.append(arrival)
            while conn.recv(64):
                pass
            if arrival:
                arrival.left = time.time()
        finally:
            with self.lock:
                self.current -= 1
            conn.close()


_SLOTS = None  # a ClusterSlots(capacity 2) in a worker run with --cap slots


def hold(port: int, job: str, seconds: float) -> None:
    """The job body: be counted at the shared point for ``seconds`` (inside a
    cluster slot with --cap slots)."""
    if _SLOTS is not None:
        with _SLOTS.slot():
            _hold(port, job, seconds)
    else:
        _hold(port, job, seconds)


def _hold(port: int, job: str, seconds: float) -> None:
    with socket.create_connection((LOOPBACK, port)) as conn:
        conn.sendall(f"{job} {os.getpid()}\n".encode())
        time.sleep(seconds)
        # Leave as an association does: wait until the listener has counted
        # us out, so the next holder is never counted before we are gone.
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(64):
            pass


# ----------------------------------------------------------------------- engines


class Dbos:
    name = "dbos"

    def __init__(self, url: str, poll: float, cap: str = "queue") -> None:
        self.url, self.poll, self.cap = url, poll, cap

    def worker(self, worker_id: str, concurrency: int) -> None:
        import psycopg
        from dbos import DBOS

        DBOS(
            config={
                "name": "spike",
                "system_database_url": self.url,
                "executor_id": worker_id,
                "application_version": "spike-1",
                "log_level": "WARNING",
                "max_executor_threads": concurrency + 4,
            }
        )

        @DBOS.workflow(name="hold")
        def hold_workflow(port: int, job: str, seconds: float) -> None:
            hold(port, job, seconds)

        # Liveness: held for the process's life, released by PostgreSQL when it dies.
        alive = psycopg.connect(self.url, autocommit=True)
        alive.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"dqr-executor:{worker_id}",))
        DBOS.launch()
        if self.cap == "queue":
            DBOS.register_queue(
                "steps",
                worker_concurrency=concurrency,
                partition_concurrency=2,
                polling_interval_sec=self.poll,
                on_conflict="always_update",
            )
        else:
            # The cap is the slots; the queue's global concurrency is a prefetch
            # window (2 running + 2 waiting for a slot), so a freed slot is
            # taken at once instead of at the next poll.
            DBOS.register_queue(
                "steps",
                worker_concurrency=concurrency,
                global_concurrency=int(os.environ.get("SPIKE_WINDOW", "4")),
                polling_interval_sec=self.poll,
                on_conflict="always_update",
            )
        probe = psycopg.connect(self.url, autocommit=True)
        while True:
            time.sleep(1.0)
            rows = probe.execute(
                "SELECT DISTINCT executor_id FROM dbos.workflow_status "
                "WHERE status = 'PENDING' AND executor_id <> %s",
                (worker_id,),
            ).fetchall()
            for (peer,) in rows:
                key = f"dqr-executor:{peer}"
                if probe.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()[0]:
                    probe.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
                    DBOS._recover_pending_workflows([peer])

    def client(self):
        from dbos import DBOSClient

        client = DBOSClient(system_database_url=self.url)

        def enqueue(port: int, job: str, seconds: float) -> None:
            options = {"queue_name": "steps", "workflow_name": "hold", "app_version": "spike-1"}
            if self.cap == "queue":
                options["queue_partition_key"] = PARTITION
            client.enqueue(
                options,
                port,
                job,
                seconds,
            )

        return enqueue

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url) as conn:
                return bool(conn.execute("SELECT count(*) FROM dbos.queues").fetchone()[0])
        except psycopg.Error:
            return False


class Procrastinate:
    name = "procrastinate"

    def __init__(self, url: str, poll: float, cap: str = "queue") -> None:
        self.url, self.poll, self.cap = url, poll, cap

    def _app(self):
        import procrastinate

        app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.url))

        # N=1 per lock is all procrastinate offers; 2 slots = 2 lock names.
        @app.task(name="hold", queue="steps", pass_context=False)
        def hold_task(port: int, job: str, seconds: float) -> None:
            hold(port, job, seconds)

        return app

    def worker(self, worker_id: str, concurrency: int) -> None:
        app = self._app()

        async def main() -> None:
            async with app.open_async():

                async def retry_stalled() -> None:
                    while True:
                        await asyncio.sleep(1.0)
                        for job in await app.job_manager.get_stalled_jobs(
                            seconds_since_heartbeat=3
                        ):
                            await app.job_manager.retry_job(job)

                asyncio.create_task(retry_stalled())
                await app.run_worker_async(
                    queues=["steps"],
                    concurrency=concurrency,
                    fetch_job_polling_interval=self.poll,
                    update_heartbeat_interval=1.0,
                    stalled_worker_timeout=3.0,
                    install_signal_handlers=False,
                )

        asyncio.run(main())

    def client(self):
        app = self._app()
        app.open()
        slots = iter(range(10**9))

        def enqueue(port: int, job: str, seconds: float) -> None:
            lock = f"{PARTITION}-{next(slots) % 2}" if self.cap == "queue" else None
            app.tasks["hold"].configure(lock=lock).defer(port=port, job=job, seconds=seconds)

        return enqueue

    def ready(self) -> bool:
        return True

    def migrate(self) -> None:
        app = self._app()
        with app.open():
            app.schema_manager.apply_schema()


ENGINES = {"dbos": Dbos, "procrastinate": Procrastinate}


# ---------------------------------------------------------------------- harness


class Workers:
    def __init__(self, engine, count: int, concurrency: int) -> None:
        self.processes: list[subprocess.Popen] = []
        for i in range(count):
            cmd = [sys.executable, "-m", "bench.queue_spike", "--engine", engine.name,
                   "--poll", str(engine.poll), "--cap", engine.cap, "worker", "--url", engine.url,
                   "--id", f"w{i}-{os.getpid()}", "--concurrency", str(concurrency)]  # fmt: skip
            self.processes.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))

    def by_pid(self, pid: int) -> subprocess.Popen:
        return next(p for p in self.processes if p.pid == pid)

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def warm_up(engine, listener: CountingListener, enqueue, workers: int) -> None:
    """Until every worker has run a job: startup (imports, migrations) is not latency."""
    n = 0
    deadline = time.monotonic() + 60
    while len({a.pid for a in listener.arrivals if a.job.startswith("warm")}) < workers:
        if time.monotonic() > deadline:
            raise SystemExit("workers did not start")
        enqueue(listener.port, f"warm{n}", 0.3)
        n += 1
        time.sleep(0.3)
    time.sleep(1.0)


def measure_latency(engine, enqueue, listener: CountingListener) -> dict:
    workers = Workers(engine, 1, 4)
    try:
        warm_up(engine, listener, enqueue, 1)
        enqueued: dict[str, float] = {}
        for i in range(20):
            job = f"lat{i}"
            enqueued[job] = time.time()
            enqueue(listener.port, job, 0.1)
            time.sleep(0.3)
        wait_for(lambda: sum(a.job.startswith("lat") for a in listener.arrivals) >= 20, 30, "jobs")
        pickup = sorted(a.at - enqueued[a.job] for a in listener.arrivals if a.job in enqueued)
        if os.environ.get("SPIKE_DEBUG"):
            print(
                [round(a.at - enqueued[a.job], 2) for a in listener.arrivals if a.job in enqueued]
            )
        return {
            "pickup_median_ms": round(1000 * statistics.median(pickup)),
            "pickup_p95_ms": round(1000 * pickup[int(0.95 * (len(pickup) - 1))]),
            "pickup_max_ms": round(1000 * pickup[-1]),
        }
    finally:
        workers.stop()


def measure_cap(engine, enqueue, listener: CountingListener) -> dict:
    workers = Workers(engine, 3, 4)
    try:
        warm_up(engine, listener, enqueue, 3)
        listener.maximum = listener.current
        start = time.time()
        for i in range(24):
            enqueue(listener.port, f"cap{i}", 0.2)
        wait_for(
            lambda: (
                sum(a.job.startswith("cap") and a.left is not None for a in listener.arrivals) >= 24
            ),
            60,
            "jobs",
        )
        caps = [a for a in listener.arrivals if a.job.startswith("cap")]
        if os.environ.get("SPIKE_DEBUG"):
            print(
                [
                    (a.job, a.pid % 100, round(a.at - start, 2), round(a.left - start, 2))
                    for a in caps
                ]
            )
        return {
            "max_simultaneous": listener.maximum,
            "processes_used": len({a.pid for a in caps}),
            "wall_s_for_24x0.2s_at_cap_2": round(max(a.left for a in caps) - start, 2),
        }
    finally:
        workers.stop()


def measure_kill(engine, enqueue, listener: CountingListener) -> dict:
    workers = Workers(engine, 2, 4)
    try:
        warm_up(engine, listener, enqueue, 2)
        enqueue(listener.port, "victim", 3.0)
        wait_for(lambda: any(a.job == "victim" for a in listener.arrivals), 30, "the victim job")
        first = next(a for a in listener.arrivals if a.job == "victim")
        workers.by_pid(first.pid).send_signal(signal.SIGKILL)
        killed = time.time()
        wait_for(
            lambda: sum(a.job == "victim" for a in listener.arrivals) >= 2, 120, "the takeover"
        )
        again = [a for a in listener.arrivals if a.job == "victim"][1]
        return {
            "takeover_s": round(again.at - killed, 2),
            "taken_over_by_other_pid": again.pid != first.pid,
        }
    finally:
        workers.stop()


def _cpu_seconds(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_cpu(postmaster: int) -> float:
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == postmaster:
                pids.append(int(entry))
    return sum(_cpu_seconds(pid) for pid in pids)


def measure_idle(engine, enqueue, listener: CountingListener, postmaster: int = 0) -> dict:
    """4 idle workers for 10 s: what the polling costs (CPU of workers and server)."""
    workers = Workers(engine, 4, 4)
    try:
        warm_up(engine, listener, enqueue, 4)
        before_w = sum(_cpu_seconds(p.pid) for p in workers.processes)
        before_s = _server_cpu(postmaster)
        time.sleep(10)
        return {
            "idle_cpu_pct_4_workers": round(
                10 * (sum(_cpu_seconds(p.pid) for p in workers.processes) - before_w), 1
            ),
            "idle_cpu_pct_server": round(10 * (_server_cpu(postmaster) - before_s), 1),
        }
    finally:
        workers.stop()


MEASURES = {
    "latency": measure_latency,
    "cap": measure_cap,
    "kill": measure_kill,
    "idle": measure_idle,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--poll", type=float, default=None, help="queue polling interval, s")
    parser.add_argument("--measure", choices=MEASURES, action="append")
    parser.add_argument(
        "--cap", choices=["queue", "slots"], default="queue",
        help="enforce the cap of 2 by the engine (partition / locks) or by dqr.cluster_limits slots",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("worker")
    worker.add_argument("--url", required=True)
    worker.add_argument("--id", required=True)
    worker.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    poll = args.poll if args.poll is not None else (1.0 if args.engine == "dbos" else 5.0)

    if args.command == "worker":
        if args.cap == "slots":
            global _SLOTS
            from dqr.cluster_limits import ClusterLimits

            _SLOTS = ClusterLimits(args.url).slots(PARTITION, 2)
        ENGINES[args.engine](args.url, poll, args.cap).worker(args.id, args.concurrency)
        return

    from dqr.testing.postgres import PostgresServer

    results = {"engine": args.engine, "poll_s": poll, "cap": args.cap}
    for name in args.measure or list(MEASURES):
        # A fresh cluster per measure: no leftovers from the previous one.
        with PostgresServer.start() as pg:
            engine = ENGINES[args.engine](pg.create_database("spike"), poll, args.cap)
            if isinstance(engine, Procrastinate):
                engine.migrate()
            listener = CountingListener()
            listener.start()
            enqueue = None
            if isinstance(engine, Dbos):
                # The schema and queue come from the first worker's launch.
                boot = Workers(engine, 1, 1)
                wait_for(engine.ready, 60, "DBOS migrations")
                boot.stop()
            enqueue = engine.client()
            extra = {"postmaster": pg.pid} if name == "idle" else {}
            results[name] = MEASURES[name](engine, enqueue, listener, **extra)
            print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
