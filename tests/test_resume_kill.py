"""Killing `dqr run` mid-retrieval, then running it again: a subprocess run
against the mock DIMSE PACS (in this process), slowed by a per-sub-operation
delay, stopped by SIGKILL, SIGTERM or SIGINT once some instances are in the
archive. Nothing half-written is visible, and the next run completes the
archive fetching only what was missing (counted on the mock)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from conftest import archive_files

from dqr.plugins.testpacs.memory.synthetic import (
    DEFAULT_COHORT,
    accession_number,
    generate_cohort,
)

#: What ``mock_dimse_pacs`` serves (core/testing/fixtures_dimse.py).
COHORT = DEFAULT_COHORT
ACCESSIONS = [accession_number(COHORT, p, s) for p in range(COHORT.patients) for s in range(2)]
EXPECTED = {d.SOPInstanceUID: d.AccessionNumber for d in generate_cohort(COHORT)}
LABELS = {accession: (f"S{i}", f"S{i}_A") for i, accession in enumerate(ACCESSIONS, start=1)}
#: Seconds before each C-STORE sub-operation once retrieval began: 57
#: instances, 2 at a time, take ~1.5 s -- time enough to be interrupted.
SLOW = 0.05


@pytest.fixture
def kill_job(site, write_csv, mock_dimse_pacs, dimse_transport) -> Path:
    rows = "".join(f"{a},{s},{t}\n" for a, (s, t) in LABELS.items())
    return site(
        source={
            "type": "dimse",
            "host": "127.0.0.1",
            "port": mock_dimse_pacs.port,
            "called_aet": "MOCKPACS",
            "calling_aet": "DQR",
            "dimse_timeout": 10,
            "acse_timeout": 10,
            "transport": dimse_transport,
        },
        limits={"backoff_initial": 0.01, "backoff_max": 0.05, "retries": 2, "max_retrievals": 2},
        csv=str(write_csv("Accession Number,Subject,Session\n" + rows)),
    )


@pytest.fixture
def start_dqr(tmp_path) -> Callable[..., subprocess.Popen]:
    """Start ``python -m dqr ARGS`` in the background; killed and waited for after."""
    started: list[subprocess.Popen] = []

    def start(*args: object) -> subprocess.Popen:
        process = subprocess.Popen(
            [sys.executable, "-m", "dqr", *map(str, args)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)


def interrupt_mid_retrieval(process: subprocess.Popen, mock, archive: Path, signum: int) -> None:
    """Slow the mock down once retrieval starts, wait for a few stored
    instances, then send ``signum``."""
    deadline = time.monotonic() + 30
    while mock.requests["C-GET"] == 0:
        assert process.poll() is None and time.monotonic() < deadline, "dqr never started retrieving"
        time.sleep(0.005)
    mock.faults.delay = SLOW
    while len(archive_files(archive)) < 4:
        assert process.poll() is None and time.monotonic() < deadline, "dqr stored nothing"
        time.sleep(0.01)
    process.send_signal(signum)


def assert_every_dcm_is_whole(archive: Path) -> None:
    for path in archive_files(archive):
        dataset = pydicom.dcmread(path)  # a truncated file raises
        assert dataset.SOPInstanceUID == path.stem
        assert len(dataset.PixelData) == COHORT.rows * COHORT.columns * 2


def assert_archive_complete_and_relabeled(archive: Path) -> None:
    files = archive_files(archive)
    assert sorted(path.stem for path in files) == sorted(EXPECTED)  # each exactly once
    for path in files:
        dataset = pydicom.dcmread(path)
        assert (str(dataset.PatientName), dataset.StudyID) == LABELS[EXPECTED[dataset.SOPInstanceUID]]
    assert list(archive.rglob("*.dqr-tmp")) == []


def wait_until_quiet(mock) -> None:
    """Let the mock finish the C-GETs of a dead client: its handler only
    notices at its next sub-operation, and must not count in the next run."""
    deadline = time.monotonic() + 10
    last = None
    while (mock.current_associations, mock.requests["C-STORE"]) != last:
        assert time.monotonic() < deadline, "the mock kept serving a dead client"
        last = (mock.current_associations, mock.requests["C-STORE"])
        time.sleep(3 * SLOW)
    assert mock.current_associations == 0


def resume(dqr, config, mock, archive: Path) -> tuple[dict, int]:
    """Run to completion in process; returns the --json summary and how
    many instances were on disk before, and checks that the mock sent only
    the missing ones."""
    wait_until_quiet(mock)
    on_disk = len(archive_files(archive))
    mock.reset()
    result = dqr("run", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["instances_stored"] == len(EXPECTED) - on_disk
    assert mock.requests["C-STORE"] == len(EXPECTED) - on_disk  # fetched only what was missing
    return summary, on_disk


def test_after_sigkill_no_half_written_file_is_visible_and_the_rerun_completes(
    kill_job, start_dqr, dqr, mock_dimse_pacs, tmp_path
):
    archive = tmp_path / "archive"
    process = start_dqr("run", "--config", kill_job)
    interrupt_mid_retrieval(process, mock_dimse_pacs, archive, signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL
    on_disk = len(archive_files(archive))
    assert 4 <= on_disk < len(EXPECTED)
    assert_every_dcm_is_whole(archive)

    resume(dqr, kill_job, mock_dimse_pacs, archive)
    assert_archive_complete_and_relabeled(archive)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_exits_130_with_a_summary_and_the_rerun_completes(
    signum, kill_job, start_dqr, dqr, mock_dimse_pacs, tmp_path
):
    archive = tmp_path / "archive"
    process = start_dqr("run", "--config", kill_job, "--json")
    interrupt_mid_retrieval(process, mock_dimse_pacs, archive, signum)
    stdout, stderr = process.communicate(timeout=20)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again to resume" in stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True
    assert 0 < summary["instances_stored"] < len(EXPECTED)
    assert_every_dcm_is_whole(archive)

    resume(dqr, kill_job, mock_dimse_pacs, archive)
    assert_archive_complete_and_relabeled(archive)


def test_a_second_stop_signal_stops_at_once_and_the_rerun_completes(
    kill_job, start_dqr, dqr, mock_dimse_pacs, tmp_path
):
    archive = tmp_path / "archive"
    process = start_dqr("run", "--config", kill_job)
    interrupt_mid_retrieval(process, mock_dimse_pacs, archive, signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)
    assert process.returncode == 130
    assert_every_dcm_is_whole(archive)

    resume(dqr, kill_job, mock_dimse_pacs, archive)
    assert_archive_complete_and_relabeled(archive)

