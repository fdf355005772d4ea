"""Reliability over DIMSE, through the CLI against the mock Query/Retrieve
SCP: faults injected on the mock (delays, association rejects, aborts,
failure statuses, a closed port), the concurrency it observes, the circuit
breaker, the retrieval window, `dqr status` / `dqr retry`, and what the logs
may say. Requests are counted on the mock, never by patching the engine."""

from __future__ import annotations

import csv
import json
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import archive_files

from dqr.plugins.testpacs.memory.synthetic import (
    DEFAULT_COHORT,
    accession_number,
    generate_cohort,
)
from dqr.plugins.testpacs.mockpacs.dimse_server import AbortFault, RejectFault, StatusFault

#: What ``mock_dimse_pacs`` serves (core/testing/fixtures_dimse.py).
COHORT = DEFAULT_COHORT
CT_STUDY = accession_number(COHORT, 0, 0)  # DOE^JANE: CT, 2 series x 3 instances
MR_STUDY = accession_number(COHORT, 0, 1)  # DOE^JANE: MR, 3 series x 3 instances
PET_STUDY = accession_number(COHORT, 1, 1)  # SMITH^JOHN: CT AC + PET WB, 2 series x 3 instances
MULLER_STUDY = accession_number(COHORT, 2, 0)  # MÜLLER^JÜRGEN: PET-CT, 2 series x 3 instances
ALL_STUDIES = [accession_number(COHORT, p, s) for p in range(COHORT.patients) for s in range(2)]
#: Retries and backoffs small enough for tests.
FAST = {"backoff_initial": 0.01, "backoff_max": 0.05, "retries": 2}


def _instances_by_accession() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for dataset in generate_cohort(COHORT):
        found.setdefault(dataset.AccessionNumber, []).append(dataset.SOPInstanceUID)
    return found


INSTANCES = _instances_by_accession()


def expected_sops(*accessions: str) -> list[str]:
    return sorted(uid for accession in accessions for uid in INSTANCES[accession])


def stored_sops(root: Path) -> list[str]:
    """The SOP Instance UIDs in the archive, one per .dcm file (duplicates kept)."""
    return sorted(path.stem for path in archive_files(root))


def dimse_source(server, **keys) -> dict:
    return {
        "type": "dimse",
        "host": "127.0.0.1",
        "port": server if isinstance(server, int) else server.port,
        "called_aet": "MOCKPACS",
        "calling_aet": "DQR",
        "connect_timeout": 5,
        "acse_timeout": 10,
        "dimse_timeout": 10,
        **keys,
    }


@pytest.fixture
def dimse_job(site, write_csv, mock_dimse_pacs, dimse_transport):
    """``dimse_job(accessions, server=mock_dimse_pacs, limits={}, **site_keys)``:
    a site config on the mock DIMSE PACS with a CSV of accession numbers
    (one row each, labelled ``S<n>``/``S<n>_A``)."""

    def make(accessions, server=None, limits=None, **overrides) -> Path:
        rows = "".join(f"{a},S{i},S{i}_A\n" for i, a in enumerate(accessions, start=1))
        csv_path = write_csv("Accession Number,Subject,Session\n" + rows)
        return site(
            source=dimse_source(server or mock_dimse_pacs, transport=dimse_transport),
            limits={**FAST, **(limits or {})},
            csv=str(csv_path),
            **overrides,
        )

    return make


def json_summary(result) -> dict:
    return json.loads(result.stdout)


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# -- faults: retried, then failed with a reason; the rest completes ---------------------


def test_delays_still_complete_the_job(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    mock_dimse_pacs.faults.delay = 0.02
    result = dqr("run", "--config", dimse_job([CT_STUDY, PET_STUDY]))
    assert result.exit_code == 0, result.output
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY, PET_STUDY)


def test_transient_association_rejects_are_retried_then_succeed(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    mock_dimse_pacs.faults.reject = RejectFault(times=2, transient=True, reason="no-reason")
    result = dqr("run", "--config", dimse_job([CT_STUDY], limits={"max_queries": 1}))
    assert result.exit_code == 0, result.output
    assert mock_dimse_pacs.faults.reject.times == 0  # both rejects were met, and retried past
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_a_permanent_reject_fails_that_row_at_once_and_the_rest_completes(
    dimse_job, dqr, mock_dimse_pacs, tmp_path
):
    # One permanent reject, met by row 2's query (one query at a time): if dqr
    # retried it, the retry would be accepted and the row would not fail.
    mock_dimse_pacs.faults.reject = RejectFault(times=1, transient=False, reason="calling-aet")
    config = dimse_job([CT_STUDY, PET_STUDY], limits={"max_queries": 1})
    result = dqr("run", "--config", config, "--json")
    assert result.exit_code == 1, result.output
    assert "calling AE title not recognised" in result.stderr
    assert json_summary(result)["rows_failed"] == [2]
    assert stored_sops(tmp_path / "archive") == expected_sops(PET_STUDY)


def test_a_reject_that_outlasts_the_retries_fails_with_a_reason_in_the_failures_csv(
    dimse_job, dqr, mock_dimse_pacs, tmp_path
):
    # retries: 2 -> three attempts, all rejected, for row 2 (queries run one at a time).
    mock_dimse_pacs.faults.reject = RejectFault(times=3, transient=True, reason="no-reason")
    config = dimse_job([CT_STUDY, PET_STUDY, MR_STUDY], limits={"max_queries": 1})
    result = dqr("run", "--config", config)
    assert result.exit_code == 1, result.output
    failures = read_csv_rows(tmp_path / "archive-failures.csv")
    assert [(f["Accession Number"], f["Subject"], f["Session"]) for f in failures] == [(CT_STUDY, "S1", "S1_A")]
    assert "rejected the association (transient" in failures[0]["reason"]
    assert stored_sops(tmp_path / "archive") == expected_sops(PET_STUDY, MR_STUDY)


def test_the_failures_csv_keeps_the_inputs_columns_and_adds_reason(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    mock_dimse_pacs.faults.reject = RejectFault(times=1, transient=False, reason="called-aet")
    dqr("run", "--config", dimse_job([CT_STUDY, PET_STUDY], limits={"max_queries": 1}))
    header, row = (tmp_path / "archive-failures.csv").read_text(encoding="utf-8").splitlines()
    assert header == "Accession Number,Subject,Session,reason"
    assert row.startswith(f"{CT_STUDY},S1,S1_A,")


def test_an_abort_mid_series_is_retried_and_each_instance_stored_once(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    mock_dimse_pacs.faults.abort = AbortFault(after_stores=1, times=1)
    result = dqr("run", "--config", dimse_job([CT_STUDY], limits={"max_retrievals": 1}))
    assert result.exit_code == 0, result.output
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)
    manifest = (tmp_path / "archive" / "Test" / "S1" / "S1_A" / "manifest.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["SOPInstanceUID"] for line in manifest) == expected_sops(CT_STUDY)


def test_the_retry_after_an_abort_fetches_only_the_missing_instances(dimse_job, dqr, mock_dimse_pacs):
    mock_dimse_pacs.faults.abort = AbortFault(after_stores=2, times=1)
    dqr("run", "--config", dimse_job([CT_STUDY], limits={"max_retrievals": 1}))
    # 2 instances arrived before the abort; the retry must ask for the last
    # one only, so the mock sends each of the 6 instances exactly once.
    assert mock_dimse_pacs.requests["C-STORE"] == len(expected_sops(CT_STUDY))


def test_a_failure_status_is_final_with_its_reason_and_not_retried(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    mock_dimse_pacs.faults.statuses = [StatusFault(service="C-GET", status=0xC000, times=1)]
    result = dqr("run", "--config", dimse_job([CT_STUDY], limits={"max_retrievals": 1}), "--json")
    assert result.exit_code == 1, result.output
    [failure] = json_summary(result)["failures"]
    assert failure["kind"] == "series" and "0xC000" in failure["reason"]
    assert mock_dimse_pacs.requests["C-GET"] == 2  # one per series: no retry of the refused one
    assert len(stored_sops(tmp_path / "archive")) == 3  # the other series


def test_out_of_resources_is_a_slow_down_retried_not_a_failure(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    mock_dimse_pacs.faults.statuses = [
        StatusFault(service="C-GET", status=0xA702, times=1),
        StatusFault(service="C-FIND", status=0xA702, times=1),
    ]
    result = dqr("run", "--config", dimse_job([CT_STUDY], limits={"max_retrievals": 1}), "--json")
    assert result.exit_code == 0, result.output
    assert json_summary(result)["failures"] == []
    assert mock_dimse_pacs.requests["C-GET"] == 3  # two series, one retried
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_a_series_that_keeps_failing_never_stops_the_others(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    # retries: 2 -> the first series retrieved meets all three 0xA702 answers.
    mock_dimse_pacs.faults.statuses = [StatusFault(service="C-GET", status=0xA702, times=3)]
    # One at a time (max_queries too: a study is listed and fetched by one
    # step, and steps run up to the larger limit at once).
    config = dimse_job([CT_STUDY, PET_STUDY, MR_STUDY], limits={"max_retrievals": 1, "max_queries": 1})
    result = dqr("run", "--config", config, "--json")
    assert result.exit_code == 1, result.output
    summary = json_summary(result)
    assert [f["kind"] for f in summary["failures"]] == ["series"]
    assert "out of resources" in summary["failures"][0]["reason"]
    assert summary["studies_stored"] == 2
    assert len(stored_sops(tmp_path / "archive")) == len(expected_sops(CT_STUDY, PET_STUDY, MR_STUDY)) - 3


def test_a_pacs_association_limit_is_met_by_slowing_down_not_by_failing(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    # The PACS accepts two associations at once; dqr's defaults would use up
    # to 4 queries + 2 retrievals. Its "local limit exceeded" rejects must
    # make dqr slow down and finish, not fail series.
    mock_dimse_pacs.faults.max_associations = 2
    config = dimse_job([CT_STUDY, PET_STUDY, MR_STUDY], limits={"retries": 5})
    result = dqr("run", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY, PET_STUDY, MR_STUDY)


def test_a_pacs_taking_one_association_at_a_time_still_gets_everything(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    # dqr's idle query association must not keep its retrievals out.
    mock_dimse_pacs.faults.max_associations = 1
    config = dimse_job([CT_STUDY, PET_STUDY], limits={"retries": 5, "max_queries": 1, "max_retrievals": 1})
    result = dqr("run", "--config", config)
    assert result.exit_code == 0, result.output
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY, PET_STUDY)


# -- concurrency: the mock counts simultaneous associations -----------------------------


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_simultaneous_query_associations_never_exceed_max_queries(
    limit, dimse_job, dqr, mock_dimse_pacs
):
    mock_dimse_pacs.faults.delay = 0.05  # per answer: queries overlap
    result = dqr("query", "--config", dimse_job(ALL_STUDIES), "--max-queries", limit)
    assert result.exit_code == 0, result.output
    assert mock_dimse_pacs.max_concurrent_associations == limit


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_simultaneous_retrieval_associations_never_exceed_max_retrievals(
    limit, dimse_job, dqr, mock_dimse_pacs, tmp_path
):
    # Queries go over one association (--max-queries 1), which stays open in
    # dqr's pool, so the PACS sees it beside at most `limit` C-GET ones.
    studies = [CT_STUDY, MR_STUDY, PET_STUDY, MULLER_STUDY]  # 9 series
    # Four studies, listed one after the other over the one query association,
    # may be retrieved three at a time under limit 4 (a first study goes series
    # by series); the PACS holds retrievals until that many are in progress, so
    # the overlap does not hang on listing being quicker than retrieving.
    overlap = min(limit, 3)
    mock_dimse_pacs.faults.meet = overlap
    mock_dimse_pacs.faults.delay = 0.05  # per answer and sub-operation: an excess would show
    result = dqr("run", "--config", dimse_job(studies), "--max-queries", 1, "--max-retrievals", limit)
    assert result.exit_code == 0, result.output
    assert overlap + 1 <= mock_dimse_pacs.max_concurrent_associations <= limit + 1
    assert stored_sops(tmp_path / "archive") == expected_sops(*studies)


# -- the circuit breaker --------------------------------------------------------------------

BREAKER = {
    "breaker_failures": 2,
    "breaker_cooldown": 0.2,
    "breaker_max_cooldowns": 2,
    "retries": 1,
    "max_queries": 1,
}


def test_an_unreachable_source_makes_dqr_give_up_quickly_with_a_clear_message(
    dimse_job, dqr, closed_loopback_port
):
    config = dimse_job(ALL_STUDIES, server=closed_loopback_port, limits=BREAKER)
    started = time.monotonic()
    result = dqr("run", "--config", config)
    assert time.monotonic() - started < 5
    assert result.exit_code == 1, result.output
    assert "gave up" in result.stderr
    assert "could not be reached" in result.stderr and "connection refused" in result.stderr


def test_after_giving_up_status_shows_the_rows_still_pending(dimse_job, dqr, closed_loopback_port):
    config = dimse_job(ALL_STUDIES, server=closed_loopback_port, limits=BREAKER)
    dqr("run", "--config", config)
    status = json.loads(dqr("status", "--config", config, "--json").stdout)
    # The source was down: no row is at fault, every one is still to do.
    assert status["counts"]["rows"] == {"pending": len(ALL_STUDIES)}


def test_echo_against_a_closed_port_reports_refused(dimse_job, dqr, closed_loopback_port):
    result = dqr("echo", "--config", dimse_job([CT_STUDY], server=closed_loopback_port))
    assert result.exit_code == 1
    assert "connection refused" in result.stderr


# -- the retrieval window --------------------------------------------------------------------


def clock(offset: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(time.time() + offset))


class RequestSampler:
    """Samples the mock's request counters while a CLI run blocks the test."""

    def __init__(self, server) -> None:
        self.server = server
        self.samples: list[tuple[float, Counter]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append((time.monotonic() - self.started, Counter(self.server.requests)))

    def __enter__(self) -> RequestSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def first(self, service: str) -> float:
        return next(t for t, counts in self.samples if counts[service])


def test_outside_the_window_dqr_queries_then_waits_saying_until_when(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    opens = clock(3)  # whole seconds: the wait is between 2 and 3 s
    config = dimse_job([CT_STUDY], limits={"retrieve_window": f"{opens}-{clock(3600)}"})
    with RequestSampler(mock_dimse_pacs) as sampler:
        result = dqr("run", "--config", config)
    assert result.exit_code == 0, result.output
    assert f"waiting until {opens}" in result.stderr
    assert sampler.first("C-FIND") < 1.0  # queries ran before the window opened
    assert sampler.first("C-GET") >= 1.9
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_inside_the_window_dqr_does_not_wait(dimse_job, dqr, tmp_path):
    config = dimse_job([CT_STUDY], limits={"retrieve_window": f"{clock(-3600)}-{clock(3600)}"})
    started = time.monotonic()
    result = dqr("run", "--config", config)
    assert result.exit_code == 0, result.output
    assert "waiting" not in result.stderr
    assert time.monotonic() - started < 1.9
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


# -- dqr status and dqr retry --failed ----------------------------------------------------------


@pytest.fixture
def job_with_a_failed_series(dimse_job, dqr, mock_dimse_pacs):
    """A run of three studies where one series was refused (0xC000, once)."""
    mock_dimse_pacs.faults.statuses = [StatusFault(service="C-GET", status=0xC000, times=1)]
    config = dimse_job([CT_STUDY, PET_STUDY, MR_STUDY], limits={"max_retrievals": 1})
    assert dqr("run", "--config", config).exit_code == 1
    return config


def test_status_counts_each_state_and_lists_failures_with_reasons(job_with_a_failed_series, dqr):
    result = dqr("status", "--config", job_with_a_failed_series)
    assert result.exit_code == 0, result.output
    assert "failed: 1" in result.stdout and "stored: 6" in result.stdout  # series
    assert "0xC000" in result.stdout


def test_status_json_is_machine_readable(job_with_a_failed_series, dqr):
    status = json.loads(dqr("status", "--config", job_with_a_failed_series, "--json").stdout)
    assert status["counts"]["rows"] == {"queried": 3}
    assert status["counts"]["studies"] == {"failed": 1, "stored": 2}
    assert status["counts"]["series"] == {"failed": 1, "stored": 6}
    series_failures = [f for f in status["failures"] if f["kind"] == "series"]
    assert len(series_failures) == 1 and "0xC000" in series_failures[0]["error"]
    assert series_failures[0]["attempts"] == 1


def test_retry_failed_fetches_only_the_failed_series_and_exits_0(
    job_with_a_failed_series, dqr, mock_dimse_pacs, tmp_path
):
    mock_dimse_pacs.reset()  # the PACS is fixed
    result = dqr("retry", "--config", job_with_a_failed_series, "--failed", "--json")
    assert result.exit_code == 0, result.output
    assert mock_dimse_pacs.requests["C-GET"] == 1
    assert json_summary(result)["instances_stored"] == 3
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY, PET_STUDY, MR_STUDY)
    status = json.loads(dqr("status", "--config", job_with_a_failed_series, "--json").stdout)
    assert status["failures"] == [] and status["counts"]["series"] == {"stored": 7}


def test_retry_failed_requeries_only_the_rows_whose_query_failed(dimse_job, dqr, mock_dimse_pacs, tmp_path):
    mock_dimse_pacs.faults.statuses = [StatusFault(service="C-FIND", status=0xC001, times=1)]
    config = dimse_job([CT_STUDY, PET_STUDY], limits={"max_queries": 1})
    assert dqr("run", "--config", config).exit_code == 1
    mock_dimse_pacs.reset()
    result = dqr("retry", "--config", config, "--failed")
    assert result.exit_code == 0, result.output
    # the CT study in one request (the first run found C-GET works), nothing of the PET study
    assert mock_dimse_pacs.requests["C-GET"] == 1
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY, PET_STUDY)


# -- logs ------------------------------------------------------------------------------------------

#: The patients of CT_STUDY and MULLER_STUDY, as the PACS knows them.
IDENTIFYING = {
    dataset.AccessionNumber: (str(dataset.PatientName), dataset.PatientBirthDate)
    for dataset in generate_cohort(COHORT)
}


def test_default_logs_hold_no_patient_names_or_birth_dates(dimse_job, dqr, mock_dimse_pacs):
    # Faults make dqr log warnings and failures too, not only progress.
    mock_dimse_pacs.faults.statuses = [
        StatusFault(service="C-GET", status=0xA702, times=1),
        StatusFault(service="C-FIND", status=0xC000, times=1),
    ]
    accessions = [CT_STUDY, MULLER_STUDY, PET_STUDY]
    result = dqr("run", "--config", dimse_job(accessions, limits={"max_queries": 1}))
    assert result.exit_code == 1, result.output  # the refused query
    for accession in accessions:
        name, birth_date = IDENTIFYING[accession]
        for word in (name, *name.split("^"), birth_date):
            assert word not in result.stderr, word
    assert "MÜLLER" not in result.stderr and "DOE" not in result.stderr


def test_verbose_warns_that_logs_may_hold_patient_names(dimse_job, dqr):
    result = dqr("--verbose", "run", "--config", dimse_job([CT_STUDY]))
    assert result.exit_code == 0, result.output
    assert "may contain patient names and birth dates" in result.stderr



def test_expected_instances_come_from_one_image_query_per_study_not_one_per_series(dimse_job, dqr, mock_dimse_pacs):
    # CT study: 2 series. C-FINDs: 1 study query + 1 series query + 1 image query.
    dqr("run", "--config", dimse_job([CT_STUDY]))
    assert mock_dimse_pacs.requests["C-FIND"] == 3


def test_what_retrieve_auto_found_is_kept_in_the_job_state_for_the_next_run(
    site, write_csv, mock_dimse_pacs, dimse_transport, free_loopback_port, dqr, tmp_path
):
    import sqlite3

    mock_dimse_pacs.faults.transport.refuse_get = "context"
    mock_dimse_pacs.add_destination("DQR", "127.0.0.1", free_loopback_port)
    source = dimse_source(mock_dimse_pacs, transport=dimse_transport, store_port=free_loopback_port, store_host="127.0.0.1")
    config = site(source=source, limits=FAST, csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")))
    assert dqr("run", "--config", config).exit_code == 0
    with sqlite3.connect(tmp_path / "archive-job.sqlite") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'learnt:main:retrieve_mode'").fetchone() == ("c-move",)

    mock_dimse_pacs.reset()  # C-GET would work now: the next run does not probe it
    mock_dimse_pacs.add_destination("DQR", "127.0.0.1", free_loopback_port)
    assert dqr("run", "--config", config, "--csv", write_csv(f"Accession Number\n{PET_STUDY}\n", "next.csv")).exit_code == 0
    assert mock_dimse_pacs.requests["C-MOVE"] >= 1 and mock_dimse_pacs.requests["C-GET"] == 0


@pytest.mark.slow
def test_a_pacs_that_slows_down_mid_series_fails_the_attempt_after_retrieve_timeout(dimse_job, mock_dimse_pacs, dqr):
    config = dimse_job([CT_STUDY], limits={"retries": 0, "retrieve_timeout": 1.0})
    mock_dimse_pacs.faults.delay = 0.6  # before each sub-operation: a 3-instance series takes ~2 s
    result = dqr("run", "--config", config, "--json")
    assert result.exit_code == 1
    reasons = [f["reason"] for f in json_summary(result)["failures"]]
    assert reasons and all("limits.retrieve_timeout (1 s)" in reason for reason in reasons)


def test_a_slow_c_find_fails_after_query_timeout(dimse_job, mock_dimse_pacs, dqr):
    config = dimse_job([CT_STUDY], limits={"retries": 0, "query_timeout": 0.5})
    mock_dimse_pacs.faults.delay = 2.0
    result = dqr("run", "--config", config)
    assert result.exit_code == 1
    assert "limits.query_timeout (0.5 s)" in result.stderr


def test_a_study_with_every_series_selected_is_one_c_get(dimse_job, mock_dimse_pacs, dqr, tmp_path):
    config = dimse_job([CT_STUDY, MR_STUDY])
    config.write_text(config.read_text().replace("type: dimse", "type: dimse\n    retrieve: c-get"))
    assert dqr("run", "--config", config).exit_code == 0
    assert mock_dimse_pacs.requests["C-GET"] == 2
    assert len(archive_files(tmp_path / "archive")) == 15


def move_job(dimse_job, mock_dimse_pacs, port, accessions, **limits):
    mock_dimse_pacs.add_destination("DQR", "127.0.0.1", port)
    config = dimse_job(accessions, limits=limits)
    config.write_text(
        config.read_text().replace(
            "type: dimse", f"type: dimse\n    retrieve: c-move\n    store_port: {port}\n    store_host: 127.0.0.1"
        )
    )
    return config


def test_a_study_with_every_series_selected_is_one_c_move(dimse_job, mock_dimse_pacs, free_loopback_port, dqr, tmp_path):
    config = move_job(dimse_job, mock_dimse_pacs, free_loopback_port, [CT_STUDY, MR_STUDY])
    assert dqr("run", "--config", config).exit_code == 0
    assert mock_dimse_pacs.requests["C-MOVE"] == 2
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY, MR_STUDY)


def test_after_a_study_c_move_aborts_only_the_missing_instances_are_moved(
    dimse_job, mock_dimse_pacs, free_loopback_port, dqr, tmp_path
):
    mock_dimse_pacs.faults.abort = AbortFault(after_stores=2, times=1)
    config = move_job(dimse_job, mock_dimse_pacs, free_loopback_port, [CT_STUDY], max_retrievals=1)
    result = dqr("run", "--config", config)
    assert result.exit_code == 0, result.output
    # the study's C-MOVE delivered 2 of 6; then one C-MOVE per series for the rest
    assert mock_dimse_pacs.requests["C-MOVE"] == 3
    assert mock_dimse_pacs.requests["C-STORE"] == len(expected_sops(CT_STUDY))
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_a_resumed_study_is_moved_series_by_series_asking_only_for_the_missing(
    dimse_job, mock_dimse_pacs, free_loopback_port, dqr, tmp_path
):
    # every C-MOVE aborts after 2 instances and nothing is retried: the CT
    # study (2 x 3 instances) ends with one series complete, one with 2 of 3
    mock_dimse_pacs.faults.abort = AbortFault(after_stores=2, times=None)
    config = move_job(dimse_job, mock_dimse_pacs, free_loopback_port, [CT_STUDY], max_retrievals=1, retries=0)
    assert dqr("run", "--config", config).exit_code == 1
    assert len(stored_sops(tmp_path / "archive")) == 5
    mock_dimse_pacs.reset()
    mock_dimse_pacs.add_destination("DQR", "127.0.0.1", free_loopback_port)
    result = dqr("run", "--config", config)
    assert result.exit_code == 0, result.output
    assert (mock_dimse_pacs.requests["C-MOVE"], mock_dimse_pacs.requests["C-STORE"]) == (1, 1)
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)


def test_a_study_c_move_stores_exactly_the_study_refusing_what_was_not_asked_for(
    dimse_job, mock_dimse_factory, free_loopback_port, dqr, tmp_path
):
    from dqr.plugins.testpacs.memory.hostile import unrequested_uid

    hostile = {"accession": CT_STUDY, "foreign_study": True, "unrequested_instance": True}
    server = mock_dimse_factory(faults={"hostile": hostile})
    config = move_job(
        lambda accessions, limits: dimse_job(accessions, server=server, limits=limits),
        server, free_loopback_port, [CT_STUDY],
    )
    result = dqr("run", "--config", config)
    # the storage SCP accepts only the instances the image-level query found:
    # the extras are refused (0xC001, a warning), the study is complete
    assert result.exit_code == 0, result.output
    assert server.requests["C-MOVE"] == 1
    assert stored_sops(tmp_path / "archive") == expected_sops(CT_STUDY)
    assert result.stderr.count("storage SCP: refused instance") == 2
    assert f"refused instance {unrequested_uid(INSTANCES[CT_STUDY][0])} " in result.stderr
