"""The native transport's C-STORE requestor: an association on a blocking
socket, driven by the one thread that uses it (the destination's sender).

A requestor that only sends C-STOREs (and the C-ECHO, C-FIND and N-ACTION
of a destination's checks) never receives anything it did not ask for, so
it needs no reader: the thread that sends a request reads its response from
the same socket. That is what dcmtk's storescu does, and it is what makes
one C-STORE cost one write and one read -- no polling thread (pynetdicom's
two per association), and no hand-off to an event loop and back (the loop
in :mod:`dqr.plugins.dimse.native`, which costs two thread wake-ups per
exchange: milliseconds each on a loaded machine, more than a Storage SCP
needs to store a small instance).

The C-STORE request's command set is encoded, and its response decoded,
here (a fixed handful of implicit-VR elements); the dataset goes out as
the bytes received, never decoded. Everything else (association PDUs,
C-ECHO, C-FIND, N-ACTION) uses pynetdicom's codecs. Every wait is bounded by
one of the destination's timeouts, and the error names it.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import sys
import time
from collections.abc import Iterator
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dimse_messages import N_ACTION_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.dsutils import decode
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor

from dqr.errors import RemoteError
from dqr.plugins.dimse.native import (
    ABORT,
    ABORT_SOURCES,
    AFFECTED_SOP_CLASS,
    AFFECTED_SOP_INSTANCE,
    APPLICATION_CONTEXT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    C_STORE_RQ_FIELD,
    C_STORE_RSP_FIELD,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    ERROR_COMMENT,
    MESSAGE_ID,
    NO_DATA_SET,
    P_DATA,
    PRIORITY,
    RELEASE_RP,
    RELEASE_RQ,
    RESPONDED_TO,
    STATUS,
    Timeouts,
    _command_element,
    _uid_bytes,
    _user_information,
    encode_dataset,
    parse_command,
    request_message,
)
from dqr.plugins.dimse.status import PENDING, NoAcceptedContexts, connect_error, reject_error

#: P-DATA message control header bits (PS3.8 E.2).
_COMMAND, _LAST = 0x01, 0x02


def store_command(message_id: int, sop_class: str, sop_instance: str, priority: int = 2) -> bytes:
    """The C-STORE-RQ command set (implicit VR little endian, PS3.7 9.3.1.1)."""
    body = b"".join(
        (
            _command_element(AFFECTED_SOP_CLASS, _uid_bytes(sop_class)),
            _command_element(COMMAND_FIELD, struct.pack("<H", C_STORE_RQ_FIELD)),
            _command_element(MESSAGE_ID, struct.pack("<H", message_id)),
            _command_element(PRIORITY, struct.pack("<H", priority)),
            _command_element(DATA_SET_TYPE, struct.pack("<H", 0x0000)),  # a data set follows
            _command_element(AFFECTED_SOP_INSTANCE, _uid_bytes(sop_instance)),
        )
    )
    return _command_element(_GROUP_LENGTH, struct.pack("<I", len(body))) + body


#: Command Group Length (0000,0000), which only a sent command set carries here.
_GROUP_LENGTH = 0x0000


def _us(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    return struct.unpack("<H", value[:2])[0] if value is not None and len(value) >= 2 else None


def pdata_pdus(context_id: int, control: int, data: bytes | memoryview, max_pdu: int) -> list[bytes | memoryview]:
    """``data`` as P-DATA-TF PDUs of one PDV each, within the peer's maximum
    PDU length (0: none), the last fragment flagged (PS3.8 9.3.5, E.2)."""
    step = len(data) if max_pdu == 0 else max(1, max_pdu - 6)
    pieces: list[bytes | memoryview] = []
    offset = 0
    while True:
        fragment = data[offset : offset + step]
        offset += len(fragment)
        last = offset >= len(data)
        pieces.append(
            struct.pack(">BBIIBB", P_DATA, 0, len(fragment) + 6, len(fragment) + 2, context_id,
                        control | (_LAST if last else 0))
        )
        pieces.append(fragment)
        if last:
            return pieces


#: How much later than its deadline a read may time out, rather than set the socket's timeout again.
_TIMEOUT_SLACK = 0.1
#: The least a read asks the socket for.
_READ_AHEAD = 4096


class StoreAssociation:
    """An association on a blocking socket, used by one thread at a time.

    The part of pynetdicom's ``Association`` a destination uses
    (``accepted_contexts``, ``is_established``, ``send_c_echo``,
    ``send_c_find``, ``send_n_action``, ``release``, ``abort``), plus
    :meth:`send_c_store` for an instance's encoded bytes.
    """

    def __init__(self, sock: socket.socket, where: str, timeouts: Timeouts) -> None:
        self.sock = sock
        self.where = where
        self.timeouts = timeouts
        self.accepted_contexts: list[PresentationContext] = []
        self.contexts: dict[int, tuple[str, str]] = {}
        self.peer_max_pdu = 16382
        self.state = "established"  # released | aborted (by the peer) | killed (by dqr) | lost
        self.why = ""
        self.last_used = time.monotonic()
        self._request_context = 0
        #: Bytes read past the last PDU taken (a read asks for more than the PDU's header).
        self._received = b""
        # A plain TCP socket is used blocking, its timeouts kept by the kernel
        # (SO_RCVTIMEO, SO_SNDTIMEO): with a Python-level timeout every send
        # and recv is preceded by a poll(2), two more GIL hand-overs an
        # instance for the threads storing. A TLS socket keeps Python's, and
        # so does a platform whose SO_RCVTIMEO is not a struct timeval.
        self._kernel_timeouts = sys.platform.startswith("linux") and not isinstance(sock, ssl.SSLSocket)
        self._timeout = sock.gettimeout()
        if self._kernel_timeouts:
            sock.settimeout(None)
            self._timeout = None

    # -- state ---------------------------------------------------------------------
    @property
    def is_established(self) -> bool:
        """Open and usable: not idle past network_timeout (then aborted, as
        pynetdicom does), and the peer has not ended it meanwhile (anything
        readable on an idle requestor's socket is an A-RELEASE-RQ, an
        A-ABORT or the end of the connection)."""
        if self.state != "established":
            return False
        if time.monotonic() - self.last_used > self.timeouts.network:
            self.abort()
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            self.state = "lost"
            return False
        if readable or self._received:
            try:
                self._read_pdu(self.timeouts.acse)
            except RemoteError:
                pass
            if self.state == "established":  # something else arrived unasked: a protocol error
                self.abort()
            return False
        return True

    @property
    def is_aborted(self) -> bool:
        return self.state in ("aborted", "killed", "lost")

    # -- sending -------------------------------------------------------------------
    def send_c_store(
        self, context_id: int, sop_class: str, sop_instance: str, data: bytes | memoryview, message_id: int
    ) -> tuple[int, str]:
        """One C-STORE of a dataset's encoded bytes; (status, error comment)."""
        pieces = pdata_pdus(context_id, _COMMAND, store_command(message_id, sop_class, sop_instance), self.peer_max_pdu)
        pieces += pdata_pdus(context_id, 0, data, self.peer_max_pdu)
        self._write(b"".join(pieces), "C-STORE")
        while True:
            command, _ = self._read_message("C-STORE")
            if _us(command, COMMAND_FIELD) != C_STORE_RSP_FIELD or _us(command, RESPONDED_TO) != message_id:
                self.abort()
                raise RemoteError(
                    f"C-STORE to {self.where}: the answer was not the response to the request sent; "
                    "dqr aborted the association",
                    retriable=True,
                )
            status = _us(command, STATUS)
            if status is None:
                self.abort()
                raise RemoteError(f"C-STORE to {self.where}: a response without a status", retriable=True)
            comment = command.get(ERROR_COMMENT, b"").decode("ascii", "replace").rstrip("\0 ")
            return status, comment

    def send_c_echo(self, msg_id: int = 1) -> Dataset:
        from pynetdicom.sop_class import Verification

        self._send_message(request_message("C-ECHO", Verification, msg_id), Verification, "C-ECHO")
        status, _ = next(self._responses("C-ECHO"))
        return status

    def send_c_find(self, identifier: Dataset, model: str, msg_id: int = 1) -> Iterator[tuple[Dataset, Any]]:
        message = request_message("C-FIND", model, msg_id, self._encode(identifier, model))
        self._send_message(message, model, "C-FIND")
        return self._responses("C-FIND")

    def send_n_action(
        self, dataset: Dataset, action_type: int, class_uid: str, instance_uid: str, msg_id: int = 1
    ) -> tuple[Dataset, Any]:
        primitive = N_ACTION()
        primitive.MessageID = msg_id
        primitive.RequestedSOPClassUID = class_uid
        primitive.RequestedSOPInstanceUID = instance_uid
        primitive.ActionTypeID = action_type
        primitive.ActionInformation = BytesIO(self._encode(dataset, class_uid))
        message = N_ACTION_RQ()
        message.primitive_to_message(primitive)
        self._send_message(message, class_uid, "N-ACTION")
        status, reply = next(self._responses("N-ACTION"))
        return status, reply

    def release(self) -> None:
        """A-RELEASE, waiting at most acse_timeout for the answer."""
        if self.state != "established":
            return
        try:
            self._write(A_RELEASE_RQ().encode(), "A-RELEASE")
            deadline = time.monotonic() + self.timeouts.acse
            while self.state == "established":
                self._read_pdu(max(0.001, deadline - time.monotonic()))
        except RemoteError:
            pass
        finally:
            self._close()

    def abort(self) -> None:
        if self.state == "established":
            self.state = "killed"
            pdu = A_ABORT_RQ()
            pdu.source = 0
            pdu.reason_diagnostic = 0
            try:
                self._set_timeout(1.0)
                self.sock.sendall(pdu.encode())
            except OSError:
                pass
        self._close()

    # -- internals -----------------------------------------------------------------
    def _close(self) -> None:
        if self.state == "established":
            self.state = "released"
        try:
            self.sock.close()
        except OSError:
            pass

    def _context_id(self, abstract_syntax: str) -> int:
        for context in self.accepted_contexts:
            if str(context.abstract_syntax) == abstract_syntax:
                return int(context.context_id)
        raise RemoteError(f"{self.where} did not accept the presentation context for {UID(abstract_syntax).name}")

    def _encode(self, dataset: Dataset, abstract_syntax: str) -> bytes:
        _, syntax = self.contexts[self._context_id(abstract_syntax)]
        return encode_dataset(dataset, syntax, "data set")

    def _send_message(self, message: DIMSEMessage, abstract_syntax: str, operation: str) -> None:
        if self.state != "established":
            raise RemoteError(f"the association with {self.where} is no longer open ({self.why or self.state})",
                              retriable=True)
        context_id = self._request_context = self._context_id(abstract_syntax)
        data = b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, self.peer_max_pdu))
        self._write(data, operation)

    def _write(self, data: bytes, operation: str) -> None:
        if self.state != "established":
            raise RemoteError(f"the association with {self.where} is no longer open ({self.why or self.state})",
                              retriable=True)
        try:
            self._set_timeout(self.timeouts.dimse)
            self.sock.sendall(data)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO expired
            self.abort()
            raise RemoteError(
                f"{operation} to {self.where}: could not send within {self.timeouts.dimse:g} s "
                "(dqr's dimse_timeout fired; dqr aborted the association)",
                retriable=True,
            ) from None
        except OSError as exc:
            raise self._lost(operation, f"the connection failed ({exc})") from None
        self.last_used = time.monotonic()

    def _lost(self, operation: str, why: str) -> RemoteError:
        """The connection is gone: closed, and the (retriable) error naming why."""
        self.state, self.why = "lost", why
        self._close()
        return RemoteError(f"{operation} to {self.where} got no answer: {why}", retriable=True)

    def _set_timeout(self, seconds: float) -> None:
        """The socket's timeout, for the time left before a deadline. Each
        ``settimeout`` is an ioctl(2): it is only set again when the time left
        is longer than the timeout set (it would fire early) or more than
        :data:`_TIMEOUT_SLACK` shorter (it would fire that much late)."""
        if self._timeout is None or seconds > self._timeout or seconds < self._timeout - _TIMEOUT_SLACK:
            if self._kernel_timeouts:
                # at least a microsecond: a zero timeval means no timeout at all
                timeval = struct.pack("ll", *divmod(max(1, round(seconds * 1e6)), 1_000_000))
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            else:
                self.sock.settimeout(seconds)
            self._timeout = seconds

    def _recv_exactly(self, n: int, deadline: float, operation: str) -> bytes:
        """The next ``n`` bytes. A read asks for at least :data:`_READ_AHEAD`
        bytes, so that a response's header and body come in one recv(2); what
        comes past the ``n`` is kept for the next call."""
        received = self._received
        if len(received) >= n:
            self._received = received[n:]
            return received[:n]
        chunks = [received] if received else []
        have = len(received)
        while have < n:
            left = deadline - time.monotonic()
            if left <= 0:
                self._received = b"".join(chunks)
                raise TimeoutError
            self._set_timeout(left)
            try:
                chunk = self.sock.recv(min(max(n - have, _READ_AHEAD), 1 << 20))
            except BlockingIOError:  # SO_RCVTIMEO expired
                self._received = b"".join(chunks)
                raise TimeoutError from None
            if not chunk:
                raise self._lost(operation, "the destination closed the connection without releasing the association")
            chunks.append(chunk)
            have += len(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(data) == n:
            self._received = b""
            return data
        self._received = data[n:]
        return data[:n]

    def _read_pdu(self, timeout: float, operation: str = "A-RELEASE") -> tuple[int, bytes]:
        """The next PDU (type, whole PDU); association PDUs are handled here
        (and raise when they end the association)."""
        deadline = time.monotonic() + timeout
        try:
            header = self._recv_exactly(6, deadline, operation)
            body = self._recv_exactly(int.from_bytes(header[2:6], "big"), deadline, operation)
        except TimeoutError:
            self.abort()
            raise RemoteError(
                f"{operation} to {self.where} got no answer: no response within {timeout:g} s "
                f"(dqr's {'acse' if operation == 'A-RELEASE' else 'dimse'}_timeout fired; dqr aborted the association)",
                retriable=True,
            ) from None
        except OSError as exc:
            raise self._lost(operation, f"the connection failed ({exc})") from None
        self.last_used = time.monotonic()
        pdu_type = header[0]
        if pdu_type == P_DATA:
            return pdu_type, header + body
        if pdu_type == RELEASE_RP:
            self._close()
            raise RemoteError(f"{operation} to {self.where}: the association was released", retriable=True)
        if pdu_type == RELEASE_RQ:
            try:
                self.sock.sendall(A_RELEASE_RP().encode())
            except OSError:
                pass
            self.why = "the destination released the association"
            self._close()
            raise RemoteError(f"{operation} to {self.where} got no answer: {self.why}", retriable=True)
        if pdu_type == ABORT:
            self.state = "aborted"
            source = body[2] if len(body) >= 4 else 0
            reason = body[3] if len(body) >= 4 else 0
            self.why = (
                f"the association was aborted by {ABORT_SOURCES.get(source, f'source {source}')} "
                f"(A-ABORT, reason {reason})"
            ).replace("the PACS", "the destination")
            self._close()
            raise RemoteError(f"{operation} to {self.where} got no answer: {self.why}", retriable=True)
        self.abort()
        raise RemoteError(f"{operation} to {self.where}: unexpected PDU type 0x{pdu_type:02X}; dqr aborted the "
                          "association", retriable=True)

    def _read_message(self, operation: str) -> tuple[dict[int, bytes], bytes]:
        """The next DIMSE message: (command elements, data set bytes). A data
        set announced by the command set is read too, so the stream stays in step."""
        command: list[bytes] = []
        data: list[bytes] = []
        elements: dict[int, bytes] | None = None
        while True:
            _, pdu = self._read_pdu(self.timeouts.dimse, operation)
            offset = 6
            while offset + 6 <= len(pdu):
                (length,) = struct.unpack_from(">I", pdu, offset)
                control = pdu[offset + 5]
                fragment = pdu[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & _COMMAND:
                    command.append(fragment)
                    if control & _LAST:
                        elements = self._parsed(command, operation)
                        if _us(elements, DATA_SET_TYPE) == NO_DATA_SET:
                            return elements, b""
                else:
                    data.append(fragment)
                    if control & _LAST and elements is not None:
                        return elements, b"".join(data)

    def _parsed(self, command: list[bytes], operation: str) -> dict[int, bytes]:
        try:
            return parse_command(b"".join(command))
        except ValueError as exc:
            self.abort()
            raise RemoteError(f"{operation} to {self.where}: {exc}; dqr aborted the association", retriable=True) from None

    def _responses(self, operation: str) -> Iterator[tuple[Dataset, Any]]:
        """Responses to the request just sent, until the final one."""
        while True:
            command, data = self._read_message(operation)
            code = _us(command, STATUS)
            if code is None:
                continue  # not a response (a peer's stray request): ignore
            status = Dataset()
            status.Status = code
            comment = command.get(ERROR_COMMENT, b"").decode("ascii", "replace").rstrip("\0 ")
            if comment:
                status.ErrorComment = comment
            reply = None
            if data:
                _, syntax = self.contexts.get(self._request_context, ("", "1.2.840.10008.1.2"))
                uid = UID(syntax)
                reply = decode(BytesIO(data), uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
            yield status, reply
            if code not in PENDING:
                return


def associate(
    host: str,
    port: int,
    calling_aet: str,
    called_aet: str,
    where: str,
    contexts: list[PresentationContext],
    timeouts: Timeouts,
    tls: ssl.SSLContext | None = None,
) -> StoreAssociation:
    """Connect and negotiate; raise a classified :class:`RemoteError`."""
    try:
        sock = socket.create_connection((host, port), timeout=timeouts.connect)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=host)
    except OSError as exc:  # TimeoutError and ssl.SSLError included
        raise connect_error(exc, where, timeouts.connect) from None
    assoc = StoreAssociation(sock, where, timeouts)
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
    request = A_ASSOCIATE()
    request.application_context_name = APPLICATION_CONTEXT
    request.calling_ae_title = calling_aet
    request.called_ae_title = called_aet
    request.presentation_context_definition_list = contexts
    request.user_information = _user_information()
    try:
        assoc._set_timeout(timeouts.acse)
        sock.sendall(A_ASSOCIATE_RQ(request).encode())
        deadline = time.monotonic() + timeouts.acse
        header = assoc._recv_exactly(6, deadline, "A-ASSOCIATE")
        body = assoc._recv_exactly(int.from_bytes(header[2:6], "big"), deadline, "A-ASSOCIATE")
    except TimeoutError:
        assoc.abort()
        raise RemoteError(
            f"{where} did not answer the association request within {timeouts.acse:g} s (dqr's acse_timeout fired)",
            retriable=True,
        ) from None
    except OSError as exc:
        assoc._close()
        raise RemoteError(f"{where} closed the connection while negotiating the association ({exc})",
                          retriable=True) from None
    except RemoteError:
        raise RemoteError(f"{where} closed the connection while negotiating the association", retriable=True) from None
    pdu_type = header[0]
    if pdu_type != ASSOCIATE_AC:
        assoc._close()
        if pdu_type == ASSOCIATE_RJ:
            rj = A_ASSOCIATE_RJ()
            rj.decode(header + body)
            raise reject_error(int(rj.result), int(rj.source), int(rj.reason_diagnostic), where, calling_aet, called_aet)
        if pdu_type == ABORT:
            raise RemoteError(f"{where} aborted the association while negotiating", retriable=True)
        raise RemoteError(f"{where} answered the association request with PDU type 0x{pdu_type:02X}", retriable=True)
    ac = A_ASSOCIATE_AC()
    ac.decode(header + body)
    answer = ac.to_primitive()
    for item in answer.user_information:
        if isinstance(item, MaximumLengthNotification):
            assoc.peer_max_pdu = int(item.maximum_length_received or 0)
    results = negotiate_as_requestor(contexts, answer.presentation_context_definition_results_list, None)
    assoc.accepted_contexts = [cx for cx in results if cx.result == 0x00]
    assoc.contexts = {
        int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts
    }
    assoc.last_used = time.monotonic()
    if not assoc.accepted_contexts:
        assoc.release()
        raise NoAcceptedContexts(
            f"{where} accepted the association but none of the proposed presentation contexts"
        )
    return assoc
