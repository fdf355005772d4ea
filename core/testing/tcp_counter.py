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

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"


@dataclass
class Connection:
    opened: float
    closed: float | None = None
    #: the first line a client wrote to a sink; through a proxy, what
    #: ``classify`` said of the client's first bytes
    tag: str = ""
    #: the client process, when the proxy was asked to identify clients
    pid: int | None = None


#: DIMSE: an A-ASSOCIATE-RQ proposing a C-GET model (study or patient root).
C_GET_MODELS = (b"1.2.840.10008.5.1.4.1.2.2.3", b"1.2.840.10008.5.1.4.1.2.1.3")


def dimse_kind(first_bytes: bytes) -> str:
    """``"get"`` for an association proposing C-GET, else ``"other"``."""
    return "get" if any(model in first_bytes for model in C_GET_MODELS) else "other"


def pid_of_client(local_port: int) -> int | None:
    """The process owning the loopback TCP socket bound to ``local_port`` (Linux /proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == local_port and fields[3] == "01":
                inode = fields[9]
                break
        if inode:
            break
    if not inode:
        return None
    target = f"socket:[{inode}]"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    return int(entry)
        except OSError:
            continue
    return None


class CountingProxy:
    """Start with :meth:`start`; stop with :meth:`stop` or a ``with`` block."""

    def __init__(
        self,
        upstream: tuple[str, int] | None = None,
        *,
        classify: Callable[[bytes], str] | None = None,
        identify: bool = False,
        delay: float = 0.0,
    ) -> None:
        """:param classify: tags each proxied connection from the client's first
            bytes (e.g. :func:`dimse_kind`); :attr:`maximum_by_tag` counts per tag.
        :param identify: record each client's PID (:func:`pid_of_client`).
        :param delay: seconds to wait before forwarding each chunk from upstream
            (a slow PACS, to catch work in the middle)."""
        self.upstream = upstream
        self.classify = classify
        self.identify = identify
        self.delay = delay
        self.maximum_by_tag: dict[str, int] = {}
        self._current_by_tag: dict[str, int] = {}
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
        if self.identify:
            record.pid = pid_of_client(client.getpeername()[1])
        with self._lock:
            self.current += 1
            self.maximum = max(self.maximum, self.current)
            self.connections.append(record)
            self._sockets.add(client)
        try:
            if self.upstream is None:
                self._sink(client, record)
            else:
                self._forward(client, record)
        finally:
            record.closed = time.time()
            with self._lock:
                self.current -= 1
                if record.tag and self.upstream is not None:
                    self._current_by_tag[record.tag] -= 1
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

    def _forward(self, client: socket.socket, record: Connection) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets.add(upstream)
        first = b""
        if self.classify is not None:
            try:
                first = client.recv(65536)
            except OSError:
                first = b""
            record.tag = self.classify(first)
            with self._lock:
                now = self._current_by_tag.get(record.tag, 0) + 1
                self._current_by_tag[record.tag] = now
                self.maximum_by_tag[record.tag] = max(self.maximum_by_tag.get(record.tag, 0), now)
            if first:
                upstream.sendall(first)
        other = threading.Thread(target=_pipe, args=(upstream, client, self.delay), daemon=True)
        other.start()
        if self.classify is None or first:
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


def _pipe(source: socket.socket, target: socket.socket, delay: float = 0.0) -> None:
    """Copy until ``source`` ends, then end ``target``'s sending side."""
    try:
        while data := source.recv(65536):
            if delay:
                time.sleep(delay)
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
