"""A TCP proxy that misbehaves on purpose, between dqr and a PACS, for the
faults a pynetdicom-based mock cannot produce: PDUs split into tiny TCP
segments, slow peers, a connection cut in the middle of a PDU, and a small
maximum PDU length forced on the PACS's sends (the proxy rewrites dqr's
A-ASSOCIATE-RQ, so the PACS fragments every message into 4 KB PDUs).

``fault_proxy(target_port, **faults)`` (fixture) starts one on 127.0.0.1;
``proxy.port`` is where dqr connects. Faults apply to what the PACS sends.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["FaultProxy", "fault_proxy"]


@dataclass
class ProxyFaults:
    chunk: int | None = None
    """Forward the PACS's bytes in segments of at most this many bytes."""
    delay: float = 0.0
    """Seconds before each forwarded segment (a slow peer)."""
    cut_after: int | None = None
    """Close both sockets after forwarding this many bytes of the PACS's
    first connection that got that far (mid-PDU, without an A-ABORT)."""
    max_pdu: int | None = None
    """Rewrite dqr's Maximum Length item to this (the PACS then sends PDUs of at most this size)."""


class FaultProxy:
    def __init__(self, target_port: int, faults: ProxyFaults) -> None:
        self.target_port = target_port
        self.faults = faults
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stopped = False
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="fault-proxy")
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, server]
            threading.Thread(target=self._upstream, args=(client, server), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket) -> None:
        first = True
        while data := _recv(client):
            if first and self.faults.max_pdu and data[0] == 0x01:
                data = _rewrite_max_length(data, self.faults.max_pdu)
            first = False
            if not _send(server, data):
                break
        _close(client, server)

    def _downstream(self, server: socket.socket, client: socket.socket) -> None:
        sent = 0
        while data := _recv(server):
            size = self.faults.chunk or len(data)
            for start in range(0, len(data), size):
                piece = data[start : start + size]
                if self.faults.cut_after is not None and sent + len(piece) > self.faults.cut_after:
                    _send(client, piece[: self.faults.cut_after - sent])
                    self.faults.cut_after = None  # once
                    self.cuts += 1
                    _close(client, server)
                    return
                if self.faults.delay:
                    time.sleep(self.faults.delay)
                if not _send(client, piece):
                    _close(client, server)
                    return
                sent += len(piece)
        _close(client, server)

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        for sock in self._sockets:
            _close(sock)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _rewrite_max_length(pdu: bytes, max_pdu: int) -> bytes:
    """The A-ASSOCIATE-RQ with its Maximum Length sub-item (0x51) set to
    ``max_pdu`` (assumes the PDU arrived in one segment, as it does on loopback)."""
    marker = b"\x51\x00\x00\x04"
    at = pdu.find(marker)
    if at < 0:
        return pdu
    at += len(marker)
    return pdu[:at] + max_pdu.to_bytes(4, "big") + pdu[at + 4 :]


@pytest.fixture
def fault_proxy() -> Iterator[Callable[..., Any]]:
    started: list[FaultProxy] = []

    def start(target_port: int, **faults: Any) -> FaultProxy:
        proxy = FaultProxy(target_port, ProxyFaults(**faults))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()
