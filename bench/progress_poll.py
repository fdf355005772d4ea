"""What the queue driver's progress read costs on a large job: the phase's
workflow counts (DBOS's ``workflow_status``), the list of finished ones (read
when steps are batched) and the run's stored instances (the job state), on a
private PostgreSQL grown to the size of a 100,000-study job.

    python -m bench.progress_poll                      # 100,000 workflows, 2,000,000 instances
    python -m bench.progress_poll --workflows 10000 --instances 200000

One small real job (the memory source, the queue executor) makes DBOS's
schema and the job state; its rows are then copied, under the same phase and
run, up to the sizes asked. Prints one JSON line: each read's median time
over ``--repeat`` reads, and what share of the driver's time the reads would
take at a fixed 0.1 s interval and with :func:`progress_interval`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from dqr.plugins.queue_executor import PROGRESS_INTERVAL, phase_counts, phase_ids, progress_interval
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, accession_number
from dqr.state import PostgresJobState
from dqr.testing.postgres import PostgresServer


def _small_job(root: Path, url: str) -> None:
    """One real queue run (8 studies of the memory source), in one process."""
    config = {
        "project": "Bench",
        "sources": {"main": {"type": "memory", "synthetic": {"patients": 4}}},
        "archive": "archive",
        "executor": {"type": "queue", "database_url_env": "DQR_BENCH_QUEUE_URL"},
    }
    site = root / "site.yaml"
    site.write_text(yaml.safe_dump(config, sort_keys=False))
    spec = CohortSpec(patients=4)
    csv = root / "studies.csv"
    csv.write_text("Accession Number\n" + "".join(f"{accession_number(spec, p, s)}\n" for p in range(4) for s in range(2)))
    subprocess.run(
        [sys.executable, "-m", "dqr", "run", "--config", str(site), "--csv", str(csv)],
        cwd=root, env={**os.environ, "DQR_BENCH_QUEUE_URL": url}, check=True, capture_output=True,
        stdin=subprocess.DEVNULL, timeout=300,
    )  # fmt: skip


def _grow(conn, workflows: int, instances: int) -> tuple[str, int]:
    """Copy the job's rows up to the sizes asked: ``workflows`` finished
    workflows in its retrieving phase and ``instances`` stored instances of
    its run. Returns the phase's id prefix and the run."""
    (sample,) = conn.execute(
        "SELECT workflow_uuid FROM dbos.workflow_status WHERE workflow_uuid LIKE '%/fetch-study/%' LIMIT 1"
    ).fetchone()
    prefix = sample[: sample.index("/fetch-study/") + len("/fetch-study/")]
    conn.execute(
        "INSERT INTO dbos.workflow_status SELECT (jsonb_populate_record(NULL::dbos.workflow_status,"
        " to_jsonb(w) || jsonb_build_object('workflow_uuid', %s || '\"bench-' || g || '\"'))).*"
        " FROM dbos.workflow_status w, generate_series(1, %s) g WHERE w.workflow_uuid = %s",
        (prefix, workflows, sample),
    )
    (run,) = conn.execute("SELECT max(run) FROM dqr.instances").fetchone()
    conn.execute(
        "INSERT INTO dqr.instances (sop_uid, series_uid, stored, size, run)"
        " SELECT '2.25.' || g, '2.25.9' || (g / 500), 1, 12000, %s FROM generate_series(1, %s) g",
        (run, instances),
    )
    conn.execute("VACUUM ANALYZE dqr.instances")
    conn.execute("VACUUM ANALYZE dbos.workflow_status")
    return prefix, run


def _median_s(read, repeat: int) -> float:
    took = []
    for _ in range(repeat):
        started = time.perf_counter()
        read()
        took.append(time.perf_counter() - started)
    return statistics.median(took)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workflows", type=int, default=100_000, help="finished workflows in the phase")
    parser.add_argument("--instances", type=int, default=2_000_000, help="stored instances of the run")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    import psycopg

    with tempfile.TemporaryDirectory(prefix="dqr-progress-") as tmp, PostgresServer.start() as pg:
        url = pg.create_database("bench")
        _small_job(Path(tmp), url)
        with psycopg.connect(url, autocommit=True) as conn:
            prefix, run = _grow(conn, args.workflows, args.instances)
            state = PostgresJobState(url)
            counts_s = _median_s(lambda: phase_counts(conn, prefix), args.repeat)
            done_s = _median_s(lambda: phase_ids(conn, prefix, done=True), args.repeat)
            stored_s = _median_s(lambda: state.stored_by_run(run), args.repeat)
            state.close()
    for_each_read = counts_s + done_s + stored_s
    result = {
        "workflows": args.workflows,
        "instances": args.instances,
        "phase_counts_ms": round(counts_s * 1000, 1),
        "phase_ids_done_ms": round(done_s * 1000, 1),
        "stored_by_run_ms": round(stored_s * 1000, 1),
        "read_ms": round(for_each_read * 1000, 1),
        "share_at_fixed_interval": round(for_each_read / (for_each_read + PROGRESS_INTERVAL), 3),
        "interval_s": round(progress_interval(for_each_read), 2),
        "share_with_progress_interval": round(for_each_read / (for_each_read + progress_interval(for_each_read)), 3),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
