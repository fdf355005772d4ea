"""The ``queue`` executor (dqr.plugins.queue_executor): dqr run and dqr worker
processes sharing one job through DBOS on a private PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("dbos", reason="the queue extra (pip install 'dqr[queue]') is not installed")

from dqr.plugins.memory.synthetic import CohortSpec, accession_number  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def write_site(folder: Path, executor, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "project": "Test",
        "sources": {"main": {"type": "memory", "synthetic": {"patients": 4}}},
        "archive": "archive",
        "limits": {"backoff_initial": 0.01, "backoff_max": 0.05},
        "executor": executor,
        **extra,
    }
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def all_studies_csv(folder: Path, patients: int = 4, studies_per_patient: int = 2) -> Path:
    spec = CohortSpec(patients=patients)
    accessions = [
        accession_number(spec, p, s) for p in range(patients) for s in range(studies_per_patient)
    ]
    path = folder / "studies.csv"
    path.write_text("Accession Number\n" + "".join(f"{a}\n" for a in accessions), encoding="utf-8")
    return path


def dqr(
    *args, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dqr", *map(str, args)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def archive_contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


@pytest.mark.slow
def test_queue_executor_in_one_process_gives_the_same_archive_as_local(
    tmp_path: Path, postgres_url: str
) -> None:
    local = write_site(tmp_path / "local", "local")
    queued = write_site(
        tmp_path / "queue", {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"}
    )
    csv = all_studies_csv(tmp_path)

    by_local = dqr("run", "--config", local, "--csv", csv)
    by_queue = dqr(
        "run", "--config", queued, "--csv", csv, env={"DQR_TEST_QUEUE_URL": postgres_url}
    )

    assert by_local.returncode == 0, by_local.stderr
    assert by_queue.returncode == 0, by_queue.stderr
    expected = archive_contents(tmp_path / "local" / "archive")
    assert len(expected) > 0
    assert archive_contents(tmp_path / "queue" / "archive") == expected


def test_queue_executor_without_its_url_exits_2_naming_the_variable(tmp_path: Path) -> None:
    queued = write_site(tmp_path, {"type": "queue", "database_url_env": "DQR_UNSET_QUEUE_URL"})
    env = {k: v for k, v in os.environ.items() if k != "DQR_UNSET_QUEUE_URL"}

    result = subprocess.run(
        [sys.executable, "-m", "dqr", "worker", "--config", str(queued)],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip

    assert result.returncode == 2
    assert "DQR_UNSET_QUEUE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_wrong_password_is_never_shown(tmp_path: Path, postgres) -> None:
    queued = write_site(tmp_path, {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"})
    url = f"postgresql://nobody:s3cret-pw@127.0.0.1:{postgres.port}/no_such_db"

    result = dqr("worker", "--config", queued, env={"DQR_TEST_QUEUE_URL": url}, timeout=60)

    assert result.returncode == 2
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "queue database" in result.stderr


def test_worker_stops_cleanly_on_sigterm(tmp_path: Path, postgres_url: str) -> None:
    queued = write_site(tmp_path, {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"})
    worker = subprocess.Popen(
        [sys.executable, "-m", "dqr", "worker", "--config", str(queued)],
        env={**os.environ, "DQR_TEST_QUEUE_URL": postgres_url},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(3)  # started: DBOS launched, waiting for steps
        assert worker.poll() is None
        sent = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=15)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()

    assert code == 0, worker.stderr.read()
    assert time.monotonic() - sent < 10
