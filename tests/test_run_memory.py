"""`dqr run`, `query` and `retrieve` end to end through the CLI, on the
in-memory PACS: what ends up in the archive, and what the user is told."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pydicom
import pytest
from conftest import archive_files

from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort

CT_STUDY = "0557639308"  # DOE^JANE, PAT00000, StudyID 1, CT: Localizer + Axial 5mm, 3 instances each
MR_STUDY = "0731707651"  # DOE^JANE, PAT00000, StudyID 2, MR: 3 series
PET_STUDY = "0425454454"  # SMITH^JOHN, PAT00001, StudyID 2, CT AC + PET WB


def read_results(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_run_stores_the_study_relabeled_under_subject_and_session(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject,Session\n{CT_STUDY},Subj001,Subj001_CT\n")))
    assert dqr("run", "--config", config).exit_code == 0
    files = archive_files(tmp_path / "archive" / "Test" / "Subj001" / "Subj001_CT")
    assert len(files) == 6
    dataset = pydicom.dcmread(files[0])
    assert (str(dataset.PatientName), dataset.PatientID) == ("Subj001", "Subj001")
    assert (dataset.StudyID, dataset.AccessionNumber) == ("Subj001_CT", "Subj001_CT")


def test_relabeling_changes_nothing_else_and_pixel_data_is_byte_identical(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject,Session\n{CT_STUDY},Subj001,S1\n")))
    dqr("run", "--config", config)
    originals = {d.SOPInstanceUID: d for d in generate_cohort(CohortSpec(patients=4))}
    for path in archive_files(tmp_path / "archive"):
        stored = pydicom.dcmread(path)
        original = originals[stored.SOPInstanceUID]
        changed = {e.keyword for e in stored if e.tag in original and e.value != original[e.tag].value}
        assert changed == {"PatientName", "PatientID", "StudyID", "AccessionNumber"}
        assert stored.PixelData == original.PixelData
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


def test_archive_layout_is_project_subject_session_series_instance(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject,Session\n{CT_STUDY},Subj001,S1\n")))
    dqr("run", "--config", config)
    path = archive_files(tmp_path / "archive")[0]
    dataset = pydicom.dcmread(path)
    relative = path.relative_to(tmp_path / "archive")
    assert relative.parts == ("Test", "Subj001", "S1", dataset.SeriesInstanceUID, f"{dataset.SOPInstanceUID}.dcm")


def test_the_manifest_keeps_the_original_values_relabeling_replaced(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject,Session\n{CT_STUDY},Subj001,S1\n")))
    dqr("run", "--config", config)
    manifest = tmp_path / "archive" / "Test" / "Subj001" / "S1" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 6
    assert records[0]["replaced"] == {
        "PatientName": "DOE^JANE",
        "PatientID": "PAT00000",
        "StudyID": "1",
        "AccessionNumber": CT_STUDY,
    }


def test_without_labels_the_dicom_is_unchanged_and_directories_follow_the_rules(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number\n{MR_STUDY}\n")))
    dqr("run", "--config", config)
    files = archive_files(tmp_path / "archive" / "Test" / "PAT00000" / "2")
    assert len(files) == 9
    assert str(pydicom.dcmread(files[0]).PatientName) == "DOE^JANE"


def test_session_label_rule_accession_number(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject\n{MR_STUDY},S9\n")), session_label="AccessionNumber")
    dqr("run", "--config", config)
    dataset = pydicom.dcmread(archive_files(tmp_path / "archive" / "Test" / "S9" / MR_STUDY)[0])
    assert dataset.AccessionNumber == MR_STUDY  # a derived session label relabels nothing


def test_series_are_chosen_by_description_globs_from_the_config(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")), series={"exclude": ["LOCALIZER"]})
    dqr("run", "--config", config)
    assert {pydicom.dcmread(p).SeriesDescription for p in archive_files(tmp_path / "archive")} == {"Axial 5mm"}


def test_the_summary_says_how_many_series_the_filter_left_out(site, write_csv, dqr):
    # The plan counts what the PACS holds; without this line a user reads
    # fewer instances stored than announced as instances lost.
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")), series={"exclude": ["LOCALIZER"]})
    result = dqr("run", "--config", config)
    assert "1 studies selected (2 series, 6 instances on the PACS)" in result.output
    assert "1 studies stored (3 instances, " in result.output
    assert "; 1 series left out by the series filter" in result.output


def test_series_include_on_the_command_line(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number\n{MR_STUDY}\n")))
    dqr("run", "--config", config, "--include", "t? *")
    assert {pydicom.dcmread(p).SeriesDescription for p in archive_files(tmp_path / "archive")} == {"T1 SAG", "T2 AX"}


def test_a_list_of_accession_numbers_is_fanned_out_and_merged(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\\{MR_STUDY}\n")))
    dqr("run", "--config", config)
    assert [r["AccessionNumber"] for r in read_results(tmp_path / "archive-results.csv")] == [CT_STUDY, MR_STUDY]


def test_results_table_has_the_documented_columns(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")))
    dqr("run", "--config", config)
    header = (tmp_path / "archive-results.csv").read_text().splitlines()[0]
    assert header == (
        "row,selected,subject,session,StudyInstanceUID,PatientID,PatientName,PatientBirthDate,StudyDate,"
        "AccessionNumber,ModalitiesInStudy,StudyDescription,StudyID,NumberOfStudyRelatedSeries,"
        "NumberOfStudyRelatedInstances,warning"
    )


def test_a_row_with_no_match_is_reported_in_the_table_and_summary(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv("Accession Number\nNOPE\n")))
    result = dqr("run", "--config", config)
    assert result.exit_code == 0
    assert "rows with no match (1): 2" in result.stderr
    [line] = read_results(tmp_path / "archive-results.csv")
    assert (line["selected"], line["warning"]) == ("false", "no study matched")


def test_a_labelled_row_matching_several_studies_is_ambiguous_and_not_selected(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv("Patient ID,Subject\nPAT00000,S1\n")))
    result = dqr("run", "--config", config)
    assert "ambiguous rows" in result.stderr
    assert [r["selected"] for r in read_results(tmp_path / "archive-results.csv")] == ["false", "false"]
    assert archive_files(tmp_path / "archive") == []


def test_select_all_retrieves_every_study_of_an_ambiguous_row(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv("Patient ID,Subject\nPAT00000,S1\n")))
    dqr("run", "--config", config, "--select", "all")
    assert len(archive_files(tmp_path / "archive")) == 15


def test_a_study_matched_by_two_rows_is_retrieved_once(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Patient ID\n{CT_STUDY},\n,PAT00000\n")))
    dqr("run", "--config", config)
    lines = read_results(tmp_path / "archive-results.csv")
    again = [line for line in lines if line["AccessionNumber"] == CT_STUDY and line["row"] == "3"]
    assert again[0]["selected"] == "false" and "also matched by row 2" in again[0]["warning"]
    assert len(archive_files(tmp_path / "archive")) == 15


def test_two_studies_that_would_share_labels_are_not_stored(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject,Session\n{CT_STUDY},S1,X\n{MR_STUDY},S1,X\n")))
    result = dqr("run", "--config", config)
    assert "label collisions" in result.stderr
    assert all("label collision" in r["warning"] for r in read_results(tmp_path / "archive-results.csv"))
    assert archive_files(tmp_path / "archive") == []


def test_a_second_run_fetches_nothing_again(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n")), json=None) if False else site(
        csv=str(write_csv(f"Accession Number,Subject\n{CT_STUDY},S1\n"))
    )
    dqr("run", "--config", config)
    second = dqr("run", "--config", config, "--json")
    summary = json.loads(second.stdout)
    assert (summary["instances_stored"], summary["studies_already_stored"]) == (0, 1)


def test_json_summary_is_machine_readable(site, write_csv, dqr):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\nNOPE\n")))
    summary = json.loads(dqr("run", "--config", config, "--json").stdout)
    assert summary["studies_stored"] == 1 and summary["instances_stored"] == 6
    assert summary["rows_without_match"] == [3]


# -- invalid input: exit 2, nothing queried or written --------------------------------


def test_an_invalid_csv_exits_2_listing_every_problem_and_writes_nothing(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv("Accession Number,Subject\n1E+5,ok\nA1,bad/label\n")))
    result = dqr("run", "--config", config)
    assert result.exit_code == 2
    assert "2 problems found; nothing was queried" in result.stderr
    assert "line 2" in result.stderr and "line 3" in result.stderr
    assert not (tmp_path / "archive").exists() and not (tmp_path / "archive-job.sqlite").exists()


def test_an_unknown_config_key_exits_2_with_its_line_and_the_closest_key(site, dqr, tmp_path):
    config = site(sesion_label="StudyID")
    result = dqr("run", "--config", config, "--csv", tmp_path / "none.csv")
    assert result.exit_code == 2
    assert "line 11" in result.stderr and "did you mean 'session_label'" in result.stderr


def test_an_unknown_backend_type_lists_the_available_ones(site, dqr):
    result = dqr("validate", "--csv", __file__, "--config", site(source={"type": "dimsee"}))
    assert result.exit_code == 2
    assert "unknown backend type 'dimsee'" in result.stderr and "did you mean 'dimse'" in result.stderr
    assert "memory" in result.stderr


def test_a_secret_in_the_yaml_is_refused(site, dqr, write_csv):
    source = {"type": "dicomweb", "url": "http://127.0.0.1:1/", "auth": {"type": "basic", "username": "u", "password": "hunter2"}}
    result = dqr("validate", "--csv", write_csv("Patient ID\nP\n"), "--config", site(source=source))
    assert result.exit_code == 2
    assert "secrets never go in the YAML" in result.stderr and "hunter2" not in result.stderr


def test_no_csv_anywhere_is_a_config_error(site, dqr):
    assert dqr("run", "--config", site()).exit_code == 2


# -- query and retrieve with an edited table ---------------------------------------------


def test_query_writes_the_table_and_retrieves_nothing(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")))
    result = dqr("query", "--config", config, "-o", tmp_path / "results.csv")
    assert result.exit_code == 0
    assert read_results(tmp_path / "results.csv")[0]["AccessionNumber"] == CT_STUDY
    assert archive_files(tmp_path) == []


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_query_prints_csv_or_json_to_stdout(site, write_csv, dqr, fmt):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")))
    stdout = dqr("query", "--config", config, "--format", fmt).stdout
    assert CT_STUDY in stdout and (stdout.startswith("row,") if fmt == "csv" else json.loads(stdout))


def test_the_terminal_table_shows_no_patient_names_or_birth_dates(site, write_csv, dqr):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")))
    result = dqr("query", "--config", config)
    assert "DOE" not in result.output and "19801118" not in result.output


def test_query_series_lists_each_studys_series(site, write_csv, dqr):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")))
    output = dqr("query", "--config", config, "--series").stderr
    assert "Localizer" in output and "Axial 5mm" in output


def edit_table(path: Path, **changes_by_accession: dict[str, str]) -> None:
    lines = read_results(path)
    for line in lines:
        line.update(changes_by_accession.get(line["AccessionNumber"], {}))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)


@pytest.mark.parametrize("word", ["yes", "1", "x", "TRUE"])
def test_retrieve_takes_the_lines_selected_in_an_edited_table(site, write_csv, dqr, tmp_path, word):
    config = site(csv=str(write_csv("Patient ID\nPAT00000\n")))
    dqr("query", "--config", config, "-o", tmp_path / "results.csv")
    edit_table(
        tmp_path / "results.csv",
        **{CT_STUDY: {"selected": word, "subject": "Edited", "session": "E1"}, MR_STUDY: {"selected": "no"}},
    )
    assert dqr("retrieve", "--config", config, "--results", tmp_path / "results.csv").exit_code == 0
    files = archive_files(tmp_path / "archive")
    assert len(files) == 6 and str(pydicom.dcmread(files[0]).PatientName) == "Edited"


def test_retrieve_refuses_a_table_with_bad_edits(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv("Patient ID\nPAT00000\n")))
    dqr("query", "--config", config, "-o", tmp_path / "results.csv")
    edit_table(tmp_path / "results.csv", **{CT_STUDY: {"selected": "maybe", "session": "../x"}})
    result = dqr("retrieve", "--config", config, "--results", tmp_path / "results.csv")
    assert result.exit_code == 2
    assert "column 'selected'" in result.stderr and "column 'session'" in result.stderr


# -- other commands ----------------------------------------------------------------------


def test_validate_reports_a_valid_csv(dqr, write_csv):
    result = dqr("validate", "--csv", write_csv("Accession Number\nA\\B\n"))
    assert result.exit_code == 0 and "1 rows, 2 queries" in result.stderr


def test_plugins_lists_backend_types(dqr):
    result = dqr("plugins")
    assert result.exit_code == 0 and "memory" in result.stdout and "archive" in result.stdout


def test_echo_describes_the_memory_pacs(site, dqr):
    result = dqr("echo", "--config", site())
    assert result.exit_code == 0 and "in-memory PACS with 57 instances" in result.stderr


def test_a_study_matched_by_an_unlabelled_and_a_labelled_row_goes_to_the_labelled_one(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Patient ID,Accession Number,Subject,Session\nPAT00000,,,\n,{CT_STUDY},S1,CT1\n")))
    dqr("run", "--config", config)
    lines = read_results(tmp_path / "archive-results.csv")
    unlabelled = next(line for line in lines if line["row"] == "2" and line["AccessionNumber"] == CT_STUDY)
    assert unlabelled["selected"] == "false" and "retrieved once, for row 3" in unlabelled["warning"]
    assert len(archive_files(tmp_path / "archive" / "Test" / "S1" / "CT1")) == 6


def test_requests_per_second_on_the_command_line_paces_the_queries(site, write_csv, dqr):
    rows = "\n".join(["NOPE"] * 6)
    config = site(csv=str(write_csv(f"Accession Number\n{rows}\n")))
    started = time.monotonic()
    assert dqr("query", "--config", config, "--requests-per-second", "10", "--format", "csv").exit_code == 0
    assert time.monotonic() - started >= 0.45  # 6 queries at 10/s: 5 intervals of 0.1 s
