"""Faults of the wire itself, between dqr and the mock PACS (a misbehaving
TCP proxy, :mod:`dqr.testing.fault_proxy`, and the mock's TransportFaults):
PDUs in tiny segments, 4 KB PDUs, a connection cut in the middle of a PDU,
slow peers, and timeouts that say which of dqr's own fired."""

from __future__ import annotations

import pytest

from dqr.errors import RemoteError
from dqr.model import RetrieveRequest, StudyQuery
from dqr.plugins.testpacs.memory.pacs import MemoryPacs
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort

#: 128 x 128 16-bit images: 32 KB of pixels, eight 4 KB PDUs an instance.
BIG = CohortSpec(patients=1, studies_per_patient=1, instances_per_series=2, rows=128, columns=128)


@pytest.fixture(scope="module")
def big_cohort() -> MemoryPacs:
    return MemoryPacs.from_datasets(generate_cohort(BIG))


def retrieve_all(backend):
    study = next(backend.query_studies(StudyQuery(1, {"PatientID": "PAT00000"})))
    received = []
    for series in backend.query_series(study):
        backend.retrieve(RetrieveRequest(study, series), received.append)
    return study, received


def assert_byte_identical(cohort, study, received):
    stored = {i.sop_instance_uid: i for i in cohort.instances(study.study_uid)}
    assert sorted(r.sop_instance_uid for r in received) == sorted(stored)
    for instance in received:
        assert instance.dataset == stored[instance.sop_instance_uid].read_dataset()


def test_pdus_split_into_7_byte_segments_are_reassembled(
    mock_dimse_factory, big_cohort, fault_proxy, dimse_backend_factory
):
    server = mock_dimse_factory(pacs=big_cohort)
    proxy = fault_proxy(server.port, chunk=7)
    study, received = retrieve_all(dimse_backend_factory(proxy.port))
    assert_byte_identical(big_cohort, study, received)


def test_4_kb_pdus_are_reassembled_into_whole_instances(
    mock_dimse_factory, big_cohort, fault_proxy, dimse_backend_factory
):
    server = mock_dimse_factory(pacs=big_cohort, faults={"transport": {"max_pdu": 4096}})
    proxy = fault_proxy(server.port, max_pdu=4096)  # what dqr announces, as the PACS reads it
    study, received = retrieve_all(dimse_backend_factory(proxy.port))
    assert_byte_identical(big_cohort, study, received)


def test_a_connection_cut_in_the_middle_of_a_pdu_is_retriable_and_says_so(
    mock_dimse_factory, big_cohort, fault_proxy, dimse_backend_factory
):
    server = mock_dimse_factory(pacs=big_cohort)
    proxy = fault_proxy(server.port)
    backend = dimse_backend_factory(proxy.port)
    study = next(backend.query_studies(StudyQuery(1, {"PatientID": "PAT00000"})))
    series = next(backend.query_series(study))
    proxy.faults.cut_after = 20_000  # inside the first instance's pixel data
    with pytest.raises(RemoteError, match="closed|aborted") as caught:
        backend.retrieve(RetrieveRequest(study, series), lambda instance: None)
    assert caught.value.retriable and proxy.cuts == 1


def test_a_slow_peer_within_the_timeouts_completes(
    mock_dimse_factory, big_cohort, fault_proxy, dimse_backend_factory
):
    server = mock_dimse_factory(pacs=big_cohort)
    proxy = fault_proxy(server.port, chunk=16384, delay=0.01)
    study, received = retrieve_all(dimse_backend_factory(proxy.port, dimse_timeout=5))
    assert_byte_identical(big_cohort, study, received)


def test_a_retrieval_longer_than_dimse_timeout_completes_while_instances_keep_coming(
    mock_dimse_pacs, dimse_backend_factory
):
    # dimse_timeout bounds the wait for each message, not the whole C-GET
    # (the native transport answers its C-STOREs and Pending responses on
    # the event loop: the timer must see them all the same)
    # (gaps of 0.6 s against 1.5 s: a loaded CI machine once stretched 0.2 s gaps past 0.5 s)
    backend = dimse_backend_factory(mock_dimse_pacs.port, dimse_timeout=1.5)
    study = next(backend.query_studies(StudyQuery(1, {"PatientID": "PAT00000"})))
    series = next(backend.query_series(study))
    mock_dimse_pacs.faults.delay = 0.6  # before each sub-operation: 3 instances, > 1.5 s in all
    received = []
    backend.retrieve(RetrieveRequest(study, series), received.append)
    assert len(received) == 3


def test_a_pacs_slower_than_dimse_timeout_is_reported_as_dqrs_timeout(
    mock_dimse_pacs, dimse_backend_factory
):
    # issue 10 item 17: not "the association was aborted or closed by the PACS"
    mock_dimse_pacs.faults.delay = 1.0
    backend = dimse_backend_factory(mock_dimse_pacs.port, dimse_timeout=0.3)
    with pytest.raises(RemoteError, match=r"no response within 0.3 s \(.*dimse_timeout") as caught:
        next(backend.query_studies(StudyQuery(1, {"PatientID": "PAT00000"})))
    assert "aborted or closed by the PACS" not in str(caught.value)
    assert caught.value.retriable


@pytest.mark.parametrize("dimse_transport", ["native"])
def test_a_pacs_that_never_answers_the_association_is_dqrs_acse_timeout(
    fault_proxy, dimse_backend_factory, free_loopback_port
):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        backend = dimse_backend_factory(silent.getsockname()[1], acse_timeout=0.3)
        with pytest.raises(RemoteError, match=r"within 0.3 s \(dqr's acse_timeout") as caught:
            backend.echo()
    assert caught.value.retriable
