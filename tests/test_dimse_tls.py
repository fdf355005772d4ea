"""DICOM over TLS (`tls:`) against a real TLS peer: an Orthanc with
DicomTlsEnabled, certificates from a private CA made for the test. Both
transports: C-ECHO, C-FIND, C-GET, and C-MOVE to dqr's storage SCP over TLS
(`tls.storage_scp`); a wrong CA or a missing client certificate is a clear,
final error naming TLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from dqr.errors import RemoteError
from dqr.model import RetrieveRequest, StudyQuery
from dqr.plugins.testpacs.memory.pacs import MemoryPacs
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort
from dqr.testing.certificates import CertificateAuthority, TlsFiles, write_ca
from dqr.testing.fixtures_orthanc import require_orthanc
from dqr.testing.orthanc import OrthancServer

pytestmark = pytest.mark.orthanc

COHORT = CohortSpec(patients=1, studies_per_patient=1, instances_per_series=2, seed=13)


class Pki:
    def __init__(self, folder: Path) -> None:
        self.ca: CertificateAuthority = write_ca(folder, "ca")
        self.pacs: TlsFiles = self.ca.issue(folder, "pacs")
        self.dqr: TlsFiles = self.ca.issue(folder, "dqr")
        #: another CA, which signed nothing the PACS uses
        self.other_ca: CertificateAuthority = write_ca(folder, "other-ca")

    def dqr_tls(self, **keys) -> dict:
        return {"ca_file": str(self.ca.cert), "cert_file": str(self.dqr.cert), "key_file": str(self.dqr.key), **keys}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_orthanc(tmp_path_factory, pki):
    """An Orthanc that speaks DICOM only over TLS and wants a client
    certificate signed by the test CA."""
    require_orthanc()
    server = OrthancServer.start(
        tmp_path_factory.mktemp("orthanc-tls"),
        dicomweb=False,
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.pacs.cert),
            "DicomTlsPrivateKey": str(pki.pacs.key),
            "DicomTlsTrustedCertificates": str(pki.ca.cert),
        },
    )
    try:
        server.seed(generate_cohort(COHORT))
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def seeded() -> MemoryPacs:
    return MemoryPacs.from_datasets(generate_cohort(COHORT))


@pytest.fixture
def tls_backend(tls_orthanc, dimse_backend_factory, pki):
    def make(**keys):
        keys.setdefault("tls", pki.dqr_tls())
        return dimse_backend_factory(tls_orthanc.dicom_port, called_aet=tls_orthanc.aet, **keys)

    return make


def one_series(backend, seeded: MemoryPacs):
    (study,) = backend.query_studies(StudyQuery(1, {"StudyInstanceUID": seeded.study_uids()[0]}))
    series = sorted(backend.query_series(study), key=lambda s: s.series_uid)[0]
    return study, series


def assert_identical(received, seeded: MemoryPacs, study, series) -> None:
    stored = {i.sop_instance_uid: i.read_dataset() for i in seeded.instances(study.study_uid, series.series_uid)}
    assert {r.sop_instance_uid: r.dataset for r in received} == stored


def test_echo_and_c_find_over_tls(tls_backend, seeded, dimse_transport):
    backend = tls_backend()
    assert "OK (" in backend.echo().splitlines()[0] and f"transport {dimse_transport}" in backend.echo()
    studies = list(backend.query_studies(StudyQuery(1, {"PatientID": "*"})))
    assert [s.study_uid for s in studies] == seeded.study_uids()


def test_c_get_over_tls_is_byte_identical(tls_backend, seeded):
    backend = tls_backend(retrieve="c-get")
    study, series = one_series(backend, seeded)
    received = []
    report = backend.retrieve(RetrieveRequest(study, series), received.append)
    assert_identical(received, seeded, study, series)
    assert (report.completed, report.failed) == (2, 0)


def test_c_move_to_a_tls_storage_scp(tls_backend, tls_orthanc, seeded, pki):
    backend = tls_backend(
        retrieve="c-move", store_port=0, move_destination="DQRTLS", tls=pki.dqr_tls(storage_scp=True)
    )
    port = backend.move_receiver().port
    tls_orthanc.add_modality("dqrtls", "DQRTLS", "127.0.0.1", port, UseDicomTls=True)
    study, series = one_series(backend, seeded)
    received = []
    report = backend.retrieve(RetrieveRequest(study, series), received.append)
    assert_identical(received, seeded, study, series)
    assert report.completed == 2


@pytest.mark.parametrize("dimse_transport", ["native"])
def test_a_pacs_moving_without_tls_to_the_tls_storage_scp_is_logged(tls_backend, tls_orthanc, seeded, pki, dqr_log):
    backend = tls_backend(
        retrieve="c-move", store_port=0, move_destination="DQRPLAIN", tls=pki.dqr_tls(storage_scp=True)
    )
    tls_orthanc.add_modality("dqrplain", "DQRPLAIN", "127.0.0.1", backend.move_receiver().port, UseDicomTls=False)
    study, series = one_series(backend, seeded)
    received = []
    with pytest.raises(RemoteError):
        backend.retrieve(RetrieveRequest(study, series), received.append)
    assert received == []
    assert "storage SCP: TLS handshake with 127.0.0.1:" in dqr_log.text


def test_a_certificate_from_another_ca_is_a_final_tls_error(tls_backend, pki):
    backend = tls_backend(tls=pki.dqr_tls(ca_file=str(pki.other_ca.cert)))
    with pytest.raises(RemoteError, match=r"TLS handshake with PACS ORTHANC .* could not be verified.*tls\.ca_file") as caught:
        backend.echo()
    assert not caught.value.retriable


def test_no_client_certificate_names_the_tls_keys(tls_backend, pki):
    backend = tls_backend(tls={"ca_file": str(pki.ca.cert)})
    # the PACS's alert (a final TLS error), or the connection closed before it was read
    with pytest.raises(RemoteError, match=r"TLS .* client certificate.*tls\.cert_file"):
        backend.echo()


@pytest.mark.parametrize("dimse_transport", ["native"])
def test_plain_dicom_to_a_tls_port_suggests_tls(tls_backend):
    with pytest.raises(RemoteError, match=r"closed the connection while negotiating .*set `tls:`"):
        tls_backend(tls=None).echo()


def test_a_wrong_ca_through_the_cli_is_one_line_without_traceback(tls_orthanc, pki, site, dqr, dimse_transport):
    source = {
        "type": "dimse", "host": "127.0.0.1", "port": tls_orthanc.dicom_port, "called_aet": tls_orthanc.aet,
        "transport": dimse_transport, "tls": pki.dqr_tls(ca_file=str(pki.other_ca.cert)),
    }
    result = dqr("echo", "--config", site(source=source))
    assert result.exit_code == 1
    assert "TLS handshake" in result.output and "tls.ca_file" in result.output
    assert "Traceback" not in result.output
