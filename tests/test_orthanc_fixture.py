"""The private-Orthanc launcher and its pytest fixtures (dqr.testing.orthanc,
dqr.testing.fixtures_orthanc)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dqr.plugins.testpacs.memory.synthetic import accession_number
from dqr.testing import orthanc as orthanc_module
from dqr.testing.orthanc import OrthancError, OrthancServer

needs_orthanc = pytest.mark.orthanc


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@needs_orthanc
def test_orthanc_reports_its_own_aet_and_ports(orthanc: OrthancServer) -> None:
    system = orthanc.session.get(orthanc.http_url + "/system", timeout=5).json()

    assert (system["DicomAet"], system["DicomPort"], system["HttpPort"]) == (
        orthanc.aet,
        orthanc.dicom_port,
        int(orthanc.http_url.rsplit(":", 1)[1]),
    )


@needs_orthanc
def test_orthanc_is_seeded_with_every_cohort_study(orthanc: OrthancServer) -> None:
    studies = orthanc.session.get(orthanc.http_url + "/studies", timeout=5).json()

    assert len(studies) == orthanc.cohort_spec.n_studies == 8


@needs_orthanc
def test_orthanc_answers_c_echo(orthanc: OrthancServer) -> None:
    ae = AE(ae_title="DQRTEST")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert association.is_established
    try:
        status = association.send_c_echo()
    finally:
        association.release()

    assert status.Status == 0x0000


@needs_orthanc
def test_orthanc_serves_qido_studies(orthanc: OrthancServer) -> None:
    spec = orthanc.cohort_spec
    response = orthanc.session.get(
        orthanc.dicomweb_url + "/studies", headers={"Accept": "application/dicom+json"}, timeout=5
    )
    response.raise_for_status()

    found = {study["00080050"]["Value"][0] for study in response.json()}  # AccessionNumber
    expected = {
        accession_number(spec, p, s)
        for p in range(spec.patients)
        for s in range(spec.studies_per_patient)
    }
    assert found == expected


@needs_orthanc
def test_orthanc_runs_with_tcp_nodelay(orthanc: OrthancServer) -> None:
    # Without it Debian's DCMTK leaves Nagle on: ~40 ms per DIMSE exchange.
    environ = Path(f"/proc/{orthanc.pid}/environ").read_bytes().split(b"\0")

    assert b"TCP_NODELAY=1" in environ


@needs_orthanc
def test_add_modality_declares_a_dicom_node(orthanc: OrthancServer) -> None:
    orthanc.add_modality("DQRTESTNODE", "DQRNODE", "127.0.0.1", 11112)
    try:
        node = orthanc.session.get(
            orthanc.http_url + "/modalities/DQRTESTNODE/configuration", timeout=5
        ).json()
    finally:
        orthanc.session.delete(orthanc.http_url + "/modalities/DQRTESTNODE", timeout=5)

    assert (node["AET"], node["Host"], node["Port"]) == ("DQRNODE", "127.0.0.1", 11112)


@needs_orthanc
def test_stop_ends_the_orthanc_process(orthanc_factory) -> None:
    server = orthanc_factory(dicomweb=False)

    server.stop()

    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)


@needs_orthanc
def test_start_retries_when_a_port_is_taken_before_orthanc_binds_it(
    orthanc_factory, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # start() picks the HTTP port, then the DICOM port: hand it a taken DICOM
    # port once, as if another process had won the race for it.
    real_free_port = orthanc_module.free_port
    handed_out = [real_free_port(), busy_port]
    monkeypatch.setattr(
        orthanc_module, "free_port", lambda: handed_out.pop(0) if handed_out else real_free_port()
    )

    server = orthanc_factory(dicomweb=False)

    assert server.running and server.dicom_port != busy_port


@needs_orthanc
def test_start_failure_carries_the_orthanc_log(orthanc_factory) -> None:
    with pytest.raises(OrthancError, match="/proc/not-writable"):
        orthanc_factory(extra_config={"StorageDirectory": "/proc/not-writable"})
