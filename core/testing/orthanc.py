"""A private Orthanc for tests and benchmarks, run from the Debian packages.

Each :class:`OrthancServer` is its own ``/usr/sbin/Orthanc`` process with a
generated config, storage and log in a work directory, on free loopback
ports. It never touches the system service (``/etc/orthanc``,
``/var/lib/orthanc``). A plain library (no pytest): the fixtures in
:mod:`dqr.testing.fixtures_orthanc` and the benchmark harness both use it.

Clients use 127.0.0.1 only. The HTTP side refuses other hosts
(``RemoteAccessAllowed: false``); Orthanc 1.10 cannot bind its DICOM port to
loopback, so that one listens on every interface: seed it with synthetic data.

Example::

    with OrthancServer.start(tmp_path) as orthanc:
        orthanc.seed(generate_cohort())
        requests.get(orthanc.dicomweb_url + "/studies")

Install Orthanc with ``apt-get install -y orthanc orthanc-dicomweb``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Where the Debian package puts things.
ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

#: Overrides the binary's location (e.g. an Orthanc built from source).
ORTHANC_ENV = "DQR_ORTHANC"

INSTALL_HINT = (
    "install it with: apt-get install -y orthanc orthanc-dicomweb (or run scripts/test.sh)"
)

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 5
# Orthanc's words when the HTTP or DICOM port was taken between our pick and its bind.
_PORT_IN_USE = "privileged or already in use"


class OrthancError(RuntimeError):
    """Orthanc could not be started or refused a request."""


def find_orthanc() -> Path | None:
    """The Orthanc binary: ``$DQR_ORTHANC``, else ``Orthanc`` on PATH, else the
    Debian location; None if there is none."""
    candidates = [os.environ.get(ORTHANC_ENV), shutil.which("Orthanc"), str(ORTHANC_BINARY)]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return Path(candidate)
    return None


def free_port() -> int:
    """A TCP port free on loopback right now. Another process may take it
    before we use it; :meth:`OrthancServer.start` retries when that happens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, recursing into nested dicts (so
    ``{"DicomWeb": {"StudiesMetadata": "MainDicomTags"}}`` keeps ``Enable``)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _to_part10(item: Dataset | bytes | bytearray | str | os.PathLike) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        return Path(item).read_bytes()
    buffer = BytesIO()
    item.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _expand(items: Iterable[Any]) -> Iterable[Any]:
    """Items as given, except that a folder stands for every file under it."""
    for item in items:
        if isinstance(item, (str, os.PathLike)) and Path(item).is_dir():
            yield from sorted(p for p in Path(item).rglob("*") if p.is_file())
        else:
            yield item


# Servers still running at interpreter exit (a crashed test run, a benchmark
# interrupted by Ctrl-C) are stopped then, not left listening.
_running: set[OrthancServer] = set()


def stop_all(servers: Iterable[OrthancServer], timeout: float = STOP_TIMEOUT) -> None:
    """Stop several servers at once: signal them all, then wait for each, so
    their ~3.5 s shutdowns overlap instead of adding up."""
    servers = list(servers)
    for server in servers:
        server._terminate()
    for server in servers:
        server._reap(timeout)


@atexit.register
def _stop_running() -> None:
    stop_all(_running)


class OrthancServer:
    """One running Orthanc. Start with :meth:`start`; stop with :meth:`stop`
    or by leaving a ``with`` block."""

    http_url: str
    dicomweb_url: str
    dicom_port: int
    http_port: int
    aet: str
    pid: int
    workdir: Path
    config_path: Path
    log_path: Path
    #: The session used for REST calls; reuse it for your own.
    session: requests.Session
    #: What it was seeded with, if its starter says (the ``orthanc`` fixture sets a CohortSpec).
    cohort_spec: Any = None

    def __init__(
        self,
        process: subprocess.Popen,
        *,
        workdir: Path,
        config: dict,
        config_path: Path,
        log_path: Path,
    ) -> None:
        self._process = process
        self.pid = process.pid
        self.workdir = workdir
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        self.aet = config["DicomAet"]
        self.http_port = config["HttpPort"]
        self.dicom_port = config["DicomPort"]
        self.http_url = f"http://{LOOPBACK}:{self.http_port}"
        self.dicomweb_url = self.http_url + "/dicom-web"
        self.session = requests.Session()

    # ------------------------------------------------------------------ start

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        aet: str = "ORTHANC",
        dicomweb: bool = True,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        extra_config: dict | None = None,
        tcp_nodelay: bool = True,
    ) -> OrthancServer:
        """Start Orthanc with its storage, config and log in ``workdir``
        (created; one server per workdir, reusing one keeps its stored data)
        and wait until it answers ``GET /system``.

        :param aet: Orthanc's own AE title.
        :param dicomweb: load the DICOMweb plugin (served at :attr:`dicomweb_url`).
        :param modalities: known DICOM nodes, ``name -> (AET, host, port)``; a
            C-MOVE destination must be one of these.
        :param extra_config: merged over the generated config (nested dicts merged).
        :param tcp_nodelay: set ``TCP_NODELAY=1`` in Orthanc's environment. Debian's
            DCMTK otherwise leaves Nagle on, adding ~40 ms to every DIMSE exchange;
            pass False only to measure that stock behaviour.
        :raises OrthancError: Orthanc is missing, exits, or does not answer in time
            (the message carries the tail of its log).
        """
        binary = find_orthanc()
        if binary is None:
            raise OrthancError(f"Orthanc not found; {INSTALL_HINT}")
        if dicomweb and not DICOMWEB_PLUGIN.is_file():
            raise OrthancError(
                f"Orthanc's DICOMweb plugin not found at {DICOMWEB_PLUGIN}; {INSTALL_HINT}"
            )
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)

        env = dict(os.environ)
        if tcp_nodelay:
            env["TCP_NODELAY"] = "1"
        else:
            env.pop("TCP_NODELAY", None)

        for attempt in range(1, _PORT_ATTEMPTS + 1):
            http_port = free_port()
            dicom_port = free_port()
            while dicom_port == http_port:  # the first socket was closed: it can come back
                dicom_port = free_port()
            config = _config(
                workdir,
                aet=aet,
                http_port=http_port,
                dicom_port=dicom_port,
                dicomweb=dicomweb,
                modalities=modalities or {},
                extra_config=extra_config or {},
            )
            config_path = workdir / "orthanc.json"
            config_path.write_text(json.dumps(config, indent=2))
            log_path = workdir / "orthanc.log"
            with open(log_path, "wb") as log:  # one attempt per log: the port check reads it
                process = subprocess.Popen(
                    [str(binary), str(config_path)],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own process group: a Ctrl-C meant for the test run does not
                    # kill Orthanc under a fixture that still wants to stop it cleanly.
                    start_new_session=True,
                )
            server = cls(
                process, workdir=workdir, config=config, config_path=config_path, log_path=log_path
            )
            _running.add(server)
            try:
                server._wait_until_ready(START_TIMEOUT)
                return server
            except OrthancError:
                server.stop()
                port_race = _PORT_IN_USE in _tail(log_path, 20)
                if not port_race or attempt == _PORT_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with code {self._process.returncode} while starting "
                    f"(config {self.config_path}); end of {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                response = self.session.get(self.http_url + "/system", timeout=1)
                # The name is unique to this start: an answer from another process
                # that grabbed the port first must not pass for ours.
                if response.ok and response.json().get("Name") == self.config["Name"]:
                    return
            except (requests.ConnectionError, requests.Timeout, ValueError):
                pass
            time.sleep(0.05)
        raise OrthancError(
            f"Orthanc did not answer GET /system within {timeout:.0f} s "
            f"(config {self.config_path}); end of {self.log_path}:\n{_tail(self.log_path)}"
        )

    # ------------------------------------------------------------------- data

    def upload(self, part10: bytes) -> None:
        """Store one Part-10 file (``POST /instances``)."""
        response = self.session.post(
            self.http_url + "/instances",
            data=part10,
            headers={"Content-Type": "application/dicom"},
            timeout=60,
        )
        if not response.ok:
            raise OrthancError(
                f"POST /instances: HTTP {response.status_code}: {response.text[:500]}"
            )

    def seed(self, items: Iterable[Dataset | bytes | str | os.PathLike]) -> int:
        """Store many instances: pydicom datasets (with file meta), Part-10
        bytes, or paths of files or folders (every file under them). Returns
        how many were uploaded."""
        count = 0
        for item in _expand(items):
            self.upload(_to_part10(item))
            count += 1
        return count

    def add_modality(self, name: str, aet: str, host: str, port: int, **settings: Any) -> None:
        """Declare a DICOM node (e.g. a C-MOVE destination) at run time
        (``PUT /modalities/<name>``); ``settings``: more of Orthanc's
        modality keys (``UseDicomTls=True``)."""
        response = self.session.put(
            f"{self.http_url}/modalities/{name}",
            json={"AET": aet, "Host": host, "Port": port, **settings},
            timeout=10,
        )
        if not response.ok:
            raise OrthancError(
                f"PUT /modalities/{name}: HTTP {response.status_code}: {response.text[:500]}"
            )

    # ------------------------------------------------------------------- stop

    @property
    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop this Orthanc by PID: SIGTERM, wait up to ``timeout`` seconds
        (a clean shutdown takes Orthanc ~3.5 s), then SIGKILL. Idempotent."""
        self._terminate()
        self._reap(timeout)

    def _terminate(self) -> None:
        _running.discard(self)
        self.session.close()
        # poll() first: once the process is reaped its PID may be someone else's.
        if self._process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def _reap(self, timeout: float) -> None:
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self._process.wait()

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<OrthancServer {self.aet} pid={self.pid} {self.http_url} dicom={self.dicom_port} {state}>"


def _config(
    workdir: Path,
    *,
    aet: str,
    http_port: int,
    dicom_port: int,
    dicomweb: bool,
    modalities: dict[str, tuple[str, str, int]],
    extra_config: dict,
) -> dict:
    storage = str(workdir / "storage")
    config: dict[str, Any] = {
        # Unique per start: lets the readiness check tell our process from another.
        "Name": f"dqr-test-{uuid.uuid4().hex[:12]}",
        "StorageDirectory": storage,
        "IndexDirectory": storage,
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        # Loopback only, no users: a test server, never a real one.
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        # Stock Orthanc accepts an unknown caller's association, then aborts its
        # C-FIND/C-GET/C-MOVE: let any calling AE query and retrieve.
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {
            name: {"AET": node_aet, "Host": host, "Port": port}
            for name, (node_aet, host, port) in modalities.items()
        },
        "SynchronousCMove": True,
        "ConcurrentJobs": 2,
        # Throw-away storage: no fsync per instance, no jobs kept across restarts.
        "SyncStorageArea": False,
        "SaveJobs": False,
        "WebDavEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
    }
    if dicomweb:
        config["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            # Host (with port) that WADO-RS URLs in QIDO answers point to.
            "Host": f"{LOOPBACK}:{http_port}",
            "Ssl": False,
        }
    return _merge(config, extra_config)
