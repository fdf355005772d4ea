"""The dimse backend against dcmtk's dcmqrscp, a Query/Retrieve SCP nobody
on this team wrote: C-FIND, C-GET and C-MOVE on both transports."""

from __future__ import annotations

import shutil

import pytest

from dqr.model import RetrieveRequest, StudyQuery
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort

pytestmark = pytest.mark.skipif(
    shutil.which("dcmqrscp") is None and not __import__("os").environ.get("CI"),
    reason="dcmtk's dcmqrscp is not installed",
)

SPEC = CohortSpec(patients=1, studies_per_patient=2, instances_per_series=2)


def originals():
    return {d.SOPInstanceUID: d for d in generate_cohort(SPEC)}


def first_study(backend):
    return next(backend.query_studies(StudyQuery(1, {"PatientID": "PAT00000"})))


def retrieve_study(backend):
    study = first_study(backend)
    received = []
    for series in backend.query_series(study):
        backend.retrieve(RetrieveRequest(study, series), received.append)
    return study, received


def assert_received_the_study(study, received):
    wanted = {uid for uid, d in originals().items() if d.StudyInstanceUID == study.study_uid}
    assert wanted and {r.sop_instance_uid for r in received} == wanted


def test_c_find_at_every_level(dcmqrscp_factory, dimse_backend_factory):
    server = dcmqrscp_factory(generate_cohort(SPEC))
    backend = dimse_backend_factory(server.port, called_aet=server.aet)
    studies = list(backend.query_studies(StudyQuery(1, {"PatientID": "PAT00000"})))
    assert len(studies) == 2
    series = list(backend.query_series(studies[0]))
    assert series and all(s.instance_uids for s in series)


def test_c_get(dcmqrscp_factory, dimse_backend_factory):
    server = dcmqrscp_factory(generate_cohort(SPEC))
    backend = dimse_backend_factory(server.port, called_aet=server.aet, retrieve="c-get")
    assert_received_the_study(*retrieve_study(backend))


def test_c_move(dcmqrscp_factory, dimse_backend_factory, free_loopback_port):
    server = dcmqrscp_factory(generate_cohort(SPEC), move_destinations={"DQR": free_loopback_port})
    backend = dimse_backend_factory(
        server.port, called_aet=server.aet, retrieve="c-move", store_port=free_loopback_port
    )
    assert_received_the_study(*retrieve_study(backend))
