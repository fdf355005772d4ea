"""The dicomweb backend keeps simultaneous HTTP requests within the source's
limits, counted by the mock PACS on the server side."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from dqr.model import RetrieveRequest, StudyQuery


def run_in_threads(function, items, threads: int = 8) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(function, items))


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_simultaneous_queries_never_exceed_max_queries(limit, mock_dicomweb_pacs, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url, limits={"max_queries": limit})
    mock_dicomweb_pacs.faults.delay = 0.02  # long enough for requests to overlap

    counts = run_in_threads(lambda line: len(list(backend.query_studies(StudyQuery(line, {})))), range(16))

    assert counts == [8] * 16
    assert mock_dicomweb_pacs.max_concurrent_requests == limit


@pytest.mark.parametrize("limit", [1, 2])
def test_simultaneous_retrievals_never_exceed_max_retrievals(
    limit, mock_dicomweb_pacs, dicomweb_backend_factory
):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url, limits={"max_retrievals": limit})
    requests = [
        RetrieveRequest(study, series)
        for study in backend.query_studies(StudyQuery(1, {}))
        for series in backend.query_series(study)
    ]
    mock_dicomweb_pacs.reset_counters()
    mock_dicomweb_pacs.faults.delay = 0.02

    received = run_in_threads(lambda request: _count_retrieved(backend, request), requests)

    assert sum(received) == 57
    assert mock_dicomweb_pacs.max_concurrent_requests == limit


def _count_retrieved(backend, request: RetrieveRequest) -> int:
    arrived: list = []
    backend.retrieve(request, arrived.append)
    return len(arrived)
