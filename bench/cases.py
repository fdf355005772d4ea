"""The cases of issue 6 and their competitors.

A case is a list of :class:`Variant`\\ s measured in the same run, interleaved
(A B C A B C ...). A variant knows how to build its command line for a fresh
run directory, where its output lands (to count the files it wrote) and how
many it must write; a variant whose tool is missing or whose backend does
not work is kept in the results as *skipped*, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.setup import (
    CALLED_AET,
    CALLING_AET,
    World,
    accession_csv,
    labelled_csv,
    lines_file,
    validate_csv,
    write_local_cohort,
)

#: Run when no --cases are given.
DEFAULT_CASES = ("query", "dimse", "dimse-large", "dicomweb", "relabel", "growth", "validate", "throttle")
#: Forwarding to a second Orthanc (issue 11): on request, `--cases cstore stow` (a few minutes).
CASES = (*DEFAULT_CASES, "cstore", "stow")


@dataclass
class Variant:
    case: str
    name: str
    #: run dir -> argv
    command: Callable[[Path], list[str]]
    description: str
    #: dqr | reference | floor
    role: str = "dqr"
    #: run dir -> folder whose files are counted afterwards
    files_dir: Callable[[Path], Path] | None = None
    expected_files: int | None = None
    #: stdout of a successful run -> None, or why it is wrong
    check: Callable[[str], str | None] | None = None
    skipped: str | None = None
    #: the x of a series case (studies, rows, max retrievals)
    x: int | None = None
    units: int | None = None  # studies or rows, for per-unit figures
    params: dict = field(default_factory=dict)


def site_yaml(run: Path, source: dict, **extra) -> Path:
    config = {
        "project": "Bench",
        "source": "pacs",
        "sources": {"pacs": source},
        "archive": "archive",
        **extra,
    }
    path = run / "site.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def store_port(world: World) -> int:
    """A free port for dqr's C-MOVE storage SCP, fresh for each run and
    registered in Orthanc under dqr's AE title. Taken below the ephemeral
    range: a port from there can be taken by any outgoing connection (the
    findscu loop alone makes thousands) between our pick and dqr's bind."""
    import random
    import socket

    low, _ = (int(x) for x in open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    for _ in range(200):
        port = random.randint(20000, max(20001, low - 1))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        world.orthanc.add_modality("dqrbench", CALLING_AET, "127.0.0.1", port)
        return port
    raise RuntimeError("no free port for the C-MOVE storage SCP")


def dimse_source(world: World, retrieve: str = "c-get", transport: str | None = None) -> dict:
    source = {
        "type": "dimse",
        "host": "127.0.0.1",
        "port": world.orthanc.dicom_port,
        "called_aet": CALLED_AET,
        "calling_aet": CALLING_AET,
        "retrieve": retrieve,
    }
    if transport:
        source["transport"] = transport
    if retrieve == "c-move":
        source.update(move_destination=CALLING_AET, store_port=0, store_host="127.0.0.1")  # port: per run
    return source


def dicomweb_source(world: World) -> dict:
    return {"type": "dicomweb", "url": world.orthanc.dicomweb_url}


def _archive(run: Path) -> Path:
    return run / "archive"


def _out(run: Path) -> Path:
    return run / "out"


def dqr_run(world: World, case: str, name: str, source: dict, csv: Path, studies: int, *extra: str, **kw) -> Variant:
    def command(run: Path) -> list[str]:
        sent = {**source, "store_port": store_port(world)} if source.get("retrieve") == "c-move" else source
        return [world.dqr, "run", "--config", str(site_yaml(run, sent)), "--csv", str(csv), *extra]

    return Variant(case, name, command, kw.pop("description", f"dqr run ({source['type']})"),
                   files_dir=_archive, expected_files=world.instances(studies), units=studies, **kw)


def _csv_rows(expected: int) -> Callable[[str], str | None]:
    """Every row of the query CSV matches exactly one study: as many result lines, each with one."""

    def check(stdout: str) -> str | None:
        import csv
        import io

        lines = list(csv.DictReader(io.StringIO(stdout)))
        matched = sum(1 for line in lines if line.get("StudyInstanceUID"))
        if len(lines) == expected == matched:
            return None
        return f"{len(lines)} result lines, {matched} with a study; expected {expected}"

    return check


def _floor_count(key: str, expected: int) -> Callable[[str], str | None]:
    import json

    def check(stdout: str) -> str | None:
        try:
            result = json.loads(stdout.strip().splitlines()[-1])
            found = result[key]
        except (ValueError, IndexError, KeyError):
            return "no result line"
        notes = [] if found == expected else [f"{key}={found}, expected {expected}"]
        if result.get("lost_responses"):
            notes.append(f"{result['lost_responses']} responses lost in pynetdicom and re-sent (2 s each)")
        return "; ".join(notes) or None

    return check


def floor(world: World, command: str, *args: str) -> list[str]:
    return [world.python, "-m", "bench.floors", command, *args]


# -- 1. query --------------------------------------------------------------------


def query_case(world: World) -> list[Variant]:
    rows = world.query_accessions
    csv = accession_csv(world.inputs / "query.csv", rows)
    plain = lines_file(world.inputs / "query-accessions.txt", rows)
    source = dimse_source(world)
    variants = [
        Variant(
            "query", "dqr query",
            lambda run: [world.dqr, "query", "--config", str(site_yaml(run, source)), "--csv", str(csv), "--format", "csv"],
            "dqr query, default limits (max_queries 4 pooled associations), CSV to stdout",
            check=_csv_rows(len(rows)), units=len(rows),
        ),
    ]
    script = world.inputs / "findscu-loop.sh"
    if world.findscu:
        keys = " ".join(f"-k {k}" for k in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "StudyDate",
                                             "ModalitiesInStudy", "StudyDescription", "StudyID",
                                             "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"))
        script.write_text(
            "#!/bin/bash\n# one dcmtk findscu process per CSV row, as a user's shell loop would\n"
            "# Debian's DCMTK leaves Nagle on unless told: the competitor at its best\n"
            "export TCP_NODELAY=1\n"
            f"while IFS= read -r acc; do\n"
            f"  {world.findscu} -S -aet {CALLING_AET} -aec {CALLED_AET} -k QueryRetrieveLevel=STUDY "
            f"-k AccessionNumber=\"$acc\" {keys} 127.0.0.1 {world.orthanc.dicom_port} >/dev/null 2>&1 || exit 1\n"
            f"done < {plain}\n"
        )
    variants.append(Variant(
        "query", "findscu loop", lambda run: ["bash", str(script)],
        "bash loop, one dcmtk findscu process per row (TCP_NODELAY=1)", role="reference", units=len(rows),
        skipped=None if world.findscu else "dcmtk findscu not installed",
    ))
    variants.append(Variant(
        "query", "pynetdicom 1 assoc",
        lambda run: floor(world, "find", "--port", str(world.orthanc.dicom_port), "--accessions", str(plain)),
        "raw pynetdicom, one association (TCP_NODELAY), the same C-FINDs in sequence; a lost response re-sent after 2 s",
        role="floor", check=_floor_count("answers", len(rows)), units=len(rows),
    ))
    return variants


# -- 2. retrieve over DIMSE ------------------------------------------------------------


def dimse_case(world: World) -> list[Variant]:
    n = world.sizes.retrieve_studies
    return dimse_variants(world, "dimse", world.first(n), n, pynetdicom_variant=True)


def dimse_large_case(world: World) -> list[Variant]:
    """Issue 13: large instances (512 x 512 16-bit, ~130 MB in all), where
    bytes rather than messages dominate."""
    from bench.setup import seed_large

    studies = seed_large(world)
    return dimse_variants(world, "dimse-large", studies, len(studies))


def dimse_variants(world: World, case: str, studies: list, n: int, pynetdicom_variant: bool = False) -> list[Variant]:
    tag = f"{case}-{n}"
    csv = labelled_csv(world.inputs / f"retrieve-{tag}.csv", studies)
    uids = lines_file(world.inputs / f"study-uids-{tag}.txt", [s.study_uid for s in studies])
    expected = sum(s.instances for s in studies)

    def run(name: str, source: dict, description: str) -> Variant:
        variant = dqr_run(world, case, name, source, csv, n, description=description)
        variant.expected_files = expected
        return variant

    variants = [
        run("dqr run c-get", dimse_source(world, "c-get"),
            "dqr run: query, C-GET, relabel, store (fsync'd), default limits (max_retrievals 2), transport native"),
        run("dqr run c-move", dimse_source(world, "c-move"),
            "dqr run: query, C-MOVE to dqr's storage SCP, relabel, store, default limits, transport native"),
    ]
    if pynetdicom_variant:
        variants.append(run("dqr run c-get pynetdicom", dimse_source(world, "c-get", "pynetdicom"),
                            "dqr run as above over `transport: pynetdicom` (the previous DIMSE stack)"))
    getscu = world.inputs / f"getscu-loop-{tag}.sh"
    movescu = world.inputs / f"movescu-loop-{tag}.sh"
    if world.getscu:
        getscu.write_text(
            "#!/bin/bash\n# one dcmtk getscu process per study, into the folder given as $1\n"
            "# Debian's DCMTK leaves Nagle on unless told: the competitor at its best\n"
            "export TCP_NODELAY=1\n"
            'mkdir -p "$1"\n'
            "while IFS= read -r uid; do\n"
            f"  {world.getscu} -S -aet {CALLING_AET} -aec {CALLED_AET} -k QueryRetrieveLevel=STUDY "
            f"-k StudyInstanceUID=\"$uid\" -od \"$1\" 127.0.0.1 {world.orthanc.dicom_port} >/dev/null 2>&1 || exit 1\n"
            f"done < {uids}\n"
        )
    movescu_tool = world.getscu and str(Path(world.getscu).with_name("movescu"))

    def movescu_command(run_dir: Path) -> list[str]:
        # the storage SCP is movescu's own (--port), registered in Orthanc like dqr's
        port = store_port(world)
        movescu.write_text(
            "#!/bin/bash\n# one dcmtk movescu process per study, each its own storage SCP on $2\n"
            "export TCP_NODELAY=1\n"
            'mkdir -p "$1"\n'
            "while IFS= read -r uid; do\n"
            f"  {movescu_tool} -S -aet {CALLING_AET} -aem {CALLING_AET} -aec {CALLED_AET} --port \"$2\" "
            f"-k QueryRetrieveLevel=STUDY -k StudyInstanceUID=\"$uid\" -od \"$1\" "
            f"127.0.0.1 {world.orthanc.dicom_port} >/dev/null 2>&1 || exit 1\n"
            f"done < {uids}\n"
        )
        return ["bash", str(movescu), str(_out(run_dir)), str(port)]

    variants.append(Variant(
        case, "getscu loop", lambda run: ["bash", str(getscu), str(_out(run))],
        "bash loop, one dcmtk getscu process per study (TCP_NODELAY=1), files as received", role="reference",
        files_dir=_out, expected_files=expected, units=n,
        skipped=None if world.getscu else "dcmtk getscu not installed",
    ))
    variants.append(Variant(
        case, "movescu loop", movescu_command,
        "bash loop, one dcmtk movescu process per study with its own storage SCP (--port), TCP_NODELAY=1",
        role="reference", files_dir=_out, expected_files=expected, units=n,
        skipped=None if movescu_tool and Path(movescu_tool).exists() else "dcmtk movescu not installed",
    ))
    variants.append(Variant(
        case, "pynetdicom C-GET",
        lambda run: floor(world, "cget", "--port", str(world.orthanc.dicom_port), "--studies", str(uids), "--out", str(_out(run))),
        "raw pynetdicom, one association (TCP_NODELAY), one C-GET per study, files written unmodified",
        role="floor", files_dir=_out, expected_files=expected, units=n,
    ))
    return variants


# -- 3. retrieve over DICOMweb ---------------------------------------------------------


def dicomweb_works(world: World) -> str | None:
    """None if dqr's dicomweb backend is registered, else why not."""
    import subprocess

    result = subprocess.run([world.dqr, "plugins"], capture_output=True, text=True, timeout=60)
    if result.returncode != 0 or "dicomweb" not in result.stdout:
        return "dqr's dicomweb backend is not registered (`dqr plugins`)"
    return None


def dicomweb_case(world: World) -> list[Variant]:
    n = world.sizes.retrieve_studies
    studies = world.first(n)
    csv = labelled_csv(world.inputs / f"retrieve-{n}.csv", studies)
    uids = lines_file(world.inputs / f"study-uids-{n}.txt", [s.study_uid for s in studies])
    expected = world.instances(n)
    url = world.orthanc.dicomweb_url
    dqr = dqr_run(world, "dicomweb", "dqr run dicomweb", dicomweb_source(world), csv, n,
                  description="dqr run: QIDO-RS, WADO-RS per series (streamed), relabel, store, default limits")
    dqr.skipped = dicomweb_works(world)
    return [
        dqr,
        Variant("dicomweb", "dicomweb-client", lambda run: floor(world, "wado-client", "--url", url, "--studies", str(uids), "--out", str(_out(run))),
                "dicomweb-client retrieve_study per study, written with pydicom", role="reference",
                files_dir=_out, expected_files=expected, units=n),
        Variant("dicomweb", "raw HTTP", lambda run: floor(world, "wado-raw", "--url", url, "--studies", str(uids), "--out", str(_out(run))),
                "requests, WADO-RS per study, multipart split by hand, parts written as they are", role="floor",
                files_dir=_out, expected_files=expected, units=n),
    ]


# -- 4. relabel + store alone -------------------------------------------------------------


def relabel_case(world: World) -> list[Variant]:
    n = world.sizes.retrieve_studies
    folder = write_local_cohort(world)
    csv = labelled_csv(world.inputs / f"retrieve-{n}.csv", world.first(n))
    expected = world.instances(n)
    return [
        dqr_run(world, "relabel", "dqr run memory", {"type": "memory", "path": str(folder)}, csv, n,
                description="dqr run on a `type: memory` source with `path:` (indexes the folder, then relabel+store)"),
        Variant("relabel", "dqr store path", lambda run: floor(world, "dqr-store", "--source", str(folder), "--out", str(_archive(run))),
                "dqr's decode/relabel/encode/write/commit called in-process (no engine, no state DB, no indexing)",
                files_dir=_archive, expected_files=expected, units=n),
        Variant("relabel", "pydicom r/m/w", lambda run: floor(world, "pydicom-relabel", "--source", str(folder), "--out", str(_out(run))),
                "bare pydicom: dcmread, set 4 attributes, save_as (no fsync)", role="reference",
                files_dir=_out, expected_files=expected, units=n),
    ]


# -- 5. growth, validation -----------------------------------------------------------------


def growth_case(world: World) -> list[Variant]:
    variants = []
    for n in world.sizes.growth:
        csv = labelled_csv(world.inputs / f"retrieve-{n}.csv", world.first(n))
        variants.append(dqr_run(world, "growth", f"dqr run c-get {n} studies", dimse_source(world), csv, n, x=n,
                                description=f"dqr run, C-GET, {n} studies ({world.instances(n)} instances)"))
    return variants


def validate_case(world: World) -> list[Variant]:
    variants = []
    for rows in world.sizes.validate_rows:
        csv = validate_csv(world.inputs / f"validate-{rows}.csv", rows)
        variants.append(Variant("validate", f"dqr validate {rows} rows", lambda run, c=csv: [world.dqr, "validate", "--csv", str(c)],
                                f"dqr validate, {rows}-row CSV", x=rows, units=rows))
    return variants


# -- 6. throttling -------------------------------------------------------------------------


def throttle_case(world: World) -> list[Variant]:
    n = world.sizes.retrieve_studies
    csv = labelled_csv(world.inputs / f"retrieve-{n}.csv", world.first(n))
    return [
        dqr_run(world, "throttle", f"dqr run c-get max_retrievals {k}", dimse_source(world), csv, n,
                "--max-retrievals", str(k), x=k, description=f"dqr run, C-GET, --max-retrievals {k}")
        for k in world.sizes.throttle
    ]


# -- 7. forwarding: memory -> C-STORE / STOW-RS --------------------------------------------

DESTINATION_AET = "DEST"
_destination = {}


def destination_orthanc(world: World):
    """A second Orthanc, the destination of the forwarding cases (stopped at exit)."""
    from dqr.testing.orthanc import OrthancServer

    if "server" not in _destination:
        _destination["server"] = OrthancServer.start(world.root / "destination-orthanc", aet=DESTINATION_AET)
    return _destination["server"]


def stop_destination_orthanc() -> None:
    """Stop the forwarding cases' destination Orthanc now, if one was started."""
    if "server" in _destination:
        _destination.pop("server").stop()


def _emptied(server) -> None:
    """Every run starts from an empty destination (outside the measured time)."""
    for patient in server.session.get(server.http_url + "/patients", timeout=60).json():
        server.session.delete(f"{server.http_url}/patients/{patient}", timeout=60).raise_for_status()


def _holds(server, expected: int) -> Callable[[str], str | None]:
    def check(stdout: str) -> str | None:
        count = server.session.get(server.http_url + "/statistics", timeout=60).json()["CountInstances"]
        return None if count == expected else f"the destination holds {count} instances, expected {expected}"

    return check


def _forwarding(world: World, case: str, name: str, destination: dict, description: str) -> Variant:
    n = world.sizes.retrieve_studies
    folder = write_local_cohort(world)
    csv = labelled_csv(world.inputs / f"retrieve-{n}.csv", world.first(n))
    server = destination_orthanc(world)

    def command(run: Path) -> list[str]:
        _emptied(server)
        config = site_yaml(run, {"type": "memory", "path": str(folder)}, destination=destination)
        return [world.dqr, "run", "--config", str(config), "--csv", str(csv)]

    return Variant(case, name, command, description, check=_holds(server, world.instances(n)), units=n)


def _forwarding_baseline(world: World, case: str) -> Variant:
    """The same dqr run into the local archive: what the memory source
    (indexing the folder), start-up, relabeling and the job state cost
    without any destination, so that the forwarding part can be told apart."""
    n = world.sizes.retrieve_studies
    folder = write_local_cohort(world)
    csv = labelled_csv(world.inputs / f"retrieve-{n}.csv", world.first(n))
    return dqr_run(world, case, "dqr run memory->archive (same source, no network)",
                   {"type": "memory", "path": str(folder)}, csv, n,
                   description="the same memory source and relabeling into the local archive: dqr's cost without a destination")


def cstore_case(world: World) -> list[Variant]:
    import shutil

    server = destination_orthanc(world)
    n = world.sizes.retrieve_studies
    folder = write_local_cohort(world)
    target = {"type": "dimse", "host": "127.0.0.1", "port": server.dicom_port, "called_aet": DESTINATION_AET}
    storescu = shutil.which("storescu")
    script = world.inputs / "storescu.sh"
    script.write_text(
        "#!/bin/bash\n# dcmtk storescu: every file of the folder, one association (TCP_NODELAY=1)\n"
        "export TCP_NODELAY=1\n"
        f"{storescu} -aet {CALLING_AET} -aec {DESTINATION_AET} +sd +r 127.0.0.1 {server.dicom_port} {folder} >/dev/null 2>&1\n"
    )

    def storescu_command(run: Path) -> list[str]:
        _emptied(server)
        return ["bash", str(script)]

    return [
        _forwarding(world, "cstore", "dqr run memory->C-STORE", {**target, "verify": False},
                    "dqr run: memory source, relabel, C-STORE to a second Orthanc (max_associations 2), no verify"),
        _forwarding(world, "cstore", "dqr run memory->C-STORE verified", target,
                    "the same, verified by C-FIND at IMAGE level after each series"),
        _forwarding_baseline(world, "cstore"),
        Variant("cstore", "storescu +sd", storescu_command,
                "dcmtk storescu +sd +r on the same files (not relabeled), one association (TCP_NODELAY=1)",
                role="reference", check=_holds(server, world.instances(n)), units=n,
                skipped=None if storescu else "dcmtk storescu not installed"),
    ]


def stow_case(world: World) -> list[Variant]:
    server = destination_orthanc(world)
    n = world.sizes.retrieve_studies
    folder = write_local_cohort(world)
    target = {"type": "dicomweb", "url": server.dicomweb_url}

    def raw_command(run: Path) -> list[str]:
        _emptied(server)
        return floor(world, "stow-raw", "--url", server.dicomweb_url, "--source", str(folder))

    return [
        _forwarding(world, "stow", "dqr run memory->STOW", {**target, "verify": False},
                    "dqr run: memory source, relabel, STOW-RS per series to a second Orthanc (max_requests 2), no verify"),
        _forwarding(world, "stow", "dqr run memory->STOW verified", target,
                    "the same, verified by QIDO-RS after each series"),
        _forwarding_baseline(world, "stow"),
        Variant("stow", "raw STOW loop", raw_command,
                "requests, one STOW-RS POST per series folder, the same files (not relabeled), in sequence",
                role="floor", check=_holds(server, world.instances(n)), units=n),
    ]


BUILDERS = {
    "query": query_case,
    "dimse": dimse_case,
    "dimse-large": dimse_large_case,
    "dicomweb": dicomweb_case,
    "relabel": relabel_case,
    "growth": growth_case,
    "validate": validate_case,
    "throttle": throttle_case,
    "cstore": cstore_case,
    "stow": stow_case,
}
