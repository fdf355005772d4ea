"""C-FIND identifiers and answers: which keys dqr asks for at each level and
how answers become :mod:`dqr.model` objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom.dataset import Dataset

from dqr.model import (
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    Instance,
    Series,
    Study,
    series_from_attributes,
    study_from_attributes,
)

STUDY_RETURN_KEYS = STUDY_KEYWORDS
SERIES_RETURN_KEYS = SERIES_KEYWORDS
IMAGE_RETURN_KEYS = ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
#: Patient-level keys of the Patient Root model (PS3.4 C.6.1.1.2).
PATIENT_KEYS = frozenset({"PatientID", "PatientName", "PatientBirthDate", "PatientSex"})


def identifier(
    level: str, filters: Mapping[str, str], return_keys: tuple[str, ...] = ()
) -> Dataset:
    """A C-FIND/C-GET/C-MOVE identifier: empty return keys, then the filters."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in return_keys:
        setattr(ds, keyword, "")
    for keyword, value in filters.items():
        setattr(ds, keyword, value)
    if any(not str(value).isascii() for value in filters.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"  # the values are str: send them as UTF-8
    return ds


def text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if _is_multi(value):
        return "\\".join(str(v) for v in value)
    return str(value)


def _is_multi(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"


def study_from_answer(ds: Dataset) -> Study | None:
    if not text(ds, "StudyInstanceUID"):
        return None
    return study_from_attributes({keyword: text(ds, keyword) for keyword in STUDY_KEYWORDS})


def series_from_answer(
    study: Study, ds: Dataset, sop_class_uids: frozenset[str] = frozenset()
) -> Series | None:
    if not text(ds, "SeriesInstanceUID"):
        return None
    attributes = {keyword: text(ds, keyword) for keyword in SERIES_KEYWORDS}
    return series_from_attributes(study.study_uid, attributes, sop_class_uids)


def instance_from_answer(series_uid: str, ds: Dataset) -> Instance | None:
    uid = text(ds, "SOPInstanceUID")
    if not uid:
        return None
    return Instance(
        series_uid=series_uid, sop_instance_uid=uid, sop_class_uid=text(ds, "SOPClassUID")
    )


def is_single_value(value: str) -> bool:
    """A value that names one thing (no wildcard, list or range)."""
    return bool(value) and not any(char in value for char in "*?\\")
