"""The archive tells the truth: a file counts as stored only when its bytes
are what its manifest line records under this run's labels; a stray or
differently relabeled file at an instance's path is a conflict naming the
instance by UIDs (never "already stored", never a patient name); and every
stored file has exactly one manifest line, however often a run is killed."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pydicom
import pytest
from conftest import archive_files
from test_resume_kill import EXPECTED, SLOW, kill_job, start_dqr  # noqa: F401 - fixtures

from dqr.manifest import MANIFEST, file_digest
from dqr.plugins.testpacs.memory.synthetic import (
    DEFAULT_COHORT,
    accession_number,
    generate_cohort,
)

COHORT = DEFAULT_COHORT
TARGET = accession_number(COHORT, 0, 0)
STUDY = [d for d in generate_cohort(COHORT) if d.AccessionNumber == TARGET]
FIRST = STUDY[0]
WHERE = f"{FIRST.StudyInstanceUID}/{FIRST.SeriesInstanceUID}/{FIRST.SOPInstanceUID}.dcm"


def manifest_lines(archive: Path) -> list[dict]:
    return [json.loads(line) for path in archive.rglob(MANIFEST) for line in path.read_text().splitlines() if line]


def assert_one_true_line_per_file(archive: Path) -> None:
    lines = manifest_lines(archive)
    by_file = {}
    for path in archive.rglob(MANIFEST):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_file.setdefault(path.parent / record["path"], []).append(record)
    files = archive_files(archive)
    assert sorted(by_file) == sorted(files), "a file without a line, or a line without a file"
    for path, records in by_file.items():
        assert len(records) == 1, f"{path}: {len(records)} lines"
        assert records[0]["sha256"] == file_digest(path)
        assert records[0]["size"] == path.stat().st_size
    assert len(lines) == len(files)


def labelled_csv(write_csv, subject: str = "S1", session: str = "S1_A") -> str:
    return str(write_csv(f"Accession Number,Subject,Session\n{TARGET},{subject},{session}\n"))


def plant_stray(path: Path, **changes) -> bytes:
    """A file at an instance's path: that instance with other content."""
    dataset = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_encoded(FIRST)))
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    dataset.PixelData = bytes(len(dataset.PixelData))
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _encoded(dataset) -> bytes:
    from dqr.plugins.testpacs.memory.synthetic import encode

    return encode(dataset)


def test_the_manifest_has_one_line_per_file_with_its_digest_and_labels(dqr, site, write_csv, tmp_path):
    result = dqr("run", "--config", site(csv=labelled_csv(write_csv)))

    assert result.exit_code == 0, result.output
    assert_one_true_line_per_file(tmp_path / "archive")
    line = manifest_lines(tmp_path / "archive")[0]
    assert line["labels"] == {"subject": "S1", "session": "S1_A", "relabel_subject": True, "relabel_session": True}
    assert set(line["replaced"]) == {"PatientName", "PatientID", "StudyID", "AccessionNumber"}


def test_a_stray_file_at_an_instance_path_is_a_conflict_not_already_stored(dqr, site, write_csv, tmp_path):
    stray = tmp_path / "archive" / "Test" / "S1" / "S1_A" / FIRST.SeriesInstanceUID / f"{FIRST.SOPInstanceUID}.dcm"
    planted = plant_stray(stray, PatientName="S1", PatientID="S1", StudyID="S1_A", AccessionNumber="S1_A")

    result = dqr("run", "--config", site(csv=labelled_csv(write_csv)))

    assert result.exit_code == 1, result.output
    assert f"{WHERE} already exists with different content" in result.stderr
    assert stray.read_bytes() == planted  # not overwritten
    assert "0 studies stored" in result.stderr


def test_an_archived_file_not_relabeled_as_the_new_run_asks_is_a_conflict(dqr, site, write_csv, tmp_path):
    # First job: labels derived from the study's tags, so nothing is relabeled.
    derived = str(write_csv(f"Accession Number\n{TARGET}\n", name="derived.csv"))
    assert dqr("run", "--config", site(csv=derived)).exit_code == 0
    # A new job asks for the same directories, relabeled this time.
    config = site(csv=labelled_csv(write_csv, FIRST.PatientID, FIRST.StudyID))

    result = dqr("run", "--config", config, "--new-job")

    assert result.exit_code == 1, result.output
    assert "is not relabeled as this run asks" in result.stderr
    for path in archive_files(tmp_path / "archive"):
        assert str(pydicom.dcmread(path).PatientName) == str(FIRST.PatientName)  # untouched, and reported


def test_a_storage_failure_names_uids_not_the_patient_name(dqr, site, write_csv, tmp_path):
    from dqr.labels import safe_label

    subject = safe_label(str(FIRST.PatientName), "UNKNOWN")
    session = FIRST.StudyID
    stray = tmp_path / "archive" / "Test" / subject / session / FIRST.SeriesInstanceUID / f"{FIRST.SOPInstanceUID}.dcm"
    plant_stray(stray)
    config = site(csv=str(write_csv(f"Accession Number\n{TARGET}\n")), subject_label="PatientName")

    result = dqr("run", "--config", config)

    assert result.exit_code == 1, result.output
    assert WHERE in result.stderr
    failures = (tmp_path / "archive-failures.csv").read_text()
    for name_part in filter(None, str(FIRST.PatientName).split("^")):
        assert name_part not in result.stderr
        assert name_part not in failures


def test_files_kept_after_the_job_state_is_lost_are_trusted_by_their_digest(dqr, site, write_csv, tmp_path):
    config = site(csv=labelled_csv(write_csv))
    assert dqr("run", "--config", config).exit_code == 0

    result = dqr("run", "--config", config, "--new-job", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["instances_stored"] == 0  # found and proven, not fetched again
    assert_one_true_line_per_file(tmp_path / "archive")


@pytest.mark.slow
def test_after_repeated_sigkill_every_file_has_exactly_one_manifest_line(
    kill_job, start_dqr, dqr, mock_dimse_pacs, tmp_path  # noqa: F811
):
    archive = tmp_path / "archive"
    for _ in range(3):
        process = start_dqr("run", "--config", kill_job)
        before = len(archive_files(archive))
        deadline = time.monotonic() + 30
        mock_dimse_pacs.faults.delay = SLOW
        while len(archive_files(archive)) < before + 3:
            assert process.poll() is None and time.monotonic() < deadline, "dqr stored nothing"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=10) == -signal.SIGKILL
        process.communicate(timeout=10)
        if len(archive_files(archive)) >= len(EXPECTED) - 4:
            break

    deadline = time.monotonic() + 40  # a dead client's association ends at the mock's next send or timeout
    while mock_dimse_pacs.current_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    mock_dimse_pacs.reset()
    result = dqr("run", "--config", kill_job)
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in archive_files(archive)) == sorted(EXPECTED)
    assert_one_true_line_per_file(archive)
