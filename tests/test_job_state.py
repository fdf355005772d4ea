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


def _listed(job_state, study="1.2.3"):
    """A study of two selected series (three and two expected instances) and an excluded one."""
    from dqr.model import Series

    job_state.record_listing([
        (Series(study, f"{study}.1", instance_uids=tuple(f"{study}.1.{n}" for n in (1, 2, 3))), True),
        (Series(study, f"{study}.2", instance_uids=(f"{study}.2.1", f"{study}.2.2")), True),
        (Series(study, f"{study}.3", n_instances=7), False),
    ])
    return study


def test_a_series_count_of_stored_instances_follows_every_mark(job_state):
    # PostgreSQL marks and recounts in one statement: instances marked twice,
    # or stored by an earlier mark, are counted once.
    study = _listed(job_state)
    job_state.mark_stored(f"{study}.1", [f"{study}.1.1", f"{study}.1.2"])
    job_state.mark_stored(f"{study}.1", [f"{study}.1.2", f"{study}.1.3", f"{study}.1.3"])
    job_state.mark_stored(f"{study}.2", [f"{study}.2.9"])  # not expected: stored all the same
    stored = dict(job_state._query("SELECT series_uid, stored FROM series WHERE study_uid = ?", study))
    assert stored == {f"{study}.1": 3, f"{study}.2": 1, f"{study}.3": 0}
    job_state.unmark_stored(f"{study}.1", [f"{study}.1.1"])
    assert job_state._query("SELECT stored FROM series WHERE series_uid = ?", f"{study}.1") == [(2,)]


def test_a_study_instances_are_read_in_one_go_as_series_by_series(job_state):
    study = _listed(job_state)
    job_state.mark_stored(f"{study}.2", [f"{study}.2.1"])
    found = job_state.study_instances(study)
    assert set(found) == {f"{study}.1", f"{study}.2", f"{study}.3"}
    assert sorted(found[f"{study}.1"][0]) == sorted(job_state.expected_instances(f"{study}.1"))
    assert found[f"{study}.1"][1] == set()
    assert sorted(found[f"{study}.2"][0]) == [f"{study}.2.1", f"{study}.2.2"]
    assert found[f"{study}.2"][1] == job_state.stored_instances(f"{study}.2") == {f"{study}.2.1"}
    assert found[f"{study}.3"] == (None, set())  # excluded: its instances were never listed


def test_studies_are_planned_and_judged_many_at_a_time_as_one_by_one(job_state):
    from dqr.model import Labels, Study, StudyStatus
    from dqr.state import SeriesCounts

    first, second = _listed(job_state, "1.2.3"), _listed(job_state, "1.2.4")
    job_state.mark_stored(f"{first}.1", [f"{first}.1.1"])
    assert job_state.studies_labels([first, "9.9"]) == {}  # found nowhere yet: not selected
    job_state.select_studies([(Study(first), Labels("S1", "S1_MR"), 2), (Study(second), Labels("S2", "S2_MR"), 3)])
    assert job_state.studies_labels([first, second, "9.9"]) == {
        first: (Labels("S1", "S1_MR"), StudyStatus.SELECTED), second: (Labels("S2", "S2_MR"), StudyStatus.SELECTED)}
    assert job_state.studies_series([first, second, "9.9"]) == {
        first: job_state.known_series(first), second: job_state.known_series(second), "9.9": []}
    assert job_state.studies_instance_counts([first]) == {
        f"{first}.1": SeriesCounts(True, 3, 1), f"{first}.2": SeriesCounts(True, 2, 0),
        f"{first}.3": SeriesCounts(False, 0, 0),
    }
    job_state.set_study_statuses([(first, StudyStatus.STORED, None), (second, StudyStatus.FAILED, "why")])
    assert [job_state.study_status(uid) for uid in (first, second)] == [StudyStatus.STORED, StudyStatus.FAILED]
    assert job_state.failures() == [
        {"kind": "study", "row": 3, "StudyInstanceUID": second, "error": "why", "attempts": 1}]


def test_many_studies_are_read_in_chunks(job_state):
    from dqr.model import Labels, Study

    uids = [f"1.2.{n}" for n in range(1, 1203)]  # more than two chunks of placeholders
    job_state.select_studies([(Study(uid), Labels(f"S{n}", f"S{n}_CT"), n) for n, uid in enumerate(uids)])
    assert len(job_state.studies_labels(uids)) == len(uids)
    assert job_state.studies_labels(uids)[uids[-1]][0] == Labels(f"S{len(uids) - 1}", f"S{len(uids) - 1}_CT")


def test_a_series_listed_again_keeps_its_progress_while_the_filter_selects_it(job_state):
    from dqr.model import Series

    study = _listed(job_state)
    job_state.set_series_status(f"{study}.1", SeriesStatus.STORED)
    again = [(Series(study, f"{study}.1", instance_uids=(f"{study}.1.1",)), True), (Series(study, f"{study}.3"), True)]
    job_state.record_listing(again)
    statuses = {s.series_uid: status for s, status in job_state.known_series(study)}
    assert statuses == {f"{study}.1": SeriesStatus.STORED, f"{study}.2": SeriesStatus.PENDING,
                        f"{study}.3": SeriesStatus.PENDING}
    job_state.record_listing([(Series(study, f"{study}.1"), False)])
    assert job_state.known_series(study)[0][1] == SeriesStatus.EXCLUDED


def test_a_series_a_pacs_lists_twice_is_recorded_once_in_its_first_place(job_state):
    from dqr.model import Series

    study = "1.2.3"
    job_state.record_listing([
        (Series(study, "1.2.3.1", instance_uids=("1.2.3.1.1",)), True),
        (Series(study, "1.2.3.2"), True),
        (Series(study, "1.2.3.1", instance_uids=("1.2.3.1.1", "1.2.3.1.2")), False),
    ])
    assert [(s.series_uid, status) for s, status in job_state.known_series(study)] == [
        ("1.2.3.1", SeriesStatus.EXCLUDED), ("1.2.3.2", SeriesStatus.PENDING)]
    assert job_state.expected_instances("1.2.3.1") == ["1.2.3.1.1"]


def test_a_row_answer_is_recorded_with_its_studies_in_answer_order_each_once(job_state):
    from dqr.model import RowOutcome, RowQuery, Study

    rows = [RowQuery(2, {"AccessionNumber": "A1"}, "S1", "S1_CT"), RowQuery(3, {"AccessionNumber": "A2"})]
    input_id = job_state.begin_input("csv", "studies.csv", "fingerprint", rows)
    answered = [Study("1.2.5", accession_number="A1"), Study("1.2.4"), Study("1.2.5", accession_number="A1b")]
    job_state.record_row_matches(input_id, 2, answered, ["a remark", "a remark"])
    job_state.record_row_failure(input_id, 3, "refused")
    first, second = job_state.row_answers(input_id)
    assert [s.study_uid for s in first.studies] == ["1.2.5", "1.2.4"]
    assert first.studies[0].accession_number == "A1b"  # as last answered
    assert (first.outcome, first.notes, first.subject) == (RowOutcome.MATCHED, ("a remark",), "S1")
    assert (second.outcome, second.reason, second.studies) == (RowOutcome.QUERY_FAILED, "refused", [])
