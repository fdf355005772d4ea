"""WADO-RS retrieval of the dicomweb backend: streamed, byte-identical,
subsets, interruptions, and memory that does not grow with the series."""

from __future__ import annotations

import re
import subprocess
import sys
import tracemalloc

import pytest

from dqr.errors import RemoteError
from dqr.model import ReceivedInstance, RetrieveRequest, StudyQuery


@pytest.fixture(params=["mock", "orthanc"])
def web_url(request, mock_dicomweb_pacs) -> str:
    if request.param == "orthanc":
        return request.getfixturevalue("orthanc").dicomweb_url
    return mock_dicomweb_pacs.url


def first_series_request(backend, **filters: str) -> RetrieveRequest:
    study = next(iter(backend.query_studies(StudyQuery(line=2, filters=filters))))
    series = next(iter(backend.query_series(study)))
    return RetrieveRequest(study=study, series=series)


def test_retrieved_instances_are_byte_identical(web_url, dicomweb_backend_factory, dicomweb_memory_pacs):
    backend = dicomweb_backend_factory(web_url)
    request = first_series_request(backend, PatientName="DOE^JANE")
    received: list[ReceivedInstance] = []

    backend.retrieve(request, received.append)

    stored = {i.sop_instance_uid: i for i in dicomweb_memory_pacs.instances(request.study.study_uid)}
    assert len(received) == 3
    for instance in received:
        original = stored[instance.sop_instance_uid]
        assert instance.dataset == original.read_dataset()
        assert (instance.sop_class_uid, instance.transfer_syntax) == (original.sop_class_uid, original.transfer_syntax)


def test_subset_retrieve_fetches_only_the_asked_instances(web_url, dicomweb_backend_factory, dicomweb_memory_pacs):
    backend = dicomweb_backend_factory(web_url)
    request = first_series_request(backend, PatientName="SMITH^JOHN")
    wanted = [i.sop_instance_uid for i in dicomweb_memory_pacs.instances(request.study.study_uid, request.series.series_uid)][:2]
    received: list[ReceivedInstance] = []

    backend.retrieve(RetrieveRequest(request.study, request.series, tuple(wanted)), received.append)

    assert sorted(i.sop_instance_uid for i in received) == sorted(wanted)


def test_connection_cut_mid_multipart_is_retriable_after_delivering_earlier_instances(
    mock_dicomweb_pacs, dicomweb_backend_factory
):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url)
    request = first_series_request(backend, PatientName="DOE^JANE")
    mock_dicomweb_pacs.faults.cut_after_parts = 2
    received: list[ReceivedInstance] = []

    with pytest.raises(RemoteError) as caught:
        backend.retrieve(request, received.append)

    assert caught.value.retriable and not caught.value.slow_down
    assert len(received) == 2 and "2 instances had arrived" in str(caught.value)


def test_store_failure_passes_through_unchanged(mock_dicomweb_pacs, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url)
    request = first_series_request(backend, PatientName="DOE^JANE")

    def failing_store(instance: ReceivedInstance) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        backend.retrieve(request, failing_store)


def test_unknown_series_is_a_final_not_found(mock_dicomweb_pacs, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url)
    request = first_series_request(backend, PatientName="DOE^JANE")
    missing = RetrieveRequest(request.study, type(request.series)(request.study.study_uid, "1.2.3.4"))

    with pytest.raises(RemoteError, match="HTTP 404") as caught:
        backend.retrieve(missing, lambda instance: None)

    assert not caught.value.retriable


@pytest.fixture
def large_series_mock(tmp_path):
    """The mock PACS in a process of its own, serving one study whose series
    have 60 instances of 256x256x16 bit (~128 KiB each, ~7.7 MiB a series).

    Its own process, so that tracemalloc sees only the client: the werkzeug
    server thread allocates a transient 10 MB buffer after some answers."""
    config = tmp_path / "mock.yaml"
    config.write_text(
        "source: {synthetic: {patients: 1, studies_per_patient: 1, instances_per_series: 60, rows: 256, columns: 256}}\n"
        "dicomweb: {port: 0}\n"
    )
    command = [sys.executable, "-c", "from dqr.cli import main; main()", "mock-pacs", "--config", str(config)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # "dicomweb: QIDO-RS/WADO-RS at http://127.0.0.1:PORT/dicom-web ..."
        match = re.search(r"http://127\.0\.0\.1:\d+/dicom-web", line)
        assert match, f"mock-pacs did not start: {line!r}"
        yield match.group(0)
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


def test_memory_stays_flat_while_retrieving_a_large_series(large_series_mock, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(large_series_mock)
    request = first_series_request(backend)
    sizes: list[int] = []

    tracemalloc.start()
    try:
        backend.retrieve(request, lambda instance: sizes.append(len(instance.dataset)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    total = sum(sizes)
    assert len(sizes) == 60
    # A few instances' worth (the part being split, its copy, a network
    # chunk), not the series.
    assert peak < 8 * max(sizes) < total / 4, (peak, total)
