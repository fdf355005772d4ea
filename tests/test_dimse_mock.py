"""The dimse backend against the in-memory PACS served over real DIMSE
(the mock Query/Retrieve SCP), including its fault injection."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest

from dqr.errors import IncompleteRetrieveError, RemoteError
from dqr.model import RetrieveRequest, StudyQuery
from dqr.plugins.dimse.network import has_nodelay
from dqr.plugins.testpacs.memory.synthetic import CT_IMAGE
from dqr.plugins.testpacs.mockpacs.dimse_server import AbortFault, RejectFault, StatusFault


def first_study(backend, **filters):
    return next(backend.query_studies(StudyQuery(1, filters or {"PatientID": "PAT00000"})))


def retrieve_first_series(backend, study_filters=None, uids=None):
    study = first_study(backend, **(study_filters or {}))
    series = next(backend.query_series(study))
    received = []
    report = backend.retrieve(RetrieveRequest(study, series, uids), received.append)
    return study, series, report, received


# -- echo ---------------------------------------------------------------------


def test_echo_reports_ok(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    assert "OK" in backend.echo()
    assert mock_dimse_pacs.requests["C-ECHO"] == 1


def test_echo_refused_is_unreachable(dimse_backend_factory, closed_loopback_port):
    backend = dimse_backend_factory(closed_loopback_port)
    with pytest.raises(RemoteError, match="connection refused") as caught:
        backend.echo()
    assert caught.value.unreachable and caught.value.retriable


def test_echo_rejected_permanently_says_why(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.reject = RejectFault(transient=False, reason="calling-aet")
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with pytest.raises(
        RemoteError, match="permanent.*calling AE title not recognised.*'DQR'"
    ) as caught:
        backend.echo()
    assert not caught.value.retriable


def test_transient_reject_is_retriable(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.reject = RejectFault(times=1, transient=True, reason="no-reason")
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with pytest.raises(RemoteError, match="transient") as caught:
        backend.echo()
    assert caught.value.retriable and not caught.value.slow_down
    assert "OK" in backend.echo()  # the fault fired once


def test_too_many_associations_reject_means_slow_down(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.reject = RejectFault(reason="local-limit")
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with pytest.raises(RemoteError, match="local limit exceeded") as caught:
        backend.echo()
    assert caught.value.slow_down


# -- queries --------------------------------------------------------------------


def test_query_by_accession_number(mock_dimse_pacs, dimse_backend_factory, mock_dimse_cohort):
    expected = mock_dimse_cohort.find("STUDY", {})[3]
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    studies = list(
        backend.query_studies(StudyQuery(1, {"AccessionNumber": expected["AccessionNumber"]}))
    )
    assert [s.study_uid for s in studies] == [expected["StudyInstanceUID"]]
    study = studies[0]
    assert study.patient_id == expected["PatientID"]
    assert study.patient_birth_date == expected["PatientBirthDate"]
    assert study.modalities == expected["ModalitiesInStudy"]
    assert study.n_series == int(expected["NumberOfStudyRelatedSeries"])
    assert study.n_instances == int(expected["NumberOfStudyRelatedInstances"])


def test_query_by_wildcard_name_with_non_ascii(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    studies = list(backend.query_studies(StudyQuery(1, {"PatientName": "MÜLLER*"})))
    assert len(studies) == 2
    assert {s.patient_name for s in studies} == {"MÜLLER^JÜRGEN"}


def test_query_by_date_range(mock_dimse_pacs, dimse_backend_factory, mock_dimse_cohort):
    dates = sorted(a["StudyDate"] for a in mock_dimse_cohort.find("STUDY", {}))
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    found = list(backend.query_studies(StudyQuery(1, {"StudyDate": f"{dates[1]}-{dates[3]}"})))
    assert sorted(s.study_date for s in found) == dates[1:4]


def test_query_by_uid_list(mock_dimse_pacs, dimse_backend_factory, mock_dimse_cohort):
    uids = sorted(mock_dimse_cohort.study_uids())[:3]
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    found = list(backend.query_studies(StudyQuery(1, {"StudyInstanceUID": "\\".join(uids)})))
    assert sorted(s.study_uid for s in found) == uids


def test_query_by_modalities_in_study(mock_dimse_pacs, dimse_backend_factory, mock_dimse_cohort):
    expected = {
        a["StudyInstanceUID"] for a in mock_dimse_cohort.find("STUDY", {"ModalitiesInStudy": "PT"})
    }
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    found = list(backend.query_studies(StudyQuery(1, {"ModalitiesInStudy": "PT"})))
    assert {s.study_uid for s in found} == expected
    assert all(s.modalities == ("CT", "PT") for s in found)


def test_patient_root_finds_patients_then_studies(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port, query_model="patient")
    found = list(backend.query_studies(StudyQuery(1, {"PatientName": "S*", "StudyID": "1"})))
    assert [(s.patient_name, s.study_id) for s in found] == [("SMITH^JOHN", "1")]
    assert mock_dimse_pacs.requests["C-FIND"] == 2  # PATIENT level, then STUDY level


def test_series_query_learns_sop_classes(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    series = list(backend.query_series(first_study(backend)))
    assert [(s.number, s.description, s.modality, s.n_instances) for s in series] == [
        ("1", "Localizer", "CT", 3),
        ("2", "Axial 5mm", "CT", 3),
    ]
    assert all(s.sop_class_uids == {CT_IMAGE} for s in series)


def test_instance_query_lists_sop_instances(
    mock_dimse_pacs, dimse_backend_factory, mock_dimse_cohort
):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    study = first_study(backend)
    series = next(backend.query_series(study))
    found = list(backend.query_instances(study, series))
    expected = [
        i.sop_instance_uid for i in mock_dimse_cohort.instances(study.study_uid, series.series_uid)
    ]
    assert sorted(i.sop_instance_uid for i in found) == sorted(expected)
    assert {i.sop_class_uid for i in found} == {CT_IMAGE}


def test_query_refused_as_a_whole_is_final(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.statuses = [StatusFault(service="C-FIND", status=0xC000)]
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with pytest.raises(RemoteError, match="0xC000") as caught:
        first_study(backend)
    assert not caught.value.retriable


def test_query_out_of_resources_means_slow_down(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.statuses = [StatusFault(service="C-FIND", status=0xA700, times=1)]
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with pytest.raises(RemoteError) as caught:
        first_study(backend)
    assert caught.value.slow_down
    assert first_study(backend)  # the same pooled association still works


def test_no_answer_within_dimse_timeout_is_retriable(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.delay = 1.0
    backend = dimse_backend_factory(mock_dimse_pacs.port, dimse_timeout=0.3)
    with pytest.raises(RemoteError, match="no answer") as caught:
        first_study(backend)
    assert caught.value.retriable


# -- associations -------------------------------------------------------------------


@pytest.mark.parametrize("max_queries", [1, 2, 4])
def test_query_associations_never_exceed_max_queries(
    mock_dimse_pacs, dimse_backend_factory, max_queries
):
    mock_dimse_pacs.faults.delay = 0.005  # keep queries overlapping
    backend = dimse_backend_factory(mock_dimse_pacs.port, limits={"max_queries": max_queries})
    threads = [
        threading.Thread(target=lambda: [first_study(backend) for _ in range(3)]) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mock_dimse_pacs.requests["C-FIND"] == 24
    assert mock_dimse_pacs.max_concurrent_associations == max_queries


def test_idle_query_associations_are_released_when_the_burst_ends(mock_dimse_pacs, dimse_backend_factory):
    # Idle associations occupy the PACS's workers: Orthanc queues a new
    # association (a retrieval's) behind them for about a second.
    mock_dimse_pacs.faults.delay = 0.005
    backend = dimse_backend_factory(mock_dimse_pacs.port, limits={"max_queries": 4})
    threads = [threading.Thread(target=lambda: [first_study(backend) for _ in range(3)]) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 2
    while mock_dimse_pacs.current_associations > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mock_dimse_pacs.max_concurrent_associations == 4
    assert mock_dimse_pacs.current_associations == 1


def test_association_closed_by_the_pacs_is_not_reused(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    first_study(backend)
    for assoc in mock_dimse_pacs._server.active_associations:
        assoc.abort()  # the PACS drops the idle pooled association
    assert first_study(backend)


def client_socket(assoc):
    link = getattr(assoc, "link", None)
    return link.transport.get_extra_info("socket") if link else assoc.dul.socket.socket


def test_client_and_server_sockets_have_tcp_nodelay(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with backend.pool.lease() as (assoc, _):
        assert has_nodelay(client_socket(assoc))
        accepted = mock_dimse_pacs._server.active_associations
        assert accepted and all(has_nodelay(a.dul.socket.socket) for a in accepted)


def test_move_receiver_sockets_have_tcp_nodelay(mock_dimse_pacs, dimse_backend_factory):
    from pynetdicom import AE, build_context

    from dqr.plugins.dimse.arrivals import Arrivals

    backend = dimse_backend_factory(mock_dimse_pacs.port, retrieve="c-move", store_port=0)
    study = first_study(backend)
    request = RetrieveRequest(study, next(backend.query_series(study)))
    receiver = backend.move_receiver()
    ae = AE("MOCKPACS")  # the PACS's AE title: the only one the receiver accepts
    with receiver.expecting(1, Arrivals(lambda instance: None, native=backend.native), request):
        assoc = ae.associate("127.0.0.1", receiver.port, [build_context(CT_IMAGE)], ae_title="DQR")
        try:
            assert assoc.is_established
            assert receiver.sockets and all(has_nodelay(sock) for sock in receiver.sockets)
        finally:
            assoc.release()


# -- retrieval ------------------------------------------------------------------------


def test_c_get_delivers_the_series_byte_identical(
    mock_dimse_pacs, dimse_backend_factory, mock_dimse_cohort
):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    study, series, report, received = retrieve_first_series(backend)
    stored = {
        i.sop_instance_uid: i
        for i in mock_dimse_cohort.instances(study.study_uid, series.series_uid)
    }
    assert sorted(r.sop_instance_uid for r in received) == sorted(stored)
    for instance in received:
        assert instance.dataset == stored[instance.sop_instance_uid].read_dataset()
        assert instance.transfer_syntax == stored[instance.sop_instance_uid].transfer_syntax
        assert instance.sop_class_uid == CT_IMAGE
    assert (report.completed, report.failed, report.warning) == (3, 0, 0)


def test_c_move_delivers_the_series(mock_dimse_pacs, dimse_backend_factory, mock_dimse_cohort):
    backend = dimse_backend_factory(mock_dimse_pacs.port, retrieve="c-move", store_port=0)
    mock_dimse_pacs.add_destination("DQR", "127.0.0.1", backend.move_receiver().port)
    study, series, report, received = retrieve_first_series(backend)
    stored = {
        i.sop_instance_uid: i
        for i in mock_dimse_cohort.instances(study.study_uid, series.series_uid)
    }
    assert {r.sop_instance_uid: r.dataset for r in received} == {
        u: i.read_dataset() for u, i in stored.items()
    }
    assert report.completed == 3


def test_mock_move_sub_association_hands_a_response_its_reactor_took_to_the_sender():
    # pynetdicom's reactor may take the C-STORE-RSP of a fast storage SCP
    # (see _keep_responses_for_the_sender): the mock puts it back where
    # send_c_store waits, so the C-MOVE does not stall for dimse_timeout.
    import queue
    from types import SimpleNamespace

    from pynetdicom.dimse_primitives import C_STORE

    from dqr.plugins.testpacs.mockpacs.dimse_server import _keep_responses_for_the_sender

    served = []
    assoc = SimpleNamespace(
        dimse=SimpleNamespace(msg_queue=queue.Queue()),
        _serve_request=lambda msg, context_id: served.append(msg),
    )
    _keep_responses_for_the_sender(SimpleNamespace(assoc=assoc))
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 7
    response.Status = 0x0000
    assoc._serve_request(response, 3)
    assert assoc.dimse.msg_queue.get_nowait() == (3, response)
    assert served == []


def test_c_get_of_an_instance_subset_sends_one_uid_list(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    study = first_study(backend)
    series = next(backend.query_series(study))
    wanted = tuple(i.sop_instance_uid for i in backend.query_instances(study, series))[:2]
    received = []
    backend.retrieve(RetrieveRequest(study, series, wanted), received.append)
    assert sorted(r.sop_instance_uid for r in received) == sorted(wanted)
    assert mock_dimse_pacs.requests["C-GET"] == 1


def test_subset_is_fanned_out_when_uid_lists_are_off(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port, matching={"uid_lists": False})
    study = first_study(backend)
    series = next(backend.query_series(study))
    wanted = tuple(i.sop_instance_uid for i in backend.query_instances(study, series))[:2]
    received = []
    backend.retrieve(RetrieveRequest(study, series, wanted), received.append)
    assert sorted(r.sop_instance_uid for r in received) == sorted(wanted)
    assert mock_dimse_pacs.requests["C-GET"] == 2


def test_c_move_to_unknown_destination_names_aet_host_and_port(
    mock_dimse_pacs, dimse_backend_factory
):
    backend = dimse_backend_factory(
        mock_dimse_pacs.port, retrieve="c-move", store_port=0, move_destination="DQRSTORE"
    )
    port = backend.move_receiver().port
    with pytest.raises(RemoteError, match=rf"0xA801.*'DQRSTORE'.*127\.0\.0\.1:{port}") as caught:
        retrieve_first_series(backend)
    assert not caught.value.retriable


def test_retrieve_out_of_resources_means_slow_down(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.statuses = [StatusFault(service="C-GET", status=0xA702)]
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with pytest.raises(RemoteError, match="0xA702") as caught:
        retrieve_first_series(backend)
    assert caught.value.slow_down and caught.value.retriable


def test_abort_in_the_middle_of_a_series_is_retriable(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.abort = AbortFault(after_stores=1)
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with pytest.raises(RemoteError, match="aborted") as caught:
        retrieve_first_series(backend)
    assert caught.value.retriable
    assert mock_dimse_pacs.requests["C-STORE"] == 1


def test_fewer_instances_than_announced_is_incomplete(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    study = first_study(backend)
    series = next(backend.query_series(study))
    inflated = type(series)(**{**series.__dict__, "n_instances": 5})
    with pytest.raises(IncompleteRetrieveError, match="3 of 5 instances arrived") as caught:
        backend.retrieve(RetrieveRequest(study, inflated), lambda instance: None)
    assert caught.value.missing == 2 and caught.value.retriable


def test_store_failure_fails_the_c_store_and_is_raised(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    study = first_study(backend)
    series = next(backend.query_series(study))

    def full_disk(instance):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left") as caught:
        backend.retrieve(RetrieveRequest(study, series), full_disk)
    assert any("could not store 3" in note for note in caught.value.__notes__)


@pytest.mark.parametrize("dimse_transport", ["pynetdicom"])  # a pynetdicom race
def test_a_final_response_that_never_reaches_the_query_aborts_the_association(
    mock_dimse_pacs, dimse_backend_factory, monkeypatch
):
    # pynetdicom#875: its reactor can swallow a response meant for the waiting
    # query, which would then wait dimse_timeout. dqr aborts instead, so the
    # query is retried at once. Simulate it by not taking the final response.
    from dqr.plugins.dimse import backend as dimse_backend
    from dqr.plugins.dimse import queries

    monkeypatch.setattr(dimse_backend, "LOST_FINAL_GRACE", 0.2)
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    assoc = backend._open_query_association()
    responses = assoc.send_c_find(queries.identifier("STUDY", {}, ("StudyInstanceUID",)), backend.find_model)
    status, _ = next(responses)
    assert status.Status == 0xFF00
    deadline = time.monotonic() + 3
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


@pytest.mark.parametrize("dimse_transport", ["pynetdicom"])  # a pynetdicom race
def test_a_final_response_taken_in_time_leaves_the_association_open(
    mock_dimse_pacs, dimse_backend_factory, monkeypatch
):
    from dqr.plugins.dimse import backend as dimse_backend

    monkeypatch.setattr(dimse_backend, "LOST_FINAL_GRACE", 0.2)
    backend = dimse_backend_factory(mock_dimse_pacs.port, limits={"max_queries": 1})
    first_study(backend)
    time.sleep(0.5)
    assert mock_dimse_pacs.current_associations == 1  # the pooled association survived
    first_study(backend)
    assert mock_dimse_pacs.requests["C-FIND"] == 2


# -- retrieve: auto -------------------------------------------------------------------


@pytest.mark.parametrize("refusal", ["context", "role"])
def test_auto_falls_back_to_c_move_when_c_get_is_refused_and_remembers(
    mock_dimse_pacs, dimse_backend_factory, refusal
):
    mock_dimse_pacs.faults.transport.refuse_get = refusal
    backend = dimse_backend_factory(mock_dimse_pacs.port, store_port=0)
    mock_dimse_pacs.add_destination("DQR", "127.0.0.1", backend.move_receiver().port)
    assert backend.retrieve_mode is None
    _, _, report, received = retrieve_first_series(backend)
    assert len(received) == 3 and report.completed == 3
    assert backend.retrieve_mode == "c-move"
    assert mock_dimse_pacs.requests["C-GET"] == 0 and mock_dimse_pacs.requests["C-MOVE"] == 1
    retrieve_first_series(backend)
    assert mock_dimse_pacs.requests["C-MOVE"] == 2  # not probed again


def test_auto_falls_back_when_c_get_is_answered_unable_to_process(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.statuses = [StatusFault(service="C-GET", status=0xC000)]
    backend = dimse_backend_factory(mock_dimse_pacs.port, store_port=0)
    mock_dimse_pacs.add_destination("DQR", "127.0.0.1", backend.move_receiver().port)
    _, _, report, received = retrieve_first_series(backend)
    assert len(received) == 3 and backend.retrieve_mode == "c-move"


def test_auto_keeps_c_get_when_the_pacs_does_it(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port, store_port=0)
    retrieve_first_series(backend)
    assert backend.retrieve_mode == "c-get" and mock_dimse_pacs.requests["C-MOVE"] == 0


def test_auto_without_store_port_says_c_get_was_refused_and_c_move_needs_it(
    mock_dimse_pacs, dimse_backend_factory
):
    mock_dimse_pacs.faults.transport.refuse_get = "context"
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    with pytest.raises(RemoteError, match="C-GET refused.*not possible without `store_port`") as caught:
        retrieve_first_series(backend)
    assert not caught.value.retriable


def test_a_remembered_mode_is_used_without_probing(mock_dimse_pacs, dimse_backend_factory, tmp_path):
    from dqr.backend import SourceContext
    from dqr.config import Limits
    from dqr.plugins.dimse import DimseSourceConfig, make_backend

    config = DimseSourceConfig.model_validate(
        {"type": "dimse", "host": "127.0.0.1", "port": mock_dimse_pacs.port, "called_aet": "MOCKPACS",
         "store_port": 0}
    )
    backend = make_backend(config, SourceContext("pacs", tmp_path, Limits()), retrieve_mode="c-move")
    try:
        mock_dimse_pacs.add_destination("DQR", "127.0.0.1", backend.move_receiver().port)
        retrieve_first_series(backend)
        assert mock_dimse_pacs.requests["C-GET"] == 0 and mock_dimse_pacs.requests["C-MOVE"] == 1
    finally:
        backend.close()


def test_echo_describes_what_the_pacs_accepts(mock_dimse_pacs, dimse_backend_factory):
    mock_dimse_pacs.faults.transport.refuse_get = "context"
    backend = dimse_backend_factory(mock_dimse_pacs.port)
    described = backend.echo()
    assert "OK" in described
    assert "Study Root: C-FIND yes, C-GET no, C-MOVE yes" in described
    assert "C-MOVE to DQR: refused" in described  # the mock does not know DQR yet
    assert "Explicit VR Little Endian" in described


# -- C-MOVE: only the PACS, only the instances asked for -------------------------------


def evil_store(port, dataset, calling_aet="EVIL"):
    """A second SCU sending one C-STORE to dqr's storage SCP; its status, or
    None when the association was refused."""
    from pynetdicom import AE

    ae = AE(calling_aet)
    ae.add_requested_context(CT_IMAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title="DQR")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(dataset).Status)
    finally:
        assoc.release()


def test_c_move_refuses_c_stores_from_another_ae_and_instances_not_asked_for(
    mock_dimse_pacs, dimse_backend_factory, mock_dimse_cohort, caplog
):
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    backend = dimse_backend_factory(mock_dimse_pacs.port, retrieve="c-move", store_port=0)
    port = backend.move_receiver().port
    mock_dimse_pacs.add_destination("DQR", "127.0.0.1", port)
    study = first_study(backend)
    series = next(backend.query_series(study))
    stored = next(iter(mock_dimse_cohort.instances(study.study_uid, series.series_uid)))
    injected = dcmread(io.BytesIO(stored.read_part10()))
    outcomes = {}
    received = []
    mock_dimse_pacs.faults.delay = 0.3  # keeps the move in flight while the intruders send

    def intrude():  # from another thread: the store callback must not wait on the network
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.01)
        outcomes["evil"] = evil_store(port, injected)
        foreign = injected.copy()
        foreign.SOPInstanceUID = generate_uid()
        outcomes["foreign"] = evil_store(port, foreign, calling_aet="MOCKPACS")

    intruder = threading.Thread(target=intrude)
    intruder.start()
    backend.retrieve(RetrieveRequest(study, series), received.append)
    intruder.join()
    assert outcomes["evil"] in (None, 0xC001)  # association rejected, or the C-STORE refused
    assert outcomes["foreign"] == 0xC001
    assert len(received) == 3
    assert "EVIL" in caplog.text and "PAT" not in caplog.text  # logged, without PHI


def test_storage_scp_binds_the_address_that_reaches_the_pacs(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port, retrieve="c-move", store_port=0)
    assert backend.move_receiver().host == "127.0.0.1"


def test_an_idle_association_is_closed_after_network_timeout(mock_dimse_pacs, dimse_backend_factory):
    backend = dimse_backend_factory(mock_dimse_pacs.port, network_timeout=0.5)
    first_study(backend)
    assert mock_dimse_pacs.current_associations == 1  # pooled
    deadline = time.monotonic() + 5
    while mock_dimse_pacs.current_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mock_dimse_pacs.current_associations == 0


def association_request_pdu(called_aet: str) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification, as bytes on the wire."""
    from pynetdicom import build_context
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.sop_class import Verification

    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title = "DQR"
    request.called_ae_title = called_aet
    context = build_context(Verification)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    request.user_information = [max_length]
    return A_ASSOCIATE_RQ(request).encode()


def test_a_client_gone_right_after_its_association_request_is_not_counted_as_open(mock_dimse_pacs):
    # A dqr killed (or timing out) just after it asked: the mock's reader
    # thread may see the close before its association thread reads the
    # request. Counted then, it stayed open for ever and every later
    # limits test on the shared server saw one association too many.
    request = association_request_pdu(mock_dimse_pacs.aet)
    for _ in range(30):  # about a quarter of them lost the race before the fix
        with socket.create_connection(("127.0.0.1", mock_dimse_pacs.port)) as client:
            client.sendall(request)
    deadline = time.monotonic() + 10
    while mock_dimse_pacs.current_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mock_dimse_pacs.current_associations == 0
