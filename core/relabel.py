"""The store path's middle step: decode what relabeling needs, let the
``dqr_relabel`` hooks change it, and encode a Part-10 file.

Only element headers are parsed; values stay raw bytes unless a hook touches
them. Encoding splices: every top-level element still raw is copied from the
bytes that arrived, and only changed or added elements are encoded. That
keeps pixel data byte-identical and costs a fraction of re-encoding the
whole dataset (the largest share of dqr's own per-instance time).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from dqr.model import Labels, ReceivedInstance, Series, Study
from dqr.part10 import LONG_HEADER_VRS

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
IMPLEMENTATION_VERSION = "DQR_010"
PREAMBLE = b"\0" * 128 + b"DICM"


@dataclass
class RelabelContext:
    """One received instance on its way to the destination.

    Hooks change elements with :meth:`set`, which keeps the first original
    value of each keyword in ``replaced`` (the manifest's provenance).
    """

    dataset: Dataset
    labels: Labels
    study: Study
    series: Series
    replaced: dict[str, str] = field(default_factory=dict)
    #: The job's :class:`dqr.backend.Destination` (``None`` when the caller
    #: does not say): hooks whose change depends on where the instance goes
    #: (XNAT routing) read it.
    destination: Any = None

    def set(self, keyword: str, value: Any) -> None:
        """Set ``keyword`` to ``value``, remembering what it was."""
        original = self.dataset.get(keyword, None)
        original_text = "" if original is None else str(original)
        if original_text == str(value):
            return
        self.replaced.setdefault(keyword, original_text)
        setattr(self.dataset, keyword, value)


@dataclass
class DecodedInstance:
    """A lazily parsed dataset and where each top-level element's bytes are."""

    dataset: Dataset
    source: bytes
    spans: dict[int, tuple[int, int]]


def decode(received: ReceivedInstance) -> DecodedInstance:
    """Parse the received dataset lazily (element values stay raw)."""
    data = received.dataset
    if received.transfer_syntax == DEFLATED:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    implicit = received.transfer_syntax == IMPLICIT_LITTLE
    little = received.transfer_syntax != EXPLICIT_BIG
    dataset = read_dataset(BytesIO(data), is_implicit_VR=implicit, is_little_endian=little)
    return DecodedInstance(dataset, data, _element_spans(dataset, len(data), implicit))


def raw_text(decoded: DecodedInstance, tag: int) -> str | None:
    """A top-level text element's value read from the source bytes, without
    converting the element: a converted element would have to be re-encoded
    when splicing. ``None`` when absent."""
    element = decoded.dataset._dict.get(tag)
    if element is None:
        return None
    if not isinstance(element, RawDataElement):
        return str(decoded.dataset[tag].value)
    value = element.value or b""
    return value.decode("ascii", "replace").rstrip("\0 ")


def _element_spans(dataset: Dataset, size: int, implicit: bool) -> dict[int, tuple[int, int]]:
    """Byte range of every top-level element in the source: from its header
    to the next element's header (which also covers undefined lengths)."""
    starts: list[tuple[int, int]] = []
    for tag, element in dataset._dict.items():
        if not isinstance(element, RawDataElement):
            return {}
        header = 8 if implicit or element.VR not in LONG_HEADER_VRS else 12
        starts.append((element.value_tell - header, int(tag)))
    starts.sort()
    ends = [start for start, _ in starts[1:]] + [size]
    return {tag: (start, end) for (start, tag), end in zip(starts, ends, strict=True)}


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """The file meta group (0002) of a Part-10 file, encoded directly: it
    is the same few elements every time, and pydicom's general writer made
    it the largest cost of storing a small instance."""
    version = IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join(
        [
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _short_element(0x0002, b"UI", _uid_value(sop_class_uid)),
            _short_element(0x0003, b"UI", _uid_value(sop_instance_uid)),
            _short_element(0x0010, b"UI", _uid_value(transfer_syntax)),
            _short_element(0x0012, b"UI", _uid_value(PYDICOM_IMPLEMENTATION_UID)),
            _short_element(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        ]
    )
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def encode_part10(decoded: DecodedInstance, received: ReceivedInstance) -> bytes:
    """The dataset as a Part-10 file in the transfer syntax it arrived in."""
    _drop_stale_group_lengths(decoded)
    if received.transfer_syntax == DEFLATED or not decoded.spans:
        return _encode_whole(decoded.dataset, received)
    meta = file_meta_bytes(received.sop_class_uid, received.sop_instance_uid, received.transfer_syntax)
    return PREAMBLE + meta + _splice(decoded, received)


def _splice(decoded: DecodedInstance, received: ReceivedInstance) -> bytes:
    dataset, source, spans = decoded.dataset, decoded.source, decoded.spans
    implicit = received.transfer_syntax == IMPLICIT_LITTLE
    little = received.transfer_syntax != EXPLICIT_BIG
    encodings = dataset._character_set
    parts: list[bytes] = []
    for tag in sorted(dataset._dict):
        element = dataset._dict[tag]
        if isinstance(element, RawDataElement) and int(tag) in spans:
            start, end = spans[int(tag)]
            parts.append(source[start:end])
            continue
        encoder = DicomBytesIO()
        encoder.is_implicit_VR, encoder.is_little_endian = implicit, little
        write_data_element(encoder, dataset[tag], encodings)
        parts.append(encoder.getvalue())
    return b"".join(parts)


def _drop_stale_group_lengths(decoded: DecodedInstance) -> None:
    """Group lengths (gggg,0000) are retired and would be wrong in a group
    whose elements changed: drop those."""
    dataset = decoded.dataset
    changed_groups = {
        tag >> 16 for tag, element in dataset._dict.items()
        if not isinstance(element, RawDataElement) or int(tag) not in decoded.spans
    }
    for tag in [t for t in dataset._dict if t & 0xFFFF == 0 and t >> 16 in changed_groups]:
        del dataset[tag]


def _encode_whole(dataset: Dataset, received: ReceivedInstance) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(received.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(received.sop_instance_uid)
    meta.TransferSyntaxUID = UID(received.transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    dataset.file_meta = meta
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
