"""The job state and the archive across runs: resume, conflicts, provenance
of failures -- on the memory PACS, through the CLI -- and the job state's
own guarantees, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import sqlite3

import pydicom
import pytest
from conftest import archive_files

from dqr.model import SeriesStatus

CT_STUDY = "0557639308"
MR_STUDY = "0731707651"


def test_a_resumed_run_stores_only_what_is_missing(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n")))
    dqr("run", "--config", config)
    victims = archive_files(tmp_path / "archive")[:2]
    for path in victims:
        path.unlink()
    with sqlite3.connect(tmp_path / "archive-job.sqlite") as db:  # as if killed before these were reported
        db.executemany("UPDATE instances SET stored = 0 WHERE sop_uid = ?", [(p.stem,) for p in victims])
        db.execute("UPDATE studies SET status = 'retrieving'")
        db.execute("UPDATE series SET status = 'retrieving'")
    summary = json.loads(dqr("run", "--config", config, "--json").stdout)
    assert summary["instances_stored"] == 2
    assert len(archive_files(tmp_path / "archive")) == 6


def test_files_an_interrupted_run_wrote_but_did_not_report_are_kept_not_refetched(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n")))
    dqr("run", "--config", config)
    with sqlite3.connect(tmp_path / "archive-job.sqlite") as db:
        db.execute("UPDATE instances SET stored = 0")
        db.execute("UPDATE studies SET status = 'retrieving'")
        db.execute("UPDATE series SET status = 'retrieving'")
    summary = json.loads(dqr("run", "--config", config, "--json").stdout)
    assert summary["instances_stored"] == 0 and summary["studies_stored"] == 1


def test_stale_temporary_files_are_removed_by_the_next_run(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n")))
    dqr("run", "--config", config)
    series_dir = archive_files(tmp_path / "archive")[0].parent
    (series_dir / ".1.2.3.dcm.999.1.dqr-tmp").write_bytes(b"half")
    with sqlite3.connect(tmp_path / "archive-job.sqlite") as db:
        db.execute("UPDATE studies SET status = 'retrieving'")
        db.execute("UPDATE series SET status = 'retrieving'")
    dqr("run", "--config", config)
    assert list(series_dir.glob("*.dqr-tmp")) == []


def test_a_different_file_already_in_the_archive_is_never_overwritten(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n")))
    dqr("run", "--config", config)
    target = archive_files(tmp_path / "archive")[0]
    target.write_bytes(b"someone else's file")
    with sqlite3.connect(tmp_path / "archive-job.sqlite") as db:
        db.execute("DELETE FROM instances")
        db.execute("UPDATE series SET status = 'pending', expected = NULL")
        db.execute("UPDATE studies SET status = 'selected'")
    result = dqr("run", "--config", config)
    assert result.exit_code == 1
    assert "already exists with different content" in result.stderr
    assert target.read_bytes() == b"someone else's file"


def test_a_study_already_stored_under_other_labels_is_not_stored_again(site, write_csv, dqr, tmp_path):
    first = write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n", "first.csv")
    second = write_csv(f"Accession Number,Subject\n{CT_STUDY},S2\n", "second.csv")
    config = site()
    dqr("run", "--config", config, "--csv", first)
    result = dqr("run", "--config", config, "--csv", second)
    assert result.exit_code == 1
    assert "already stored as S1/1" in result.stderr
    assert not (tmp_path / "archive" / "Test" / "S2").exists()


def test_state_of_another_project_is_refused_with_the_reason(site, write_csv, dqr, tmp_path):
    csv_path = write_csv(f"Accession Number\n{CT_STUDY}\n")
    dqr("run", "--config", site(csv=str(csv_path)))
    result = dqr("run", "--config", site(csv=str(csv_path), project="Other"))
    assert result.exit_code == 2
    assert "project was 'Test', now 'Other'" in result.stderr


def test_new_job_sets_the_old_state_aside(site, write_csv, dqr, tmp_path):
    csv_path = write_csv(f"Accession Number\n{CT_STUDY}\n")
    dqr("run", "--config", site(csv=str(csv_path)))
    result = dqr("run", "--config", site(csv=str(csv_path), project="Other"), "--new-job")
    assert result.exit_code == 0
    assert len(list(tmp_path.glob("archive-job.sqlite.*"))) == 1


def test_status_counts_the_job_by_state(site, write_csv, dqr):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\nNOPE\n")))
    dqr("run", "--config", config)
    status = json.loads(dqr("status", "--config", config, "--json").stdout)
    assert status["counts"]["rows"] == {"queried": 2}
    assert status["counts"]["studies"] == {"stored": 1}
    assert status["counts"]["instances"] == {"stored": 6}


def test_status_without_a_job_says_so(site, dqr):
    result = dqr("status", "--config", site())
    assert result.exit_code == 0 and "no job yet" in result.stderr


def test_the_failures_csv_keeps_the_input_rows_verbatim_with_a_reason(site, write_csv, dqr, tmp_path):
    first = write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n", "first.csv")
    second = write_csv(f'Accession Number,Subject\n"{CT_STUDY}",S2\n{MR_STUDY},S3\n', "second.csv")
    config = site()
    dqr("run", "--config", config, "--csv", first)
    dqr("run", "--config", config, "--csv", second)
    with open(tmp_path / "archive-failures.csv", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["Accession Number", "Subject", "reason"]
    assert rows[1][:2] == [CT_STUDY, "S2"] and "already stored as S1/1" in rows[1][2]
    assert len(rows) == 2


def test_the_failures_csv_can_be_run_as_it_is(site, write_csv, dqr, tmp_path):
    config = site()
    dqr("run", "--config", config, "--csv", write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n", "a.csv"))
    dqr("run", "--config", config, "--csv", write_csv(f"Accession Number,Subject\n{CT_STUDY},S2\n", "b.csv"))
    result = dqr("validate", "--csv", tmp_path / "archive-failures.csv")
    assert result.exit_code == 0


def test_a_retrieval_window_that_is_open_now_does_not_wait(site, write_csv, dqr, tmp_path):
    config = site(
        csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")),
        limits={"retrieve_window": "00:00-23:59:59", "backoff_initial": 0.01},
    )
    result = dqr("run", "--config", config)
    assert result.exit_code == 0 and "waiting until" not in result.stderr


def test_a_malformed_retrieval_window_is_a_config_error(site, dqr, write_csv):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")), limits={"retrieve_window": "7pm-7am"})
    result = dqr("run", "--config", config)
    assert result.exit_code == 2 and "HH:MM-HH:MM" in result.stderr


def test_relabeled_files_keep_their_sop_instance_uid_as_file_name(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n")))
    dqr("run", "--config", config)
    for path in archive_files(tmp_path / "archive"):
        assert path.stem == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


@pytest.fixture(params=["sqlite", "postgresql"])
def job_state(request, tmp_path):
    """An empty job state of each kind: the local executor's SQLite file and
    the queue executor's PostgreSQL schema."""
    from dqr.state import JobState, PostgresJobState

    if request.param == "sqlite":
        state = JobState(tmp_path / "job.sqlite")
    else:
        state = PostgresJobState(request.getfixturevalue("postgres_url"))
    yield state
    state.close()


def test_a_study_listing_is_recorded_whole_or_not_at_all(job_state):
    # A study that knows some of its series is never listed again: a run
    # killed halfway through recording them left it failing for ever as
    # "incomplete". A failure on the third series here stands for the kill.
    from dqr.model import Series

    study = "1.2.3"
    listing = [
        (Series(study, "1.2.3.1", instance_uids=("1.2.3.1.1", "1.2.3.1.2")), True),
        (Series(study, "1.2.3.2"), False),
        (Series(None, "1.2.3.3"), True),  # type: ignore[arg-type]  # NOT NULL: the write fails
    ]
    with pytest.raises(Exception):  # noqa: B017, PT011 - sqlite3's or psycopg's integrity error
        job_state.record_listing(listing)
    assert job_state.known_series(study) == []
    assert job_state.expected_instances("1.2.3.1") is None

    job_state.record_listing(listing[:2])
    assert [(s.series_uid, status) for s, status in job_state.known_series(study)] == [
        ("1.2.3.1", SeriesStatus.PENDING), ("1.2.3.2", SeriesStatus.EXCLUDED),
    ]
    assert sorted(job_state.expected_instances("1.2.3.1")) == ["1.2.3.1.1", "1.2.3.1.2"]
