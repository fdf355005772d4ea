"""The dimse destination's native C-STORE requestor (dqr.plugins.dimse.native_store)
against the mock Storage SCP (pynetdicom, over real loopback DIMSE)."""

from __future__ import annotations

import threading
import time
from io import BytesIO

import pytest

from dqr.backend import DestinationContext
from dqr.model import Series, Study
from dqr.plugins.destinations import DimseDestinationConfig
from dqr.plugins.destinations.dimse_store import DimseDestination
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort


def _instances(n: int) -> list[tuple[str, bytes]]:
    out = []
    from itertools import islice

    for dataset in islice(generate_cohort(CohortSpec(patients=1)), n):
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        out.append((str(dataset.SOPInstanceUID), buffer.getvalue()))
    return out


@pytest.fixture
def destination_to(tmp_path):
    made: list[DimseDestination] = []

    def make(scp, **keys) -> DimseDestination:
        config = DimseDestinationConfig(
            type="dimse", host="127.0.0.1", port=scp.port, called_aet=scp.aet, **keys
        )
        destination = DimseDestination(config, DestinationContext(tmp_path / "archive", "Test", tmp_path / "job.sqlite"))
        made.append(destination)
        return destination

    yield make
    for destination in made:
        destination.close()


def _requestor_threads() -> list[threading.Thread]:
    from pynetdicom.association import Association

    return [t for t in threading.enumerate() if isinstance(t, Association) and t.is_requestor and t.is_alive()]


@pytest.mark.parametrize(("transport", "threads"), [(None, 0), ("pynetdicom", 1)])
def test_the_default_c_store_path_runs_no_pynetdicom_association(
    transport, threads, destination_to, mock_store_scp_factory
):
    """pynetdicom's association polls in its own threads (1 ms sleeps), the
    per-message cost that made dqr's C-STORE 7.8x storescu; the default
    transport sends from the calling thread."""
    scp = mock_store_scp_factory()
    destination = destination_to(scp, **({"transport": transport} if transport else {}))
    before = len(_requestor_threads())
    uid, data = _instances(1)[0]
    assert destination.store(data) is None
    assert len(_requestor_threads()) - before == threads
    assert uid in scp.received


def test_an_association_idle_past_network_timeout_is_replaced_not_failed(destination_to, mock_store_scp_factory):
    scp = mock_store_scp_factory()
    destination = destination_to(scp, network_timeout=0.3, limits={"retries": 0, "max_associations": 1})
    (first, a), (second, b) = _instances(2)
    destination.store(a)
    time.sleep(0.5)
    destination.store(b)
    assert {first, second} <= set(scp.received)
    assert len(scp._per_association) == 2  # the idle one was closed, the second sent on a new one


def test_an_idle_association_the_scp_aborted_is_replaced_without_a_retry(destination_to, mock_store_scp_factory):
    scp = mock_store_scp_factory()
    destination = destination_to(scp, limits={"retries": 0, "max_associations": 1})
    (first, a), (second, b) = _instances(2)
    destination.store(a)
    for assoc in scp._server.active_associations:
        assoc.abort()
    time.sleep(0.3)
    destination.store(b)  # with retries: 0, a send on the aborted association would fail
    assert {first, second} <= set(scp.received)


def test_a_writer_reports_only_what_the_scp_acknowledged(destination_to, mock_store_scp_factory):
    from dqr.errors import DestinationRefusedError

    instances = _instances(3)
    refused = instances[1][0]
    scp = mock_store_scp_factory(faults={"statuses": {refused: 0xA900}})
    destination = destination_to(scp, limits={"retries": 0})
    study, series = Study(study_uid="1.2.3"), Series(study_uid="1.2.3", series_uid="1.2.3.4")
    writer = destination.open_series(study, series, "S", "E")
    for uid, data in instances:
        try:
            writer.write(uid, data, {})
        except DestinationRefusedError as error:
            assert uid == refused and "0xA900" in str(error)
    assert sorted(writer.commit()) == sorted(uid for uid, _ in instances if uid != refused)
