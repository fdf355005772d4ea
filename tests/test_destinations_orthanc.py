"""`dqr run` into a second, empty Orthanc used as the destination, over
C-STORE and over STOW-RS: what it holds, read back over its REST API, is
exactly the selected instances, relabeled, everything else byte-identical."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest

from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort

pytestmark = pytest.mark.orthanc

PET_STUDY = "0425454454"  # SMITH^JOHN, PAT00001, StudyID 2, CT AC + PET WB, 3 instances each
RELABELED = {"PatientName", "PatientID", "StudyID", "AccessionNumber"}
ROUTING = "Project: Test Subject: Subj042 Session: Subj042_PET"
#: Every C-STORE test runs on both DIMSE stacks of the dimse destination.
over_transports = pytest.mark.parametrize("transport", ["native", "pynetdicom"])


def dimse_destination(orthanc, transport="native", **keys):
    return {
        "type": "dimse", "host": "127.0.0.1", "port": orthanc.dicom_port, "called_aet": orthanc.aet,
        "transport": transport, **keys,
    }


def dicomweb_destination(orthanc, **keys):
    return {"type": "dicomweb", "url": orthanc.dicomweb_url, **keys}


def held_files(orthanc) -> dict[str, bytes]:
    """SOP Instance UID -> the file the destination holds."""
    files = {}
    for instance_id in orthanc.session.get(orthanc.http_url + "/instances", timeout=10).json():
        data = orthanc.session.get(f"{orthanc.http_url}/instances/{instance_id}/file", timeout=10).content
        files[pydicom.dcmread(BytesIO(data)).SOPInstanceUID] = data
    return files


def originals_of(accession: str) -> dict[str, pydicom.Dataset]:
    return {d.SOPInstanceUID: d for d in generate_cohort(CohortSpec(patients=4)) if d.AccessionNumber == accession}


def run_into(dqr, site, write_csv, destination, **extra):
    config = site(
        destination=destination,
        csv=str(write_csv(f"Accession Number,Subject,Session\n{PET_STUDY},Subj042,Subj042_PET\n")),
        **extra,
    )
    result = dqr("run", "--config", config)
    assert result.exit_code == 0, result.output
    return config


def assert_holds_exactly_relabeled(orthanc, changed_expected: set[str], patient_comments: str | None = None):
    originals = originals_of(PET_STUDY)
    files = held_files(orthanc)
    assert sorted(files) == sorted(originals)
    for uid, data in files.items():
        held, original = pydicom.dcmread(BytesIO(data)), originals[uid]
        assert (str(held.PatientName), held.PatientID) == ("Subj042", "Subj042")
        assert (held.StudyID, held.AccessionNumber) == ("Subj042_PET", "Subj042_PET")
        tags = {e.tag for e in held} | {e.tag for e in original}
        changed = {pydicom.datadict.keyword_for_tag(t) for t in tags if t not in held or t not in original
                   or held[t].value != original[t].value}
        assert changed == changed_expected
        assert held.PixelData == original.PixelData
        assert held.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert held.get("PatientComments") == patient_comments


@over_transports
def test_c_store_destination_holds_exactly_the_study_relabeled(transport, dqr, site, write_csv, orthanc_factory):
    destination = orthanc_factory(aet="DEST", dicomweb=False)
    run_into(dqr, site, write_csv, dimse_destination(destination, transport))
    assert_holds_exactly_relabeled(destination, RELABELED)


@over_transports
def test_c_store_over_tls_to_an_orthanc_that_requires_a_client_certificate(
    transport, dqr, site, write_csv, orthanc_factory, tmp_path
):
    from dqr.testing.certificates import write_ca

    ca = write_ca(tmp_path, "ca")
    pacs, client = ca.issue(tmp_path, "pacs"), ca.issue(tmp_path, "dqr")
    destination = orthanc_factory(aet="DEST", dicomweb=False, extra_config={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pacs.cert), "DicomTlsPrivateKey": str(pacs.key),
        "DicomTlsTrustedCertificates": str(ca.cert), "DicomTlsRemoteCertificateRequired": True,
    })
    tls = {"ca_file": str(ca.cert), "cert_file": str(client.cert), "key_file": str(client.key)}
    run_into(dqr, site, write_csv, dimse_destination(destination, transport, tls=tls))
    assert_holds_exactly_relabeled(destination, RELABELED)


def test_stow_destination_holds_exactly_the_study_relabeled(dqr, site, write_csv, orthanc_factory):
    destination = orthanc_factory(aet="DEST")
    run_into(dqr, site, write_csv, dicomweb_destination(destination))
    assert_holds_exactly_relabeled(destination, RELABELED)


@over_transports
def test_xnat_routing_writes_patient_comments_and_the_manifest_keeps_the_original(
    transport, dqr, site, write_csv, orthanc_factory, tmp_path
):
    import json

    destination = orthanc_factory(aet="XNAT", dicomweb=False)
    run_into(dqr, site, write_csv, dimse_destination(destination, transport, xnat_routing=True))
    assert_holds_exactly_relabeled(destination, RELABELED | {"PatientComments"}, ROUTING)
    manifest = tmp_path / "archive-job-manifest" / "Test" / "Subj042" / "Subj042_PET" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == 6
    assert all(r["replaced"]["PatientComments"] == "" and r["replaced"]["PatientName"] == "SMITH^JOHN" for r in records)


@over_transports
def test_verify_by_c_find_and_by_qido_names_the_instances_not_held(transport, orthanc_factory, tmp_path):
    from dqr.backend import DestinationContext
    from dqr.model import Series, Study
    from dqr.plugins.destinations import DicomwebDestinationConfig, DimseDestinationConfig
    from dqr.plugins.destinations.dimse_store import DimseDestination
    from dqr.plugins.destinations.stow import StowDestination

    server = orthanc_factory(aet="DEST")
    originals = originals_of(PET_STUDY)
    held = originals[sorted(originals)[0]]
    server.upload(_part10(held))
    study = Study(study_uid=held.StudyInstanceUID)
    series = Series(study_uid=held.StudyInstanceUID, series_uid=held.SeriesInstanceUID)
    asked = sorted(uid for uid, d in originals.items() if d.SeriesInstanceUID == held.SeriesInstanceUID)
    context = DestinationContext(tmp_path / "archive", "Test", tmp_path / "job.sqlite", tmp_path)
    for destination in (
        DimseDestination(DimseDestinationConfig.model_validate(dimse_destination(server, transport)), context),
        StowDestination(DicomwebDestinationConfig.model_validate(dicomweb_destination(server)), context),
    ):
        try:
            assert destination.verify(study, series, asked) == [uid for uid in asked if uid != held.SOPInstanceUID]
        finally:
            destination.close()


@over_transports
def test_echo_reaches_both_kinds_of_destination(transport, orthanc_factory, tmp_path):
    from dqr.backend import DestinationContext
    from dqr.plugins.destinations import DicomwebDestinationConfig, DimseDestinationConfig
    from dqr.plugins.destinations.dimse_store import DimseDestination
    from dqr.plugins.destinations.stow import StowDestination

    server = orthanc_factory(aet="DEST")
    context = DestinationContext(tmp_path / "archive", "Test", tmp_path / "job.sqlite", tmp_path)
    dimse = DimseDestination(DimseDestinationConfig.model_validate(dimse_destination(server, transport)), context)
    stow = StowDestination(DicomwebDestinationConfig.model_validate(dicomweb_destination(server)), context)
    try:
        assert "DEST at 127.0.0.1" in dimse.echo()
        assert server.dicomweb_url in stow.echo()
    finally:
        dimse.close()
        stow.close()


def _part10(dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@over_transports
def test_storage_commitment_from_orthanc_confirms_what_was_sent(transport, orthanc_factory, tmp_path, free_loopback_port):
    from dqr.backend import DestinationContext, VerifyMode
    from dqr.model import Series, Study
    from dqr.plugins.destinations import DimseDestinationConfig
    from dqr.plugins.destinations.dimse_store import DimseDestination

    server = orthanc_factory(aet="DEST", dicomweb=False, modalities={"dqr": ("DQR", "127.0.0.1", free_loopback_port)})
    originals = originals_of(PET_STUDY)
    first = originals[sorted(originals)[0]]
    series_uids = sorted(uid for uid, d in originals.items() if d.SeriesInstanceUID == first.SeriesInstanceUID)
    config = DimseDestinationConfig.model_validate(
        dimse_destination(server, transport, verify="commitment", commitment_port=free_loopback_port, commitment_timeout=10)
    )
    context = DestinationContext(tmp_path / "archive", "Test", tmp_path / "job.sqlite", tmp_path)
    destination = DimseDestination(config, context)
    study = Study(study_uid=first.StudyInstanceUID)
    series = Series(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID)
    try:
        assert destination.verify_mode is VerifyMode.COMMITMENT
        writer = destination.open_series(study, series, "S", "E")
        for uid in series_uids[:2]:
            writer.write(uid, _part10(originals[uid]), {})
        assert sorted(writer.commit()) == series_uids[:2]
        assert destination.verify(study, series, series_uids) == series_uids[2:]
    finally:
        destination.close()
