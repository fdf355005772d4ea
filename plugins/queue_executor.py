"""The ``queue`` executor: the engine's steps as durable DBOS workflows on
PostgreSQL, run by every ``dqr run`` and ``dqr worker`` process that shares
the database.

    executor:
      type: queue
      database_url_env: DQR_QUEUE_URL   # the env var holding postgresql://... (a secret)

How it works (docs/scale-out.md has the operator's view):

- Each process is one DBOS executor with its own id (host, pid, random).
  :class:`Node` launches DBOS once per process and registers one workflow,
  ``dqr-step(kind, key, options, run_id)``, which opens (once, cached) a
  :class:`~dqr.context.JobContext` of this process for the run's options and
  calls ``STEPS[kind](ctx, key)``: the step reads its inputs from the job
  state and records its outcome there.
- :meth:`QueueExecutor.run` (the driver in ``dqr run``) enqueues one workflow
  per key (for query-row and fetch-study steps, per batch of keys: :data:`_BATCHED`) on the
  source's queue, whose global concurrency it sets to the
  phase's ``workers`` (``max_queries`` / ``max_retrievals``), waits until all
  are done -- with the follow-up steps they enqueued themselves, under their
  own workflow ids (a ``fetch-study`` step's ``retrieve-series`` steps) --
  while this process works on them too, and reports the whole job's
  progress. The connections a step opens to the PACS are also capped
  cluster-wide by :mod:`dqr.cluster_limits` at the association itself.
- Liveness: each node holds a session-level advisory lock named after its
  executor id for its whole life. PostgreSQL drops it when the process dies
  (its connection closes), so a live node that can take a peer's lock knows
  that peer is gone and recovers its PENDING workflows (DBOS re-enqueues them
  by executor id); checked every :data:`RECOVERY_INTERVAL` seconds.
- Stopping (SIGTERM/Ctrl-C on a worker): no new step starts; running steps
  stop at their next instance and their workflows are *abandoned* -- never
  marked done -- so a live peer recovers and reruns them once this process
  has exited. Steps are idempotent: a rerun asks only for what is missing.

The database URL is a secret: read from the environment, never logged; every
error passes through :func:`dqr.cluster_limits.mask_url`.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

import dqr
from dqr.cluster_limits import ClusterLimits, advisory_key, mask_url
from dqr.config import ExecutorConfig, LoadedConfig
from dqr.errors import InputError, Problem

log = logging.getLogger("dqr.queue")

#: How often a node looks for peers that died with steps in hand, seconds.
RECOVERY_INTERVAL = 1.0
#: How often the driver reads the whole job's progress, seconds, at most...
PROGRESS_INTERVAL = 0.1
#: ...and the largest share of its time those reads may take: each counts a
#: whole phase's workflows and the run's stored instances, which on a
#: 100,000-study job are hundreds of thousands of rows, so a read that took
#: long spaces the next one out instead of keeping a core (and PostgreSQL) busy.
PROGRESS_SHARE = 0.05
WORKFLOW_NAME = "dqr-step"
#: The application name of each node's liveness connection (counted by --new-job).
LIVENESS_APPLICATION = "dqr-liveness"
#: Every node of a cluster must agree on it (DBOS dequeues a workflow only
#: on executors of the version it was enqueued with).
APP_VERSION = f"dqr-{dqr.__version__}"
#: The progress phase each step kind counts in (a whole-study step is seen
#: through the instances it stores, not in the per-series count).
_PHASES = {
    "query-row": "query",
    "list-study": "series",
    "retrieve-series": "retrieve",
    "retrieve-study": None,
    "fetch-study": "series",
}
#: The step kinds that store instances (the driver counts them from the job state).
_RETRIEVING = ("retrieve-series", "retrieve-study", "fetch-study")
#: Step kinds run in batches, one workflow per batch: kind -> (steps in one
#: batch at most, batches for each slot of the cluster at least). A
#: batch's steps run one after the other; a recovered batch reruns them all
#: (each step is idempotent). A query-row step takes a few ms (one C-FIND,
#: one write), the workflow around it as much again in DBOS's bookkeeping,
#: and a queue hands out no more than the phase's ``workers`` a poll -- 40
#: rows took 1.5 s, the local executor's 0.15 s: one batch per slot. A
#: fetch-study step takes 50-100 ms, its workflow ~7 ms of the process's
#: CPU, which bounds the job (docs/scale-out.md, stop 26): four studies to
#: a workflow, and at least four batches per slot so that the work still
#: spreads over the processes and what a killed one leaves is small.
_BATCHED: dict[str, tuple[int, int]] = {"query-row": (500, 1), "fetch-study": (4, 4)}
#: Query rows in one batch at most: the driver's progress advances by whole
#: batches, and a recovered batch reruns its rows.
MAX_BATCH = _BATCHED["query-row"][0]
_DONE = ("SUCCESS", "ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")


class QueueExecutorConfig(ExecutorConfig):
    """``executor: {type: queue, ...}``."""

    database_url_env: str = Field(
        "DQR_QUEUE_URL",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding the PostgreSQL URL of the queue (never put the URL itself in the YAML)",
    )
    polling_interval: float = Field(
        0.1,
        gt=0,
        le=10,
        description="how often each process looks for queued steps, seconds (pickup latency)",
    )
    threads: int = Field(8, ge=1, le=256, description="steps one process runs at once")


class QueueConfigError(InputError):
    """The queue executor cannot start (no URL, database unreachable)."""


def database_url(config: LoadedConfig) -> str:
    """The queue database's URL, from the environment variable the config names."""
    env = config.executor.database_url_env
    url = os.environ.get(env, "").strip()
    if not url:
        raise QueueConfigError(
            Problem(
                str(config.path),
                f"executor.type is queue, but the environment variable {env} is not set; "
                f"set it to the queue database's URL, e.g. {env}=postgresql://user@host:5432/dqr",
            )
        )
    if not url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        raise QueueConfigError(
            Problem(
                str(config.path),
                f"{env} must hold a postgresql:// URL (got {mask_url(url)[:40]!r}...)",
            )
        )
    return url


class Node:
    """This process as a member of the cluster (one per process: DBOS is a singleton)."""

    def __init__(self, config: LoadedConfig) -> None:
        self.config = config
        self.url = database_url(config)
        self.executor_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stopping = threading.Event()
        self._contexts: dict[str, Any] = {}
        #: contexts of a driver in this process (its own; it closes them)
        self._borrowed: set[str] = set()
        self._contexts_lock = threading.Lock()
        self._active = 0
        self._active_lock = threading.Condition()
        self._liveness = None
        self._probe = None
        self._probe_lock = threading.Lock()
        self._limits: ClusterLimits | None = None
        self.steps_run = 0

    # -- start and stop --------------------------------------------------------

    def start(self) -> None:
        try:
            import psycopg
            from dbos import DBOS
        except ImportError:
            raise QueueConfigError(
                Problem(
                    str(self.config.path),
                    "executor.type is queue, which needs the queue extra: pip install 'dqr[queue]'",
                )
            ) from None

        try:
            self._liveness = psycopg.connect(
                self.url, autocommit=True, application_name=LIVENESS_APPLICATION
            )
            self._liveness.execute(
                "SELECT pg_advisory_lock(%s)", (_liveness_key(self.executor_id),)
            )
            self._probe = psycopg.connect(
                self.url, autocommit=True, application_name="dqr-recovery"
            )
        except psycopg.Error as error:
            raise QueueConfigError(
                Problem(
                    str(self.config.path),
                    f"cannot connect to the queue database: {mask_url(str(error))}",
                )
            ) from None
        _register_workflow()
        DBOS(
            config={
                "name": "dqr",
                "system_database_url": self.url,
                "executor_id": self.executor_id,
                "application_version": APP_VERSION,
                "log_level": "WARNING",
                "max_executor_threads": self.config.executor.threads + 8,
            }
        )
        try:
            DBOS.launch()
        except Exception as error:  # DBOS wraps driver errors in its own
            raise QueueConfigError(
                Problem(str(self.config.path), f"the queue database failed: {mask_url(str(error))}")
            ) from None
        # Every source's queue, so that this process already listens to it when
        # a driver enqueues there (the driver sets its concurrency per phase).
        for source in self.config.sources:
            limits = self.config.limits_for(source, {})
            _register_queue(queue_name(source), limits.max_retrievals, self.config, on_conflict="never_update")
        threading.Thread(target=self._recover_dead_peers, name="dqr-recovery", daemon=True).start()
        # Closed when the process ends, however it ends (dqr's CLI leaves
        # without the interpreter's teardown, but runs the exit functions).
        atexit.register(self.close)
        log.info("queue node %s started", self.executor_id)

    def stop(self, timeout: float = 10.0) -> None:
        """No new step; running ones stop at their next instance and are left
        for a peer (their workflows never finish here). Returns when none is
        running any more, or after ``timeout``."""
        self.stopping.set()
        with self._contexts_lock:
            contexts = list(self._contexts.values())
        for ctx in contexts:
            ctx.stop.set()
        deadline = time.monotonic() + timeout
        with self._active_lock:
            while self._active and time.monotonic() < deadline:
                self._active_lock.wait(0.1)

    def close(self) -> None:
        """Release the liveness lock: peers may now recover what was left."""
        if self._limits is not None:
            self._limits.close()
        for conn in (self._liveness, self._probe):
            if conn is not None:
                conn.close()

    def _recover_dead_peers(self) -> None:
        from dbos import DBOS

        while not self.stopping.wait(RECOVERY_INTERVAL):
            try:
                for peer in self._dead_peers():
                    log.warning("worker %s is gone; its steps are taken over", peer)
                    DBOS._recover_pending_workflows([peer])
            except Exception as error:  # keep looking: the database may come back
                log.warning("looking for dead workers failed: %s", mask_url(str(error)))

    def _dead_peers(self) -> list[str]:
        """Executors with PENDING steps whose liveness lock is free: their process ended."""
        dead = []
        with self._probe_lock:
            peers = self._probe.execute(
                "SELECT DISTINCT executor_id FROM dbos.workflow_status "
                "WHERE status = 'PENDING' AND executor_id <> %s AND name = %s",
                (self.executor_id, WORKFLOW_NAME),
            ).fetchall()
            for (peer,) in peers:
                key = _liveness_key(peer)
                if self._probe.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
                    self._probe.execute("SELECT pg_advisory_unlock(%s)", (key,))
                    dead.append(peer)
        return dead

    # -- reading the cluster's progress -----------------------------------------

    def probe_counts(self, prefix: str) -> PhaseCounts:
        """The workflows of a phase (ids starting with ``prefix``): see :func:`phase_counts`."""
        with self._probe_lock:
            return phase_counts(self._probe, prefix)

    def probe_done(self, prefix: str) -> list[str]:
        """The ids of a phase's finished workflows (follow-ups included)."""
        with self._probe_lock:
            return phase_ids(self._probe, prefix, done=True)

    def live_nodes(self) -> int:
        """How many dqr processes are members of the cluster now (this one included)."""
        with self._probe_lock:
            return live_nodes(self._probe)

    def probe_unfinished(self, prefix: str) -> list[str]:
        with self._probe_lock:
            return phase_ids(self._probe, prefix, done=False)

    # -- running a step --------------------------------------------------------

    def context(self, options: dict[str, Any], run_id: int):
        """This process's context for a run's options (opened once)."""
        from dqr.context import JobContext, JobOptions

        cache_key = json.dumps([options, run_id], sort_keys=True)
        with self._contexts_lock:
            ctx = self._contexts.get(cache_key)
            if ctx is None:
                ctx = JobContext.open(self.config, JobOptions(**options))
                # Instances this process stores count for the run that queued them.
                ctx.run_id = run_id
                self._cap_cluster_wide(ctx)
                if self.stopping.is_set():
                    ctx.stop.set()
                self._contexts[cache_key] = ctx
            return ctx

    def _cap_cluster_wide(self, ctx) -> None:
        """The source's and the destination's limits bound the sum over every
        process: each query and retrieval attempt holds a cluster slot (inside
        this process's adaptive limit), the query rate is booked in the
        database, and pooled connections hold a slot while open."""
        from dqr.cluster_limits import CappedLimit

        if self._limits is None:
            self._limits = ClusterLimits(self.url)
        scope = f"{self.config.site.project}/{ctx.source_name}"
        guard, limits = ctx.guard, ctx.limits
        guard.queries = CappedLimit(
            guard.queries, self._limits.slots(f"{scope}/queries", limits.max_queries)
        )
        guard.retrievals = CappedLimit(
            guard.retrievals, self._limits.slots(f"{scope}/retrievals", limits.max_retrievals)
        )
        if limits.requests_per_second:
            guard.rate = self._limits.rate(f"{scope}/requests", limits.requests_per_second)
        # Connections a backend or destination keeps open between calls (pooled
        # associations) hold their own slots while open, idle or not; a
        # destination's limits are its own, shared by every source sending to it.
        cluster = self._limits
        parts = (
            (ctx.backend, scope),
            (ctx.destination, f"{self.config.site.project}/destination/{ctx.destination.describe()}"),
        )
        for part, prefix in parts:
            cap_connections = getattr(part, "cap_connections", None)
            if cap_connections is not None:
                cap_connections(
                    lambda name, capacity, prefix=prefix: cluster.slots(f"{prefix}/{name}", capacity, shared=True)
                )

    def run_step(self, kind: str, key: Any, options: dict[str, Any], run_id: int) -> list[tuple[str, Any]]:
        """Run one step here -- or each of a batch's, ``{"batch": [key, ...]}``
        -- and return the follow-ups (see :mod:`dqr.steps`)."""
        from dqr.steps import STEPS, StepKind

        if self.stopping.is_set():
            _abandon()
        with self._active_lock:
            self._active += 1
        try:
            ctx = self.context(options, run_id)
            follow_ups = []
            for one in key["batch"] if isinstance(key, dict) else [key]:
                if self.stopping.is_set():
                    break
                follow_ups += STEPS[StepKind(kind)](ctx, one) or []
                self.steps_run += 1
        except Exception:
            # A bug, not a remote failure (steps record those themselves): say
            # where, here; the workflow ends in ERROR and the driver stops.
            log.exception("%s step %s failed", kind, json.dumps(key))
            raise
        finally:
            with self._active_lock:
                self._active -= 1
                self._active_lock.notify_all()
        if self.stopping.is_set():
            # Stopped mid-step: leave the workflow PENDING for a peer to rerun.
            _abandon()
        return [(str(next_kind), next_key) for next_kind, next_key in follow_ups]

    def adopt(self, options: dict[str, Any], ctx) -> None:
        """The driver's steps run on the driver's own context (its backend,
        destination, state and guard), as the local executor's do, instead of
        opening a second one: no context to open per run here, and none left
        open after it (the driver closes its own). Its progress is the
        driver's to count from the cluster's, so the steps report to a silent
        reporter; its stop is the node's."""
        from dataclasses import replace

        from dqr.context import Reporter

        cache_key = json.dumps([options, ctx.run_id], sort_keys=True)
        with self._contexts_lock:
            if cache_key in self._contexts:
                return
            steps_ctx = replace(ctx, reporter=Reporter(), stop=threading.Event())
            self._cap_cluster_wide(steps_ctx)
            if self.stopping.is_set():
                steps_ctx.stop.set()
            self._contexts[cache_key] = steps_ctx
            self._borrowed.add(cache_key)

    def stop_borrowed(self) -> None:
        """The driver was interrupted: its steps running here stop too."""
        with self._contexts_lock:
            for key in self._borrowed:
                if key in self._contexts:
                    self._contexts[key].stop.set()

    def close_contexts(self) -> None:
        with self._contexts_lock:
            contexts = [ctx for key, ctx in self._contexts.items() if key not in self._borrowed]
            self._contexts = {}
        for ctx in contexts:
            ctx.close()


def _abandon() -> None:
    """Never return: the workflow stays PENDING and is recovered elsewhere
    once this process has exited."""
    threading.Event().wait()


def _liveness_key(executor_id: str) -> int:
    return advisory_key("executor", executor_id)


_node: Node | None = None
_node_lock = threading.Lock()
_workflow = None


def _register_workflow():
    global _workflow
    if _workflow is None:
        from dbos import DBOS, SetWorkflowID

        @DBOS.workflow(name=WORKFLOW_NAME)
        def dqr_step(kind: str, key: Any, options: dict[str, Any], run_id: int) -> None:
            assert _node is not None, "a dqr-step workflow ran before the node started"
            follow_ups = _node.run_step(kind, key, options, run_id)
            # Follow-ups go on the same queue, under this workflow's id (so the
            # driver's phase counts them) and before it ends (so the phase is
            # over once nothing under it is unfinished). Their ids are
            # deterministic: a recovered step re-enqueues none twice.
            for next_kind, next_key in follow_ups:
                with SetWorkflowID(f"{DBOS.workflow_id}/{next_kind}/{json.dumps(next_key)}"):
                    DBOS.enqueue_workflow(
                        queue_name(options["source"]), dqr_step, next_kind, next_key, options, run_id
                    )

        _workflow = dqr_step
    return _workflow


def _register_queue(name: str, workers: int, config: LoadedConfig, on_conflict: str) -> None:
    from dbos import DBOS

    DBOS.register_queue(
        name,
        global_concurrency=workers,
        worker_concurrency=min(workers, config.executor.threads),
        polling_interval_sec=config.executor.polling_interval,
        on_conflict=on_conflict,
    )


def node(config: LoadedConfig) -> Node:
    """This process's node, started on first use."""
    global _node
    with _node_lock:
        if _node is None:
            started = Node(config)
            started.start()
            _node = started
        return _node


def queue_name(source: str) -> str:
    """One queue per source for every kind of step: the driver runs one phase
    at a time and sets the queue's concurrency to that phase's limit, and a
    queue every process already listens to needs no discovery (DBOS looks for
    new queues once a second: a queue per phase cost ~1 s per phase)."""
    return f"dqr-{source}"


class QueueExecutor:
    """Enqueues every step of a phase and waits for the whole cluster to do them."""

    @staticmethod
    def open_state(config: LoadedConfig, new_job: bool = False):
        """The job state lives in the queue's database (schema ``dqr``), where
        every process of the cluster reads and writes it."""
        from dqr.state import PostgresJobState

        url = database_url(config)
        if new_job:
            set_job_aside(config, url)
        env = config.executor.database_url_env
        return PostgresJobState(url, label=f"the job state in the queue database (${env})")

    def run(self, step, keys: Sequence[Any], workers: int, stop: threading.Event) -> None:
        from dbos import DBOS, SetWorkflowID

        if not keys:
            return
        ctx = step.ctx
        here = node(ctx.config)
        kind = str(step.kind)
        name = queue_name(ctx.source_name)
        _register_queue(name, workers, ctx.config, on_conflict="always_update")
        options = {
            "source": ctx.source_name,
            "limits": ctx.options.limits,
            "select_all": ctx.options.select_all,
            "include": ctx.options.include,
            "exclude": ctx.options.exclude,
        }
        job = ctx.state.job_id()
        prefix = f"{ctx.config.site.project}/{ctx.source_name}/{job}/{ctx.run_id}/{kind}/"
        here.adopt(options, ctx)
        workflow = _register_workflow()
        # workflow id -> the steps it runs (a batch is named by its first key)
        sizes = {}
        batches = _batches(keys, workers * here.live_nodes(), *_BATCHED[kind]) if kind in _BATCHED else keys
        for key in batches:
            workflow_id = prefix + json.dumps(key["batch"][0] if isinstance(key, dict) else key)
            with SetWorkflowID(workflow_id):
                DBOS.enqueue_workflow(name, workflow, kind, key, options, ctx.run_id)
            sizes[workflow_id] = len(key["batch"]) if isinstance(key, dict) else 1
        self._wait(here, ctx, kind, prefix, sizes, stop)

    def _wait(
        self, here: Node, ctx, kind: str, prefix: str, sizes: dict[str, int], stop: threading.Event
    ) -> None:
        """Until every step of the phase is done -- follow-ups included --
        advancing this run's progress by what the whole cluster finished.
        ``sizes``: the steps each enqueued workflow runs."""
        from dbos import DBOS

        phase = _PHASES.get(kind)
        reported = follow_ups_seen = follow_ups_reported = steps_reported = 0
        batched = any(size > 1 for size in sizes.values())
        stored = ctx.state.stored_by_run(ctx.run_id)[0]
        while True:
            polled = time.monotonic()
            counts = here.probe_counts(prefix)
            if counts.done > reported:
                if phase is not None:
                    steps = sum(sizes.get(i, 0) for i in here.probe_done(prefix)) if batched else counts.done
                    ctx.reporter.advance(phase, steps - steps_reported)
                    steps_reported = steps
                reported = counts.done
            # what a fetch-study step did not fetch in one request: its series
            if counts.follow_ups > follow_ups_seen:
                ctx.reporter.grow("retrieve", counts.follow_ups - follow_ups_seen)
                follow_ups_seen = counts.follow_ups
            if counts.follow_ups_done > follow_ups_reported:
                ctx.reporter.advance("retrieve", counts.follow_ups_done - follow_ups_reported)
                follow_ups_reported = counts.follow_ups_done
            if kind in _RETRIEVING:
                now_stored = ctx.state.stored_by_run(ctx.run_id)[0]
                if now_stored > stored:
                    ctx.reporter.advance("instances", now_stored - stored)
                    stored = now_stored
            if counts.error:
                raise RuntimeError(f"a {kind} step failed in a worker: {counts.error}")
            if counts.done >= len(sizes) and not counts.unfinished:
                return
            if stop.wait(progress_interval(time.monotonic() - polled)):
                # Interrupted: what is still queued is not started anywhere,
                # and this process's running steps stop at their next instance.
                for workflow_id in here.probe_unfinished(prefix):
                    DBOS.cancel_workflow(workflow_id)
                here.stop_borrowed()
                return


def progress_interval(took: float) -> float:
    """Seconds to wait after a progress read that took ``took`` seconds."""
    return max(PROGRESS_INTERVAL, took * (1 - PROGRESS_SHARE) / PROGRESS_SHARE)


@dataclass(frozen=True)
class PhaseCounts:
    """A phase's workflows as the database has them (:meth:`Node.probe_counts`)."""

    done: int
    follow_ups: int
    follow_ups_done: int
    unfinished: int
    error: str | None


def phase_counts(conn, prefix: str) -> PhaseCounts:
    """The workflows of a phase (ids starting with ``prefix``), read on
    ``conn``: how many the driver enqueued are finished, how many follow-ups
    they enqueued and how many of those are finished, and the first error."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status = ANY(%(done)s) AND NOT follow_up),"
        " count(*) FILTER (WHERE follow_up),"
        " count(*) FILTER (WHERE status = ANY(%(done)s) AND follow_up),"
        " count(*) FILTER (WHERE NOT status = ANY(%(done)s)),"
        " min(error) FILTER (WHERE status = 'ERROR')"
        " FROM (SELECT status, error, strpos(substr(workflow_uuid, %(after)s), '/') > 0 AS follow_up"
        "       FROM dbos.workflow_status WHERE workflow_uuid LIKE %(pattern)s) AS phase",
        {"done": list(_DONE), "after": len(prefix) + 1, "pattern": _like_prefix(prefix)},
    ).fetchone()
    done, follow_ups, follow_ups_done, unfinished, error = row
    return PhaseCounts(
        int(done), int(follow_ups), int(follow_ups_done), int(unfinished),
        mask_url(str(error))[:500] if error else None,
    )


def phase_ids(conn, prefix: str, *, done: bool) -> list[str]:
    """The ids of a phase's finished (or unfinished) workflows, read on ``conn``."""
    status_is = "status = ANY(%s)" if done else "NOT status = ANY(%s)"
    rows = conn.execute(
        f"SELECT workflow_uuid FROM dbos.workflow_status WHERE workflow_uuid LIKE %s AND {status_is}",
        (_like_prefix(prefix), list(_DONE)),
    ).fetchall()
    return [row[0] for row in rows]


def _batches(
    keys: Sequence[Any], slots: int, largest: int = MAX_BATCH, per_slot: int = 1
) -> list[dict[str, list[Any]]]:
    """``keys`` in order, in ``per_slot`` batches per slot the cluster has
    for the phase (its ``workers`` on each live process), of at most
    ``largest`` keys. For query rows one per slot, not more: a queue hands
    out at most the phase's ``workers`` a poll, so each further round waits
    for a poll -- 40 rows in 16 batches took four polls, 0.55 s; in 4
    batches 0.31 s (one process). Not fewer: the rows spread over the processes."""
    size = min(largest, max(1, math.ceil(len(keys) / max(1, slots * per_slot))))
    return [{"batch": list(keys[start : start + size])} for start in range(0, len(keys), size)]


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern for ids starting with ``prefix`` (its wildcards escaped)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def live_nodes(conn) -> int:
    """How many dqr processes (``dqr run``, ``dqr worker``) are members of
    the cluster on this database now: each holds a liveness connection."""
    (count,) = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()",
        (LIVENESS_APPLICATION,),
    ).fetchone()
    return int(count)


def set_job_aside(config: LoadedConfig, url: str) -> None:
    """``dqr run --new-job``: the job in the queue database is moved aside
    (schema ``dqr`` renamed, kept) and its unfinished steps are cancelled, so
    that the run starts a fresh job. Refused while any other dqr process is
    on the database: it would go on working on the old job's steps."""
    import psycopg

    from dqr.state import PostgresJobState

    env = config.executor.database_url_env
    try:
        with psycopg.connect(url, autocommit=True, application_name="dqr-new-job") as conn:
            others = live_nodes(conn)
            if others:
                raise QueueConfigError(
                    Problem(
                        str(config.path),
                        f"--new-job: {others} dqr process(es) (dqr run or dqr worker) are working on the job "
                        f"in the queue database (${env}); stop them first (SIGTERM), then run again. "
                        "Nothing was changed.",
                    )
                )
            aside = PostgresJobState.set_aside(conn)
            unfinished = []
            if conn.execute("SELECT to_regclass('dbos.workflow_status')").fetchone()[0]:
                unfinished = [
                    row[0]
                    for row in conn.execute(
                        "SELECT workflow_uuid FROM dbos.workflow_status WHERE name = %s AND NOT status = ANY(%s)",
                        (WORKFLOW_NAME, list(_DONE)),
                    ).fetchall()
                ]
    except psycopg.Error as error:
        raise QueueConfigError(
            Problem(str(config.path), f"--new-job: the queue database failed: {mask_url(str(error))}")
        ) from None
    if unfinished:
        from dbos import DBOSClient

        client = DBOSClient(system_database_url=url)
        try:
            client.cancel_workflows(unfinished)
        finally:
            client.destroy()
    if aside:
        log.warning(
            "--new-job: the previous job is kept in schema %s of the queue database (%d unfinished steps cancelled)",
            aside,
            len(unfinished),
        )


def run_worker(
    config: LoadedConfig, stop: threading.Event, ready: Callable[[Node], None] | None = None
) -> Node:
    """``dqr worker``: be a node until ``stop`` is set, then stop cleanly.
    ``ready(node)`` is called once the node takes steps from the queue."""
    if config.executor.type != "queue":
        raise QueueConfigError(
            Problem(
                str(config.path),
                f"dqr worker needs `executor: {{type: queue}}` (the config has {config.executor.type!r})",
            )
        )
    here = node(config)
    if ready is not None:
        ready(here)
    stop.wait()
    here.stop()
    return here


@dqr.hookimpl
def dqr_register_executors(register):
    register("queue", QueueExecutor, QueueExecutorConfig)
