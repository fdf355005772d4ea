"""A deterministic synthetic cohort: patients x studies x series x instances
with realistic tags and small images.

The same spec always gives the same UIDs, names and pixel bytes, so tests,
the demo CSV and the benchmarks can refer to studies by accession number.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
PET_IMAGE = "1.2.840.10008.5.1.4.1.1.128"

#: Study templates: (modalities, description, [(modality, sop class, series description)]).
STUDY_TEMPLATES = (
    ("CT", "CT CHEST W/O CONTRAST", [("CT", CT_IMAGE, "Localizer"), ("CT", CT_IMAGE, "Axial 5mm")]),
    ("MR", "MR BRAIN", [("MR", MR_IMAGE, "T1 SAG"), ("MR", MR_IMAGE, "T2 AX"), ("MR", MR_IMAGE, "DWI")]),
    ("PT", "PET-CT WHOLE BODY", [("CT", CT_IMAGE, "CT AC"), ("PT", PET_IMAGE, "PET WB")]),
)

#: (family, given, middle) -- includes a non-ASCII name and a three-part one.
NAMES = (
    ("DOE", "JANE", ""),
    ("SMITH", "JOHN", ""),
    ("MÜLLER", "JÜRGEN", ""),
    ("NGUYEN", "ANH", "Q"),
    ("GARCIA", "MARIA", ""),
    ("O'BRIEN", "SEAN", ""),
    ("TANAKA", "YUKI", ""),
    ("JOHNSON", "ROBERT", "E"),
)


@dataclass(frozen=True)
class CohortSpec:
    """How big a cohort to make. ``seed`` changes every UID and value."""

    patients: int = 4
    studies_per_patient: int = 2
    instances_per_series: int = 3
    rows: int = 16
    columns: int = 16
    seed: int = 0

    @property
    def n_studies(self) -> int:
        return self.patients * self.studies_per_patient


#: The cohort every test fixture and test serves (the memory source's
#: default): 4 patients x 2 studies, CT, MR and PET-CT templates, 3 instances a series.
DEFAULT_COHORT = CohortSpec()


def _uid(spec: CohortSpec, *parts: object) -> str:
    # One joined source: pydicom concatenates entropy sources without a
    # separator, so ("series", 1, 10) and ("series", 11, 0) would collide.
    return generate_uid(entropy_srcs=["/".join(["dqr-synthetic", str(spec.seed), *map(str, parts)])])


def patient_id(spec: CohortSpec, patient: int) -> str:
    """``PAT`` plus a zero-padded number: leading zeros must survive."""
    return f"PAT{spec.seed:02d}{patient:05d}" if spec.seed else f"PAT{patient:05d}"


def accession_number(spec: CohortSpec, patient: int, study: int) -> str:
    """A 10-digit accession number starting with 0 (spreadsheets eat these)."""
    digest = hashlib.sha256(f"{spec.seed}/{patient}/{study}".encode()).hexdigest()
    return "0" + str(int(digest[:12], 16) % 10**9).zfill(9)


def _pixels(spec: CohortSpec, *parts: object) -> bytes:
    rng = random.Random("/".join(map(str, (spec.seed, *parts))))
    return rng.randbytes(spec.rows * spec.columns * 2)


def generate_cohort(spec: CohortSpec = DEFAULT_COHORT) -> Iterator[Dataset]:
    """Yield every instance of the cohort as a dataset with file meta."""
    for p in range(spec.patients):
        family, given, middle = NAMES[p % len(NAMES)]
        name = "^".join(part for part in (family, given, middle) if part)
        rng = random.Random(f"{spec.seed}/patient/{p}")
        birth = f"{rng.randint(1940, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        for s in range(spec.studies_per_patient):
            template = STUDY_TEMPLATES[(p + s) % len(STUDY_TEMPLATES)]
            study = {
                "PatientName": name,
                "PatientID": patient_id(spec, p),
                "PatientBirthDate": birth,
                "PatientSex": "F" if p % 2 == 0 else "M",
                "StudyInstanceUID": _uid(spec, "study", p, s),
                "StudyDate": f"{2015 + (p + s) % 9}{(p * 3 + s) % 12 + 1:02d}{(p + s * 7) % 28 + 1:02d}",
                "StudyTime": f"{8 + s % 10:02d}{(p * 7) % 60:02d}00",
                "AccessionNumber": accession_number(spec, p, s),
                "StudyID": str(s + 1),
                "StudyDescription": template[1],
                "ReferringPhysicianName": "WELBY^MARCUS",
            }
            for n, (modality, sop_class, description) in enumerate(template[2]):
                series_uid = _uid(spec, "series", p, s, n)
                for i in range(spec.instances_per_series):
                    yield _instance(spec, study, series_uid, n + 1, modality, sop_class, description, i + 1, (p, s, n, i))


def _instance(
    spec: CohortSpec,
    study: dict[str, str],
    series_uid: str,
    series_number: int,
    modality: str,
    sop_class: str,
    description: str,
    instance_number: int,
    key: tuple[int, ...],
) -> Dataset:
    sop_uid = _uid(spec, "instance", *key)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for keyword, value in study.items():
        setattr(ds, keyword, value)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = _uid(spec, "for", *key[:2])
    ds.ImagePositionPatient = [0, 0, instance_number * 5]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(spec, *key)
    return ds


def encode(dataset: Dataset) -> bytes:
    """A dataset as a Part-10 file in memory."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_cohort(spec: CohortSpec, folder: Path) -> list[Path]:
    """Write the cohort as ``<folder>/<study>/<series>/<instance>.dcm``."""
    written = []
    for dataset in generate_cohort(spec):
        path = folder / dataset.StudyInstanceUID / dataset.SeriesInstanceUID / f"{dataset.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(dataset))
        written.append(path)
    return written
