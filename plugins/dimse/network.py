"""Sockets and associations: TCP_NODELAY everywhere, connect errors that are
not lost, TLS, and association opening with every failure classified.

pynetdicom neither sets TCP_NODELAY (each DIMSE exchange spanning two writes
then stalls ~40 ms on delayed ACKs) nor keeps the OSError of a failed
connect (it only logs it), so dqr's application entity creates its own
sockets.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import T_CONNECT, AddressInformation, AssociationSocket

from dqr.errors import ConfigError, Problem, RemoteError
from dqr.plugins.dimse.status import NoAcceptedContexts, connect_error, reject_error


def set_nodelay(sock: socket.socket) -> None:
    """Turn Nagle's algorithm off on a TCP socket (TLS sockets too)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def has_nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class _RecordingConnect:
    """Remembers why ``connect`` failed and sets TCP_NODELAY once connected."""

    connect_error: OSError | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)  # type: ignore[misc]
        except OSError as exc:
            self.connect_error = exc
            raise
        set_nodelay(self)  # type: ignore[arg-type]


class TcpSocket(_RecordingConnect, socket.socket):
    pass


class TlsSocket(_RecordingConnect, ssl.SSLSocket):
    pass


class DqrAssociationSocket(AssociationSocket):
    """A requestor's socket: a :class:`TcpSocket` (or :class:`TlsSocket`)."""

    attempted: socket.socket | None = None

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        sock = TcpSocket(address.address_family, socket.SOCK_STREAM)
        if self.assoc.network_timeout is not None:
            sock.settimeout(self.assoc.network_timeout)
        sock.bind(address.as_tuple)
        return sock

    def connect(self, primitive: T_CONNECT) -> None:
        if self.tls_args and self.socket is not None:
            # Wrapped here rather than by pynetdicom so that the TLS socket
            # (the context's sslsocket_class) is one we can ask afterwards.
            context, hostname = self.tls_args
            self.socket = context.wrap_socket(
                self.socket, server_side=False, server_hostname=hostname
            )
            self.tls_args = None
        self.attempted = self.socket
        super().connect(primitive)

    @property
    def connect_error(self) -> OSError | None:
        return getattr(self.attempted, "connect_error", None)


class DqrApplicationEntity(AE):
    """An AE whose outgoing associations use :class:`DqrAssociationSocket`."""

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: Any
    ) -> AssociationSocket:
        sock = DqrAssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


def _nodelay_on_accept(event: evt.Event) -> None:
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        set_nodelay(sock.socket)


#: Bind these on a server (``ae.start_server(evt_handlers=...)``) so that every
#: accepted socket gets TCP_NODELAY before the A-ASSOCIATE-RQ is read.
NODELAY_SERVER_HANDLERS = [(evt.EVT_CONN_OPEN, _nodelay_on_accept)]


def accepted_transfer_syntaxes() -> list[str]:
    """What a storage SCP accepts, best first. pynetdicom's acceptor picks
    by *its* order: Explicit VR Little Endian first (what PACSes store most),
    compressed syntaxes next (kept as sent, never decompressed by the
    sender for us), Implicit VR last (it drops the VRs)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    others = [
        uid
        for uid in ALL_TRANSFER_SYNTAXES
        if uid not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    ]
    return [ExplicitVRLittleEndian, *others, ImplicitVRLittleEndian]


def tls_client_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """For every association dqr requests, on both transports: the PACS's
    certificate is verified against ``ca_file`` (else the system's CAs) and
    ``host``; ``cert_file`` is dqr's client certificate."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None
    )
    if cert_file and key_file:
        context.load_cert_chain(str(cert_file), str(key_file))
    context.sslsocket_class = TlsSocket
    return context


def tls_server_context(ca_file: Path | None, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """For dqr's C-MOVE storage SCP (``tls.storage_scp``): it presents
    ``cert_file``; with ``ca_file`` the PACS must present a certificate
    signed by it (DICOM TLS authenticates both nodes)."""
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(ca_file) if ca_file else None
    )
    context.load_cert_chain(str(cert_file), str(key_file))
    context.verify_mode = ssl.CERT_REQUIRED if ca_file else ssl.CERT_NONE
    return context


class Peer:
    """Where and how to associate with one PACS."""

    def __init__(
        self,
        host: str,
        port: int,
        called_aet: str,
        calling_aet: str,
        timeouts: dict[str, float],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.called_aet = called_aet
        self.calling_aet = calling_aet
        self.timeouts = timeouts
        self.tls = tls

    @property
    def where(self) -> str:
        return f"PACS {self.called_aet} at {self.host}:{self.port}"

    def new_ae(self) -> DqrApplicationEntity:
        ae = DqrApplicationEntity(ae_title=self.calling_aet)
        ae.connection_timeout = self.timeouts["connect"]
        ae.acse_timeout = self.timeouts["acse"]
        ae.dimse_timeout = self.timeouts["dimse"]
        ae.network_timeout = self.timeouts["network"]
        return ae

    def associate(
        self,
        ae: AE,
        contexts: list[Any],
        ext_neg: Iterable[Any] = (),
        evt_handlers: Iterable[Any] = (),
    ) -> Association:
        """Open an association or raise a classified :class:`RemoteError`."""
        assoc = ae.associate(
            self.host,
            self.port,
            contexts=contexts,
            ae_title=self.called_aet,
            ext_neg=list(ext_neg) or None,
            evt_handlers=list(evt_handlers),
            tls_args=(self.tls, self.host) if self.tls else None,
        )
        if assoc.is_established:
            return assoc
        raise self.association_failure(assoc)

    def association_failure(self, assoc: Association) -> RemoteError:
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            return reject_error(
                int(rj.result),
                int(rj.result_source),
                int(rj.diagnostic),
                self.where,
                self.calling_aet,
                self.called_aet,
            )
        sock = assoc.dul.socket
        failure = sock.connect_error if isinstance(sock, DqrAssociationSocket) else None
        if failure is not None or (
            isinstance(sock, DqrAssociationSocket) and sock.attempted is None
        ):
            return connect_error(failure, self.where, self.timeouts["connect"])
        answer = assoc.acceptor.primitive
        if (
            answer is not None
            and getattr(answer, "result", None) == 0
            and not assoc.accepted_contexts
        ):
            return NoAcceptedContexts(
                f"{self.where} accepted the association but none of the proposed presentation "
                "contexts (it does not support this query/retrieve model or these SOP classes)"
            )
        if assoc.is_aborted:
            hint = (
                " (over TLS the PACS may have refused dqr's client certificate; check `tls.cert_file` / "
                "`tls.key_file` and that the PACS trusts their CA)"
                if self.tls is not None
                else ""
            )
            return RemoteError(
                f"{self.where} aborted the association while negotiating{hint}", retriable=True
            )
        return RemoteError(
            f"{self.where} did not answer the association request within {self.timeouts['acse']:g} s (acse_timeout)",
            retriable=True,
        )


def tls_files(tls: Any, resolve: Any, section: str) -> tuple[Path | None, Path | None, Path | None]:
    """A ``tls:`` section's ``(ca_file, cert_file, key_file)`` resolved by
    ``resolve``; every one that is missing or unreadable is a
    :class:`ConfigError` naming ``<section>.<key>`` (all listed at once)."""
    problems: list[Problem] = []

    def path(key: str, value: str | None) -> Path | None:
        if value is None:
            return None
        resolved = resolve(value)
        try:
            with open(resolved, "rb"):
                pass
        except OSError as exc:
            problems.append(Problem(f"{section}.{key}", f"{resolved}: {exc.strerror or exc}"))
        return resolved

    files = (path("ca_file", tls.ca_file), path("cert_file", tls.cert_file), path("key_file", tls.key_file))
    if problems:
        raise ConfigError(problems)
    return files


def loaded_tls(build: Any, section: str) -> ssl.SSLContext:
    """``build()``'s SSL context; files that are not PEM, or a key that does
    not match its certificate, are a :class:`ConfigError` naming ``section``."""
    try:
        return build()
    except ssl.SSLError as exc:
        raise ConfigError(f"the certificate files could not be loaded: {exc.reason or exc}", file=section) from None
