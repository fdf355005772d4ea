"""Listing a selected study (its series and their instances) over DICOMweb:
one WADO-RS metadata request, decoded as it arrives, or QIDO-RS (by choice,
or when the server refuses the metadata) -- the same series either way."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dqr.errors import RemoteError
from dqr.model import Study, StudyQuery
from dqr.plugins.dicomweb.metadata import JsonArrayError, iter_json_array, series_from_metadata


@pytest.fixture(params=["mock", "orthanc"])
def web_url(request, mock_dicomweb_pacs) -> str:
    if request.param == "orthanc":
        return request.getfixturevalue("orthanc").dicomweb_url
    return mock_dicomweb_pacs.url


def a_study(backend) -> Study:
    return next(iter(backend.query_studies(StudyQuery(line=2, filters={"PatientName": "DOE^JANE"}))))


def listed(backend, study: Study) -> set[tuple]:
    return {
        (s.series_uid, s.modality, s.description, s.number, s.n_instances, s.sop_class_uids, frozenset(s.instance_uids or ()))
        for s in backend.query_series(study)
    }


def test_metadata_and_qido_list_the_same_series_and_instances(web_url, dicomweb_backend_factory, dicomweb_memory_pacs):
    study = a_study(dicomweb_backend_factory(web_url))

    by_metadata = listed(dicomweb_backend_factory(web_url, listing="metadata"), study)
    by_qido = listed(dicomweb_backend_factory(web_url, listing="qido"), study)

    assert by_metadata == by_qido
    stored = {i.sop_instance_uid for i in dicomweb_memory_pacs.instances(study.study_uid)}
    assert set().union(*(uids for *_, uids in by_metadata)) == stored


def test_metadata_listing_is_one_request_per_study(mock_dicomweb_pacs, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url)
    study = a_study(backend)

    listed(backend, study)

    assert mock_dicomweb_pacs.requests["metadata-study"] == 1
    assert mock_dicomweb_pacs.requests["qido-series"] == mock_dicomweb_pacs.requests["qido-instances"] == 0


def test_qido_listing_sends_no_metadata_request(mock_dicomweb_pacs, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url, listing="qido")

    listed(backend, a_study(backend))

    assert mock_dicomweb_pacs.requests["metadata-study"] == 0
    assert mock_dicomweb_pacs.requests["qido-series"] == mock_dicomweb_pacs.requests["qido-instances"] == 1


@pytest.mark.parametrize("metadata", ["not-found", "empty"])
def test_a_server_without_metadata_is_listed_with_qido(mock_dicomweb_factory, dicomweb_backend_factory, metadata):
    server = mock_dicomweb_factory(metadata=metadata)
    backend = dicomweb_backend_factory(server.url)
    study = a_study(backend)

    found = listed(backend, study)

    assert found == listed(dicomweb_backend_factory(server.url, listing="qido"), study)
    assert server.requests["qido-series"] == 2 and server.requests["qido-instances"] == 2


def test_a_failing_metadata_request_is_retriable_not_a_silent_fallback(mock_dicomweb_pacs, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url)
    study = a_study(backend)
    mock_dicomweb_pacs.faults.server_errors = 1

    with pytest.raises(RemoteError, match="WADO-RS study metadata.*HTTP 500") as caught:
        listed(backend, study)

    assert caught.value.retriable
    assert mock_dicomweb_pacs.requests["qido-series"] == 0


def test_an_answer_of_another_study_is_not_expected():
    study = Study("1.2.3")
    mine = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3.1"]},
            "00080018": {"vr": "UI", "Value": ["1.2.3.1.1"]}, "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]}}
    foreign = {**mine, "0020000D": {"vr": "UI", "Value": ["9.9"]}, "00080018": {"vr": "UI", "Value": ["9.9.1"]}}

    (series,) = series_from_metadata(study, [mine, foreign])

    assert series.instance_uids == ("1.2.3.1.1",) and series.n_instances == 1


ITEMS = [{"00080018": {"vr": "UI", "Value": [f"1.2.{n}"]}, "0008103E": {"vr": "LO", "Value": ["MÜLLER ] , [ \"x\""]}} for n in range(50)]


@pytest.mark.parametrize("size", [1, 7, 4096], ids=["1-byte-chunks", "7-byte-chunks", "one-chunk"])
def test_a_json_array_is_decoded_item_by_item_across_chunk_boundaries(size):
    body = json.dumps(ITEMS, indent=1).encode()

    items = list(iter_json_array(body[i : i + size] for i in range(0, len(body), size)))

    assert items == ITEMS


@pytest.mark.parametrize("body", [b"", b"[]", b" [ ] \r\n"], ids=["empty-body", "empty-array", "padded"])
def test_an_empty_answer_has_no_items(body):
    assert list(iter_json_array([body])) == []


@pytest.mark.parametrize(
    "body, reason",
    [
        (b'[{"a": 1}, {"b"', "ended early|not JSON"),
        (b'[{"a": 1}', "ended early"),
        (b'{"a": 1}', "not a JSON array"),
        (b'[{"a": 1} {"b": 2}]', "not separated by commas"),
        (b"[1, 2]", "not an object"),
        (b'[{"a": 1}] []', "after the end"),
    ],
    ids=["cut-in-an-item", "cut-after-an-item", "object", "no-comma", "numbers", "trailing"],
)
def test_a_broken_json_array_is_an_error(body, reason):
    with pytest.raises(JsonArrayError, match=reason):
        list(iter_json_array([body[:5], body[5:]]))


_DECODE_A_LARGE_ANSWER = """
import json, tracemalloc
from dqr.plugins.dicomweb.metadata import iter_json_array

item = json.dumps({"00080018": {"vr": "UI", "Value": ["1.2.3"]}, "00081030": {"vr": "LO", "Value": ["x" * 4000]}})

def chunks():  # ~20 MB of JSON in 64 KiB chunks, made as it is read
    yield b"["
    body = ",".join([item] * 16).encode()
    for _ in range(300):
        yield body + b","
    yield item.encode() + b"]"

tracemalloc.start()
count = sum(1 for _ in iter_json_array(chunks()))
_, peak = tracemalloc.get_traced_memory()
print(count, peak)
"""


def test_memory_stays_flat_while_decoding_a_large_answer():
    # In a process of its own: tracemalloc counts every thread's allocations,
    # and the test session's servers allocate too.
    out = subprocess.run(
        [sys.executable, "-c", _DECODE_A_LARGE_ANSWER], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    count, peak = map(int, out.split())
    assert count == 300 * 16 + 1
    assert peak < 2 * 1024 * 1024, peak  # a chunk and an item or two, not the 20 MB answer
