"""Count what a server sees: simultaneous TCP connections, from any number of
client processes. A plain library (no pytest), for tests and benchmarks.

- :class:`CountingProxy` forwards 127.0.0.1:<port> to an upstream server (an
  Orthanc's DICOM port, say) and counts the connections open through it at
  once: point every dqr process at the proxy, and ``maximum`` is what the
  PACS had to serve at worst, summed over all of them.
- With no upstream it is a counting sink: a client connects, may write one
  line naming itself (``tag``), holds the connection as long as it "works"
  and closes it. That is a shared point that several processes can be
  counted at without sharing memory.

Each connection is recorded (:class:`Connection`: when it opened and closed,
on this process's clock, and its first line if a sink).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass
class Connection:
    opened: float
    closed: float | None = None
    #: the first line a client wrote to a sink ('' through a proxy)
    tag: str = ""


class CountingProxy:
    """Start with :meth:`start`; stop with :meth:`stop` or a ``with`` block."""

    def __init__(self, upstream: tuple[str, int] | None = None) -> None:
        self.upstream = upstream
        self._server = socket.create_server((LOOPBACK, 0))
        self.port: int = self._server.getsockname()[1]
        self.connections: list[Connection] = []
        self.current = 0
        self.maximum = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sockets: set[socket.socket] = set()

    def start(self) -> CountingProxy:
        threading.Thread(target=self._accept, name="counting-proxy", daemon=True).start()
        return self

    def reset_maximum(self) -> None:
        """Start counting the maximum afresh (from what is open now)."""
        with self._lock:
            self.maximum = self.current

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        record = Connection(opened=time.time())
        with self._lock:
            self.current += 1
            self.maximum = max(self.maximum, self.current)
            self.connections.append(record)
            self._sockets.add(client)
        try:
            if self.upstream is None:
                self._sink(client, record)
            else:
                self._forward(client)
        finally:
            record.closed = time.time()
            with self._lock:
                self.current -= 1
                self._sockets.discard(client)
            client.close()

    def _sink(self, client: socket.socket, record: Connection) -> None:
        reader = client.makefile("rb")
        try:
            record.tag = reader.readline().decode(errors="replace").strip()
            while reader.read(4096):
                pass
        except OSError:
            pass

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets.add(upstream)
        other = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
        other.start()
        _pipe(client, upstream)
        other.join()
        with self._lock:
            self._sockets.discard(upstream)
        upstream.close()

    def stop(self) -> None:
        self._stopped.set()
        self._server.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    """Copy until ``source`` ends, then end ``target``'s sending side."""
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def hold(port: int, tag: str, seconds: float) -> None:
    """A client of a sink: be counted as ``tag`` for ``seconds``. It leaves as
    an association is released, waiting until the sink has counted it out, so
    whoever it hands a slot to is never counted while it still is."""
    with socket.create_connection((LOOPBACK, port)) as conn:
        conn.sendall(tag.encode() + b"\n")
        time.sleep(seconds)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(4096):
            pass
