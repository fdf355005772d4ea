"""A study's series and instances from one WADO-RS metadata answer
(``GET {wado}/studies/{uid}/metadata``, PS3.18 10.4.1).

Why metadata and not QIDO-RS for listing a study that is about to be
retrieved: it needs one request where QIDO-RS needs two (series search, then
instance search), and it is the request DICOMweb viewers send to open a
study, which servers make fast. Orthanc's DICOMweb plugin (1.7) answers an
instance-level QIDO-RS by rebuilding each instance's tags through its REST
API, ~0.7 ms of server CPU an instance, and the metadata by formatting the
stored file directly, ~2.5x cheaper (docs/performance.md, "DICOMweb path").

The answer holds every instance's attributes (bulk data left out) and is not
paged, so a large study's answer can be tens of megabytes: it is decoded one
instance at a time as it arrives (:func:`iter_json_array`) and only what the
listing needs is kept.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from dqr.model import Series, Study, series_from_attributes
from dqr.plugins.dicomweb.qido import json_text, json_values

#: The series attributes taken from the first instance of each series.
SERIES_ATTRIBUTES = ("SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber")
#: One instance's metadata larger than this is refused rather than buffered.
MAX_ITEM_CHARACTERS = 32 * 1024 * 1024

_WHITESPACE = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()


class JsonArrayError(ValueError):
    """The answer is not a JSON array of objects."""


def iter_json_array(chunks: Iterable[bytes]) -> Iterator[Any]:
    """The items of a top-level JSON array arriving as UTF-8 ``chunks``, each
    as soon as it is complete: at most one item (and a chunk) is held.

    An item cut by a chunk boundary is decoded again once at least as much
    text again has arrived, so a large item costs a few decodes, not one per
    chunk. An empty body is an empty array (a 204 or an empty 200 means no
    match).
    """
    text = ""
    pos = 0
    started = finished = False
    retry_at = 0  # decode a pending item again once `text` is this long
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = iter(chunks)
    ended = False
    while True:
        if not ended and (pos >= len(text) or len(text) < retry_at):
            chunk = next(pending, None)
            if chunk is None:
                ended = True
                text = text[pos:] + decoder.decode(b"", final=True)
            else:
                text = text[pos:] + decoder.decode(chunk)
            retry_at -= pos
            pos = 0
            continue
        pos = _WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]
        if pos >= len(text):
            if not ended:
                continue
            if started and not finished:
                raise JsonArrayError("the JSON array ended early")
            return
        if finished:
            raise JsonArrayError("text after the end of the JSON array")
        if not started:
            if text[pos] != "[":
                raise JsonArrayError("the answer is not a JSON array")
            started = True
            pos += 1
            continue
        if text[pos] == "]":
            finished = True
            pos += 1
            continue
        try:
            item, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            if ended:
                raise JsonArrayError("the JSON array holds something that is not JSON") from None
            if len(text) - pos > MAX_ITEM_CHARACTERS:
                raise JsonArrayError(f"an item of the JSON array is longer than {MAX_ITEM_CHARACTERS} characters") from None
            retry_at = pos + 2 * (len(text) - pos)
            continue
        if not isinstance(item, dict):
            raise JsonArrayError("an item of the JSON array is not an object")
        yield item
        pos = _WHITESPACE.match(text, end).end()  # type: ignore[union-attr]
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] != "]":
            raise JsonArrayError("the items of the JSON array are not separated by commas")


def series_from_metadata(study: Study, answers: Iterable[dict[str, Any]]) -> list[Series]:
    """The study's series, in the order the answers first name them, each
    with its instances' SOP Instance and Class UIDs.

    An answer naming another study is left out: nothing of it is expected
    (and if it arrives, it is refused as not of the requested study).
    """
    attributes: dict[str, dict[str, str]] = {}
    instances: dict[str, list[str]] = {}
    classes: dict[str, set[str]] = {}
    for answer in answers:
        study_uid = json_text(answer, "StudyInstanceUID")
        if study_uid and study_uid != study.study_uid:
            continue
        series_uid = json_text(answer, "SeriesInstanceUID")
        if series_uid not in attributes:
            attributes[series_uid] = {keyword: json_text(answer, keyword) for keyword in SERIES_ATTRIBUTES}
            instances[series_uid], classes[series_uid] = [], set()
        instances[series_uid].append(json_text(answer, "SOPInstanceUID"))
        classes[series_uid].update(value for value in json_values(answer, "SOPClassUID") if value)
    return [
        series_from_attributes(
            study.study_uid,
            {**attributes[uid], "NumberOfSeriesRelatedInstances": len(instances[uid])},
            sop_class_uids=frozenset(classes[uid]),
            instance_uids=tuple(instances[uid]),
        )
        for uid in attributes
    ]
