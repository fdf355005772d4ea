"""DICOM attribute matching (PS3.4 C.2.2.2), as a PACS applies it to C-FIND
keys. Used by the in-memory PACS and by the engine's client-side checks.

Rules implemented:

- an empty key matches everything (universal matching);
- UID keys: ``\\``-separated list matching, exact otherwise;
- dates (DA): single value, or range ``A-B``, ``-B``, ``A-`` inclusive;
- other strings: ``*`` any run of characters, ``?`` exactly one character;
  ``\\``-separated lists match when any value matches;
- Patient Name (PN) is matched case-insensitively (as Orthanc and most PACSes
  do); every other attribute is case-sensitive;
- a multi-valued attribute (ModalitiesInStudy) matches when any value does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from dqr.model import DATE_KEYWORDS, UID_KEYWORDS

CASE_INSENSITIVE_KEYWORDS = frozenset({"PatientName"})


@lru_cache(maxsize=4096)
def _wildcard_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def match_date(pattern: str, value: str) -> bool:
    """Match a DA value against a single date or an inclusive range."""
    if not value:
        return False
    if "-" not in pattern:
        return value == pattern
    start, _, end = pattern.partition("-")
    return (not start or value >= start) and (not end or value <= end)


def match_string(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """Single-value matching with ``*``/``?`` wildcards."""
    if "*" in pattern or "?" in pattern:
        return _wildcard_regex(pattern, ignore_case).fullmatch(value) is not None
    if ignore_case:
        return pattern.casefold() == value.casefold()
    return pattern == value


def matches(keyword: str, pattern: str, values: str | Iterable[str]) -> bool:
    """Whether an attribute with ``values`` matches the key ``pattern``."""
    if pattern in ("", "*"):
        return True
    candidates = [values] if isinstance(values, str) else list(values)
    if keyword in DATE_KEYWORDS:
        return any(match_date(pattern, value) for value in candidates)
    if keyword in UID_KEYWORDS:
        wanted = set(pattern.split("\\"))
        return any(value in wanted for value in candidates)
    ignore_case = keyword in CASE_INSENSITIVE_KEYWORDS
    alternatives = pattern.split("\\")
    return any(
        match_string(alternative, value, ignore_case) for alternative in alternatives for value in candidates
    )


def matches_all(filters: dict[str, str], attributes: dict[str, str | tuple[str, ...]]) -> bool:
    """AND of :func:`matches` over every filter (missing attributes are empty)."""
    return all(matches(keyword, pattern, attributes.get(keyword, "")) for keyword, pattern in filters.items())
