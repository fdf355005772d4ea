"""The results table is opened in spreadsheets and comes back edited: PACS
values that a spreadsheet would run as formulas are neutralised on writing
and restored exactly on reading, and every column of an edited table is
checked (digits, control characters, lengths, labels) with line and column."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pydicom
import pytest

from dqr.csvquery import read_csv_queries
from dqr.errors import InputError
from dqr.results import read_table

#: PACS values in the cohort's first patient, by study: what a spreadsheet
#: would run, and values that look like dqr's own quoting.
HOSTILE_NAME = '=HYPERLINK("http://evil.example/x","open me")'
HOSTILE_DESCRIPTIONS = ("'=1+1", "'quoted")
HOSTILE_STUDY_ID = "-5"
HOSTILE_ACCESSION = "@A1"


@pytest.fixture(scope="module")
def hostile_pacs(tmp_path_factory) -> Path:
    """A memory PACS folder whose first patient's values start with formula characters."""
    from typer.testing import CliRunner

    from dqr.cli import app

    folder = tmp_path_factory.mktemp("hostile-pacs")
    assert CliRunner().invoke(app, ["demo-data", str(folder), "--patients", "2"]).exit_code == 0
    studies: list[str] = []
    for path in sorted(folder.rglob("*.dcm")):
        dataset = pydicom.dcmread(path)
        if dataset.PatientID != "PAT00000":
            continue
        if dataset.StudyInstanceUID not in studies:
            studies.append(dataset.StudyInstanceUID)
        dataset.PatientName = HOSTILE_NAME
        dataset.StudyDescription = HOSTILE_DESCRIPTIONS[studies.index(dataset.StudyInstanceUID) % 2]
        dataset.StudyID = HOSTILE_STUDY_ID
        dataset.AccessionNumber = HOSTILE_ACCESSION + str(studies.index(dataset.StudyInstanceUID))
        dataset.save_as(path)
    return folder


@pytest.fixture
def results_table(site, write_csv, dqr, tmp_path, hostile_pacs) -> Path:
    """The results table of a query for both patients, as dqr writes it."""
    config = site(source={"type": "memory", "path": str(hostile_pacs)})
    output = tmp_path / "results.csv"
    result = dqr("query", "--config", config, "--csv", write_csv("Patient ID\nPAT00000\nPAT00001\n"), "-o", output)
    assert result.exit_code == 0, result.stderr
    return output


def records(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


def edit(path: Path, line: int, column: str, value: str) -> Path:
    """Set one cell (``line`` is the file's line: 2 is the first data row)."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    rows[line - 1][rows[0].index(column)] = value
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


def table_problems(path: Path) -> list[str]:
    with pytest.raises(InputError) as error:
        read_table(path)
    return [str(p) for p in error.value.problems]


def test_cells_a_spreadsheet_would_run_are_quoted(results_table):
    hostile = [r for r in records(results_table) if r["PatientID"] == "PAT00000"]
    assert hostile and all(r["PatientName"] == "'" + HOSTILE_NAME for r in hostile)
    assert all(r["StudyID"] == "'" + HOSTILE_STUDY_ID for r in hostile)
    assert all(r["AccessionNumber"].startswith("'@A") for r in hostile)
    assert sorted(r["StudyDescription"] for r in hostile) == ["''=1+1", "'quoted"]


def test_no_cell_starts_with_a_formula_character(results_table):
    text = results_table.read_text(encoding="utf-8")
    cells = [cell for row in csv.reader(io.StringIO(text)) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@", "\t", "\r")]


def test_reading_the_table_back_restores_every_value_exactly(results_table):
    hostile = [line.study for line in read_table(results_table) if line.study.patient_id == "PAT00000"]
    assert {s.patient_name for s in hostile} == {HOSTILE_NAME}
    assert {s.study_id for s in hostile} == {HOSTILE_STUDY_ID}
    assert sorted(s.study_description for s in hostile) == sorted(HOSTILE_DESCRIPTIONS)
    assert sorted(s.accession_number for s in hostile) == [HOSTILE_ACCESSION + "0", HOSTILE_ACCESSION + "1"]


def test_a_value_a_spreadsheet_saved_without_the_quote_reads_as_it_is(results_table):
    lines = read_table(edit(results_table, 2, "StudyDescription", "=1+1"))
    assert lines[0].study.study_description == "=1+1"


def test_a_tab_at_the_start_of_a_description_survives_the_round_trip(results_table):
    lines = read_table(edit(results_table, 2, "StudyDescription", "'\tindented"))
    assert lines[0].study.study_description == "\tindented"


def test_the_hostile_table_can_be_retrieved(results_table, site, dqr, hostile_pacs, tmp_path):
    config = site(source={"type": "memory", "path": str(hostile_pacs)})
    result = dqr("retrieve", "--config", config, "--results", results_table)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("value", ["²", "1²", "١٢", "٣"])
def test_a_non_ascii_digit_in_row_names_line_and_column(results_table, value):
    [message] = table_problems(edit(results_table, 3, "row", value))
    assert "line 3" in message and "column 'row'" in message


@pytest.mark.parametrize("column", ["NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"])
@pytest.mark.parametrize("value", ["²", "3²", "٤", "-1", "1e3"])
def test_a_count_that_is_not_ascii_digits_names_line_and_column(results_table, column, value):
    [message] = table_problems(edit(results_table, 2, column, value))
    assert "line 2" in message and f"column {column!r}" in message


def test_a_huge_number_in_row_is_a_validation_error(results_table):
    [message] = table_problems(edit(results_table, 2, "row", "9" * 5000))
    assert "line 2" in message and "column 'row'" in message


@pytest.mark.parametrize("column", ["PatientName", "StudyDescription", "warning", "PatientID", "StudyDate"])
def test_a_control_character_names_line_and_column(results_table, column):
    [message] = table_problems(edit(results_table, 2, column, "x\x1b[31mred"))
    assert "line 2" in message and f"column {column!r}" in message and "control character" in message


def test_an_over_long_value_names_line_and_column(results_table):
    [message] = table_problems(edit(results_table, 2, "StudyDescription", "x" * 20_000))
    assert "line 2" in message and "column 'StudyDescription'" in message and "characters" in message


def test_a_session_label_longer_than_sh_allows_names_the_vr(results_table):
    [message] = table_problems(edit(results_table, 2, "session", "S" * 17))
    assert "line 2" in message and "column 'session'" in message and "SH" in message and "16" in message


def test_a_reserved_windows_name_as_subject_is_refused(results_table):
    [message] = table_problems(edit(results_table, 2, "subject", "aux"))
    assert "line 2" in message and "column 'subject'" in message and "reserved" in message


def test_a_duplicate_column_is_refused(results_table):
    text = results_table.read_text(encoding="utf-8").splitlines()
    text = [line + ",x" for line in text]
    text[0] = text[0].rsplit(",", 1)[0] + ",selected"
    results_table.write_text("\n".join(text) + "\n", encoding="utf-8")
    [message] = table_problems(results_table)
    assert "line 1" in message and "'selected' appears twice" in message


def test_a_semicolon_separated_table_says_to_save_it_comma_separated(results_table):
    text = results_table.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=";", lineterminator="\n").writerows(rows)
    results_table.write_text(buffer.getvalue(), encoding="utf-8")
    [message] = table_problems(results_table)
    assert "semicolon-separated" in message


def test_an_unbalanced_quote_in_the_table_names_its_line(results_table):
    lines = results_table.read_text(encoding="utf-8").splitlines()
    lines[3] = '"' + lines[3]
    results_table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    [message] = table_problems(results_table)
    assert "unbalanced quote starting on line 4" in message


def test_the_edited_table_error_exits_2(results_table, site, dqr, hostile_pacs):
    config = site(source={"type": "memory", "path": str(hostile_pacs)})
    result = dqr("retrieve", "--config", config, "--results", edit(results_table, 2, "row", "²"))
    assert result.exit_code == 2
    assert "column 'row'" in result.stderr


@pytest.fixture
def unreachable_source() -> dict:
    """A DIMSE source on a free loopback port nothing listens on: every query fails at once."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limits = {"retries": 0, "breaker_failures": 1, "breaker_cooldown": 0, "breaker_max_cooldowns": 1}
    return {"type": "dimse", "host": "127.0.0.1", "port": port, "called_aet": "NOBODY", "limits": limits}


def test_the_failures_file_neutralises_cells_and_runs_again_as_it_is(site, write_csv, dqr, tmp_path, unreachable_source):
    config = site(source=unreachable_source)
    result = dqr("run", "--config", config, "--csv", write_csv("Patient ID,Study Date\nP1,-20200101\n"))
    assert result.exit_code == 1, result.stderr
    failures = tmp_path / "archive-failures.csv"
    [row] = records(failures)
    assert row["Study Date"] == "'-20200101"
    [query] = read_csv_queries(failures)
    assert query.filters == {"PatientID": "P1", "StudyDate": "-20200101"}
