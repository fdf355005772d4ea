"""The competitors written by hand: what a user would script without dqr.

Each is a subcommand run as its own process (``python -m bench.floors NAME
...``), like ``dqr`` itself, so every side pays its own interpreter start and
imports, and the harness measures each one's wall time and peak RSS the same
way. Each prints one JSON line (what it did) on stdout.

- ``find``: one pynetdicom association (TCP_NODELAY set), one study-level
  C-FIND per accession number, the same return keys as dqr asks for; a
  response lost inside pynetdicom (#875, about 1 in 1,000 here) is waited
  for 2 s, then the query is re-sent on a new association.
- ``cget``: one pynetdicom association (TCP_NODELAY set), one C-GET per
  study, each received instance written unmodified (``encoded_dataset``).
- ``wado-client``: dicomweb-client ``retrieve_study`` per study, written
  with pydicom.
- ``wado-raw``: requests, one WADO-RS study retrieve per study, the
  multipart answer split by hand, each part written as it is.
- ``pydicom-relabel``: read, set the four XNAT label attributes, write;
  per file, no fsync.
- ``dqr-store``: dqr's own store path called in-process on the same folder
  (decode lazily, ``dqr_relabel`` hooks, Part-10 encode, archive write and
  per-series commit) -- relabel+store without the engine, the state DB or
  the memory backend's folder indexing.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

STUDY_RETURN_KEYS = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyDate",
    "AccessionNumber",
    "ModalitiesInStudy",
    "StudyDescription",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
#: The SOP classes of the synthetic cohort (CT, MR, PET).
STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.128",
)
LOST_RESPONSE_TIMEOUT = 2.0
LABELS = {"PatientName": "BENCH_SUBJ", "PatientID": "BENCH_SUBJ", "StudyID": "BENCH_SESS", "AccessionNumber": "BENCH_SESS"}


def _lines(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def _nodelay(assoc) -> None:
    sock = assoc.dul.socket.socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def find(args: argparse.Namespace) -> dict:
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(FIND)
    # Orthanc answers in milliseconds: a response missing after this long was
    # lost inside pynetdicom (pynetdicom#875), and the association is aborted.
    ae.dimse_timeout = LOST_RESPONSE_TIMEOUT

    def associate():
        assoc = ae.associate(args.host, args.port, ae_title=args.called_aet)
        if not assoc.is_established:
            raise SystemExit("association failed")
        _nodelay(assoc)
        return assoc

    assoc = associate()
    answers = queries = lost = 0
    try:
        for accession in _lines(args.accessions):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            for keyword in STUDY_RETURN_KEYS:
                setattr(ds, keyword, "")
            ds.AccessionNumber = accession
            for _attempt in range(3):  # the least a script must do to finish: resend once lost
                found, final = 0, False
                for status, identifier in assoc.send_c_find(ds, FIND):
                    if status and status.Status in (0xFF00, 0xFF01) and identifier is not None:
                        found += 1
                    elif status and "Status" in status:
                        final = True
                if final:
                    break
                lost += 1
                if assoc.is_established:
                    assoc.abort()
                assoc = associate()
            answers += found
            queries += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return {"queries": queries, "answers": answers, "lost_responses": lost}


def cget(args: argparse.Namespace) -> dict:
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = 0

    def on_store(event) -> int:
        nonlocal written
        (out / f"{event.request.AffectedSOPInstanceUID}.dcm").write_bytes(event.encoded_dataset())
        written += 1
        return 0x0000

    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(GET)
    for sop_class in STORAGE_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    roles = [build_role(sop_class, scp_role=True) for sop_class in STORAGE_CLASSES]
    assoc = ae.associate(
        args.host, args.port, ae_title=args.called_aet, ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise SystemExit("association failed")
    _nodelay(assoc)
    try:
        for study_uid in _lines(args.studies):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = study_uid
            for _status, _ in assoc.send_c_get(ds, GET):
                pass
    finally:
        assoc.release()
    return {"written": written}


def wado_client(args: argparse.Namespace) -> dict:
    from dicomweb_client.api import DICOMwebClient

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    client = DICOMwebClient(url=args.url)
    written = 0
    for study_uid in _lines(args.studies):
        for dataset in client.retrieve_study(study_uid):
            dataset.save_as(out / f"{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
            written += 1
    return {"written": written}


def _split_multipart(body: bytes, boundary: bytes):
    delimiter = b"--" + boundary
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            return
        header_end = chunk.index(b"\r\n\r\n")
        yield chunk[header_end + 4 : len(chunk) - 2]  # drop the CRLF before the next delimiter


def wado_raw(args: argparse.Namespace) -> dict:
    import requests

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = requests.Session()
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=*'
    written = 0
    for study_uid in _lines(args.studies):
        response = session.get(f"{args.url}/studies/{study_uid}", headers={"Accept": accept}, timeout=120)
        response.raise_for_status()
        content_type = response.headers["Content-Type"]
        boundary = next(
            part.split("=", 1)[1].strip().strip('"')
            for part in content_type.split(";")
            if part.strip().lower().startswith("boundary=")
        )
        for number, part in enumerate(_split_multipart(response.content, boundary.encode())):
            (out / f"{study_uid}-{number}.dcm").write_bytes(part)
            written += 1
    return {"written": written}


def _files(folder: str) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*.dcm") if p.is_file())


def pydicom_relabel(args: argparse.Namespace) -> dict:
    from pydicom import dcmread

    out = Path(args.out)
    written = 0
    for path in _files(args.source):
        dataset = dcmread(path)
        for keyword, value in LABELS.items():
            setattr(dataset, keyword, value)
        target = out / dataset.StudyInstanceUID / dataset.SeriesInstanceUID
        target.mkdir(parents=True, exist_ok=True)
        dataset.save_as(target / f"{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
        written += 1
    return {"written": written}


def dqr_store(args: argparse.Namespace) -> dict:
    """dqr's own store path (dqr.steps.store_instance: check, relabel,
    encode, atomic write, durable commit), in-process, one series at a time,
    with no network."""
    import threading
    from itertools import groupby
    from types import SimpleNamespace

    from pydicom import dcmread

    from dqr.context import Reporter
    from dqr.model import Labels, RetrieveRequest, Series, Study
    from dqr.pluginmanager import get_plugin_manager
    from dqr.plugins.archive import Archive
    from dqr.plugins.dicomweb.multipart import received_instance
    from dqr.steps import StoreTarget, store_instance

    # store_instance needs only the hooks, the stop event and a reporter.
    ctx = SimpleNamespace(hooks=get_plugin_manager().hook, stop=threading.Event(), reporter=Reporter())
    archive = Archive(Path(args.out), "Bench")
    labels = Labels("BENCH_SUBJ", "BENCH_SESS", relabel_subject=True, relabel_session=True)
    written = 0
    # The files are laid out <study>/<series>/<sop>.dcm: a series is a folder.
    for _series_dir, paths in groupby(_files(args.source), key=lambda p: p.parent):
        paths = list(paths)
        meta = dcmread(paths[0], stop_before_pixels=True)
        study = Study(study_uid=meta.StudyInstanceUID, patient_id=meta.PatientID)
        series = Series(study_uid=meta.StudyInstanceUID, series_uid=meta.SeriesInstanceUID)
        target = StoreTarget(RetrieveRequest(study, series), labels,
                             archive.open_series(study, series, labels.subject, labels.session))
        for path in paths:
            store_instance(ctx, received_instance(path.read_bytes()), target)
            written += 1
        target.writer.commit()
    return {"written": written}


def stow_raw(args: argparse.Namespace) -> dict:
    """requests, one STOW-RS POST per series folder, the files as they are."""
    import uuid
    from itertools import groupby

    import requests

    session = requests.Session()
    sent = 0
    for _series_dir, paths in groupby(_files(args.source), key=lambda p: p.parent):
        boundary = uuid.uuid4().hex
        parts = []
        for path in paths:
            parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path.read_bytes(), b"\r\n"]
            sent += 1
        parts.append(f"--{boundary}--\r\n".encode())
        response = session.post(
            args.url + "/studies", data=b"".join(parts),
            headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                     "Accept": "application/dicom+json"},
            timeout=300,
        )
        response.raise_for_status()
    return {"sent": sent}


COMMANDS = {
    "find": find,
    "cget": cget,
    "wado-client": wado_client,
    "wado-raw": wado_raw,
    "pydicom-relabel": pydicom_relabel,
    "dqr-store": dqr_store,
    "stow-raw": stow_raw,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floors", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--called-aet", default="ORTHANC")
    parser.add_argument("--calling-aet", default="DQR")
    parser.add_argument("--url", help="DICOMweb base URL")
    parser.add_argument("--accessions", help="file: one accession number a line")
    parser.add_argument("--studies", help="file: one StudyInstanceUID a line")
    parser.add_argument("--source", help="folder of Part-10 files")
    parser.add_argument("--out", help="folder to write to")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = COMMANDS[args.command](args)
    result["seconds_in_process"] = round(time.perf_counter() - started, 4)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
