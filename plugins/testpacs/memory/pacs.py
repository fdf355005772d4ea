"""An in-memory PACS: an index of DICOM instances answering study-, series-
and image-level queries with DICOM matching semantics.

It is the ``memory`` backend's store and also what the mock PACS servers
(DIMSE and DICOMweb) serve, so every network path can be tested against the
same data without an external server.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian

from dqr.matching import matches_all
from dqr.part10 import LONG_HEADER_VR_BYTES, dataset_offset, read_file_meta
from dqr.relabel import IMPLICIT_LITTLE, _plain

STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)
SERIES_KEYWORDS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")
IMAGE_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
INDEXED_KEYWORDS = ("AccessionNumber", "PatientID")


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


#: keyword -> tag of every attribute the index keeps
_INDEXED_TAGS = {keyword: tag_for_keyword(keyword) for keyword in STUDY_KEYWORDS + SERIES_KEYWORDS + IMAGE_KEYWORDS}
#: VRs whose value pydicom gives back as the stored text, trailing padding stripped
_AS_STORED_VRS = frozenset({"AE", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM", "UI", "UC", "UT"})


def _as_stored(vr: str | None, raw: bytes) -> str | None:
    """The text pydicom gives back for an element's value (padding already
    stripped) when that is the value as stored: plain ASCII of a text VR, or
    an IS of digits alone; ``None`` when pydicom would convert it."""
    if raw[:1] == b" " or not _plain(raw):
        return None
    if vr == "IS":
        return raw.decode("ascii") if raw.isdigit() or not raw else None
    return raw.decode("ascii") if vr in _AS_STORED_VRS else None


#: the indexed attributes by tag, with their dictionary VR (an implicit-VR file has none of its own)
_INDEXED_BY_TAG = {tag: (keyword, dictionary_VR(tag)) for keyword, tag in _INDEXED_TAGS.items()}
_LAST_INDEXED_TAG = max(_INDEXED_BY_TAG)


def _scan_plain(data: bytes, offset: int, implicit: bool) -> dict[str, str] | None:
    """The indexed attributes of a little-endian dataset read straight from
    its element headers, stopping after the last indexed tag (before the
    pixel data) -- when each one present is plain text as stored (or an IS
    of digits alone, which pydicom gives back as stored). ``None`` for
    anything else (an undefined length on the way, a value pydicom would
    convert): :func:`_index_part10` decides those."""
    unpack = struct.unpack_from
    size = len(data)
    found = dict.fromkeys(_INDEXED_TAGS, "")
    pos = offset
    previous = -1
    while pos + 8 <= size:
        group, number = unpack("<HH", data, pos)
        tag = group << 16 | number
        if tag <= previous:  # out of order or repeated: stopping early could miss one
            return None
        if tag > _LAST_INDEXED_TAG:
            break
        previous = tag
        if implicit:
            length = unpack("<I", data, pos + 4)[0]
            vr, start = None, pos + 8
        else:
            vr = data[pos + 4 : pos + 6]
            if vr in LONG_HEADER_VR_BYTES:
                length, start = unpack("<I", data, pos + 8)[0], pos + 12
            else:
                length, start = unpack("<H", data, pos + 6)[0], pos + 8
        if length == 0xFFFFFFFF or start + length > size:
            return None
        indexed = _INDEXED_BY_TAG.get(tag)
        if indexed is not None:
            keyword, dictionary_vr = indexed
            if vr is not None and vr.decode("ascii", "replace") != dictionary_vr:
                return None
            text = _as_stored(dictionary_vr, data[start : start + length].rstrip(b" \0"))
            if text is None:
                return None
            found[keyword] = text
        pos = start + length
    return found


def _index_part10(path: Path) -> tuple[dict[str, str], str] | None:
    """What :func:`_index` makes of a Part-10 file, and its transfer syntax,
    read with the store path's decoder (element values stay raw bytes):
    plain ASCII text is taken as stored, anything else is converted by
    pydicom, element by element. A folder of thousands of files is then
    indexed in a fraction of what parsing each with pydicom costs (the demo
    and the forwarding benchmark start with it). ``None`` when the file is
    not a Part-10 file this can read; :func:`dcmread` decides those."""
    from dqr.model import ReceivedInstance
    from dqr.relabel import decode

    try:
        data = read_file(path)
        meta, offset = read_file_meta(data)
        transfer_syntax = meta.get(0x0010)
        if not offset or not transfer_syntax:
            return None
        if transfer_syntax in (IMPLICIT_LITTLE, ExplicitVRLittleEndian):
            plain = _scan_plain(data, offset, transfer_syntax == IMPLICIT_LITTLE)
            if plain is not None:
                return plain, transfer_syntax
        dataset = decode(ReceivedInstance("", "", transfer_syntax, data[offset:])).dataset
        attributes = {}
        for keyword, tag in _INDEXED_TAGS.items():
            element = dataset._dict.get(tag)
            if element is None:
                attributes[keyword] = ""
                continue
            text = None
            if isinstance(element, RawDataElement) and element.value:
                text = _as_stored(element.VR, element.value.rstrip(b" \0"))
            attributes[keyword] = _text(dataset, keyword) if text is None else text
        return attributes, transfer_syntax
    except Exception:  # noqa: BLE001 - anything unusual is pydicom's to read (or to refuse)
        return None


def read_file(path: Path) -> bytes:
    """A file's bytes in three system calls (open, read, close) where
    ``Path.read_bytes`` makes seven (fstat, isatty, lseek...): each releases
    and retakes the GIL, which the store path's threads then contend for."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))  # not inherited (PEP 446)
    try:
        chunks = []
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
            if len(chunk) < _READ_SIZE:  # a regular file's short read is its end
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


_READ_SIZE = 1 << 20


@dataclass
class StoredInstance:
    """One instance: its indexed attributes and where its bytes are."""

    attributes: dict[str, str]
    transfer_syntax: str
    part10: bytes | None = None
    path: Path | None = None

    @property
    def study_uid(self) -> str:
        return self.attributes["StudyInstanceUID"]

    @property
    def series_uid(self) -> str:
        return self.attributes["SeriesInstanceUID"]

    @property
    def sop_instance_uid(self) -> str:
        return self.attributes["SOPInstanceUID"]

    @property
    def sop_class_uid(self) -> str:
        return self.attributes["SOPClassUID"]

    def read_part10(self) -> bytes:
        """The instance as a complete Part-10 file."""
        if self.part10 is not None:
            return self.part10
        assert self.path is not None
        return read_file(self.path)

    def read_dataset(self) -> bytes:
        """The encoded dataset without preamble and file meta."""
        data = self.read_part10()
        return data[dataset_offset(data) :]




def _index(dataset: Dataset) -> dict[str, str]:
    return {keyword: _text(dataset, keyword) for keyword in STUDY_KEYWORDS + SERIES_KEYWORDS + IMAGE_KEYWORDS}


@dataclass
class MemoryPacs:
    """A thread-safe index of instances keyed by study, series and SOP UID."""

    _instances: dict[str, StoredInstance] = field(default_factory=dict)
    _studies: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Computed study/series attributes, cached: a 10,000-row CSV queries the
    # same studies over and over. Cleared whenever an instance is added.
    _attribute_cache: dict[tuple[str, ...], dict[str, Any]] = field(default_factory=dict)
    # Exact-value indexes of the keys most queries use, so a query does not scan every study.
    _index: dict[str, dict[str, set[str]]] = field(
        default_factory=lambda: {key: {} for key in INDEXED_KEYWORDS}
    )

    # -- loading ---------------------------------------------------------------

    @classmethod
    def from_datasets(cls, datasets: Iterable[Dataset]) -> MemoryPacs:
        from dqr.plugins.testpacs.memory.synthetic import encode

        pacs = cls()
        for dataset in datasets:
            pacs.add(StoredInstance(_index(dataset), dataset.file_meta.TransferSyntaxUID, part10=encode(dataset)))
        return pacs

    @classmethod
    def from_folder(cls, folder: Path) -> MemoryPacs:
        """Index every DICOM file below ``folder`` (others are skipped)."""
        pacs = cls()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            indexed = _index_part10(path)
            if indexed is None:  # not a plain Part-10 file: pydicom decides
                try:
                    dataset = dcmread(path, stop_before_pixels=True)
                except (InvalidDicomError, OSError, ValueError):
                    continue
                indexed = _index(dataset), str(dataset.file_meta.TransferSyntaxUID)
            attributes, transfer_syntax = indexed
            if not attributes["SOPInstanceUID"] or not attributes["StudyInstanceUID"]:
                continue
            pacs.add(StoredInstance(attributes, transfer_syntax, path=path))
        return pacs

    def add(self, instance: StoredInstance) -> None:
        with self._lock:
            self._instances[instance.sop_instance_uid] = instance
            series = self._studies.setdefault(instance.study_uid, {}).setdefault(instance.series_uid, [])
            if instance.sop_instance_uid not in series:
                series.append(instance.sop_instance_uid)
            self._attribute_cache.clear()
            for key in INDEXED_KEYWORDS:
                self._index[key].setdefault(instance.attributes[key], set()).add(instance.study_uid)

    def add_part10(self, data: bytes) -> StoredInstance:
        """Store a received Part-10 file (what a C-STORE SCP would do)."""
        from io import BytesIO

        dataset = dcmread(BytesIO(data), stop_before_pixels=True)
        instance = StoredInstance(_index(dataset), str(dataset.file_meta.TransferSyntaxUID), part10=data)
        self.add(instance)
        return instance

    # -- querying --------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._instances)

    def study_uids(self) -> list[str]:
        return list(self._studies)

    def _study_attributes(self, study_uid: str) -> dict[str, Any]:
        cached = self._attribute_cache.get((study_uid,))
        if cached is None:
            cached = self._attribute_cache[(study_uid,)] = self._compute_study_attributes(study_uid)
        return dict(cached)

    def _series_attributes(self, study_uid: str, series_uid: str) -> dict[str, Any]:
        cached = self._attribute_cache.get((study_uid, series_uid))
        if cached is None:
            cached = self._attribute_cache[(study_uid, series_uid)] = self._compute_series_attributes(study_uid, series_uid)
        return dict(cached)

    def _compute_study_attributes(self, study_uid: str) -> dict[str, Any]:
        series = self._studies[study_uid]
        first = self._instances[next(iter(series.values()))[0]]
        attributes: dict[str, Any] = {k: first.attributes[k] for k in STUDY_KEYWORDS}
        instances = [self._instances[uid] for uids in series.values() for uid in uids]
        attributes["ModalitiesInStudy"] = tuple(sorted({i.attributes["Modality"] for i in instances}))
        attributes["SOPClassesInStudy"] = tuple(sorted({i.sop_class_uid for i in instances}))
        attributes["NumberOfStudyRelatedSeries"] = str(len(series))
        attributes["NumberOfStudyRelatedInstances"] = str(len(instances))
        return attributes

    def _compute_series_attributes(self, study_uid: str, series_uid: str) -> dict[str, Any]:
        uids = self._studies[study_uid][series_uid]
        first = self._instances[uids[0]]
        attributes = self._study_attributes(study_uid)
        attributes.update({k: first.attributes[k] for k in SERIES_KEYWORDS})
        attributes["NumberOfSeriesRelatedInstances"] = str(len(uids))
        attributes["SOPClassesInSeries"] = tuple(sorted({self._instances[u].sop_class_uid for u in uids}))
        attributes["TransferSyntaxesInSeries"] = tuple(sorted({self._instances[u].transfer_syntax for u in uids}))
        return attributes

    def find(self, level: str, filters: dict[str, str]) -> list[dict[str, Any]]:
        """Answer a C-FIND at ``level`` (STUDY, SERIES or IMAGE; PATIENT is
        answered per study). Filters may include keys of higher levels.

        Each answer maps keywords to strings (multi-valued attributes as
        tuples), covering the level and the levels above it.
        """
        level = level.upper()
        if level not in LEVELS:
            raise ValueError(f"unknown query level {level!r}")
        active = {k: v for k, v in filters.items() if v not in ("", None)}
        answers: list[dict[str, Any]] = []
        with self._lock:
            for study_uid in self._candidate_studies(active):
                series_map = self._studies[study_uid]
                study = self._study_attributes(study_uid)
                if level in ("PATIENT", "STUDY"):
                    if matches_all(active, study):
                        answers.append(study)
                    continue
                wanted_series = active.get("SeriesInstanceUID")
                for series_uid, sop_uids in series_map.items():
                    if wanted_series and series_uid not in wanted_series.split("\\"):
                        continue
                    series = self._series_attributes(study_uid, series_uid)
                    if level == "SERIES":
                        if matches_all(active, series):
                            answers.append(series)
                        continue
                    for sop_uid in sop_uids:
                        image = dict(series)
                        image.update({k: self._instances[sop_uid].attributes[k] for k in IMAGE_KEYWORDS})
                        image["TransferSyntaxUID"] = self._instances[sop_uid].transfer_syntax
                        if matches_all(active, image):
                            answers.append(image)
        if level == "PATIENT":
            seen: dict[str, dict[str, Any]] = {}
            for answer in answers:
                seen.setdefault(answer["PatientID"], answer)
            answers = list(seen.values())
        return answers

    def _candidate_studies(self, filters: dict[str, str]) -> list[str]:
        """Studies that can match: found through an index when the query has
        an exact UID, accession number or patient ID, else all of them."""
        uids = filters.get("StudyInstanceUID")
        if uids:
            return [uid for uid in dict.fromkeys(uids.split("\\")) if uid in self._studies]
        for key in INDEXED_KEYWORDS:
            value = filters.get(key)
            if value and not any(char in value for char in "*?\\"):
                return [uid for uid in self._studies if uid in self._index[key].get(value, ())]
        return list(self._studies)

    def instances(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uids: Iterable[str] | None = None
    ) -> Iterator[StoredInstance]:
        """The stored instances of a study, one of its series, or a subset."""
        with self._lock:
            series_map = self._studies.get(study_uid, {})
            wanted = set(sop_instance_uids) if sop_instance_uids is not None else None
            selected = [
                self._instances[uid]
                for s_uid, uids in series_map.items()
                if series_uid is None or s_uid == series_uid
                for uid in uids
                if wanted is None or uid in wanted
            ]
        yield from selected
