"""Network destinations under faults, through `dqr run` on the memory
source: the mock Storage SCP and the mock STOW-RS server count what arrives."""

from __future__ import annotations

import json

import pytest

from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort

CT_STUDY = "0557639308"  # DOE^JANE, PAT00000: Localizer + Axial 5mm, 3 instances each
FAST = {"retries": 0, "backoff_initial": 0.01, "backoff_max": 0.02, "breaker_cooldown": 0}


def ct_instances() -> list[str]:
    return sorted(d.SOPInstanceUID for d in generate_cohort(CohortSpec(patients=4)) if d.AccessionNumber == CT_STUDY)


@pytest.fixture(params=["native", "pynetdicom"])
def dimse_to(request):
    """``dimse_to(scp, **keys)``: a dimse destination section; every test
    using it runs on both DIMSE stacks of the destination."""

    def section(scp, **keys):
        return {"type": "dimse", "host": "127.0.0.1", "port": scp.port, "called_aet": scp.aet,
                "transport": request.param, **keys}

    return section


def stow_to(server, **keys):
    return {"type": "dicomweb", "url": server.url, **keys}


@pytest.fixture
def ct_config(site, write_csv):
    """A site config retrieving the CT study into ``destination``."""

    def make(destination, **extra):
        csv = write_csv(f"Accession Number,Subject,Session\n{CT_STUDY},Subj001,S1\n")
        limits = {"backoff_initial": 0.01, "backoff_max": 0.05, "breaker_cooldown": 0, "breaker_failures": 50}
        return site(destination=destination, csv=str(csv), limits=limits, **extra)

    return make


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_a_rerun_sends_nothing_again(dimse_to, kind, ct_config, dqr, mock_store_scp_factory, mock_stow_factory):
    server = mock_store_scp_factory() if kind == "dimse" else mock_stow_factory()
    config = ct_config(dimse_to(server) if kind == "dimse" else stow_to(server))
    assert dqr("run", "--config", config).exit_code == 0
    assert sorted(server.received) == ct_instances()
    sent = dict(server.stores if kind == "dimse" else server.stored)
    assert dqr("run", "--config", config).exit_code == 0
    assert dict(server.stores if kind == "dimse" else server.stored) == sent
    assert all(count == 1 for count in sent.values())


def test_instances_acknowledged_but_not_recorded_in_the_job_state_are_not_sent_again(
    dimse_to, ct_config, dqr, mock_store_scp_factory, tmp_path
):
    """As after a kill -9 between the acknowledgement and the job state:
    the local manifest already has them."""
    import sqlite3

    server = mock_store_scp_factory()
    config = ct_config(dimse_to(server))
    assert dqr("run", "--config", config).exit_code == 0
    with sqlite3.connect(tmp_path / "archive-job.sqlite") as db:  # forget the job, keep the manifest
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
    (tmp_path / "archive-job.sqlite").unlink()
    assert tables
    assert dqr("run", "--config", config).exit_code == 0
    assert set(server.stores.values()) == {1}


def test_a_destination_that_is_down_fails_the_study_naming_it_and_the_rerun_completes(
    ct_config, dqr, mock_store_scp_factory, closed_loopback_port
):
    config = ct_config(
        {"type": "dimse", "host": "127.0.0.1", "port": closed_loopback_port, "called_aet": "XNAT", "limits": FAST}
    )
    result = dqr("run", "--config", config)
    assert result.exit_code == 1
    assert f"XNAT at 127.0.0.1:{closed_loopback_port}" in result.output
    server = mock_store_scp_factory(port=closed_loopback_port, aet="XNAT")
    assert dqr("run", "--config", config).exit_code == 0
    assert sorted(server.received) == ct_instances()


@pytest.mark.parametrize(("kind", "status"), [("dimse", 0xA900), ("dicomweb", 0xC000)])
def test_instances_the_destination_refuses_are_failures_and_only_they_are_sent_next_run(
    dimse_to, kind, status, ct_config, dqr, mock_store_scp_factory, mock_stow_factory
):
    """C-STORE: a failure status; STOW-RS: the instance in FailedSOPSequence."""
    refused = ct_instances()[1]
    server = mock_store_scp_factory() if kind == "dimse" else mock_stow_factory()
    refusals = {refused: status}
    if kind == "dimse":
        server.faults.statuses = refusals
    else:
        server.faults.refuse = refusals
    config = ct_config(dimse_to(server, limits=FAST) if kind == "dimse" else stow_to(server, limits=FAST))
    result = dqr("run", "--config", config)
    assert result.exit_code == 1
    assert f"0x{status:04X}" in result.output
    assert sorted(server.received) == [uid for uid in ct_instances() if uid != refused]
    if kind == "dimse":
        server.faults.statuses = {}
    else:
        server.faults.refuse = {}
    assert dqr("run", "--config", config).exit_code == 0
    assert sorted(server.received) == ct_instances()
    sent = server.stores if kind == "dimse" else server.stored
    assert {uid: n for uid, n in sent.items() if n > 1} == {refused: 2}


def test_stow_retries_a_busy_server_and_a_cut_connection(ct_config, dqr, mock_stow_factory):
    server = mock_stow_factory()
    server.faults.unavailable = 1
    server.faults.cut = 1
    config = ct_config(stow_to(server, limits={"retries": 3, "backoff_initial": 0.01, "backoff_max": 0.02}))
    assert dqr("run", "--config", config).exit_code == 0
    assert sorted(server.received) == ct_instances()


def test_c_store_retries_after_an_abort_mid_series(dimse_to, ct_config, dqr, mock_store_scp_factory):
    server = mock_store_scp_factory()
    server.faults.abort_after = 2
    config = ct_config(dimse_to(server, limits={"retries": 3, "backoff_initial": 0.01, "backoff_max": 0.02}))
    assert dqr("run", "--config", config).exit_code == 0
    assert sorted(server.received) == ct_instances()


def test_a_warning_status_counts_as_stored_with_the_warning_in_the_manifest(
    dimse_to, ct_config, dqr, mock_store_scp_factory, tmp_path
):
    warned = ct_instances()[0]
    server = mock_store_scp_factory()
    server.faults.statuses = {warned: 0xB000}
    assert dqr("run", "--config", ct_config(dimse_to(server))).exit_code == 0
    manifest = tmp_path / "archive-job-manifest" / "Test" / "Subj001" / "S1" / "manifest.jsonl"
    records = {r["SOPInstanceUID"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    assert sorted(records) == ct_instances()
    assert "0xB000" in records[warned]["warning"]
    assert "warning" not in records[ct_instances()[1]]


def test_a_warning_status_is_kept_in_the_job_state_and_shown_by_the_summary_and_status(
    dimse_to, ct_config, dqr, mock_store_scp_factory
):
    warned = ct_instances()[2]
    server = mock_store_scp_factory()
    server.faults.statuses = {warned: 0xB007}
    config = ct_config(dimse_to(server))
    result = dqr("run", "--config", config, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["instances_with_warning"] == 1
    assert "1 instances were stored with a warning from the destination" in result.stderr
    status = dqr("status", "--config", config, "--json")
    [kept] = json.loads(status.stdout)["warnings"]
    assert kept["SOPInstanceUID"] == warned
    assert "0xB007" in kept["warning"]


def test_a_sop_class_the_scp_does_not_accept_is_a_final_error_naming_it(
    dimse_to, ct_config, dqr, mock_store_scp_factory
):
    server = mock_store_scp_factory(faults={"sop_classes": ["1.2.840.10008.5.1.4.1.1.4"]})  # MR only
    result = dqr("run", "--config", ct_config(dimse_to(server, limits=FAST)))
    assert result.exit_code == 1
    assert "CT Image Storage" in result.output
    assert server.stores == {}


def test_the_destination_never_sees_more_than_max_associations(dimse_to, site, write_csv, dqr, mock_store_scp_factory):
    server = mock_store_scp_factory()
    server.faults.delay = 0.02
    csv = write_csv("Patient ID\nPAT00000\nPAT00001\nPAT00002\nPAT00003\n")
    config = site(
        destination=dimse_to(server, limits={"max_associations": 2}),
        csv=str(csv),
        limits={"max_retrievals": 4},
    )
    assert dqr("run", "--config", config).exit_code == 0
    assert len(server.received) == len(list(generate_cohort(CohortSpec(patients=4))))
    assert server.max_concurrent_associations == 2


def test_stow_never_has_more_than_max_requests_in_flight(site, write_csv, dqr, mock_stow_factory):
    server = mock_stow_factory()
    server.faults.delay = 0.05
    csv = write_csv("Patient ID\nPAT00000\nPAT00001\nPAT00002\nPAT00003\n")
    config = site(
        destination=stow_to(server, limits={"max_requests": 2}),
        csv=str(csv),
        limits={"max_retrievals": 4},
    )
    assert dqr("run", "--config", config).exit_code == 0
    assert len(server.received) == len(list(generate_cohort(CohortSpec(patients=4))))
    assert server.max_concurrent_requests == 2


def test_a_run_leaves_no_association_open_at_the_destination(dimse_to, ct_config, dqr, mock_store_scp_factory):
    """Series sent in parallel share one destination (and its pool), closed at the end."""
    import time

    server = mock_store_scp_factory()
    assert dqr("run", "--config", ct_config(dimse_to(server))).exit_code == 0
    deadline = time.monotonic() + 5
    while server.current_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.current_associations == 0


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_verify_names_what_the_destination_lost_and_the_next_writer_sends_it_again(
    dimse_to, kind, mock_store_scp_factory, mock_stow_factory, tmp_path
):
    from io import BytesIO

    from dqr.backend import DestinationContext
    from dqr.model import Series, Study
    from dqr.pluginmanager import destination_types

    server = mock_store_scp_factory() if kind == "dimse" else mock_stow_factory()
    section = dimse_to(server) if kind == "dimse" else stow_to(server)
    registered = destination_types()[kind]
    context = DestinationContext(tmp_path / "archive", "Test", tmp_path / "job.sqlite", tmp_path)
    destination = registered.factory(registered.config_model.model_validate(section), context)
    datasets = [d for d in generate_cohort(CohortSpec(patients=4)) if d.AccessionNumber == CT_STUDY][:3]
    study = Study(study_uid=datasets[0].StudyInstanceUID)
    series = Series(study_uid=study.study_uid, series_uid=datasets[0].SeriesInstanceUID)
    uids = [d.SOPInstanceUID for d in datasets]
    try:
        writer = destination.open_series(study, series, "S", "E")
        for dataset in datasets:
            buffer = BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            writer.write(dataset.SOPInstanceUID, buffer.getvalue(), {})
        assert sorted(writer.commit()) == sorted(uids)
        assert destination.verify(study, series, uids) == []
        server.forget([uids[1]])
        assert destination.verify(study, series, uids) == [uids[1]]
        again = destination.open_series(study, series, "S", "E")
        assert [again.exists(uid) for uid in uids] == [True, False, True]
    finally:
        destination.close()


@pytest.mark.parametrize(("batch_bytes", "requests"), [(None, 2), (1, 6)])
def test_stow_sends_one_request_per_series_within_the_size_bound(
    batch_bytes, requests, ct_config, dqr, mock_stow_factory
):
    server = mock_stow_factory()
    keys = {"verify": False} | ({"batch_bytes": batch_bytes} if batch_bytes else {})
    assert dqr("run", "--config", ct_config(stow_to(server, **keys))).exit_code == 0
    assert server.requests["stow"] == requests
    assert sorted(server.received) == ct_instances()


@pytest.mark.slow
def test_kill_9_mid_send_then_rerun_loses_nothing_and_resends_only_what_was_in_flight(
    dimse_to, site, write_csv, dqr, mock_store_scp_factory, tmp_path
):
    import os
    import signal
    import subprocess
    import sys
    import time

    server = mock_store_scp_factory()
    server.faults.delay = 0.05
    csv = write_csv("Patient ID\nPAT00000\nPAT00001\n")
    spec = {"patients": 2, "instances_per_series": 20}  # long series: many acknowledged mid-series at the kill
    config = site(
        source={"type": "memory", "synthetic": spec},
        destination=dimse_to(server, limits={"max_associations": 2}),
        csv=str(csv),
    )
    expected = {d.SOPInstanceUID for d in generate_cohort(CohortSpec(**spec))}
    process = subprocess.Popen(
        [sys.executable, "-m", "dqr", "run", "--config", str(config)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(server.received) < 30 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        assert process.poll() is None, "dqr finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert 30 <= len(server.received) < len(expected)
    server.faults.delay = 0.0
    assert dqr("run", "--config", config).exit_code == 0
    assert set(server.received) == expected
    # Only a C-STORE in flight at the kill (at most one per association) can be sent twice:
    # everything acknowledged before it was in the local manifest.
    assert sum(server.stores.values()) - len(expected) <= 2


def test_an_instance_acknowledged_but_not_held_fails_its_series_by_name_and_is_sent_again(
    ct_config, dqr, mock_stow_factory
):
    lost = ct_instances()[1]
    server = mock_stow_factory()
    server.faults.lose = [lost]
    config = ct_config(stow_to(server, limits=FAST))
    result = dqr("run", "--config", config)
    assert result.exit_code == 1
    assert "not held by" in result.stderr and lost in result.stderr
    server.faults.lose = []
    assert dqr("run", "--config", config).exit_code == 0
    assert sorted(server.received) == ct_instances()
    assert {uid: n for uid, n in server.stored.items() if n > 1} == {lost: 2}


def test_verify_false_says_the_studies_were_not_verified_at_the_destination(ct_config, dqr, mock_stow_factory):
    server = mock_stow_factory()
    result = dqr("run", "--config", ct_config(stow_to(server, limits=FAST, verify=False)))
    assert result.exit_code == 0
    assert "not verified at the destination (verify: false)" in result.stderr


def test_an_instance_found_missing_by_verification_is_not_counted_as_stored_by_the_run(
    ct_config, dqr, mock_stow_factory
):
    server = mock_stow_factory()
    server.faults.lose = [ct_instances()[1]]
    result = dqr("run", "--config", ct_config(stow_to(server, limits=FAST)), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["instances_stored"] == len(ct_instances()) - 1
