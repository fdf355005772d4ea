"""`dqr run` through the CLI against a real Orthanc over DIMSE, by C-GET and
by C-MOVE: the archive read back file by file."""

from __future__ import annotations

import re
from contextlib import contextmanager

import pytest
from conftest import assert_study_archived_relabeled

from dqr.plugins.testpacs.memory.synthetic import generate_cohort

pytestmark = pytest.mark.orthanc

PET_STUDY = "0425454454"  # SMITH^JOHN, PAT00001, StudyID 2, CT AC + PET WB, 3 instances each


def dimse_source(orthanc, **keys):
    return {
        "type": "dimse",
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "called_aet": orthanc.aet,
        "calling_aet": "DQR",
        **keys,
    }


@contextmanager
def move_requests(orthanc):
    """The QueryRetrieveLevel of each C-MOVE request Orthanc receives
    meanwhile, read from its verbose log."""
    levels: list[str] = []
    start = orthanc.log_path.stat().st_size
    orthanc.session.put(f"{orthanc.http_url}/tools/log-level", data="verbose", timeout=10).raise_for_status()
    try:
        yield levels
    finally:
        orthanc.session.put(f"{orthanc.http_url}/tools/log-level", data="default", timeout=10).raise_for_status()
        with open(orthanc.log_path, encoding="utf-8", errors="replace") as log:
            log.seek(start)
            text = log.read()
        # "Move-SCU request received ...", then one line per identifier element
        levels += re.findall(r"Move-SCU request received.*\n(?:.*\n)*?.*QueryRetrieveLevel = (\w+)", text)


def run_and_check_archive(dqr, site, write_csv, tmp_path, orthanc, source):
    config = site(
        source=source,
        csv=str(write_csv(f"Accession Number,Subject,Session\n{PET_STUDY},Subj042,Subj042_PET\n")),
    )
    result = dqr("run", "--config", config)
    assert result.exit_code == 0, result.output
    originals = {
        d.SOPInstanceUID: d
        for d in generate_cohort(orthanc.cohort_spec)
        if d.AccessionNumber == PET_STUDY
    }
    assert_study_archived_relabeled(
        tmp_path / "archive" / "Test" / "Subj042" / "Subj042_PET", originals, "Subj042", "Subj042_PET"
    )


def test_run_retrieves_by_c_get(dqr, site, write_csv, tmp_path, orthanc, dimse_transport):
    source = dimse_source(orthanc, retrieve="c-get", transport=dimse_transport)
    run_and_check_archive(dqr, site, write_csv, tmp_path, orthanc, source)


def test_run_retrieves_by_c_move(
    dqr, site, write_csv, tmp_path, orthanc, free_loopback_port, dimse_transport
):
    orthanc.add_modality("dqre2e", "DQRE2E", "127.0.0.1", free_loopback_port)
    source = dimse_source(
        orthanc,
        retrieve="c-move",
        move_destination="DQRE2E",
        store_port=free_loopback_port,
        transport=dimse_transport,
    )
    with move_requests(orthanc) as levels:
        run_and_check_archive(dqr, site, write_csv, tmp_path, orthanc, source)
    assert levels == ["STUDY"]  # both series selected, nothing stored: one C-MOVE

