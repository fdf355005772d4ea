"""Subject/session/project labels: they become DICOM values *and* directory
names, so only a safe alphabet is accepted."""

from __future__ import annotations

import re

_LABEL = re.compile(r"[A-Za-z0-9_.\-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
#: Longest label accepted: LO (PatientID) allows 64 characters, SH (StudyID,
#: AccessionNumber) only 16, but PACSes and XNAT accept longer in practice.
MAX_LABEL_LENGTH = 64


def validate_label(value: str) -> str | None:
    """Return what is wrong with a label, or ``None`` when it is valid."""
    value = value.strip()
    if not value:
        return "is empty; expected letters, digits, '_', '-' or '.'"
    if value in {".", ".."}:
        return f"{value!r} is not allowed (it names a directory)"
    if not _LABEL.fullmatch(value):
        bad = "".join(sorted({c for c in value if not _LABEL.fullmatch(c)}))
        return f"{value!r} contains {bad!r}; only letters, digits, '_', '-' and '.' are allowed"
    if len(value) > MAX_LABEL_LENGTH:
        return f"is {len(value)} characters long; at most {MAX_LABEL_LENGTH} are allowed"
    return None


def safe_label(value: str, fallback: str) -> str:
    """Turn a value taken from DICOM (not from the user) into a safe label.

    Unsafe characters become ``_``; an empty or dot-only result becomes
    ``fallback``. Used for directory names when no label was given.
    """
    label = _UNSAFE.sub("_", value.strip()).strip("_")[:MAX_LABEL_LENGTH]
    if not label or set(label) == {"."}:
        return fallback
    return label
