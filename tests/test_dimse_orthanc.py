"""The dimse backend against a real Orthanc (the ``orthanc`` fixture, seeded
with the default synthetic cohort). See docs/dimse.md for what Orthanc does
differently from the standard and from other PACSes."""

from __future__ import annotations

import pytest

from dqr.errors import RemoteError
from dqr.model import RetrieveRequest, StudyQuery
from dqr.plugins.testpacs.memory.pacs import MemoryPacs
from dqr.plugins.testpacs.memory.synthetic import generate_cohort

pytestmark = pytest.mark.orthanc


@pytest.fixture(scope="module")
def seeded(orthanc) -> MemoryPacs:
    """What the Orthanc was seeded with, indexed (expected values)."""
    return MemoryPacs.from_datasets(generate_cohort(orthanc.cohort_spec))


@pytest.fixture
def backend(orthanc, dimse_backend_factory):
    return dimse_backend_factory(orthanc.dicom_port, called_aet=orthanc.aet)


def studies(backend, **filters):
    return list(backend.query_studies(StudyQuery(1, filters)))


def test_echo(backend, orthanc):
    assert f"{orthanc.aet} at 127.0.0.1:{orthanc.dicom_port}" in backend.echo()


def test_wrong_port_is_refused(orthanc, dimse_backend_factory, closed_loopback_port):
    with pytest.raises(RemoteError, match="refused") as caught:
        dimse_backend_factory(closed_loopback_port, called_aet=orthanc.aet).echo()
    assert caught.value.unreachable


def test_query_by_accession_number(backend, seeded):
    expected = seeded.find("STUDY", {})[5]
    (study,) = studies(backend, AccessionNumber=expected["AccessionNumber"])
    assert study.study_uid == expected["StudyInstanceUID"]
    assert (study.patient_id, study.patient_name, study.patient_birth_date) == (
        expected["PatientID"],
        expected["PatientName"],
        expected["PatientBirthDate"],
    )
    assert (study.study_date, study.study_description, study.study_id) == (
        expected["StudyDate"],
        expected["StudyDescription"],
        expected["StudyID"],
    )
    assert study.modalities == expected["ModalitiesInStudy"]
    assert (study.n_series, study.n_instances) == (
        int(expected["NumberOfStudyRelatedSeries"]),
        int(expected["NumberOfStudyRelatedInstances"]),
    )


def test_wildcard_name_is_case_insensitive_on_orthanc(backend):
    found = studies(backend, PatientName="müller*")
    assert {s.patient_name for s in found} == {"MÜLLER^JÜRGEN"} and len(found) == 2


def test_date_range(backend, seeded):
    dates = sorted(a["StudyDate"] for a in seeded.find("STUDY", {}))
    found = studies(backend, StudyDate=f"{dates[2]}-{dates[5]}")
    assert sorted(s.study_date for s in found) == dates[2:6]


def test_uid_list(backend, seeded):
    uids = sorted(seeded.study_uids())[2:5]
    assert sorted(s.study_uid for s in studies(backend, StudyInstanceUID="\\".join(uids))) == uids


def test_modalities_in_study(backend, seeded):
    expected = {a["StudyInstanceUID"] for a in seeded.find("STUDY", {"ModalitiesInStudy": "PT"})}
    found = studies(backend, ModalitiesInStudy="PT")
    assert {s.study_uid for s in found} == expected
    assert all(set(s.modalities) == {"CT", "PT"} for s in found)


def test_patient_root_query(orthanc, dimse_backend_factory):
    backend = dimse_backend_factory(
        orthanc.dicom_port, called_aet=orthanc.aet, query_model="patient"
    )
    found = studies(backend, PatientName="SMITH*")
    assert {s.patient_id for s in found} == {"PAT00001"} and len(found) == 2


def test_series_query_with_sop_classes(backend, seeded):
    expected = seeded.find("STUDY", {"ModalitiesInStudy": "PT"})[0]
    (study,) = studies(backend, StudyInstanceUID=expected["StudyInstanceUID"])
    series = sorted(backend.query_series(study), key=lambda s: s.number)
    assert [(s.number, s.modality, s.description, s.n_instances) for s in series] == [
        ("1", "CT", "CT AC", 3),
        ("2", "PT", "PET WB", 3),
    ]
    assert [len(s.sop_class_uids) for s in series] == [1, 1]
    assert series[0].sop_class_uids != series[1].sop_class_uids


def _pet_series(backend, seeded):
    expected = seeded.find("STUDY", {"ModalitiesInStudy": "PT"})[0]
    (study,) = studies(backend, StudyInstanceUID=expected["StudyInstanceUID"])
    series = next(s for s in backend.query_series(study) if s.modality == "PT")
    return study, series


def _assert_identical(received, seeded, study, series, uids=None):
    stored = {
        i.sop_instance_uid: i.read_dataset()
        for i in seeded.instances(study.study_uid, series.series_uid, uids)
    }
    assert {r.sop_instance_uid: r.dataset for r in received} == stored


def test_c_get_of_a_series_is_byte_identical(backend, seeded):
    study, series = _pet_series(backend, seeded)
    received = []
    report = backend.retrieve(RetrieveRequest(study, series), received.append)
    _assert_identical(received, seeded, study, series)
    assert (report.completed, report.failed) == (3, 0)


def test_c_get_of_an_instance_subset(backend, seeded):
    study, series = _pet_series(backend, seeded)
    wanted = tuple(sorted(i.sop_instance_uid for i in backend.query_instances(study, series))[:2])
    received = []
    backend.retrieve(RetrieveRequest(study, series, wanted), received.append)
    _assert_identical(received, seeded, study, series, wanted)


def test_c_move_of_a_series(orthanc, dimse_backend_factory, seeded):
    backend = dimse_backend_factory(
        orthanc.dicom_port,
        called_aet=orthanc.aet,
        retrieve="c-move",
        store_port=0,
        move_destination="DQRMOVE",
    )
    orthanc.add_modality("dqrmove", "DQRMOVE", "127.0.0.1", backend.move_receiver().port)
    study, series = _pet_series(backend, seeded)
    received = []
    report = backend.retrieve(RetrieveRequest(study, series), received.append)
    _assert_identical(received, seeded, study, series)
    assert report.completed == 3


def test_c_move_to_an_unknown_destination_explains(orthanc, dimse_backend_factory, seeded):
    backend = dimse_backend_factory(
        orthanc.dicom_port,
        called_aet=orthanc.aet,
        retrieve="c-move",
        store_port=0,
        move_destination="NOBODY",
    )
    study, series = _pet_series(backend, seeded)
    with pytest.raises(RemoteError, match="0xC000.*'NOBODY'.*127.0.0.1:") as caught:
        backend.retrieve(RetrieveRequest(study, series), lambda instance: None)
    assert not caught.value.retriable
