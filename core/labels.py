"""Subject/session/project labels: they become DICOM values *and* directory
names, so only a safe alphabet is accepted, no name a file system treats
specially, and no longer than the DICOM element they are written into."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LABEL = re.compile(r"[A-Za-z0-9_.\-]+")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
#: Longest label accepted where no DICOM element bounds it (the project, a
#: directory name only), and longest label derived from a study's tags.
MAX_LABEL_LENGTH = 64
#: Device names Windows reserves in every directory, with any extension
#: (``CON.txt`` is the console too).
WINDOWS_RESERVED = frozenset(
    {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
)


@dataclass(frozen=True)
class LabelRule:
    """Where a label ends up in the DICOM, and what its VR allows."""

    elements: str
    vr: str
    max_length: int


#: The DICOM elements relabeling writes each label into (see
#: dqr.plugins.xnat_relabel) and the shortest limit of their VRs.
LABEL_RULES = {
    "Subject": LabelRule("PatientName and PatientID", "LO", 64),  # PN allows 64 per component group
    "Session": LabelRule("StudyID and AccessionNumber", "SH", 16),
}


def validate_label(value: str, role: str | None = None) -> str | None:
    """Return what is wrong with a label, or ``None`` when it is valid.

    ``role`` is ``"Subject"`` or ``"Session"`` for a label written into the
    DICOM (bounded by its VR); ``None`` for a directory name only (the project).
    """
    value = value.strip()
    if not value:
        return "is empty; expected letters, digits, '_', '-' or '.'"
    if value in {".", ".."}:
        return f"{value!r} is not allowed (it names a directory)"
    if not _LABEL.fullmatch(value):
        bad = "".join(sorted({c for c in value if not _LABEL.fullmatch(c)}))
        return f"{value!r} contains {bad!r}; only letters, digits, '_', '-' and '.' are allowed"
    if value[0] in "-.":
        why = "command-line tools read it as an option" if value[0] == "-" else "it would be a hidden directory"
        return f"{value!r} starts with {value[0]!r}: as a directory name {why}"
    if value.endswith("."):
        return f"{value!r} ends with '.': Windows drops a trailing dot from a directory name"
    if value.split(".", 1)[0].upper() in WINDOWS_RESERVED:
        return (
            f"{value!r} is a device name reserved on Windows (CON, PRN, AUX, NUL, COM1-COM9, LPT1-LPT9, "
            "with any extension); it cannot be a directory name"
        )
    rule = LABEL_RULES.get(role or "")
    if rule and len(value) > rule.max_length:
        return (
            f"is {len(value)} characters long; a {role} label is written into {rule.elements}, "
            f"whose VR {rule.vr} allows at most {rule.max_length}"
        )
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
