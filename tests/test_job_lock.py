"""One dqr per job: a second `dqr run` on a config whose job is running is
refused at once (exit 2) naming the running one, touching nothing --
`--new-job` included; a lock left by a killed run does not block."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import archive_files
from test_resume_kill import EXPECTED, SLOW, kill_job, start_dqr  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow


def wait_until_storing(process, mock, archive) -> None:
    deadline = time.monotonic() + 30
    while mock.requests["C-GET"] == 0:
        assert process.poll() is None and time.monotonic() < deadline, "dqr never started retrieving"
        time.sleep(0.005)
    mock.faults.delay = SLOW
    while not archive_files(archive):
        assert process.poll() is None and time.monotonic() < deadline, "dqr stored nothing"
        time.sleep(0.005)


def dqr_subprocess(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dqr", *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("extra", [[], ["--new-job"]], ids=["run", "new-job"])
def test_a_second_run_is_refused_while_the_first_runs(kill_job, start_dqr, mock_dimse_pacs, tmp_path, extra):  # noqa: F811
    archive = tmp_path / "archive"
    first = start_dqr("run", "--config", kill_job)
    wait_until_storing(first, mock_dimse_pacs, archive)
    state_files = sorted(p.name for p in tmp_path.glob("archive-job.sqlite*"))

    started = time.monotonic()
    second = dqr_subprocess(tmp_path, "run", "--config", kill_job, *extra)

    assert second.returncode == 2, second.stderr
    assert f"another dqr is running this job (pid {first.pid} on " in second.stderr
    assert "running since" in second.stderr and "Traceback" not in second.stderr
    assert time.monotonic() - started < 15  # at once: it does not wait for the first
    assert first.poll() is None  # the first was not disturbed...
    assert sorted(p.name for p in tmp_path.glob("archive-job.sqlite*")) == state_files  # ...nor its state moved
    mock_dimse_pacs.faults.delay = 0
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert sorted(p.stem for p in archive_files(archive)) == sorted(EXPECTED)


def test_a_lock_left_by_a_killed_run_does_not_block(kill_job, start_dqr, mock_dimse_pacs, tmp_path, dqr):  # noqa: F811
    archive = tmp_path / "archive"
    first = start_dqr("run", "--config", kill_job)
    wait_until_storing(first, mock_dimse_pacs, archive)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    assert json.loads((archive / ".dqr-lock").read_text())["pid"] == first.pid  # left behind

    deadline = time.monotonic() + 40  # the mock ends the dead client's association at its next send
    while mock_dimse_pacs.current_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    mock_dimse_pacs.reset()
    result = dqr("run", "--config", kill_job)

    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in archive_files(archive)) == sorted(EXPECTED)
