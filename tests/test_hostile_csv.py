"""The CSV query file is untrusted: malformed, oversized or mis-saved files
and formula-looking values are validation errors naming file and line
(exit 2), never a traceback or an exploding fan-out."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dqr.csvquery import read_csv_queries
from dqr.errors import InputError


def write(tmp_path: Path, content: str | bytes, name: str = "q.csv") -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


def problems(tmp_path: Path, content: str | bytes) -> list[str]:
    with pytest.raises(InputError) as error:
        read_csv_queries(write(tmp_path, content))
    return [str(p) for p in error.value.problems]


def test_a_field_over_128_kib_is_a_validation_error_with_its_line(tmp_path):
    [message] = problems(tmp_path, "Patient ID\nP1\n" + "A" * 140_000 + "\n")
    assert "line 3" in message and "128 KiB" in message


def test_a_field_over_128_kib_exits_2_without_a_traceback(tmp_path, dqr):
    result = dqr("validate", "--csv", write(tmp_path, "Patient ID\n" + "A" * 140_000 + "\n"))
    assert result.exit_code == 2
    assert "128 KiB" in result.stderr and "Traceback" not in result.output


def test_a_list_of_more_than_1000_alternatives_is_refused(tmp_path):
    values = "\\".join(f"P{i}" for i in range(1001))
    [message] = problems(tmp_path, f"Patient ID\n{values}\n")
    assert "line 2" in message and "'Patient ID'" in message
    assert "1001 values" in message and "at most 1000" in message


def test_a_50000_item_list_is_refused_quickly(tmp_path):
    values = "\\".join(str(i) for i in range(50_000))
    started = time.monotonic()
    [message] = problems(tmp_path, f"Patient ID\n{values}\n")
    assert time.monotonic() - started < 2
    assert "line 2" in message


def test_lists_whose_combinations_exceed_1000_queries_are_refused(tmp_path):
    ids = "\\".join(f"P{i}" for i in range(40))
    numbers = "\\".join(f"A{i}" for i in range(40))
    [message] = problems(tmp_path, f"Patient ID,Accession Number\n{ids},{numbers}\n")
    assert "line 2" in message and "1600 queries" in message and "at most 1000" in message


def test_a_list_of_1000_alternatives_is_accepted(tmp_path):
    values = "\\".join(f"P{i}" for i in range(1000))
    [row] = read_csv_queries(write(tmp_path, f"Patient ID\n{values}\n"))
    assert row.filters["PatientID"].count("\\") == 999


def test_an_unclosed_quote_names_the_line_it_starts_on(tmp_path):
    [message] = problems(tmp_path, 'Patient ID,Subject\nP1,S1\n"P2,S2\nP3,S3\n')
    assert "line 3" in message and "unbalanced quote" in message and "control character" not in message


def test_a_quote_closed_lines_later_names_the_line_it_starts_on(tmp_path):
    [message] = problems(tmp_path, 'Patient ID,Subject\n"P1,S1\nP2",S2\nP3,S3\n')
    assert "line 2" in message and "unbalanced quote" in message


@pytest.mark.parametrize(("separator", "name"), [(";", "semicolon"), ("\t", "tab")])
def test_a_file_with_another_separator_says_to_save_it_comma_separated(tmp_path, separator, name):
    [message] = problems(tmp_path, f"Patient ID{separator}Subject\nP1{separator}S1\n")
    assert "line 1" in message and f"looks like a {name}-separated file" in message
    assert "save as comma-separated" in message


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom_is_named(tmp_path, encoding):
    [message] = problems(tmp_path, "Patient ID,Subject\nP1,S1\n".encode(encoding))
    assert "line 1" in message and "UTF-16" in message and "UTF-8" in message


def test_utf16_with_bom_is_named(tmp_path):
    [message] = problems(tmp_path, "Patient ID,Subject\nP1,S1\n".encode("utf-16"))
    assert "line 1" in message and "UTF-16" in message and "UTF-8" in message


def test_nul_bytes_in_a_utf8_file_are_refused_with_their_line(tmp_path):
    [message] = problems(tmp_path, b"Patient ID\nP1\nP\x002\n")
    assert "line 3" in message and "NUL" in message


@pytest.mark.parametrize(
    ("header", "value"),
    [("Accession Number", "@SUM(1+1)"), ("Patient ID", "=1+1"), ("Patient ID", "+1"), ("Patient Name", "-A1*2"),
     ("Last Name", "=cmd|' /C calc'!A0"), ("Patient ID", "P1\\=1+1")],
)
def test_a_formula_looking_value_is_refused_naming_line_and_column(tmp_path, header, value):
    [message] = problems(tmp_path, f'{header}\nX0\n"{value}"\n')
    assert "line 3" in message and f"column {header!r}" in message and "formula" in message


def test_a_formula_looking_value_exits_2(tmp_path, dqr):
    result = dqr("validate", "--csv", write(tmp_path, "Accession Number\n@SUM(1+1)\n"))
    assert result.exit_code == 2
    assert "formula" in result.stderr


def test_an_open_ended_date_range_still_starts_with_a_minus(tmp_path):
    [row] = read_csv_queries(write(tmp_path, "Patient ID,Study Date\nP1,-20200101\n"))
    assert row.filters["StudyDate"] == "-20200101"


def test_a_value_neutralised_by_dqr_reads_back_as_written(tmp_path):
    [row] = read_csv_queries(write(tmp_path, "Patient ID,Study Date\nP1,'-20200101\n"))
    assert row.filters["StudyDate"] == "-20200101"


def test_a_neutralised_formula_is_still_refused(tmp_path):
    [message] = problems(tmp_path, "Patient ID\n'=1+1\n")
    assert "formula" in message


@pytest.mark.slow
def test_200000_rows_are_validated_in_seconds(tmp_path):
    body = "".join(f"ACC{i},SUBJ{i},SES{i},20200101\n" for i in range(200_000))
    path = write(tmp_path, "Accession Number,Subject,Session,Study Date\n" + body)
    started = time.monotonic()
    rows = read_csv_queries(path)
    assert len(rows) == 200_000
    assert time.monotonic() - started < 30
