"""The benchmark's world: sizes, a private Orthanc seeded with synthetic
cohorts, the input files every competitor reads, and the tools' locations.

Two cohorts, both deterministic (``dqr.plugins.testpacs.memory.synthetic``):

- the *retrieve* cohort (64x64 16-bit images, ~8 KB a file), made of
  several cohorts of at most 10 patients (20 studies) each, seeds 1, 2, 3 ...:
  ``synthetic._uid`` joins its entropy parts without a separator, so with 10
  or more patients and 10 or more instances a series two instances can get
  the same SOP Instance UID (patient 1/series 1/instance 10 and patient
  10/series 1/instance 0 both hash "1...110"; 124 duplicates in a 40-patient
  cohort), which makes Orthanc send the wrong instance for a C-GET. Studies
  are taken in generation order, so "the first 40 studies" is the same set
  in every case;
- the *query* cohort (seed 7, one instance a series): one study per query
  row, so every C-FIND of the query case matches exactly one study.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort, write_cohort
from dqr.testing.orthanc import OrthancServer

REPO = Path(__file__).resolve().parent.parent
CALLED_AET = "ORTHANC"
CALLING_AET = "DQR"


@dataclass(frozen=True)
class Sizes:
    query_rows: int
    retrieve_studies: int
    instances_per_series: int
    growth: tuple[int, ...]
    validate_rows: tuple[int, ...]
    throttle: tuple[int, ...]
    repeat: int
    timeout: float
    image_size: int = 64

    @property
    def cohort_studies(self) -> int:
        return max(self.retrieve_studies, *self.growth)


FULL = Sizes(
    query_rows=1000,
    retrieve_studies=40,
    instances_per_series=21,  # 40 studies: 93 series, 1,953 instances
    growth=(10, 20, 40, 80),
    validate_rows=(1000, 10_000, 100_000),
    throttle=(1, 2, 4),
    repeat=5,
    timeout=900,
)
QUICK = Sizes(
    query_rows=20,
    retrieve_studies=2,
    instances_per_series=2,
    growth=(1, 2),
    validate_rows=(100, 1000),
    throttle=(1, 2),
    repeat=1,
    timeout=60,
    image_size=16,
)


@dataclass
class StudyInfo:
    accession: str
    study_uid: str
    instances: int = 0


@dataclass
class World:
    """Everything the cases need, built once per benchmark run."""

    sizes: Sizes
    root: Path
    orthanc: OrthancServer
    dqr: str
    python: str
    findscu: str | None
    getscu: str | None
    studies: list[StudyInfo]  # retrieve cohort, generation order
    query_accessions: list[str]
    inputs: Path = field(init=False)
    large_studies: list[StudyInfo] | None = None

    def __post_init__(self) -> None:
        self.inputs = self.root / "inputs"
        self.inputs.mkdir(parents=True, exist_ok=True)

    def first(self, n: int) -> list[StudyInfo]:
        return self.studies[:n]

    def instances(self, n: int) -> int:
        return sum(s.instances for s in self.first(n))

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env.pop("TCP_NODELAY", None)  # only Orthanc gets it: the clients set their own sockets
        return env


#: Patients per synthetic cohort: single-digit patient numbers keep UIDs unique.
PATIENTS_PER_SEED = 10


def retrieve_specs(sizes: Sizes, studies: int | None = None) -> list[CohortSpec]:
    """Cohorts holding the first ``studies`` (default all) studies of the retrieve set."""
    patients = -(-(studies or sizes.cohort_studies) // 2)
    specs = []
    seed = 1
    while patients > 0:
        specs.append(CohortSpec(
            patients=min(PATIENTS_PER_SEED, patients),
            studies_per_patient=2,
            instances_per_series=sizes.instances_per_series,
            rows=sizes.image_size,
            columns=sizes.image_size,
            seed=seed,
        ))
        patients -= PATIENTS_PER_SEED
        seed += 1
    return specs


def retrieve_datasets(sizes: Sizes, studies: int | None = None) -> Iterator:
    for spec in retrieve_specs(sizes, studies):
        yield from generate_cohort(spec)


def query_spec(sizes: Sizes) -> CohortSpec:
    # One instance a series: every UID part but the patient number is one digit, so no collisions.
    return CohortSpec(patients=-(-sizes.query_rows // 2), studies_per_patient=2, instances_per_series=1, seed=99)


def _recording(datasets: Iterator, found: dict[str, StudyInfo]) -> Iterator:
    for dataset in datasets:
        info = found.setdefault(dataset.StudyInstanceUID, StudyInfo(dataset.AccessionNumber, dataset.StudyInstanceUID))
        info.instances += 1
        yield dataset


def seed(orthanc: OrthancServer, sizes: Sizes) -> tuple[list[StudyInfo], list[str]]:
    studies: dict[str, StudyInfo] = {}
    orthanc.seed(_recording(retrieve_datasets(sizes), studies))
    queried: dict[str, StudyInfo] = {}
    orthanc.seed(_recording(generate_cohort(query_spec(sizes)), queried))
    retrieve = list(studies.values())[: sizes.cohort_studies]
    accessions = [info.accession for info in queried.values()][: sizes.query_rows]
    return retrieve, accessions


#: Issue 13's large-instance cohort: 4 studies of 512 x 512 16-bit images,
#: ~250 instances, ~130 MB (quick: 64 x 64).
LARGE_IMAGE = 512
LARGE_INSTANCES_PER_SERIES = 28


def seed_large(world: World) -> list[StudyInfo]:
    if world.large_studies is None:
        quick = world.sizes.image_size < 64
        spec = CohortSpec(
            patients=1 if quick else 2, studies_per_patient=2,
            instances_per_series=2 if quick else LARGE_INSTANCES_PER_SERIES,
            rows=64 if quick else LARGE_IMAGE, columns=64 if quick else LARGE_IMAGE, seed=77,
        )
        found: dict[str, StudyInfo] = {}
        world.orthanc.seed(_recording(generate_cohort(spec), found))
        world.large_studies = list(found.values())
    return world.large_studies


def write_local_cohort(world: World) -> Path:
    """The retrieve set as files, for the relabel+store case (folder per series)."""
    folder = world.inputs / "local-cohort"
    if not folder.exists():
        for spec in retrieve_specs(world.sizes, world.sizes.retrieve_studies):
            write_cohort(spec, folder)
        wanted = {s.study_uid for s in world.first(world.sizes.retrieve_studies)}
        for study_dir in folder.iterdir():
            if study_dir.name not in wanted:
                shutil.rmtree(study_dir)
    return folder


def labelled_csv(path: Path, studies: list[StudyInfo]) -> Path:
    """Accession Number, Subject, Session: one row per study, each with its own
    labels, so every instance is relabeled (the XNAT rules: 4 attributes)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Accession Number", "Subject", "Session"])
        for number, study in enumerate(studies, 1):
            writer.writerow([study.accession, f"SUBJ{number:05d}", f"SUBJ{number:05d}_S1"])
    return path


def accession_csv(path: Path, accessions: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Accession Number"])
        writer.writerows([a] for a in accessions)
    return path


def validate_csv(path: Path, rows: int) -> Path:
    """A CSV as big as asked, with the usual mix of columns (no network)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Accession Number", "Patient ID", "Study Date", "Modality", "Subject", "Session"])
        for n in range(rows):
            writer.writerow([f"{n:010d}", f"PAT{n % 5000:05d}", f"2015{n % 12 + 1:02d}01-2016{n % 12 + 1:02d}28",
                             ("CT", "MR", "PT")[n % 3], f"S{n:06d}", f"S{n:06d}_1"])
    return path


def lines_file(path: Path, values: list[str]) -> Path:
    path.write_text("".join(f"{v}\n" for v in values))
    return path


# -- tools -------------------------------------------------------------------------


def _is_dcmtk(path: str) -> bool:
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "dcmtk" in (result.stdout + result.stderr).lower()


def find_dcmtk(tool: str) -> str | None:
    """dcmtk's ``tool``. pynetdicom installs apps of the same names (findscu,
    getscu) into a venv's bin: those are not dcmtk, so check ``--version``."""
    candidates = [f"/usr/bin/{tool}", *(str(Path(d) / tool) for d in os.environ.get("PATH", "").split(os.pathsep))]
    for candidate in dict.fromkeys(candidates):
        if os.access(candidate, os.X_OK) and _is_dcmtk(candidate):
            return candidate
    return None


def find_dqr() -> tuple[str, str]:
    """``dqr`` (the repo's .venv first, else PATH) and the Python beside it."""
    venv = REPO / ".venv" / "bin"
    if (venv / "dqr").exists():
        return str(venv / "dqr"), str(venv / "python")
    found = shutil.which("dqr")
    if found is None:
        raise SystemExit("dqr not found: install it (bash scripts/demo.sh) or put it on PATH")
    python = Path(found).parent / "python"
    return found, str(python if python.exists() else sys.executable)


def byte_compile(python: str, *folders: Path) -> None:
    """Write the bytecode of the modules in ``folders`` (quietly; a module
    that does not compile is left for its import to report), as installing a
    package does. An editable install compiles each module on its first
    import and caches it -- unless ``PYTHONDONTWRITEBYTECODE`` is set, as it
    is on these machines: then every dqr process compiled its ~100 modules
    from source again, ~0.1-0.5 s of start-up that no installed copy pays
    (``pip install`` writes the bytecode of what it installs)."""
    subprocess.run([python, "-m", "compileall", "-q", *map(str, folders)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)


def start_world(sizes: Sizes, root: Path) -> World:
    dqr, python = find_dqr()
    byte_compile(python, REPO / "core", REPO / "plugins", REPO / "bench")
    orthanc = OrthancServer.start(root / "orthanc", aet=CALLED_AET, tcp_nodelay=True)
    try:
        studies, accessions = seed(orthanc, sizes)
        return World(
            sizes=sizes, root=root, orthanc=orthanc, dqr=dqr, python=python,
            findscu=find_dcmtk("findscu"), getscu=find_dcmtk("getscu"),
            studies=studies, query_accessions=accessions,
        )
    except BaseException:
        orthanc.stop()
        raise
