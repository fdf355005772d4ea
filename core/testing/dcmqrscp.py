"""dcmtk's ``dcmqrscp``: a second real Query/Retrieve SCP that nobody on this
team wrote (issue 13), beside Orthanc.

``DcmQrScp.start(root, datasets, move_destinations)`` writes its config in
``root``, starts it on a free 127.0.0.1 port in its own process group (it forks
one child per association; stopping signals that group, by the PID we
started), and seeds it with dcmtk's ``storescu``.
Its AE title is ``DCMQRSCP``; C-MOVE destinations are fixed at start (dcmqrscp
reads its HostTable once), so a test that moves starts its own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = ["DcmQrScp", "dcmqrscp_factory"]

AET = "DCMQRSCP"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DcmQrScp:
    def __init__(self, process: subprocess.Popen, port: int, root: Path) -> None:
        self.process = process
        self.pid = process.pid
        self.port = port
        self.root = root
        self.aet = AET

    @classmethod
    def start(
        cls, root: Path, datasets: Iterable[Any], move_destinations: dict[str, int] | None = None
    ) -> DcmQrScp:
        binary = shutil.which("dcmqrscp")
        if binary is None:
            raise RuntimeError("dcmtk's dcmqrscp is not installed (apt-get install dcmtk)")
        storage = root / "db"
        storage.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        hosts = "\n".join(
            f"{aet.lower()} = ({aet}, 127.0.0.1, {dest_port})"
            for aet, dest_port in (move_destinations or {}).items()
        )
        (root / "dcmqrscp.cfg").write_text(
            f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n\n"
            f"HostTable BEGIN\n{hosts}\nHostTable END\n\n"
            "VendorTable BEGIN\nVendorTable END\n\n"
            f"AETable BEGIN\n{AET} {storage} RW (500, 1024mb) ANY\nAETable END\n"
        )
        log = open(root / "dcmqrscp.log", "wb")  # noqa: SIM115 - kept open for the child
        process = subprocess.Popen(
            # forking mode: dcmtk 3.6.7's --single-process crashes after its first association
            [binary, "-c", str(root / "dcmqrscp.cfg"), str(port)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        server = cls(process, port, root)
        try:
            server._wait_listening()
            server._seed(datasets)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dcmqrscp exited: {(self.root / 'dcmqrscp.log').read_text()}")
            # a real C-ECHO: a bare TCP probe makes dcmqrscp's state machine crash
            echo = subprocess.run(
                ["echoscu", "-aec", AET, "-to", "1", "127.0.0.1", str(self.port)], capture_output=True
            )
            if echo.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("dcmqrscp did not listen within 10 s")

    def _seed(self, datasets: Iterable[Any]) -> None:
        files = self.root / "seed"
        files.mkdir(exist_ok=True)
        paths = []
        for number, dataset in enumerate(datasets):
            path = files / f"{number:06d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(str(path))
        if paths:
            seeded = subprocess.run(
                ["storescu", "-aet", "SEED", "-aec", AET, "127.0.0.1", str(self.port), *paths],
                capture_output=True, text=True, timeout=120,
            )
            if seeded.returncode != 0:
                raise RuntimeError(f"storescu into dcmqrscp failed: {seeded.stdout}{seeded.stderr}")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)  # its group: the association children too
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass


@pytest.fixture
def dcmqrscp_factory(tmp_path: Path) -> Iterator[Callable[..., DcmQrScp]]:
    """``dcmqrscp_factory(datasets, move_destinations={"DQR": port})``: a
    seeded dcmqrscp (stopped after the test)."""
    started: list[DcmQrScp] = []

    def start(datasets: Iterable[Any], move_destinations: dict[str, int] | None = None) -> DcmQrScp:
        server = DcmQrScp.start(tmp_path / f"dcmqrscp-{len(started)}", datasets, move_destinations)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
