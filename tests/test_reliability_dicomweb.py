"""Reliability over DICOMweb, through the CLI against the mock QIDO-RS /
WADO-RS server: 429/503 with Retry-After, 500s and answers cut mid-multipart
are retried (then failed with a reason), and the simultaneous requests the
mock counts never exceed the limits. Faults are the mock's, never patches."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from conftest import archive_files

from dqr.plugins.testpacs.memory.synthetic import (
    DEFAULT_COHORT,
    accession_number,
    generate_cohort,
)

#: What ``mock_dicomweb_pacs`` serves (core/testing/fixtures_dicomweb.py).
COHORT = DEFAULT_COHORT
CT_STUDY = accession_number(COHORT, 0, 0)  # CT, 2 series x 3 instances
PET_STUDY = accession_number(COHORT, 1, 1)  # CT AC + PET WB, 2 series x 3 instances
MR_STUDY = accession_number(COHORT, 0, 1)  # MR, 3 series x 3 instances
ALL_STUDIES = [accession_number(COHORT, p, s) for p in range(COHORT.patients) for s in range(2)]
FAST = {"backoff_initial": 0.01, "backoff_max": 0.05, "retries": 2}

INSTANCES: dict[str, list[str]] = {}
for _dataset in generate_cohort(COHORT):
    INSTANCES.setdefault(_dataset.AccessionNumber, []).append(_dataset.SOPInstanceUID)


def expected_sops(*accessions: str) -> list[str]:
    return sorted(uid for accession in accessions for uid in INSTANCES[accession])


def stored_sops(root: Path) -> list[str]:
    return sorted(path.stem for path in archive_files(root))


@pytest.fixture
def web_job(site, write_csv, mock_dicomweb_pacs):
    """``web_job(accessions, limits={})``: a site config on the mock DICOMweb PACS."""

    def make(accessions, limits=None) -> Path:
        rows = "".join(f"{a},S{i},S{i}_A\n" for i, a in enumerate(accessions, start=1))
        return site(
            source={"type": "dicomweb", "url": mock_dicomweb_pacs.url, "read_timeout": 10},
            limits={**FAST, **(limits or {})},
            csv=str(write_csv("Accession Number,Subject,Session\n" + rows)),
        )

    return make


def wado_requests(server) -> int:
    return sum(n for kind, n in server.requests.items() if kind.startswith("wado"))


def test_429_is_retried_and_the_job_completes(web_job, dqr, mock_dicomweb_pacs, tmp_path):
    mock_dicomweb_pacs.faults.throttle = 2
    mock_dicomweb_pacs.faults.retry_after = "0"
    result = dqr("run", "--config", web_job([CT_STUDY], limits={"max_queries": 1}))
    assert result.exit_code == 0, result.output
    assert mock_dicomweb_pacs.faults.throttle == 0
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_retry_after_is_honoured_even_beyond_backoff_max(web_job, dqr, mock_dicomweb_pacs):
    mock_dicomweb_pacs.faults.throttle = 1
    mock_dicomweb_pacs.faults.retry_after = "1"
    started = time.monotonic()
    result = dqr("run", "--config", web_job([CT_STUDY], limits={"max_queries": 1}))
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 1.0


def test_retry_after_within_backoff_max_is_honoured(web_job, dqr, mock_dicomweb_pacs):
    mock_dicomweb_pacs.faults.throttle = 1
    mock_dicomweb_pacs.faults.retry_after = "1"
    config = web_job([CT_STUDY], limits={"max_queries": 1, "backoff_max": 5})
    started = time.monotonic()
    result = dqr("run", "--config", config)
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started >= 1.0


def test_503_is_retried_and_the_job_completes(web_job, dqr, mock_dicomweb_pacs, tmp_path):
    mock_dicomweb_pacs.faults.unavailable = 2
    mock_dicomweb_pacs.faults.retry_after = "0"
    mock_dicomweb_pacs.faults.on = "wado"
    result = dqr("run", "--config", web_job([CT_STUDY], limits={"max_retrievals": 1}))
    assert result.exit_code == 0, result.output
    assert wado_requests(mock_dicomweb_pacs) == 2 + 2  # two series, two 503s
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_500s_are_retried_and_the_job_completes(web_job, dqr, mock_dicomweb_pacs, tmp_path):
    mock_dicomweb_pacs.faults.server_errors = 2
    result = dqr("run", "--config", web_job([CT_STUDY, PET_STUDY]))
    assert result.exit_code == 0, result.output
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY, PET_STUDY)


def test_500s_beyond_the_retries_fail_that_series_with_a_reason_and_the_rest_completes(
    web_job, dqr, mock_dicomweb_pacs, tmp_path
):
    # The study's one-request retrieval meets the first 500 (not retried: it
    # falls back to series by series); retries: 2 -> its first series meets
    # the other three; the second series (3 instances) completes. One study:
    # another one's steps would meet some of the 500s in between.
    mock_dicomweb_pacs.faults.server_errors = 4
    mock_dicomweb_pacs.faults.on = "wado"
    result = dqr("run", "--config", web_job([CT_STUDY], limits={"max_retrievals": 1}), "--json")
    assert result.exit_code == 1, result.output
    [failure] = json.loads(result.stdout)["failures"]
    assert failure["kind"] == "series" and "HTTP 500" in failure["reason"]
    assert len(stored_sops(tmp_path / "archive")) == len(expected_sops(CT_STUDY)) - 3 == 3
    assert (tmp_path / "archive-failures.csv").read_text().startswith("Accession Number,Subject,Session,reason\n")


def cut_once(server) -> threading.Thread:
    """Cut the first WADO answer after one instance, then stop cutting."""
    server.faults.cut_after_parts = 1

    def watch() -> None:
        deadline = time.monotonic() + 20
        while wado_requests(server) == 0 and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.02)  # the answer took the fault when it started; later ones must not
        server.faults.cut_after_parts = None

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_an_answer_cut_mid_multipart_is_retried_and_each_instance_stored_once(
    web_job, dqr, mock_dicomweb_pacs, tmp_path
):
    watcher = cut_once(mock_dicomweb_pacs)
    # backoff_initial: the retry comes after the watcher lifted the fault
    config = web_job([CT_STUDY], limits={"max_retrievals": 1, "backoff_initial": 0.3, "backoff_max": 0.3})
    result = dqr("run", "--config", config)
    watcher.join()
    assert result.exit_code == 0, result.output
    assert wado_requests(mock_dicomweb_pacs) > 2  # the cut answer was retried
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_answers_always_cut_after_two_parts_still_complete_by_asking_only_for_the_rest(
    web_job, dqr, mock_dicomweb_pacs, tmp_path
):
    mock_dicomweb_pacs.faults.cut_after_parts = 2  # every answer; a series has 3 instances
    result = dqr("run", "--config", web_job([CT_STUDY], limits={"max_retrievals": 1}))
    assert result.exit_code == 0, result.output
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


# -- concurrency: the mock counts simultaneous requests ----------------------------------


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_simultaneous_requests_never_exceed_the_limits(limit, web_job, dqr, mock_dicomweb_pacs, tmp_path):
    mock_dicomweb_pacs.faults.delay = 0.02  # long enough for requests to overlap
    config = web_job(ALL_STUDIES)
    result = dqr("run", "--config", config, "--max-queries", limit, "--max-retrievals", limit)
    assert result.exit_code == 0, result.output
    assert mock_dicomweb_pacs.max_concurrent_requests == limit
    assert len(stored_sops(tmp_path / "archive")) == 57


def test_a_pacs_that_stalls_mid_series_fails_the_attempt_after_retrieve_timeout(web_job, mock_dicomweb_pacs, dqr):
    import time

    mock_dicomweb_pacs.faults.part_delay = 30.0  # stops answering after the first instance
    config = web_job([CT_STUDY], limits={**FAST, "retries": 0, "retrieve_timeout": 1.0})
    started = time.monotonic()
    result = dqr("run", "--config", config, "--json")
    assert time.monotonic() - started < 15
    assert result.exit_code == 1
    reasons = [f["reason"] for f in json.loads(result.stdout)["failures"]]
    assert reasons and all("limits.retrieve_timeout (1 s)" in reason for reason in reasons)


def test_after_a_stall_the_retry_asks_only_for_what_is_missing_and_completes(web_job, mock_dicomweb_pacs, dqr, tmp_path):
    mock_dicomweb_pacs.faults.part_delay = 30.0  # a series answer stalls after its first instance
    config = web_job([CT_STUDY], limits={**FAST, "retries": 1, "retrieve_timeout": 1.0})
    assert dqr("run", "--config", config).exit_code == 0
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_a_slow_query_fails_after_query_timeout(web_job, mock_dicomweb_pacs, dqr):
    mock_dicomweb_pacs.faults.delay = 2.0
    config = web_job([CT_STUDY], limits={**FAST, "retries": 0, "query_timeout": 0.5})
    result = dqr("run", "--config", config)
    assert result.exit_code == 1
    assert "limits.query_timeout (0.5 s)" in result.stderr


def test_a_study_with_every_series_selected_is_fetched_in_one_request(web_job, dqr, mock_dicomweb_pacs, tmp_path):
    assert dqr("run", "--config", web_job([CT_STUDY, MR_STUDY])).exit_code == 0
    assert mock_dicomweb_pacs.requests["wado-study"] == 2
    assert mock_dicomweb_pacs.requests["wado-series"] == mock_dicomweb_pacs.requests["wado-instance"] == 0
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY, MR_STUDY)


def test_a_study_with_a_series_excluded_is_fetched_series_by_series(web_job, dqr, mock_dicomweb_pacs, tmp_path):
    assert dqr("run", "--config", web_job([CT_STUDY]), "--exclude", "*localizer*").exit_code == 0
    assert mock_dicomweb_pacs.requests["wado-study"] == 0
    assert mock_dicomweb_pacs.requests["wado-series"] == 1


def test_a_study_cut_short_in_one_request_is_finished_asking_only_for_the_missing_instances(
    web_job, dqr, mock_dicomweb_pacs, tmp_path
):
    config = web_job([CT_STUDY])
    cut_once(mock_dicomweb_pacs)
    assert dqr("run", "--config", config).exit_code == 0
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)
    assert mock_dicomweb_pacs.requests["wado-study"] == 1
    assert mock_dicomweb_pacs.requests["wado-instance"] + mock_dicomweb_pacs.requests["wado-series"] >= 1
