"""Scale-out benchmark: one job over C-GET from a private Orthanc, run by the
local executor and by the queue executor with 1, 2 and 4 processes (``dqr
run`` plus 0, 1 or 3 ``dqr worker``), on a private PostgreSQL.

    python -m bench.scaleout                   # 80 studies; and 40 for the overhead
    python -m bench.scaleout --studies 20 --instances 3 --overhead-studies 0   # quick
    python -m bench.scaleout --studies 40 --processes 1 --repeat 5 --baseline-python ../base/.venv/bin/python
                                               # A/B: another checkout's queue variant, interleaved

Prints one JSON line per variant: wall time, CPU seconds per process (from
``wait4``), and for the overhead pair (40 studies, local vs queue with one
process) the queue's extra time, in all and per step. Each queue variant
starts on a database set up as a standing cluster's is (DBOS's schema and
the source's queue made by one worker, started and stopped first); its
workers have joined before the clock starts. Results go to
``bench/results/scaleout.json`` with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.setup import CALLED_AET, Sizes, retrieve_datasets
from dqr.testing.orthanc import OrthancServer
from dqr.testing.postgres import PostgresServer


def _sizes(studies: int, instances: int) -> Sizes:
    return Sizes(query_rows=1, retrieve_studies=studies, instances_per_series=instances, growth=(studies,),
                 validate_rows=(1,), throttle=(1,), repeat=1, timeout=900)  # fmt: skip


def _site(folder: Path, orthanc: OrthancServer, executor) -> Path:
    folder.mkdir(parents=True)
    config = {
        "project": "Bench",
        "sources": {"pacs": {"type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port,
                             "called_aet": CALLED_AET, "calling_aet": "DQR", "retrieve": "c-get"}},
        "archive": "archive",
        "executor": executor,
    }  # fmt: skip
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cpu(rusage) -> float:
    return round(rusage.ru_utime + rusage.ru_stime, 2)


def _wait(process: subprocess.Popen) -> tuple[int, float]:
    _, status, rusage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, _cpu(rusage)


def run_variant(root: Path, orthanc: OrthancServer, pg: PostgresServer, csv: Path, processes: int | None,
                studies: int, name: str, polling_interval: float | None = None, repeat: int = 0,
                python: str = sys.executable) -> dict:  # fmt: skip
    """``processes`` None: the local executor; else the queue with that many
    processes. ``python``: the interpreter whose dqr runs (another checkout's)."""
    env = dict(os.environ)
    variant, name = name, f"{name}-r{repeat}"
    if processes is None:
        config = _site(root / name, orthanc, "local")
    else:
        env["DQR_BENCH_QUEUE_URL"] = pg.create_database(name.replace("-", "_"))
        config = _site(
            root / name, orthanc, {"type": "queue", "database_url_env": "DQR_BENCH_QUEUE_URL",
                                   **({"polling_interval": polling_interval} if polling_interval else {})}
        )
    dqr = [python, "-m", "dqr"]
    quiet = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.DEVNULL,
        "stderr": subprocess.DEVNULL,
        "env": env,
    }
    if processes is not None:
        # The queue database as a standing cluster has it: DBOS's schema made
        # and the source's queue registered (by one worker, started and stopped).
        warmup = subprocess.Popen([*dqr, "worker", "--config", str(config)], **quiet)
        _wait_for_node(env["DQR_BENCH_QUEUE_URL"])
        warmup.send_signal(signal.SIGTERM)
        _wait(warmup)
    workers = [subprocess.Popen([*dqr, "worker", "--config", str(config)], **quiet)
               for _ in range((processes or 1) - 1)]  # fmt: skip
    if workers:
        _wait_for_node(env["DQR_BENCH_QUEUE_URL"], len(workers))
    load = os.getloadavg()[0]
    started = time.monotonic()
    run = subprocess.Popen([*dqr, "run", "--config", str(config), "--csv", str(csv)], **quiet)
    code, run_cpu = _wait(run)
    wall = time.monotonic() - started
    worker_cpu = []
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
        worker_cpu.append(_wait(worker)[1])
    stored = len(list((root / name / "archive").rglob("*.dcm")))
    result = {"variant": variant, "repeat": repeat, "studies": studies, "processes": processes or 1,
              "executor": "local" if processes is None else "queue", "exit": code, "wall_s": round(wall, 2),
              "cpu_s_run": run_cpu, "cpu_s_workers": worker_cpu, "instances_stored": stored,
              "loadavg_1min_before": round(load, 2)}  # fmt: skip
    if processes is not None:
        result["steps"], result["workflows"] = _steps(env["DQR_BENCH_QUEUE_URL"])
    return result


def _wait_for_node(url: str, count: int = 1, timeout: float = 120) -> None:
    """Until ``count`` dqr processes have joined the cluster (DBOS launched)."""
    import psycopg

    from dqr.plugins.queue_executor import live_nodes

    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while live_nodes(conn) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} dqr worker(s) did not start within {timeout} s")
            time.sleep(0.1)
    time.sleep(0.5)  # the node's queue is registered just after its liveness lock


def _steps(url: str) -> tuple[int, int]:
    """The job's steps (one per CSV row, selected study and follow-up) and
    the workflows that ran them (query rows and studies go in batches)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        workflows, follow_ups = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE workflow_uuid LIKE '%/retrieve-series/%') "
            "FROM dbos.workflow_status WHERE name = 'dqr-step'"
        ).fetchone()
        (rows,) = conn.execute("SELECT count(*) FROM dqr.rows").fetchone()
        (studies,) = conn.execute("SELECT count(*) FROM dqr.studies WHERE line IS NOT NULL").fetchone()
    return rows + studies + follow_ups, workflows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=80)
    parser.add_argument("--instances", type=int, default=21, help="instances per series")
    parser.add_argument("--overhead-studies", type=int, default=40)
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--polling-interval", type=float, help="the queue executor's polling_interval (default its own)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every variant, interleaved (medians)")
    parser.add_argument("--baseline-python", help="also run the overhead case's queue variant with this interpreter "
                        "(another checkout's venv), interleaved: an A/B on the same machine state")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="dqr-scaleout-") as tmp:
        root = Path(tmp)
        with (
            OrthancServer.start(root / "orthanc", aet=CALLED_AET) as orthanc,
            PostgresServer.start() as pg,
        ):
            sizes = _sizes(max(args.studies, args.overhead_studies), args.instances)
            accessions: list[str] = []
            for dataset in retrieve_datasets(sizes):
                orthanc.upload(_part10(dataset))
                if dataset.AccessionNumber not in accessions:
                    accessions.append(dataset.AccessionNumber)

            def csv_of(n: int) -> Path:
                path = root / f"studies-{n}.csv"
                path.write_text("Accession Number\n" + "".join(f"{a}\n" for a in accessions[:n]))
                return path

            plan = [(args.studies, None, f"local-{args.studies}")]
            plan += [(args.studies, n, f"queue{n}-{args.studies}") for n in args.processes]
            if args.overhead_studies:
                plan += [(args.overhead_studies, None, f"local-{args.overhead_studies}"),
                         (args.overhead_studies, 1, f"queue1-{args.overhead_studies}")]  # fmt: skip
                plan = list({name: (st, p, name) for st, p, name in plan}.values())
                if args.baseline_python:
                    plan.append((args.overhead_studies, 1, f"queue1-{args.overhead_studies}-baseline"))
            for repeat in range(args.repeat):
                for studies, processes, name in plan:
                    python = args.baseline_python if name.endswith("-baseline") else sys.executable
                    result = run_variant(root, orthanc, pg, csv_of(studies), processes, studies, name,
                                         args.polling_interval, repeat, python)  # fmt: skip
                    print(json.dumps(result), flush=True)
                    results.append(result)
    n = args.overhead_studies
    if n and any(r["variant"] == f"local-{n}" for r in results):
        local, queued = (statistics.median(r["wall_s"] for r in results if r["variant"] == v)
                         for v in (f"local-{n}", f"queue1-{n}"))  # fmt: skip
        steps = max(r.get("steps", 0) for r in results if r["variant"] == f"queue1-{n}")
        extra = queued - local
        overhead = {"local_median_s": local, "queue1_median_s": queued, "runs": args.repeat,
                    "overhead_pct": round(100 * extra / local, 1),
                    "overhead_ms_per_step": round(1000 * extra / max(1, steps), 1)}  # fmt: skip
        if args.baseline_python:
            baseline = statistics.median(r["wall_s"] for r in results if r["variant"] == f"queue1-{n}-baseline")
            overhead |= {"baseline_queue1_median_s": baseline,
                         "baseline_overhead_pct": round(100 * (baseline - local) / local, 1)}  # fmt: skip
        if args.studies != n and 1 in args.processes:
            walls = {v: statistics.median(r["wall_s"] for r in results if r["variant"] == v)
                     for v in (f"local-{args.studies}", f"queue1-{args.studies}")}  # fmt: skip
            overhead |= split_overhead({n: local, args.studies: walls[f"local-{args.studies}"]},
                                       {n: queued, args.studies: walls[f"queue1-{args.studies}"]})  # fmt: skip
        print(json.dumps(overhead))
        results.append(overhead)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def split_overhead(local: dict[int, float], queued: dict[int, float]) -> dict[str, float]:
    """The queue's extra time, from the walls of two job sizes (studies ->
    seconds, one process): what each further study costs it against the
    local executor (the slopes' ratio, in %), and what it costs once
    whatever the size (the intercepts' difference: DBOS's import and launch,
    the phases' hand-overs)."""
    small, large = sorted(local)
    slope_local = (local[large] - local[small]) / (large - small)
    slope_queue = (queued[large] - queued[small]) / (large - small)
    fixed = (queued[small] - slope_queue * small) - (local[small] - slope_local * small)
    return {"marginal_overhead_pct": round(100 * (slope_queue / slope_local - 1), 1),
            "fixed_overhead_s": round(fixed, 2)}  # fmt: skip


def _part10(dataset) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
