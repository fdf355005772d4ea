"""How the native C-STORE requestor reads its answers off the socket: a
response that arrives a byte at a time, and responses that arrive together
in one segment, are each read whole and in order."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dqr.errors import RemoteError
from dqr.plugins.dimse.native import Timeouts, store_response_pdu
from dqr.plugins.dimse.native_store import StoreAssociation

MR = "1.2.840.10008.5.1.4.1.1.4"
WARNING = 0xB000


@pytest.fixture
def association_and_peer():
    ours, peer = socket.socketpair()
    association = StoreAssociation(ours, "the test peer", Timeouts(connect=5, acse=5, dimse=5, network=60))
    yield association, peer
    ours.close()
    peer.close()


def _drain(peer: socket.socket, stop: threading.Event) -> None:
    """The peer reads (and ignores) what dqr sends, so dqr's sends never block."""
    peer.settimeout(0.05)
    while not stop.is_set():
        try:
            if not peer.recv(65536):
                return
        except (TimeoutError, OSError):
            continue


def _store(association: StoreAssociation, message_id: int) -> tuple[int, str]:
    return association.send_c_store(1, MR, f"1.2.3.{message_id}", b"\x08\x00\x18\x00\x04\x00\x00\x001.2\x00", message_id)


def test_a_response_trickling_in_a_byte_at_a_time_is_read_whole(association_and_peer):
    association, peer = association_and_peer
    response = store_response_pdu(1, 1, MR, "1.2.3.1", WARNING)
    stop = threading.Event()

    def trickle() -> None:
        for byte in response:
            peer.sendall(bytes([byte]))
            time.sleep(0.001)

    threads = [threading.Thread(target=_drain, args=(peer, stop)), threading.Thread(target=trickle)]
    for thread in threads:
        thread.start()
    try:
        assert _store(association, 1) == (WARNING, "")
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_responses_arriving_together_are_taken_one_per_request_in_order(association_and_peer):
    association, peer = association_and_peer
    peer.sendall(store_response_pdu(1, 1, MR, "1.2.3.1", 0x0000) + store_response_pdu(1, 2, MR, "1.2.3.2", WARNING))
    stop = threading.Event()
    drain = threading.Thread(target=_drain, args=(peer, stop))
    drain.start()
    try:
        assert _store(association, 1) == (0x0000, "")
        assert _store(association, 2) == (WARNING, "")
    finally:
        stop.set()
        drain.join()


def test_an_unanswered_request_times_out_after_the_dimse_timeout(association_and_peer):
    association, peer = association_and_peer
    association.timeouts = Timeouts(connect=5, acse=5, dimse=0.3, network=60)
    stop = threading.Event()
    drain = threading.Thread(target=_drain, args=(peer, stop))
    drain.start()
    started = time.monotonic()
    try:
        with pytest.raises(RemoteError, match="no response within 0.3 s"):
            _store(association, 1)
    finally:
        stop.set()
        drain.join()
    assert 0.3 <= time.monotonic() - started < 1.0
