"""The CSV query file's rules (XNAT DQR's Import CSV), each with a passing
and a failing example, through the public parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dqr.csvquery import read_csv_queries
from dqr.errors import InputError


def parse(tmp_path: Path, text: str | bytes):
    path = tmp_path / "q.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return read_csv_queries(path)


def problems(tmp_path: Path, text: str | bytes) -> list[str]:
    with pytest.raises(InputError) as caught:
        parse(tmp_path, text)
    return [str(p) for p in caught.value.problems]


# -- headers ---------------------------------------------------------------------


def test_reference_example_is_accepted(tmp_path):
    rows = parse(tmp_path, "Accession Number,Subject,Session\n25175352,Subj001,Subj001_MR1\n")
    assert rows[0].filters == {"AccessionNumber": "25175352"}
    assert (rows[0].subject, rows[0].session) == ("Subj001", "Subj001_MR1")


def test_headers_may_come_in_any_order(tmp_path):
    rows = parse(tmp_path, "Session,Modality,Study Date,Subject\nS1,PT,20110331,Subj002\n")
    assert rows[0].filters == {"ModalitiesInStudy": "PT", "StudyDate": "20110331"}


def test_every_search_header_maps_to_its_dicom_keyword(tmp_path):
    text = (
        "Accession Number,Study Date,Patient ID,Patient Name,DOB,Modality,Study Instance UID\n"
        "A1,20210101,P1,DOE^JANE,19800101,MR,1.2.3\n"
    )
    assert parse(tmp_path, text)[0].filters == {
        "AccessionNumber": "A1",
        "StudyDate": "20210101",
        "PatientID": "P1",
        "PatientName": "DOE^JANE",
        "PatientBirthDate": "19800101",
        "ModalitiesInStudy": "MR",
        "StudyInstanceUID": "1.2.3",
    }


def test_misspelt_header_is_named_with_the_closest_valid_one(tmp_path):
    [message] = problems(tmp_path, "Accesion Number\n123\n")
    assert "line 1" in message and "'Accesion Number'" in message and "did you mean 'Accession Number'" in message


def test_dicom_keyword_as_header_suggests_the_csv_header(tmp_path):
    [message] = problems(tmp_path, "PatientID\nP1\n")
    assert "did you mean 'Patient ID'" in message


def test_a_header_row_without_search_header_is_refused(tmp_path):
    [message] = problems(tmp_path, "Subject,Session\nS1,S2\n")
    assert "no search header" in message


def test_remapping_the_study_instance_uid_is_refused_with_the_reason(tmp_path):
    found = problems(tmp_path, "Accession Number,New Study Instance UID\nA1,1.2.3\n")
    assert any("remapping the Study Instance UID is not supported" in m for m in found)


def test_duplicate_header_is_refused(tmp_path):
    assert any("appears twice" in m for m in problems(tmp_path, "Patient ID,Patient ID\nA,B\n"))


def test_empty_file_is_refused(tmp_path):
    assert "empty" in problems(tmp_path, "")[0]


# -- rows ------------------------------------------------------------------------


def test_each_row_needs_a_search_value(tmp_path):
    [message] = problems(tmp_path, "Accession Number,Subject\n,S1\n")
    assert "line 2" in message and "no search value" in message


def test_several_values_in_a_row_are_all_kept_for_an_and_query(tmp_path):
    rows = parse(tmp_path, "Modality,Study Date\nPT,20110331\n")
    assert len(rows[0].filters) == 2


def test_blank_search_values_are_left_out(tmp_path):
    rows = parse(tmp_path, "Accession Number,Patient ID\n,P1\n")
    assert rows[0].filters == {"PatientID": "P1"}


def test_entirely_blank_rows_are_skipped(tmp_path):
    rows = parse(tmp_path, "Patient ID\nP1\n,\n\nP2\n\n\n")
    assert [r.filters["PatientID"] for r in rows] == ["P1", "P2"]


def test_rows_carry_their_csv_line_number(tmp_path):
    rows = parse(tmp_path, "Patient ID\nP1\n\nP2\n")
    assert [r.line for r in rows] == [2, 4]


def test_extra_values_beyond_the_header_are_refused(tmp_path):
    assert "3 values but the header has 2 columns" in problems(tmp_path, "Patient ID,Subject\nP1,S1,oops\n")[0]


# -- encoding and layout -----------------------------------------------------------


def test_utf8_with_bom_and_crlf_is_accepted(tmp_path):
    rows = parse(tmp_path, "\ufeffPatient Name,Subject\r\nMÜLLER^JÜRGEN,S1\r\n".encode())
    assert rows[0].filters == {"PatientName": "MÜLLER^JÜRGEN"}


def test_quoted_fields_and_spaces_around_values_are_accepted(tmp_path):
    rows = parse(tmp_path, 'Patient Name , Subject\n  "DOE^JANE"  , " S1 "\n')
    assert rows[0].filters == {"PatientName": "DOE^JANE"} and rows[0].subject == "S1"


def test_non_utf8_file_is_refused_with_its_line(tmp_path):
    [message] = problems(tmp_path, "Patient Name\nM\xfcller\n".encode("latin-1"))
    assert "line 2" in message and "UTF-8" in message


# -- values ------------------------------------------------------------------------


def test_leading_zeros_are_kept(tmp_path):
    rows = parse(tmp_path, "Accession Number,Patient ID\n0012345,000042\n")
    assert rows[0].filters == {"AccessionNumber": "0012345", "PatientID": "000042"}


@pytest.mark.parametrize("value", ["2.5175352E+07", "25175352.0"])
def test_values_mangled_by_a_spreadsheet_are_refused_with_the_likely_cause(tmp_path, value):
    [message] = problems(tmp_path, f"Accession Number\n{value}\n")
    assert "spreadsheet" in message and "column 'Accession Number'" in message


def test_a_date_is_yyyymmdd_and_a_real_calendar_date(tmp_path):
    assert parse(tmp_path, "Study Date\n20200229\n")[0].filters["StudyDate"] == "20200229"
    assert "not a calendar date" in problems(tmp_path, "Study Date\n20210229\n")[0]


@pytest.mark.parametrize("value", ["20210301-20210331", "-20210331", "20210301-"])
def test_date_ranges_and_open_ended_ranges_are_accepted(tmp_path, value):
    assert parse(tmp_path, f"Study Date\n{value}\n")[0].filters["StudyDate"] == value


def test_a_date_range_must_not_end_before_it_starts(tmp_path):
    assert "starts after it ends" in problems(tmp_path, "Study Date\n20210331-20210301\n")[0]


def test_wildcards_cannot_be_used_with_dates(tmp_path):
    assert "wildcards cannot be used with dates" in problems(tmp_path, "DOB\n1980*\n")[0]


def test_lists_cannot_be_used_with_dates(tmp_path):
    assert "lists" in problems(tmp_path, "Study Date\n20210101\\20210102\n")[0]


def test_a_reformatted_date_gets_the_yyyymmdd_it_probably_meant(tmp_path):
    assert "20210331" in problems(tmp_path, "Study Date\n3/31/2021\n")[0]


@pytest.mark.parametrize("value", ["LASTNAME*", "*FIRSTNAME", "L*NAME", "D?E^JANE"])
def test_wildcards_are_accepted_in_strings(tmp_path, value):
    assert parse(tmp_path, f"Patient Name\n{value}\n")[0].filters["PatientName"] == value


def test_backslash_separates_several_values(tmp_path):
    rows = parse(tmp_path, "Accession Number\n25175352\\8701449723783444\n")
    assert rows[0].filters["AccessionNumber"] == "25175352\\8701449723783444"


def test_an_empty_value_in_a_list_is_refused(tmp_path):
    assert "empty value" in problems(tmp_path, "Accession Number\nA1\\\n")[0]


def test_last_and_first_name_combine_into_a_patient_name(tmp_path):
    rows = parse(tmp_path, "Last Name,First Name\nSMITH,JOHN\nSMITH,\n,JOHN\n")
    assert [r.filters["PatientName"] for r in rows] == ["SMITH^JOHN", "SMITH^*", "*^JOHN"]


def test_patient_name_and_name_parts_together_are_refused(tmp_path):
    assert "either 'Patient Name' or 'Last Name'" in problems(tmp_path, "Patient Name,Last Name\nA,B\n")[0]


def test_a_lower_case_modality_is_refused_with_the_upper_case_code(tmp_path):
    assert "write 'MR'" in problems(tmp_path, "Modality\nmr\n")[0]


def test_a_study_instance_uid_must_be_a_uid(tmp_path):
    assert parse(tmp_path, "Study Instance UID\n1.2.840.1\\1.2.840.2\n")
    assert "not a UID" in problems(tmp_path, "Study Instance UID\n1.02.3\n")[0]
    assert "wildcards cannot be used with UIDs" in problems(tmp_path, "Study Instance UID\n1.2.*\n")[0]


def test_an_accession_number_longer_than_dicom_allows_is_refused(tmp_path):
    assert "16 characters" in problems(tmp_path, "Accession Number\n12345678901234567\n")[0]


# -- labels ------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["Subj 1", "a/b", "a\\b", "..", ".", "naïve", "x;rm"])
def test_unsafe_labels_are_refused_naming_row_and_column(tmp_path, label):
    [message] = problems(tmp_path, f'Patient ID,Subject\nP1,"{label}"\n')
    assert "line 2" in message and "column 'Subject'" in message


def test_labels_are_trimmed(tmp_path):
    rows = parse(tmp_path, "Patient ID,Subject,Session\nP1,  Subj_1.a-b  ,S1\n")
    assert rows[0].subject == "Subj_1.a-b"


# -- all at once -------------------------------------------------------------------


def test_every_problem_is_reported_at_once(tmp_path):
    text = "Accession Number,Study Date,Subject\n1.5E+07,20211301,ok\nA2,20210101,bad label\n,,S\n"
    found = problems(tmp_path, text)
    assert len(found) == 4
    assert [re.search(r"line \d+", m).group() for m in found] == ["line 2", "line 2", "line 3", "line 4"]


def test_failures_csv_reason_column_is_ignored_so_it_can_be_run_again(tmp_path):
    rows = parse(tmp_path, "Patient ID,reason\nP1,timed out\n")
    assert rows[0].filters == {"PatientID": "P1"}
