"""QIDO-RS query strings and answers: from dqr filters to a URL query, and
from DICOM JSON answers to :mod:`dqr.model` objects.

Why the query string is built here and not by dicomweb-client or requests:
both percent-encode every value (``DOE^JANE`` -> ``DOE%5EJANE``,
``DOE*`` -> ``DOE%2A``), and Orthanc's DICOMweb plugin -- like some other
servers -- does not percent-decode QIDO values, so such a query silently
matches nothing. dqr therefore offers two escapings (``query_value_escaping``):

``raw`` (default)
    Characters that are legal in a URL query are sent as they are, including
    the wildcards ``*`` and ``?`` and ``'``. A character that cannot be sent
    raw (space, ``^``, ``&``, ``=``, ``+``, ``%``, ``#``, ``,`` inside a value,
    non-ASCII) is replaced by a wildcard: ``?`` for an ASCII character, ``*``
    for a run of non-ASCII ones (``?`` does not match a multi-byte character
    on Orthanc). Such a value is *widened*, so every answer is checked again
    against the original value before it is yielded.
``percent``
    Standard RFC 3986 percent-encoding of every value, for servers that
    decode it and match exactly what was asked.

Lists (``\\``-separated in dqr filters) are sent comma-separated, as QIDO-RS
wants.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pydicom.datadict import tag_for_keyword

from dqr.matching import match_date, match_string
from dqr.model import (
    DATE_KEYWORDS,
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    UID_KEYWORDS,
    Instance,
    Series,
    Study,
    series_from_attributes,
    study_from_attributes,
)

#: Characters sent as they are in ``raw`` escaping: RFC 3986 unreserved
#: characters, the DICOM wildcards and sub-delimiters that neither requests
#: nor a server's query parser treat specially.
RAW_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~*?'!$():;@/")

#: Characters that some servers mishandle in QIDO values: a query holding one
#: and matching nothing gets a warning rather than a silent empty answer.
SUSPICIOUS_CHARACTERS = frozenset("*?^ ")

STUDY_FIELDS = tuple(k for k in STUDY_KEYWORDS if k != "StudyInstanceUID")
SERIES_FIELDS = tuple(k for k in SERIES_KEYWORDS if k != "SeriesInstanceUID")
INSTANCE_FIELDS = ("SOPInstanceUID", "SOPClassUID", "AvailableTransferSyntaxUID")


@dataclass(frozen=True)
class EncodedFilter:
    """One filter as sent: ``sent`` differs from ``original`` (beyond
    escaping) when characters were widened to wildcards."""

    keyword: str
    original: str
    sent: str
    widened: bool


def _raw_value(value: str) -> tuple[str, bool]:
    """``value`` with unsendable characters widened to wildcards."""
    out: list[str] = []
    for char in value:
        if char in RAW_SAFE:
            out.append(char)
        elif ord(char) < 128:
            out.append("?")
        elif not out or out[-1] != "*":
            out.append("*")
    sent = "".join(out)
    return sent, sent != value


def encode_filter(keyword: str, value: str, escaping: str) -> EncodedFilter:
    """Encode one dqr filter value (``\\``-separated list allowed) for QIDO-RS."""
    alternatives = value.split("\\")
    if escaping == "percent":
        return EncodedFilter(keyword, value, ",".join(quote(a, safe="") for a in alternatives), False)
    sent, widened = zip(*(_raw_value(a) for a in alternatives), strict=True)
    return EncodedFilter(keyword, value, ",".join(sent), any(widened))


def query_string(pairs: list[tuple[str, str]]) -> str:
    """``key=value&...``; values must already be encoded."""
    return "&".join(f"{key}={value}" for key, value in pairs)


def split_uid_lists(filters: dict[str, str], max_length: int) -> Iterator[dict[str, str]]:
    """The filters once per chunk of each long UID list, so that no request
    carries more than ``max_length`` characters of UIDs in one key.

    Several long UID lists in one query multiply (every chunk of one with
    every chunk of the other); in practice there is one.
    """
    for keyword, value in filters.items():
        if keyword in UID_KEYWORDS and len(value) > max_length:
            for chunk in _chunks(value.split("\\"), max_length):
                yield from split_uid_lists({**filters, keyword: "\\".join(chunk)}, max_length)
            return
    yield filters


def _chunks(uids: list[str], max_length: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    length = 0
    for uid in uids:
        if chunk and length + 1 + len(uid) > max_length:
            yield chunk
            chunk, length = [], 0
        chunk.append(uid)
        length += len(uid) + (1 if length else 0)
    if chunk:
        yield chunk


# -- answers -------------------------------------------------------------------


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r}")
    return f"{tag:08X}"


def json_values(answer: dict[str, Any], keyword: str) -> list[str]:
    """The values of ``keyword`` in a DICOM JSON dataset, as strings.

    Person names give their alphabetic form; numbers (IS may come as JSON
    numbers) their decimal text.
    """
    element = answer.get(_tag(keyword)) or {}
    values = []
    for value in element.get("Value", []):
        if isinstance(value, dict):
            value = value.get("Alphabetic", "")
        values.append("" if value is None else str(value))
    return values


def json_text(answer: dict[str, Any], keyword: str) -> str:
    """The value of ``keyword`` as DICOM text (multiple values joined by ``\\``)."""
    return "\\".join(json_values(answer, keyword))


def study_from_json(answer: dict[str, Any]) -> Study:
    return study_from_attributes({keyword: json_text(answer, keyword) for keyword in STUDY_KEYWORDS})


def series_from_json(study: Study, answer: dict[str, Any]) -> Series:
    return series_from_attributes(study.study_uid, {keyword: json_text(answer, keyword) for keyword in SERIES_KEYWORDS})


def instance_from_json(series: Series, answer: dict[str, Any]) -> Instance:
    syntaxes = json_values(answer, "AvailableTransferSyntaxUID")
    return Instance(
        series_uid=series.series_uid,
        sop_instance_uid=json_text(answer, "SOPInstanceUID"),
        sop_class_uid=json_text(answer, "SOPClassUID"),
        transfer_syntax=syntaxes[0] if len(syntaxes) == 1 else "",
    )


# -- re-checking widened values ---------------------------------------------------


def _value_matches(keyword: str, pattern: str, value: str) -> bool:
    if keyword in DATE_KEYWORDS:
        return match_date(pattern, value)
    # Case-insensitively: only the widening is undone here, the server's own
    # case rules (Orthanc's QIDO ignores case) are kept.
    return match_string(pattern, value, ignore_case=True)


def still_matches(answer: dict[str, Any], widened: list[EncodedFilter]) -> bool:
    """Whether an answer matches the original values of widened filters."""
    for item in widened:
        values = json_values(answer, item.keyword) or [""]
        alternatives = item.original.split("\\")
        if not any(_value_matches(item.keyword, a, v) for a in alternatives for v in values):
            return False
    return True


def suspicious_keys(filters: dict[str, str]) -> list[str]:
    """Keywords whose values hold characters some servers mishandle."""
    return [
        keyword
        for keyword, value in filters.items()
        if any(c in SUSPICIOUS_CHARACTERS or ord(c) > 127 for c in value)
    ]


def describe_characters(value: str) -> str:
    """Which mishandled characters a value holds, named without the value
    itself (it may be a patient name)."""
    names = {"*": "'*'", "?": "'?'", "^": "'^'", " ": "space"}
    found = [names[c] for c in sorted(set(value)) if c in names]
    if re.search(r"[^\x00-\x7f]", value):
        found.append("non-ASCII")
    return ", ".join(found)
