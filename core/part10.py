"""DICOM Part-10 files at the byte level: the file meta group and the
explicit-VR element headers, without pydicom (cheap on the store and
receive paths, and importable where pydicom is not wanted)."""

from __future__ import annotations

#: Explicit-VR element headers with a 4-byte length (PS3.5 7.1.2).
LONG_HEADER_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
#: The same, as they appear in an element header.
LONG_HEADER_VR_BYTES = frozenset(vr.encode("ascii") for vr in LONG_HEADER_VRS)
#: File meta VRs whose value is text worth returning.
_TEXT_VRS = frozenset({b"UI", b"AE", b"SH", b"CS"})
PREAMBLE_LENGTH = 128
MAGIC = b"DICM"


def is_part10(data: bytes) -> bool:
    return data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == MAGIC


def read_file_meta(part10: bytes) -> tuple[dict[int, str], int]:
    """The text elements of a Part-10 file's meta group (element number ->
    value) and where the dataset starts; ``({}, 0)`` when ``part10`` has no
    preamble (a bare dataset). Nothing after the file meta is decoded.

    File meta elements are explicit VR little endian; (0002,0000) gives the
    group length but is optional, so the elements are walked.
    """
    if not is_part10(part10):
        return {}, 0
    elements: dict[int, str] = {}
    pos = PREAMBLE_LENGTH + 4
    while pos + 8 <= len(part10) and part10[pos : pos + 2] == b"\x02\x00":
        element = int.from_bytes(part10[pos + 2 : pos + 4], "little")
        vr = part10[pos + 4 : pos + 6]
        if vr in LONG_HEADER_VR_BYTES:
            length, start = int.from_bytes(part10[pos + 8 : pos + 12], "little"), pos + 12
        else:
            length, start = int.from_bytes(part10[pos + 6 : pos + 8], "little"), pos + 8
        if vr in _TEXT_VRS:
            elements[element] = part10[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return elements, pos


def dataset_offset(part10: bytes) -> int:
    """Where the dataset starts in a Part-10 file (after the file meta group)."""
    return read_file_meta(part10)[1]
