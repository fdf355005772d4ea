"""The store path's middle step: decode what relabeling needs, let the
``dqr_relabel`` hooks change it, and encode a Part-10 file.

Only element headers are parsed; values stay raw bytes unless a hook touches
them. Encoding splices: every top-level element still raw is copied from the
bytes that arrived, and only changed or added elements are encoded. That
keeps pixel data byte-identical and costs a fraction of re-encoding the
whole dataset (the largest share of dqr's own per-instance time).
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from typing import Any

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite, write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID
from pydicom.valuerep import validate_value

from dqr.model import Labels, ReceivedInstance, Series, Study
from dqr.part10 import LONG_HEADER_VR_BYTES, LONG_HEADER_VRS

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
        if _set_plain_text(self, keyword, value):
            return
        original = self.dataset.get(keyword, None)
        original_text = "" if original is None else str(original)
        if original_text == str(value):
            return
        self.replaced.setdefault(keyword, original_text)
        setattr(self.dataset, keyword, value)


#: VRs :meth:`RelabelContext.set` handles without pydicom's conversions
#: when both values are plain ASCII: the labels' elements (PatientName,
#: PatientID, AccessionNumber, StudyID...).
_PLAIN_TEXT_VRS = frozenset({"PN", "LO", "SH"})
#: Character sets in which plain ASCII bytes are the ASCII text (no code
#: extensions, no remapped backslash or tilde).
_ASCII_COMPATIBLE = frozenset({
    "", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126", "ISO_IR 127",
    "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 203", "ISO_IR 192", "GB18030", "GBK",
})
_CHARSET = BaseTag(0x00080005)
_PLAIN = re.compile(rb"[\x20-\x5b\x5d-\x7e]*")


@lru_cache(maxsize=256)
def _keyword_tag(keyword: str) -> tuple[BaseTag, str] | None:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    vr = dictionary_VR(tag)
    return (BaseTag(tag), vr) if vr in _PLAIN_TEXT_VRS else None


def _plain(data: bytes) -> bool:
    """Printable ASCII without the value separator: the same text in every
    ASCII-compatible character set."""
    return _PLAIN.fullmatch(data) is not None


def _set_plain_text(context: RelabelContext, keyword: str, value: Any) -> bool:
    """:meth:`RelabelContext.set` for a still-raw PN/LO/SH element whose
    old and new values are plain ASCII: the original text is read from the
    raw bytes and the new value is kept encoded (what pydicom would write),
    so neither is converted. ``False``: not such a case, nothing done."""
    known = _keyword_tag(keyword)
    if known is None or not isinstance(value, str):
        return False
    tag, dictionary_vr = known
    dataset = context.dataset
    elements = dataset._dict
    element = elements.get(tag)
    if type(element) is not RawDataElement or not element.value or not element.is_little_endian:
        return False
    vr = element.VR or dictionary_vr
    if vr != dictionary_vr or not _plain(element.value):
        return False
    charset = elements.get(_CHARSET)
    if charset is not None and (type(charset) is not RawDataElement or _charset_text(charset.value) not in _ASCII_COMPATIBLE):
        return False
    new = value.encode("ascii", "replace")
    if not _plain(new) or new.decode("ascii") != value:
        return False
    original_text = element.value.decode("ascii").rstrip("\0 ")
    if original_text == value:
        return True
    validate_value(vr, value, pydicom_config.settings.reading_validation_mode)  # as setattr would
    context.replaced.setdefault(keyword, original_text)
    if len(new) % 2:
        new += b" "
    elements[tag] = RawDataElement(tag, element.VR, len(new), new, 0, element.is_implicit_VR, True)
    return True


def _charset_text(value: bytes | None) -> str:
    return (value or b"").decode("ascii", "replace").strip("\0 ")


@dataclass
class DecodedInstance:
    """A lazily parsed dataset and where each top-level element's bytes are.

    ``originals`` are the elements as decoded: an element still identical
    to its original is copied from ``source`` when encoding, any other is
    encoded."""

    dataset: Dataset
    source: bytes
    spans: dict[int, tuple[int, int]]
    originals: dict[int, Any] = field(default_factory=dict)


def decode(received: ReceivedInstance) -> DecodedInstance:
    """Parse the received dataset lazily (element values stay raw)."""
    data = received.dataset
    if received.transfer_syntax == DEFLATED:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    implicit = received.transfer_syntax == IMPLICIT_LITTLE
    little = received.transfer_syntax != EXPLICIT_BIG
    walked = _walk(data, implicit) if little else None
    if walked is not None:
        elements, spans = walked
        dataset = Dataset(elements, parent_encoding=default_encoding)
        dataset.set_original_encoding(implicit, True, _encodings(elements))
        return DecodedInstance(dataset, data, spans, dict(elements))
    dataset = read_dataset(BytesIO(data), is_implicit_VR=implicit, is_little_endian=little)
    return DecodedInstance(dataset, data, _element_spans(dataset, len(data), implicit), dict(dataset._dict))


_ENCODED_VRS = frozenset(
    vr.encode("ascii") for vr in (
        "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
        "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
    )
)
_UNDEFINED = 0xFFFFFFFF


def _walk(data: bytes, implicit: bool) -> tuple[dict, dict] | None:
    """The top-level elements of a little-endian dataset as pydicom's lazy
    reader makes them (:class:`RawDataElement`, values as bytes), with each
    one's byte range, read with ``struct`` alone. ``None`` for anything
    out of the ordinary -- an undefined length (sequences pydicom parses
    eagerly, encapsulated pixel data), an unknown or mistaken VR, a
    duplicate tag, a truncated element: :func:`read_dataset` decides those."""
    size = len(data)
    if size >= 6:  # pydicom's check that the data is in the VR encoding it is said to be
        found_implicit = not (0x40 < data[4] < 0x5B and 0x40 < data[5] < 0x5B)
        if found_implicit != implicit:
            return None
    unpack = struct.unpack_from
    elements: dict[BaseTag, RawDataElement] = {}
    spans: dict[BaseTag, tuple[int, int]] = {}
    pos = 0
    while pos < size:
        if pos + 8 > size:
            return None
        if implicit:
            group, number, length = unpack("<HHI", data, pos)
            vr = None
            start = pos + 8
        else:
            group, number = unpack("<HH", data, pos)
            raw_vr = data[pos + 4 : pos + 6]
            if raw_vr not in _ENCODED_VRS:
                return None
            if raw_vr in LONG_HEADER_VR_BYTES:
                if pos + 12 > size:
                    return None
                length = unpack("<I", data, pos + 8)[0]
                start = pos + 12
            else:
                length = unpack("<H", data, pos + 6)[0]
                start = pos + 8
            vr = raw_vr.decode("ascii")
        end = start + length
        if length == _UNDEFINED or end > size or group == 0xFFFE:
            return None
        tag = BaseTag(group << 16 | number)
        if tag in elements:
            return None
        value = data[start:end] if length else empty_value_for_VR(vr, raw=True)
        elements[tag] = RawDataElement(tag, vr, length, value, start, implicit, True)
        spans[tag] = (pos, end)
        pos = end
    return elements, spans


@lru_cache(maxsize=64)
def _charset_encodings(value: bytes) -> tuple[str, ...]:
    names = [part.strip(" \0") for part in value.decode("ascii", "replace").split("\\")]
    return tuple(convert_encodings(names if len(names) > 1 else names[0]))


def _encodings(elements: dict) -> str | list[str]:
    """The dataset's character encodings, as :func:`read_dataset` sets them."""
    charset = elements.get(_CHARSET)
    if charset is None:
        return default_encoding
    return list(_charset_encodings(charset.value or b""))


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
    starts: list[tuple[int, Any]] = []
    for tag, element in dataset._dict.items():
        if not isinstance(element, RawDataElement):
            return {}
        header = 8 if implicit or element.VR not in LONG_HEADER_VRS else 12
        starts.append((element.value_tell - header, tag))
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
    return _splice(decoded, received, PREAMBLE + meta)


def _splice(decoded: DecodedInstance, received: ReceivedInstance, head: bytes) -> bytes:
    """``head`` and the dataset, joined once: unchanged elements are taken
    from the received bytes through a view, not copied out first (the pixel
    data of a large instance was copied three times on its way to the file)."""
    dataset, spans, originals = decoded.dataset, decoded.spans, decoded.originals
    source = memoryview(decoded.source)
    implicit = received.transfer_syntax == IMPLICIT_LITTLE
    little = received.transfer_syntax != EXPLICIT_BIG
    encodings = None
    parts: list[bytes | memoryview] = [head]
    for tag, element in sorted(dataset._dict.items(), key=_tag_order):
        if element is originals.get(tag):
            span = spans.get(tag)
            if span is not None:
                parts.append(source[span[0] : span[1]])
                continue
        elif type(element) is RawDataElement and little and _raw_as_is(element, implicit):
            parts.append(_header(tag, element.VR, len(element.value), implicit) + element.value)
            continue
        if encodings is None:
            charset = dataset._dict.get(_CHARSET)
            # read from the raw value when still raw: the property converts it in place
            encodings = _encodings(dataset._dict) if charset is None or type(charset) is RawDataElement else dataset._character_set
        encoder = DicomBytesIO()
        encoder.is_implicit_VR, encoder.is_little_endian = implicit, little
        write_data_element(encoder, dataset[tag], encodings)
        parts.append(encoder.getvalue())
    return b"".join(parts)


def _tag_order(item: tuple[BaseTag, Any]) -> int:
    return int(item[0])


def _raw_as_is(element: RawDataElement, implicit: bool) -> bool:
    """Whether a raw element's bytes are what pydicom would write for it."""
    value = element.value
    return (
        element.is_little_endian
        and element.is_implicit_VR == implicit
        and isinstance(value, bytes)
        and element.length == len(value)
        and not len(value) % 2
        and (implicit or element.VR is not None)
    )


def _header(tag: int, vr: str | None, length: int, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)
    if vr in LONG_HEADER_VRS:
        return struct.pack("<HH2s2xI", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)  # type: ignore[union-attr]
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)  # type: ignore[union-attr]


def _drop_stale_group_lengths(decoded: DecodedInstance) -> None:
    """Group lengths (gggg,0000) are retired and would be wrong in a group
    whose elements changed: drop those."""
    dataset, originals = decoded.dataset, decoded.originals
    changed_groups = {
        tag >> 16 for tag, element in dataset._dict.items()
        if element is not originals.get(tag) or tag not in decoded.spans
    }
    changed_groups.update(tag >> 16 for tag in originals if tag not in dataset._dict)  # deleted elements
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
