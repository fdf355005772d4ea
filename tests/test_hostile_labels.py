"""Subject and Session labels are written into DICOM (Session -> StudyID and
AccessionNumber, VR SH; Subject -> PatientName and PatientID, VR LO) and
become directory names: they are checked against both."""

from __future__ import annotations

from pathlib import Path

import pytest

from dqr.config import load_config
from dqr.csvquery import read_csv_queries
from dqr.errors import ConfigError, InputError


def csv_problems(tmp_path: Path, subject: str = "S1", session: str = "X1") -> list[str]:
    path = tmp_path / "q.csv"
    path.write_text(f"Patient ID,Subject,Session\nP1,{subject},{session}\n", encoding="utf-8")
    with pytest.raises(InputError) as error:
        read_csv_queries(path)
    return [str(p) for p in error.value.problems]


def parse(tmp_path: Path, subject: str = "S1", session: str = "X1"):
    path = tmp_path / "q.csv"
    path.write_text(f"Patient ID,Subject,Session\nP1,{subject},{session}\n", encoding="utf-8")
    return read_csv_queries(path)


def test_a_session_label_of_16_characters_is_accepted(tmp_path):
    assert parse(tmp_path, session="S" * 16)[0].session == "S" * 16


def test_a_session_label_longer_than_sh_allows_is_refused_naming_the_vr(tmp_path):
    [message] = csv_problems(tmp_path, session="S" * 17)
    assert "line 2" in message and "column 'Session'" in message
    assert "17 characters" in message and "StudyID" in message and "SH" in message and "16" in message


def test_a_subject_label_of_64_characters_is_accepted(tmp_path):
    assert parse(tmp_path, subject="S" * 64)[0].subject == "S" * 64


def test_a_subject_label_longer_than_lo_allows_is_refused_naming_the_vr(tmp_path):
    [message] = csv_problems(tmp_path, subject="S" * 65)
    assert "column 'Subject'" in message and "PatientID" in message and "LO" in message and "64" in message


@pytest.mark.parametrize("label", ["CON", "con", "Nul", "PRN", "AUX", "COM1", "com9", "LPT1", "CON.txt", "aux.tar.gz"])
@pytest.mark.parametrize("column", ["Subject", "Session"])
def test_windows_reserved_names_are_refused(tmp_path, label, column):
    [message] = csv_problems(tmp_path, **{column.lower(): label})
    assert f"column {column!r}" in message and "reserved" in message and "Windows" in message


@pytest.mark.parametrize("label", ["COM10", "CONSOLE", "NULL", "LPT0", "Con1", "PRNx.txt"])
def test_names_that_only_look_reserved_are_accepted(tmp_path, label):
    assert parse(tmp_path, subject=label)[0].subject == label


@pytest.mark.parametrize(("label", "rule"), [("-rf", "starts with '-'"), (".hidden", "starts with '.'"), ("S1.", "ends with '.'")])
def test_labels_a_directory_name_cannot_start_or_end_with_are_refused(tmp_path, label, rule):
    [message] = csv_problems(tmp_path, session=label)
    assert "column 'Session'" in message and rule in message


def test_inner_dots_and_dashes_are_still_accepted(tmp_path):
    row = parse(tmp_path, subject="Subj_1.a-b", session="MR-1.2")[0]
    assert (row.subject, row.session) == ("Subj_1.a-b", "MR-1.2")


@pytest.mark.parametrize("project", ["CON", "-p", ".p", "LPT3.tar"])
def test_the_project_label_follows_the_directory_rules(site, project):
    with pytest.raises(ConfigError) as error:
        load_config(site(project=project))
    assert "project" in str(error.value)


def test_a_project_label_may_be_longer_than_a_session_label(site):
    assert load_config(site(project="P" * 40)).site.project == "P" * 40
