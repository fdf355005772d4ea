"""`dqr run` through the CLI against Orthanc's DICOMweb plugin, the archive
read back; and the same CSV over DIMSE and over DICOMweb giving the same
selection and the same archive."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import archive_files, assert_study_archived_relabeled

from dqr.part10 import dataset_offset
from dqr.plugins.testpacs.memory.synthetic import generate_cohort

pytestmark = pytest.mark.orthanc

PET_STUDY = "0425454454"  # SMITH^JOHN, PAT00001, StudyID 2, CT AC + PET WB, 3 instances each

#: Rows that exercise every kind of filter: accession, patient ID with an
#: open date range and a modality, an accession list, a non-ASCII name, a
#: wildcard name, a closed date range. No study is matched by two rows with
#: different labels (which row's labels win is not this test's subject).
MIXED_CSV = """Accession Number,Patient ID,Study Date,Modality,Last Name,First Name,Subject,Session
0557639308,,,,,,Subj001,Subj001_CT1
,PAT00001,20170101-,PT,,,Subj002,Subj002_PET
0313301265\\0323382483,,,,,,,
,,,,MÜLLER,JÜRGEN,,
,,,,NGUYEN,ANH*,,
,,20160101-20161231,,,,,
"""


def dicomweb_source(orthanc, **keys):
    return {"type": "dicomweb", "url": orthanc.dicomweb_url, **keys}


def dimse_source(orthanc):
    return {"type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port, "called_aet": orthanc.aet}


def test_run_over_dicomweb_archives_the_relabeled_study(dqr, site, write_csv, tmp_path, orthanc):
    queries = write_csv(f"Accession Number,Subject,Session\n{PET_STUDY},Subj042,Subj042_PET\n")
    config = site(source=dicomweb_source(orthanc), csv=str(queries))

    result = dqr("run", "--config", config)

    assert result.exit_code == 0, result.output
    originals = {d.SOPInstanceUID: d for d in generate_cohort(orthanc.cohort_spec) if d.AccessionNumber == PET_STUDY}
    assert_study_archived_relabeled(
        tmp_path / "archive" / "Test" / "Subj042" / "Subj042_PET", originals, "Subj042", "Subj042_PET"
    )


def selected_studies(results_csv: Path) -> list[tuple[str, str, str, str]]:
    with results_csv.open(encoding="utf-8") as handle:
        rows = csv.DictReader(handle)
        return sorted(
            (r["row"], r["subject"], r["session"], r["StudyInstanceUID"]) for r in rows if r["selected"] == "true"
        )


def archive_contents(root: Path) -> dict[str, bytes]:
    """Relative path -> encoded dataset (the file meta may name the sender)."""
    contents = {}
    for path in archive_files(root):
        data = path.read_bytes()
        contents[str(path.relative_to(root))] = data[dataset_offset(data) :]
    return contents


def test_dimse_and_dicomweb_give_the_same_selection_and_archive(dqr, site, write_csv, tmp_path, orthanc):
    queries = str(write_csv(MIXED_CSV))
    outcomes = {}
    for name, source in (("dimse", dimse_source(orthanc)), ("dicomweb", dicomweb_source(orthanc))):
        config = site(source=source, csv=queries, archive=f"archive-{name}")
        result = dqr("run", "--config", config)
        assert result.exit_code == 0, f"{name}: {result.output}"
        outcomes[name] = (
            selected_studies(tmp_path / f"archive-{name}-results.csv"),
            archive_contents(tmp_path / f"archive-{name}"),
        )

    (dimse_selection, dimse_archive), (web_selection, web_archive) = outcomes["dimse"], outcomes["dicomweb"]
    assert web_selection == dimse_selection and len(dimse_selection) >= 8
    assert sorted(web_archive) == sorted(dimse_archive) and len(dimse_archive) > 40
    assert web_archive == dimse_archive
