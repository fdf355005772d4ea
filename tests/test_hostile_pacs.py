"""A PACS that misbehaves on purpose (dqr.plugins.testpacs.memory.hostile), over the
memory source, DIMSE C-GET and DICOMweb WADO-RS: UIDs that would be paths,
instances nobody asked for, a twin arriving first. Nothing is written
outside the archive, nothing foreign is relabeled into a subject, and each
refusal is a failure with its reason (exit 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from conftest import archive_files

from dqr.plugins.testpacs.memory.hostile import unrequested_uid
from dqr.plugins.testpacs.memory.synthetic import (
    DEFAULT_COHORT,
    accession_number,
    generate_cohort,
)

COHORT = DEFAULT_COHORT
TARGET = accession_number(COHORT, 0, 0)
STUDY = [d for d in generate_cohort(COHORT) if d.AccessionNumber == TARGET]
FIRST = STUDY[0]  # the first instance of the study's first series: where the faults apply
OTHER_STUDIES = {d.SOPInstanceUID for d in generate_cohort(COHORT) if d.AccessionNumber != TARGET}
TRAVERSAL = "../../../../x"
#: Short enough for pynetdicom to send as an Affected SOP Instance UID (<= 64).
ABSOLUTE = f"/tmp/dqr-hostile-{os.getpid()}"


@pytest.fixture(params=["memory", "c-get", "dicomweb"])
def hostile_source(request, mock_dimse_factory, mock_dicomweb_factory):
    """``hostile_source(**faults)``: a source config serving the default
    cohort with hostile content, in process or over a real protocol."""

    def make(**faults) -> dict:
        faults = {"accession": TARGET, **faults}
        if request.param == "memory":
            return {"type": "memory", "synthetic": {"patients": COHORT.patients}, "hostile": faults}
        if request.param == "c-get":
            server = mock_dimse_factory(faults={"hostile": faults})
            return {
                "type": "dimse", "host": "127.0.0.1", "port": server.port, "called_aet": "MOCKPACS",
                "calling_aet": "DQR", "dimse_timeout": 10, "acse_timeout": 10,
            }
        server = mock_dicomweb_factory(faults={"hostile": faults})
        return {"type": "dicomweb", "url": server.url}

    return make


@pytest.fixture(autouse=True)
def no_absolute_leftover():
    yield
    leftovers = [path for path in (ABSOLUTE, ABSOLUTE + ".dcm") if os.path.lexists(path)]
    for path in leftovers:
        os.unlink(path)
    assert not leftovers, f"written outside the archive: {leftovers}"


def run(dqr, site, write_csv, source) -> object:
    config = site(source=source, csv=str(write_csv(f"Accession Number,Subject,Session\n{TARGET},S1,S1_A\n")))
    return dqr("run", "--config", config)


def outside_archive(tmp_path: Path) -> list[str]:
    """What a run left in its folder besides the archive, the config, the CSV
    and dqr's files beside the archive."""
    expected = {"archive", "site.yaml", "queries.csv", ".archive-job.sqlite.lock"}
    return sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.iterdir()
        if p.name not in expected and not p.name.startswith("archive-")
    )


def test_a_traversing_series_uid_writes_nothing_outside_the_archive(dqr, site, write_csv, tmp_path, hostile_source):
    result = run(dqr, site, write_csv, hostile_source(series_uid=TRAVERSAL))

    assert result.exit_code == 1, result.output
    assert outside_archive(tmp_path) == []
    assert not (tmp_path / "x").exists()
    assert "SeriesInstanceUID '../../../../x' is not a UID" in result.stderr


def test_a_traversing_study_uid_fails_the_row_and_writes_nothing(dqr, site, write_csv, tmp_path, hostile_source):
    result = run(dqr, site, write_csv, hostile_source(study_uid=TRAVERSAL))

    assert result.exit_code == 1, result.output
    assert outside_archive(tmp_path) == []
    assert not (tmp_path / "x").exists()
    assert "StudyInstanceUID '../../../../x' is not a UID" in result.stderr
    assert archive_files(tmp_path / "archive") == []


def test_an_absolute_sop_instance_uid_is_refused_and_the_other_series_stored(dqr, site, write_csv, tmp_path, hostile_source):
    result = run(dqr, site, write_csv, hostile_source(sop_uid=ABSOLUTE))

    assert result.exit_code == 1, result.output
    assert outside_archive(tmp_path) == []
    assert f"SOPInstanceUID '{ABSOLUTE}' is not a UID" in result.stderr
    stored = {p.stem for p in archive_files(tmp_path / "archive")}
    other_series = {d.SOPInstanceUID for d in STUDY if d.SeriesInstanceUID != FIRST.SeriesInstanceUID}
    assert other_series <= stored <= {d.SOPInstanceUID for d in STUDY} - {FIRST.SOPInstanceUID}


@pytest.mark.parametrize(
    "bad", ["1." + "2" * 70, "1.02.3", "1..2", "1.2/3", ".."], ids=["long", "leading-zero", "empty", "slash", "dots"]
)
@pytest.mark.parametrize("key", ["series_uid", "sop_uid"])
def test_a_value_that_is_no_uid_is_refused_with_the_reason(dqr, site, write_csv, tmp_path, key, bad):
    source = {"type": "memory", "synthetic": {"patients": COHORT.patients}, "hostile": {"accession": TARGET, key: bad}}

    result = run(dqr, site, write_csv, source)

    assert result.exit_code == 1, result.output
    assert outside_archive(tmp_path) == []
    assert "is not a UID" in result.stderr
    archive = tmp_path / "archive"
    assert not any(bad in str(p.relative_to(archive)) for p in archive.rglob("*"))


def test_an_instance_of_another_study_is_refused_not_relabeled(dqr, site, write_csv, tmp_path, hostile_source):
    result = run(dqr, site, write_csv, hostile_source(foreign_study=True))

    assert result.exit_code == 1, result.output
    assert "not of the requested study" in result.stderr
    stored = {p.stem for p in archive_files(tmp_path / "archive")}
    assert stored == {d.SOPInstanceUID for d in STUDY}  # the requested ones, and nothing foreign
    assert not stored & OTHER_STUDIES


def test_an_unrequested_instance_is_refused(dqr, site, write_csv, tmp_path, hostile_source):
    result = run(dqr, site, write_csv, hostile_source(unrequested_instance=True))

    assert result.exit_code == 1, result.output
    assert "was not requested" in result.stderr
    stored = {p.stem for p in archive_files(tmp_path / "archive")}
    assert unrequested_uid(FIRST.SOPInstanceUID) not in stored
    assert stored == {d.SOPInstanceUID for d in STUDY}


def test_a_twin_arriving_first_is_a_conflict_naming_the_instance(dqr, site, write_csv, tmp_path, hostile_source):
    result = run(dqr, site, write_csv, hostile_source(twin=True))

    assert result.exit_code == 1, result.output
    where = f"{FIRST.StudyInstanceUID}/{FIRST.SeriesInstanceUID}/{FIRST.SOPInstanceUID}.dcm"
    assert f"{where}: two different instances arrived with this SOP Instance UID" in result.stderr
    for path in archive_files(tmp_path / "archive"):  # neither twin passes for the instance
        assert path.stem != FIRST.SOPInstanceUID
        assert any(pydicom.dcmread(path).PixelData)
    assert "already stored" not in result.stderr
