"""The one gate for DICOM UIDs: a UID from the CSV, an edited results table
or a PACS answer becomes a query key and, for Study, Series and SOP Instance
UIDs, a directory or file name in the archive. Only what PS3.5 9.1 allows
passes: digits and dots, at most 64 characters, no empty component and no
leading zero in a component -- so no ``..``, ``/`` or absolute path can.
"""

from __future__ import annotations

import re

#: Components are ``0`` or start with a non-zero digit (PS3.5 9.1).
_UID = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*")
MAX_UID_LENGTH = 64
#: Longest piece of a refused value quoted back in an error message.
_QUOTED = 80


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a syntactically valid UID."""
    return len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def quoted(value: str) -> str:
    """``value`` as an error message shows it: repr'd, cut if very long."""
    return repr(value if len(value) <= _QUOTED else value[:_QUOTED] + "…")


def check_uid(value: str) -> str | None:
    """What is wrong with a UID, or ``None`` when it is valid."""
    if is_valid_uid(value):
        return None
    if len(value) > MAX_UID_LENGTH:
        return f"{quoted(value)} is not a UID: {len(value)} characters, at most {MAX_UID_LENGTH} are allowed"
    if value and _UID.fullmatch(value) is None and re.fullmatch(r"[\d.]+", value):
        return f"{quoted(value)} is not a UID: empty component or leading zero in a component"
    return f"{quoted(value)} is not a UID (digits and dots, at most 64 characters, no leading zeros)"
