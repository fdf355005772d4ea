"""The ``queue`` executor (dqr.plugins.queue_executor): dqr run and dqr worker
processes sharing one job through DBOS on a private PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

pytest.importorskip("dbos", reason="the queue extra (pip install 'dqr[queue]') is not installed")

from dqr.plugins.testpacs.memory.synthetic import CohortSpec, accession_number  # noqa: E402

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


class Worker:
    """A ``dqr worker`` on ``config``, started and -- by :meth:`wait_ready` --
    waited for until it says it takes steps. Its stderr is read as it comes
    (:attr:`lines`), so that a chatty worker never blocks on a full pipe."""

    READY = "is on the job"

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dqr", "worker", "--config", str(config)],
            env={**os.environ, **env}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.pid = self.process.pid
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)
            if self.READY in line:
                self._ready.set()
        self._ready.set()  # it ended: wait_ready says so

    def wait_ready(self, timeout: float = 120) -> Worker:
        assert self._ready.wait(timeout), f"worker {self.pid} did not join within {timeout} s"
        assert self.process.poll() is None, "".join(self.lines)[-3000:]
        return self

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM, and its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(timeout=5)


def start_workers(config: Path, env: dict[str, str], count: int) -> list[Worker]:
    """``count`` workers on ``config``, each already taking steps: a driver
    started after them shares its phases with all of them."""
    workers = [Worker(config, env) for _ in range(count)]
    try:
        return [worker.wait_ready() for worker in workers]
    except BaseException:
        for worker in workers:
            worker.kill()
        raise


def archive_contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def archives_by_local_and_queue(tmp_path: Path, postgres_url: str, *run_args: str) -> tuple[dict, dict]:
    """The same job (every study of the cohort) run by the local executor and
    by the queue executor in one process: each archive's contents."""
    local = write_site(tmp_path / "local", "local")
    queued = write_site(
        tmp_path / "queue", {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"}
    )
    csv = all_studies_csv(tmp_path)

    by_local = dqr("run", "--config", local, "--csv", csv, *run_args)
    by_queue = dqr(
        "run", "--config", queued, "--csv", csv, *run_args, env={"DQR_TEST_QUEUE_URL": postgres_url}
    )

    assert by_local.returncode == 0, by_local.stderr
    assert by_queue.returncode == 0, by_queue.stderr
    return archive_contents(tmp_path / "local" / "archive"), archive_contents(tmp_path / "queue" / "archive")


@pytest.mark.slow
def test_queue_executor_in_one_process_gives_the_same_archive_as_local(
    tmp_path: Path, postgres_url: str
) -> None:
    by_local, by_queue = archives_by_local_and_queue(tmp_path, postgres_url)
    assert len(by_local) > 0
    assert by_queue == by_local


@pytest.mark.slow
def test_a_partly_selected_study_is_retrieved_series_by_series_as_follow_up_steps(
    tmp_path: Path, postgres_url: str
) -> None:
    # With a series excluded no study goes in one request: each fetch-study
    # step hands its series on as retrieve-series steps, which must all run.
    by_local, by_queue = archives_by_local_and_queue(tmp_path, postgres_url, "--exclude", "Localizer")

    descriptions = {dcmread(BytesIO(data), stop_before_pixels=True).SeriesDescription for data in by_local.values()}
    assert "Axial 5mm" in descriptions and "Localizer" not in descriptions
    assert by_queue == by_local
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        (follow_ups,) = conn.execute(
            "SELECT count(*) FROM dbos.workflow_status WHERE workflow_uuid LIKE %s AND status = 'SUCCESS'",
            ("%/fetch-study/%/retrieve-series/%",),
        ).fetchone()
    assert follow_ups > 0


@pytest.mark.slow
def test_status_and_retry_read_the_job_state_in_the_queue_database(
    tmp_path: Path, postgres_url: str
) -> None:
    queued = write_site(tmp_path, {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"})
    env = {"DQR_TEST_QUEUE_URL": postgres_url}
    assert (
        dqr("run", "--config", queued, "--csv", all_studies_csv(tmp_path), env=env).returncode == 0
    )
    # No SQLite file: the job lives in PostgreSQL, where any machine reads it.
    assert not list(tmp_path.rglob("*.sqlite*")) and not list(tmp_path.rglob("*.db"))

    status = dqr("status", "--config", queued, "--json", env=env)
    retry = dqr("retry", "--config", queued, "--failed", env=env)

    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["counts"]
    assert counts["studies"] == {"stored": 8}
    assert set(counts["instances"]) == {"stored"}
    assert postgres_url not in status.stdout + status.stderr
    assert retry.returncode == 0, retry.stderr
    assert "retrying 0 rows and 0 studies" in retry.stderr


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


def test_worker_says_when_it_joins_and_stops_cleanly_on_sigterm(tmp_path: Path, postgres_url: str) -> None:
    queued = write_site(tmp_path, {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"})
    (worker,) = start_workers(queued, {"DQR_TEST_QUEUE_URL": postgres_url}, 1)
    try:
        sent = time.monotonic()
        code = worker.stop()
    finally:
        worker.kill()

    assert code == 0, "".join(worker.lines)
    assert time.monotonic() - sent < 10
    joined = next(line for line in worker.lines if Worker.READY in line)
    assert "1 dqr processes share the queue database ($DQR_TEST_QUEUE_URL)" in joined
    assert postgres_url not in "".join(worker.lines)
    assert "worker stopped after 0 steps" in worker.lines[-1]


@pytest.mark.parametrize(("took", "waits"), [(0.0, 0.1), (0.004, 0.1), (0.05, 0.95), (1.0, 19.0)])
def test_the_drivers_progress_reads_take_at_most_a_twentieth_of_its_time(took, waits) -> None:
    # On a 100,000-study job each read counts hundreds of thousands of rows
    # (the phase's workflows, the run's stored instances): a read that took
    # long spaces the next one out; a quick one still comes every 0.1 s.
    from dqr.plugins.queue_executor import progress_interval

    assert progress_interval(took) == pytest.approx(waits)
    assert took <= 0.05 * (took + progress_interval(took)) + 1e-12


@pytest.mark.parametrize(
    ("rows", "slots", "sizes"),
    [(40, 4, [10] * 4), (40, 12, [4] * 10), (3, 4, [1] * 3), (100_000, 4, [500] * 200)],
)
def test_query_rows_go_in_one_batch_per_slot_of_the_cluster_of_at_most_500(rows, slots, sizes) -> None:
    # A queue hands out at most the phase's workers a poll: each batch past
    # one per slot costs a poll interval; a batch is at most 500 rows so that
    # the progress and a recovered batch stay small.
    from dqr.plugins.queue_executor import _batches

    batches = _batches(list(range(rows)), slots)
    assert [len(batch["batch"]) for batch in batches] == sizes
    assert [key for batch in batches for key in batch["batch"]] == list(range(rows))


@pytest.mark.parametrize(
    ("studies", "slots", "sizes"),
    [(80, 4, [4] * 20), (40, 4, [3] * 13 + [1]), (6, 12, [1] * 6)],
)
def test_fetch_study_steps_go_four_to_a_workflow_and_four_batches_per_slot_at_least(studies, slots, sizes) -> None:
    # DBOS's bookkeeping of a workflow costs the process ~7 ms of CPU, a
    # study's step 50-100 ms: four to a batch; but a small job still spreads.
    from dqr.plugins.queue_executor import _BATCHED, _batches

    batches = _batches(list(range(studies)), slots, *_BATCHED["fetch-study"])
    assert [len(batch["batch"]) for batch in batches] == sizes
    assert [key for batch in batches for key in batch["batch"]] == list(range(studies))


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.orthanc
def test_run_and_two_workers_survive_a_sigkill_mid_retrieval_within_the_cluster_wide_limits(
    tmp_path: Path, postgres_url: str, orthanc
) -> None:
    from dqr.plugins.testpacs.memory.synthetic import generate_cohort
    from dqr.testing.tcp_counter import CountingProxy, dimse_kind

    spec = orthanc.cohort_spec
    # Orthanc behind a proxy that counts C-GET associations per client process
    # and slows every answer, so that a worker can be caught mid-retrieval.
    proxy = CountingProxy(
        ("127.0.0.1", orthanc.dicom_port), classify=dimse_kind, identify=True, delay=0.05
    )
    proxy.start()
    source = {
        "type": "dimse", "host": "127.0.0.1", "port": proxy.port, "called_aet": orthanc.aet,
        "calling_aet": "DQR", "retrieve": "c-get",
        "limits": {"max_retrievals": 2, "max_queries": 2},
    }  # fmt: skip
    config = write_site(tmp_path, {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"})
    data = yaml.safe_load(config.read_text())
    data["sources"] = {"pacs": source}
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    csv = all_studies_csv(tmp_path, spec.patients, spec.studies_per_patient)
    env = {"DQR_TEST_QUEUE_URL": postgres_url}

    workers = start_workers(config, env, 2)
    run = subprocess.Popen(
        [sys.executable, "-m", "dqr", "run", "--csv", str(csv), "--config", str(config)],
        env={**os.environ, **env}, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        worker_pids = {w.pid for w in workers}
        _wait(
            lambda: any(
                c.tag == "get" and c.pid in worker_pids and c.closed is None
                for c in proxy.connections
            ),
            120,
            "a worker retrieving",
        )
        victim = next(
            c.pid
            for c in proxy.connections
            if c.tag == "get" and c.pid in worker_pids and c.closed is None
        )
        os.kill(victim, signal.SIGKILL)
        out, errors = run.communicate(timeout=240)
        assert run.returncode == 0, errors[-3000:]

        survivor = next(w for w in workers if w.pid != victim)
        assert survivor.stop() == 0
    finally:
        for worker in workers:
            worker.kill()
        if run.poll() is None:
            run.kill()
        run.wait()
        proxy.stop()

    originals = {d.SOPInstanceUID: d for d in generate_cohort(spec)}
    archived = sorted((tmp_path / "archive").rglob("*.dcm"))
    assert sorted(p.stem for p in archived) == sorted(originals)  # every instance, exactly once
    import pydicom

    for path in archived:
        stored = pydicom.dcmread(path)
        assert stored.PixelData == originals[stored.SOPInstanceUID].PixelData
        assert path.parent.name == stored.SeriesInstanceUID
    leftovers = [
        p
        for p in (tmp_path / "archive").rglob("*")
        if p.is_file() and p.suffix not in {".dcm", ".csv", ".jsonl", ".json"}
    ]
    assert leftovers == []
    manifest = [
        json.loads(line)["SOPInstanceUID"]
        for path in (tmp_path / "archive").rglob("manifest.jsonl")
        for line in path.read_text().splitlines()
    ]
    assert sorted(manifest) == sorted(originals)  # one manifest line per instance
    assert proxy.maximum_by_tag["get"] <= 2
    retrieving = {c.pid for c in proxy.connections if c.tag == "get"}
    assert len(retrieving) >= 2, retrieving


def _run_with_workers(config: Path, env: dict[str, str], workers: int, *run_args: str) -> str:
    """``dqr run`` (with ``run_args``) beside ``workers`` ``dqr worker``
    processes on ``config``; asserts it exits 0, stops the workers by SIGTERM
    and returns its stderr."""

    started = start_workers(config, env, workers)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "dqr", "run", *run_args, "--config", str(config)],
            env={**os.environ, **env}, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        for worker in started:
            assert worker.stop() == 0, "".join(worker.lines)[-3000:]
        return run.stderr
    finally:
        for worker in started:
            worker.kill()


@pytest.mark.slow
def test_a_c_store_destinations_max_associations_bounds_all_processes_together(
    tmp_path: Path, postgres_url: str, mock_store_scp_factory
) -> None:
    from dqr.plugins.testpacs.memory.synthetic import generate_cohort
    from dqr.testing.tcp_counter import CountingProxy

    scp = mock_store_scp_factory()
    # Every association to the Storage SCP passes the proxy, which names the
    # process that opened it; slow answers make the processes' sends overlap.
    # One step at a time per process: while one process holds the association,
    # the others take studies of their own and wait for it, so more than one
    # process sends (with 8 threads one process could take every study).
    with CountingProxy(("127.0.0.1", scp.port), identify=True, delay=0.005) as proxy:
        destination = {
            "type": "dimse", "host": "127.0.0.1", "port": proxy.port, "called_aet": scp.aet,
            "limits": {"max_associations": 1},
        }  # fmt: skip
        config = write_site(
            tmp_path,
            {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL", "threads": 1},
            destination=destination,
        )
        csv = all_studies_csv(tmp_path)
        _run_with_workers(config, {"DQR_TEST_QUEUE_URL": postgres_url}, 2, "--csv", str(csv))

    expected = {d.SOPInstanceUID for d in generate_cohort(CohortSpec(patients=4))}
    assert set(scp.received) == expected
    assert len({c.pid for c in proxy.connections}) >= 2  # more than one process sent
    assert proxy.maximum == 1


@pytest.mark.slow
def test_a_stow_destinations_max_requests_bounds_all_processes_together(
    tmp_path: Path, postgres_url: str, mock_stow_factory
) -> None:
    from dqr.plugins.testpacs.memory.synthetic import generate_cohort

    server = mock_stow_factory()
    server.faults.delay = 0.05
    config = write_site(
        tmp_path,
        {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"},
        destination={"type": "dicomweb", "url": server.url, "limits": {"max_requests": 1}},
    )
    csv = all_studies_csv(tmp_path)
    _run_with_workers(config, {"DQR_TEST_QUEUE_URL": postgres_url}, 2, "--csv", str(csv))

    expected = {d.SOPInstanceUID for d in generate_cohort(CohortSpec(patients=4))}
    assert set(server.received) == expected
    assert server.max_concurrent_requests == 1


@pytest.mark.slow
def test_idle_pooled_query_associations_count_against_max_queries_over_all_processes(
    tmp_path: Path, postgres_url: str, mock_dimse_factory
) -> None:
    from dqr.testing.tcp_counter import CountingProxy, dimse_kind

    pacs = mock_dimse_factory()
    pacs.faults.delay = 0.02
    # Query associations ("other") are told from C-GET ones at the proxy.
    with CountingProxy(
        ("127.0.0.1", pacs.port), classify=dimse_kind, identify=True
    ) as proxy:
        source = {
            "type": "dimse", "host": "127.0.0.1", "port": proxy.port, "called_aet": pacs.aet,
            "calling_aet": "DQR", "retrieve": "c-get",
            "limits": {"max_queries": 1, "max_retrievals": 2},
        }  # fmt: skip
        config = write_site(
            tmp_path,
            {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"},
            sources={"pacs": source},
        )
        csv = all_studies_csv(tmp_path)
        _run_with_workers(config, {"DQR_TEST_QUEUE_URL": postgres_url}, 2, "--csv", str(csv))

    querying = {c.pid for c in proxy.connections if c.tag == "other"}
    assert len(querying) >= 2, querying  # more than one process queried
    assert proxy.maximum_by_tag["other"] == 1


def _job_schemas(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE 'dqr%' ORDER BY 1"
        ).fetchall()
    return [row[0] for row in rows]


@pytest.mark.slow
def test_new_job_sets_the_job_in_the_queue_database_aside_and_runs_a_fresh_one(
    tmp_path: Path, postgres_url: str
) -> None:
    queued = write_site(tmp_path, {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"})
    env = {"DQR_TEST_QUEUE_URL": postgres_url}
    assert dqr("run", "--config", queued, "--csv", all_studies_csv(tmp_path), env=env).returncode == 0
    one_study = tmp_path / "one.csv"
    one_study.write_text(
        "Accession Number\n" + accession_number(CohortSpec(patients=4), 0, 0) + "\n", encoding="utf-8"
    )

    fresh = dqr("run", "--config", queued, "--csv", one_study, "--new-job", env=env)

    assert fresh.returncode == 0, fresh.stderr
    status = dqr("status", "--config", queued, "--json", env=env)
    # The new job holds only its own study, and its steps ran (the old job's
    # finished steps did not stand in for them).
    assert json.loads(status.stdout)["counts"]["studies"] == {"stored": 1}
    schemas = _job_schemas(postgres_url)
    assert "dqr" in schemas and len(schemas) == 2  # the old job kept beside it
    assert "previous job is kept in schema dqr_" in fresh.stderr


@pytest.mark.slow
def test_new_job_is_refused_while_a_worker_is_on_the_job(tmp_path: Path, postgres_url: str) -> None:
    queued = write_site(tmp_path, {"type": "queue", "database_url_env": "DQR_TEST_QUEUE_URL"})
    env = {"DQR_TEST_QUEUE_URL": postgres_url}
    csv = all_studies_csv(tmp_path)
    assert dqr("run", "--config", queued, "--csv", csv, env=env).returncode == 0
    (worker,) = start_workers(queued, env, 1)
    try:
        refused = dqr("run", "--config", queued, "--csv", csv, "--new-job", env=env)
    finally:
        worker.stop()
        worker.kill()

    assert refused.returncode == 2
    assert "1 dqr process(es)" in refused.stderr and "stop them first" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _job_schemas(postgres_url) == ["dqr"]  # nothing set aside
    status = dqr("status", "--config", queued, "--json", env=env)
    assert json.loads(status.stdout)["counts"]["studies"] == {"stored": 8}
