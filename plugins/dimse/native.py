"""dqr's own DIMSE transport (``transport: native``): one asyncio event loop
per process, in one daemon thread, carries every association — queries,
C-GET, C-MOVE and dqr's storage SCP for C-MOVE. No polling threads.

The loop only moves bytes: it reads PDUs, reassembles P-DATA fragments into
DIMSE messages (pynetdicom's codecs: :mod:`pynetdicom.pdu`,
:mod:`pynetdicom.dimse_messages`, :mod:`pynetdicom.dsutils`) and hands every
complete message to an :class:`Inbox`, a thread-safe queue read by the engine
thread that waits for it; that thread runs the DIMSE exchange and sends its
requests through the loop. C-STORE requests (C-GET sub-operations, and the
storage SCP's for C-MOVE) are stored on the loop itself, as they arrive
(see :data:`STORE_ON_LOOP`): the store callback must therefore never call the
backend or wait for another retrieval.

The public surface mimics the part of :class:`pynetdicom.association.Association`
the backend uses (``send_c_find`` ... yielding ``(status, identifier)``), so
that both transports share one backend. Every wait is bounded by one of the
source's timeouts, and the error names it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from ssl import SSLContext, SSLError
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dimse_messages import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RSP,
    DIMSEMessage,
)
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_requestor

from dqr.errors import RemoteError
from dqr.plugins.dimse.status import PENDING, NoAcceptedContexts, connect_error, reject_error

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_VERSION = "DQR_NATIVE_1"
#: What dqr announces it can receive in one PDU: fewer fragments (and
#: Python calls) per instance than pynetdicom's 16 KB, but not more than
#: DCMTK's own maximum (128 KB): Orthanc allocates a send buffer of the
#: negotiated size for every PDU, and at 4 MB C-GET ran 1.5x slower.
MAX_PDU_RECEIVED = 128 * 1024

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
#: How long a release or an abort waits for its TCP connection to be closed, seconds.
CLOSE_WAIT = 2.0
#: A-ABORT sources in words (PS3.8 9.3.8).
ABORT_SOURCES = {0: "the PACS (service user)", 1: "reserved", 2: "the PACS's DICOM stack (service provider)"}


def set_nodelay(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Loop:
    """The process's one event loop, in a daemon thread, started on first use."""

    _lock = threading.Lock()
    _instance: _Loop | None = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="dqr-dimse-loop", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> _Loop:
        with cls._lock:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = _Loop()
            return cls._instance

    def run(self, coroutine: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(function, *args)


def event_loop() -> _Loop:
    return _Loop.get()


# -- received DIMSE messages --------------------------------------------------------

#: Command-set elements (group 0000) dqr reads, by element number (PS3.7 E.1).
AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, RESPONDED_TO = 0x0002, 0x0100, 0x0110, 0x0120
MOVE_DESTINATION, PRIORITY, DATA_SET_TYPE, STATUS = 0x0600, 0x0700, 0x0800, 0x0900
OFFENDING_ELEMENT, ERROR_COMMENT, ERROR_ID, AFFECTED_SOP_INSTANCE = 0x0901, 0x0902, 0x0903, 0x1000
REMAINING, COMPLETED, FAILED, WARNING = 0x1020, 0x1021, 0x1022, 0x1023
MOVE_ORIGINATOR_AET, MOVE_ORIGINATOR_ID = 0x1030, 0x1031
#: Command Field values (PS3.7 E.1-1) dqr acts on.
C_STORE_RQ_FIELD, C_STORE_RSP_FIELD, C_ECHO_RQ_FIELD = 0x0001, 0x8001, 0x0030
C_GET_RSP_FIELD, C_MOVE_RSP_FIELD = 0x8010, 0x8021
#: Command Data Set Type: no data set follows (any other value: one does).
NO_DATA_SET = 0x0101
#: Response statuses meaning "more to come" (PS3.7 C: Pending).
_PENDING_STATUSES = frozenset({0xFF00, 0xFF01})


class CommandError(ValueError):
    """A command set dqr could not parse, by hand or with pynetdicom."""


def parse_command(raw: bytes) -> dict[int, bytes]:
    """A command set's elements, element number -> value bytes.

    Decoded by hand: a command set is implicit VR little endian, group
    0000 only (PS3.7 6.3.1, E.1), so each element is a (group, element,
    length) header and its value. pynetdicom's general decoder (a pydicom
    Dataset, every element looked up in the dictionary) took 175-330 µs of
    the event loop per instance. Anything this parser does not expect
    (another group, an undefined or overrunning length, no Command Field)
    is handed to pynetdicom's decoder, which either reads it or raises
    :class:`CommandError`."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    unpack = _ELEMENT_HEADER.unpack_from
    while offset < end:
        if offset + 8 > end:
            return _parse_command_with_pynetdicom(raw)
        group, element, length = unpack(raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            return _parse_command_with_pynetdicom(raw)
        elements[element] = raw[offset : offset + length]
        offset += length
    if len(elements.get(COMMAND_FIELD, b"")) != 2:
        return _parse_command_with_pynetdicom(raw)
    return elements


_ELEMENT_HEADER = struct.Struct("<HHI")


def _parse_command_with_pynetdicom(raw: bytes) -> dict[int, bytes]:
    """The fallback of :func:`parse_command`: pynetdicom's decoder, its
    elements kept undecoded (raw values, as the hand parser gives them)."""
    try:
        dataset = decode(BytesIO(raw), True, True)
        elements = {}
        for tag in list(dataset.keys()):
            if tag.group != 0x0000:
                raise CommandError(f"an element ({tag}) outside the command group 0000")
            value = dataset.get_item(tag).value
            elements[tag.element] = value if isinstance(value, bytes) else b""
    except CommandError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever pydicom raises on garbage
        raise CommandError(f"an undecodable command set ({type(exc).__name__}: {exc})") from None
    if len(elements.get(COMMAND_FIELD, b"")) != 2:
        raise CommandError("a command set without a Command Field (0000,0100)")
    return elements


@dataclass
class Received:
    """One DIMSE message as it arrived: its presentation context, the
    command set's elements undecoded (see :func:`parse_command`) and the
    data set's bytes, if any."""

    context_id: int
    command: dict[int, bytes]
    data: bytes | None = None

    @property
    def command_field(self) -> int:
        return self.us(COMMAND_FIELD) or 0

    @property
    def expects_data(self) -> bool:
        return self.us(DATA_SET_TYPE) != NO_DATA_SET

    def us(self, element: int) -> int | None:
        """An unsigned short element (US), ``None`` when absent or empty."""
        value = self.command.get(element)
        if not value or len(value) < 2:
            return None
        return value[0] | value[1] << 8

    def text(self, element: int) -> str:
        """A UI/AE/LO/SH element as text, padding (NUL or space) stripped."""
        value = self.command.get(element)
        return value.decode("ascii", "replace").rstrip("\0 ").lstrip(" ") if value else ""

    @property
    def is_store_request(self) -> bool:
        return self.command_field == C_STORE_RQ_FIELD

    @property
    def is_bare_pending_retrieve_response(self) -> bool:
        """A C-GET/C-MOVE Pending response with counts only: nothing the
        waiting thread needs but the sign that the PACS is still at it."""
        return (
            self.command_field in (C_GET_RSP_FIELD, C_MOVE_RSP_FIELD)
            and self.us(STATUS) in _PENDING_STATUSES
            and not self.data
        )


def check_store_request(message: Received) -> None:
    """Raise :class:`CommandError` for a C-STORE-RQ that lacks what its
    response must echo (PS3.7 9.3.1.1: the SOP class and instance, the
    message ID)."""
    for element, name in ((AFFECTED_SOP_CLASS, "Affected SOP Class UID"), (MESSAGE_ID, "Message ID"),
                          (AFFECTED_SOP_INSTANCE, "Affected SOP Instance UID")):  # fmt: skip
        if not message.command.get(element):
            raise CommandError(f"a C-STORE request without its {name} (0000,{element:04X})")


# -- the wire ----------------------------------------------------------------------


class Link(asyncio.Protocol):
    """One TCP connection carrying PDUs, either side of an association.

    Runs on the loop: splits the byte stream into PDUs, reassembles DIMSE
    messages and passes everything to ``self.deliver`` (the owner's).
    """

    def __init__(self, deliver: Callable[[Link, str, Any], None]) -> None:
        self.deliver = deliver
        self.transport: asyncio.Transport | None = None
        #: Set once the connection is closed (``connection_lost``): what a
        #: release or an abort waits for, from any thread, without reading
        #: the inbox another thread may be waiting on.
        self.gone = threading.Event()
        #: The start of a PDU not yet complete (bytes of the last reads).
        self._partial = b""
        #: The message being reassembled: its command and data set fragments
        #: (joined once, when complete), its context, its parsed command.
        self._command_parts: list[bytes] = []
        self._data_parts: list[bytes] = []
        self._message: Received | None = None
        self.closed = False
        #: When the last complete DIMSE message arrived (dimse_timeout runs from it).
        self.last_message = time.monotonic()
        #: Largest PDU the peer receives (0: no limit), from the negotiation.
        self.peer_max_pdu = 16382
        #: Accepted presentation contexts: id -> (abstract syntax, transfer syntax)
        self.contexts: dict[int, tuple[str, str]] = {}
        self.last_activity = time.monotonic()
        self.peer: tuple[str, int] = ("", 0)
        #: Arbitrary owner data (the acceptor's association state).
        self.state: Any = None

    # asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        set_nodelay(transport.get_extra_info("socket"))
        self.peer = transport.get_extra_info("peername") or ("", 0)

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self._partial:
            data = self._partial + data
            self._partial = b""
        size = len(data)
        offset = 0
        with memoryview(data) as view:
            while size - offset >= 6:
                end = offset + 6 + int.from_bytes(view[offset + 2 : offset + 6], "big")
                if end > size:
                    break
                pdu_type = data[offset]
                try:
                    if pdu_type == P_DATA:
                        self._p_data(view, offset + 6, end)
                    else:
                        self._pdu(pdu_type, bytes(view[offset:end]))
                except Exception as exc:  # noqa: BLE001 - a malformed PDU ends the association
                    log.debug("undecodable PDU type %s: %s", pdu_type, exc)
                    self.deliver(self, "error", f"sent a PDU dqr could not decode ({type(exc).__name__}: {exc})")
                    self.abort()
                    return
                offset = end
                if self.closed:
                    return
        if offset < size:
            self._partial = data[offset:] if offset else data

    def connection_lost(self, exc: BaseException | None) -> None:
        was_closed, self.closed = self.closed, True
        self.gone.set()
        self.deliver(self, "lost", (was_closed, exc))

    # P-DATA: DIMSE messages in fragments (PS3.8 9.3.5, E.2) ---------------------
    def _p_data(self, view: memoryview, offset: int, end: int) -> None:
        """The PDVs of one P-DATA-TF PDU (``view[offset:end]``): each
        fragment is copied out once, and a message's fragments are joined
        once, when its last one arrives (no copy per layer, no quadratic
        concatenation of a large data set)."""
        if offset == end:
            raise ValueError("a P-DATA-TF PDU without any presentation data value")
        while offset < end:
            if offset + 6 > end:
                raise ValueError("a presentation data value item cut short")
            length = int.from_bytes(view[offset : offset + 4], "big")
            stop = offset + 4 + length
            if length < 2 or stop > end:
                raise ValueError(f"a presentation data value item of length {length} overruns its PDU")
            context_id, control = view[offset + 4], view[offset + 5]
            fragment = bytes(view[offset + 6 : stop])
            offset = stop
            if control & 0x01:  # a command fragment
                if self._message is not None:
                    raise ValueError("a command fragment in the middle of a data set")
                self._command_parts.append(fragment)
                if control & 0x02:  # the command set's last fragment
                    raw = b"".join(self._command_parts)
                    self._command_parts = []
                    message = Received(context_id, parse_command(raw))
                    if message.is_store_request:
                        check_store_request(message)
                    if message.expects_data:
                        self._message = message
                    else:
                        self._complete(message)
            else:  # a data set fragment
                if self._message is None:
                    raise ValueError("a data set fragment before its command set")
                self._data_parts.append(fragment)
                if control & 0x02:
                    message, self._message = self._message, None
                    message.data = b"".join(self._data_parts) if len(self._data_parts) > 1 else self._data_parts[0]
                    self._data_parts = []
                    self._complete(message)

    def _complete(self, message: Received) -> None:
        self.last_message = time.monotonic()
        self.deliver(self, "message", message)

    # PDUs -------------------------------------------------------------------
    def _pdu(self, pdu_type: int, pdu: bytes) -> None:
        if pdu_type == ASSOCIATE_RQ:
            rq = A_ASSOCIATE_RQ()
            rq.decode(pdu)
            self.deliver(self, "associate-rq", rq.to_primitive())
        elif pdu_type == ASSOCIATE_AC:
            ac = A_ASSOCIATE_AC()
            ac.decode(pdu)
            self.deliver(self, "associate-ac", ac.to_primitive())
        elif pdu_type == ASSOCIATE_RJ:
            rj = A_ASSOCIATE_RJ()
            rj.decode(pdu)
            self.deliver(self, "associate-rj", rj)
        elif pdu_type == RELEASE_RQ:
            self.write(A_RELEASE_RP().encode())
            self.deliver(self, "release-rq", None)
            self.close()
        elif pdu_type == RELEASE_RP:
            self.deliver(self, "release-rp", None)
            self.close()
        elif pdu_type == ABORT:
            abort = A_ABORT_RQ()
            abort.decode(pdu)
            self.closed = True
            self.deliver(self, "abort", (abort.source, abort.reason_diagnostic))
            if self.transport is not None:
                self.transport.close()
        else:
            raise ValueError(f"unknown PDU type 0x{pdu_type:02X}")

    def close_when_idle(self, idle: float) -> None:
        """Abort the association once nothing arrived for ``idle`` seconds
        (network_timeout; loop thread), as pynetdicom does."""
        if self.closed:
            return
        left = self.last_activity + idle - time.monotonic()
        if left <= 0:
            log.debug("closing an association idle for %.0f s (network_timeout)", idle)
            self.abort()
            return
        asyncio.get_running_loop().call_later(min(left, 5.0) + 0.01, self.close_when_idle, idle)

    # sending (loop thread) ----------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            pdu = A_ABORT_RQ()
            pdu.source = 0
            pdu.reason_diagnostic = 0
            self.write(pdu.encode())
        self.close()

    # sending (any thread) ------------------------------------------------------
    def encode_message(self, message: DIMSEMessage, context_id: int) -> bytes:
        return b"".join(
            P_DATA_TF(primitive).encode() for primitive in message.encode_msg(context_id, self.peer_max_pdu)
        )

    def send_threadsafe(self, data: bytes) -> None:
        event_loop().call(self.write, data)


# -- the requestor's side ----------------------------------------------------------


@dataclass
class Timeouts:
    connect: float
    acse: float
    dimse: float
    network: float


class Inbox:
    """What the loop hands to one waiting thread: the messages of its
    association(s), C-STOREs routed to it by the storage SCP, and the end of
    the connection. C-STORE requests are answered here, by ``on_store``
    (``on_store(sop_class, sop_instance, transfer_syntax, dataset) -> status``),
    whatever the waiting thread was waiting for."""

    def __init__(self, on_store: Callable[[str, str, str, bytes], int] | None = None) -> None:
        self._queue: queue.SimpleQueue[tuple[Link, str, Any]] = queue.SimpleQueue()
        self.on_store = on_store

    def put(self, link: Link, kind: str, payload: Any) -> None:
        if kind == "message":
            if STORE_ON_LOOP and self.on_store is not None and payload.is_store_request:
                self._answer_store(link, payload)
                return
            if payload.is_bare_pending_retrieve_response:
                # one per instance of a C-GET or C-MOVE: waking the waiting
                # thread for it cost a thread switch per instance; its
                # arrival is in link.last_message, which dimse_timeout reads
                return
        self._queue.put((link, kind, payload))

    def get(self, timeout: float | None) -> tuple[Link, str, Any] | None:
        """The next item that is not a C-STORE request (those are answered
        on the way), or ``None`` after ``timeout`` seconds without any item."""
        while True:
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                return None
            link, kind, payload = item
            if kind == "message" and payload.is_store_request and self.on_store is not None:
                self._answer_store(link, payload)
                continue
            return item

    def _answer_store(self, link: Link, message: Received) -> None:
        _, transfer_syntax = link.contexts.get(message.context_id, ("", ""))
        assert self.on_store is not None
        status = self.on_store(
            message.text(AFFECTED_SOP_CLASS),
            message.text(AFFECTED_SOP_INSTANCE),
            transfer_syntax,
            message.data or b"",
        )
        answer_store(link, message, status)


#: C-STOREs are stored on the loop thread, as they arrive: the store
#: callback (decode, relabel, write; no fsync, no backend call) runs
#: between reading the request's last PDU and writing its response, with no
#: thread hand-off. Handing each instance to the waiting engine thread and
#: the response back cost two wake-ups per instance, ~10 ms on this loaded
#: 2-core machine — more than Orthanc needs to send the next instance.
STORE_ON_LOOP = True


def answer_store(link: Link, message: Received, status: int) -> None:
    sop_class, sop_instance = message.text(AFFECTED_SOP_CLASS), message.text(AFFECTED_SOP_INSTANCE)
    message_id = message.us(MESSAGE_ID) or 0  # present: checked when the request was parsed
    data = store_response_pdu(message.context_id, message_id, sop_class, sop_instance, status)
    if link.peer_max_pdu and len(data) - 6 > link.peer_max_pdu:  # a peer that takes tiny PDUs: pynetdicom fragments
        primitive = C_STORE()
        primitive.MessageIDBeingRespondedTo = message_id
        primitive.AffectedSOPClassUID = sop_class
        primitive.AffectedSOPInstanceUID = sop_instance
        primitive.Status = status
        response = C_STORE_RSP()
        response.primitive_to_message(primitive)
        data = link.encode_message(response, message.context_id)
    if threading.current_thread() is event_loop().thread:
        link.write(data)
    else:
        link.send_threadsafe(data)


def _command_element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    value = uid.encode("ascii")
    return value + b"\0" if len(value) % 2 else value


def store_response_pdu(context_id: int, message_id: int, sop_class: str, sop_instance: str, status: int) -> bytes:
    """The P-DATA-TF PDU of a C-STORE-RSP, encoded directly: one command
    fragment, implicit VR little endian (PS3.7 9.3.1.2, E.1). pynetdicom's
    general encoder (a Dataset built, validated and written twice for the
    group length) took milliseconds per instance on this machine, between
    the last PDU of an instance and the PACS sending the next one."""
    body = b"".join((
        _command_element(0x0002, _uid_bytes(sop_class)),
        _command_element(COMMAND_FIELD, struct.pack("<H", C_STORE_RSP_FIELD)),
        _command_element(0x0120, struct.pack("<H", message_id)),
        _command_element(0x0800, struct.pack("<H", 0x0101)),  # no data set
        _command_element(0x0900, struct.pack("<H", status)),
        _command_element(0x1000, _uid_bytes(sop_instance)),
    ))
    command = _command_element(0x0000, struct.pack("<I", len(body))) + body
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03)  # command, last fragment
    return struct.pack(">BBI", P_DATA, 0, len(pdv) + len(command)) + pdv + command


#: operation -> (primitive, message) of the requests dqr sends with pynetdicom's codecs
_REQUESTS = {"C-ECHO": (C_ECHO, C_ECHO_RQ), "C-FIND": (C_FIND, C_FIND_RQ), "C-GET": (C_GET, C_GET_RQ),
             "C-MOVE": (C_MOVE, C_MOVE_RQ)}  # fmt: skip


def request_message(
    operation: str, sop_class: str, msg_id: int, identifier: bytes | None = None, move_destination: str | None = None
) -> DIMSEMessage:
    """A C-ECHO, C-FIND, C-GET or C-MOVE request (with an identifier: low
    priority, a bulk transfer), for either native requestor."""
    primitive_type, message_type = _REQUESTS[operation]
    primitive = primitive_type()
    primitive.MessageID = msg_id
    primitive.AffectedSOPClassUID = sop_class
    if identifier is not None:
        primitive.Priority = 2
        primitive.Identifier = BytesIO(identifier)
    if move_destination is not None:
        primitive.MoveDestination = move_destination
    message = message_type()
    message.primitive_to_message(primitive)
    return message


def encode_dataset(dataset: Dataset, transfer_syntax: str, what: str) -> bytes:
    """``dataset`` in a negotiated transfer syntax (``what`` names it in the error)."""
    uid = UID(transfer_syntax)
    data = encode(dataset, uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
    if data is None:
        raise ValueError(f"the {what} could not be encoded")
    return data


#: Status keywords of a response and their elements, in the order pynetdicom gave them.
_STATUS_COUNTS = (
    ("NumberOfRemainingSuboperations", REMAINING),
    ("NumberOfCompletedSuboperations", COMPLETED),
    ("NumberOfFailedSuboperations", FAILED),
    ("NumberOfWarningSuboperations", WARNING),
)


def status_dataset(message: Received) -> Dataset:
    """A response's status elements (PS3.7 C) as the Dataset the backend
    reads: Status, the sub-operation counts, and the failure details
    (Error Comment, Error ID, Offending Element) when present; empty for
    a message without a Status (not a response)."""
    status = Dataset()
    code = message.us(STATUS)
    if code is None:
        return status
    status.Status = code
    for keyword, element in _STATUS_COUNTS:
        value = message.us(element)
        if value is not None:
            setattr(status, keyword, value)
    for keyword, element in (("ErrorComment", ERROR_COMMENT), ("ErrorID", ERROR_ID)):
        text = message.text(element)
        if text:
            setattr(status, keyword, text)
    offending = message.command.get(OFFENDING_ELEMENT)
    if offending and len(offending) >= 4:
        tags = [Tag(*struct.unpack_from("<HH", offending, i)) for i in range(0, len(offending) - 3, 4)]
        status.OffendingElement = tags if len(tags) > 1 else tags[0]
    return status


@dataclass
class Association:
    """An association dqr requested, used by one thread at a time."""

    link: Link
    inbox: Inbox
    where: str
    timeouts: Timeouts
    accepted: list[PresentationContext]
    rejected: list[PresentationContext]
    state: str = "established"  # released | aborted (by the peer) | killed (by dqr) | lost
    why: str = ""
    _by_syntax: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for context in self.accepted:
            self._by_syntax.setdefault(str(context.abstract_syntax), int(context.context_id))

    # the part of pynetdicom's Association the backend uses ------------------------
    @property
    def is_established(self) -> bool:
        return self.state == "established" and not self.link.closed

    @property
    def is_aborted(self) -> bool:
        return self.state in ("aborted", "killed", "lost")

    @property
    def accepted_contexts(self) -> list[PresentationContext]:
        return self.accepted

    def accepts(self, abstract_syntax: str, scp_role: bool = False) -> bool:
        for context in self.accepted:
            if context.abstract_syntax == abstract_syntax and (not scp_role or context.as_scp):
                return True
        return False

    def send_c_echo(self, msg_id: int = 1) -> Dataset:
        from pynetdicom.sop_class import Verification

        self._send(request_message("C-ECHO", Verification, msg_id), Verification)
        for status, _ in self._responses("C-ECHO"):
            return status
        raise AssertionError("unreachable")  # _responses raises or yields

    def send_c_find(self, identifier: Dataset, model: str, msg_id: int = 1) -> Iterator[tuple[Dataset, Any]]:
        self._send(request_message("C-FIND", model, msg_id, self._encode(identifier, model)), model)
        return self._responses("C-FIND", model)

    def send_c_get(self, identifier: Dataset, model: str, msg_id: int = 1) -> Iterator[tuple[Dataset, Any]]:
        self._send(request_message("C-GET", model, msg_id, self._encode(identifier, model)), model)
        return self._responses("C-GET", model)

    def send_c_move(
        self, identifier: Dataset, destination: str, model: str, msg_id: int = 1
    ) -> Iterator[tuple[Dataset, Any]]:
        message = request_message("C-MOVE", model, msg_id, self._encode(identifier, model), destination)
        self._send(message, model)
        return self._responses("C-MOVE", model)

    def release(self) -> None:
        """A-RELEASE, waiting at most acse_timeout for the answer."""
        if not self.is_established:
            return
        self.link.send_threadsafe(A_RELEASE_RQ().encode())
        deadline = time.monotonic() + self.timeouts.acse
        while True:
            item = self.inbox.get(max(0.0, deadline - time.monotonic()))
            if item is None:
                self.abort()
                return
            link, kind, _ = item
            if link is self.link and kind in ("release-rp", "release-rq", "abort", "lost", "error"):
                self.state = "released"
                self._close_transport(min(deadline, time.monotonic() + CLOSE_WAIT))  # at once if already lost
                return

    def _close_transport(self, deadline: float) -> None:
        """Wait until the TCP connection is closed (PS3.8 AR-3: the requestor
        closes it on the A-RELEASE-RP). The loop thread closes it as it reads
        the answer, but only after handing the answer over, and the socket
        goes on its next turn: returning before that would hand the
        association's cluster slot to a peer process while the PACS still
        counts this connection (seen on a loaded machine, where the loop
        thread waited for the GIL)."""
        event_loop().call(self.link.close)
        self._wait_closed(deadline)

    def abort(self) -> None:
        """A-ABORT and close, waiting (at most CLOSE_WAIT) until the
        connection is closed, as pynetdicom's abort does: the cluster slot
        handed back next must not still be counted by the PACS."""
        if self.state == "established":
            self.state = "killed"
        event_loop().call(self.link.abort)
        self._wait_closed(time.monotonic() + CLOSE_WAIT)

    def _wait_closed(self, deadline: float) -> None:
        if threading.current_thread() is not event_loop().thread:  # the loop closes it: never block the loop
            self.link.gone.wait(max(0.0, deadline - time.monotonic()))

    # internals ------------------------------------------------------------
    def _context_id(self, abstract_syntax: str) -> int:
        try:
            return self._by_syntax[abstract_syntax]
        except KeyError:
            raise RemoteError(
                f"{self.where} did not accept the presentation context for {UID(abstract_syntax).name}"
            ) from None

    def _encode(self, dataset: Dataset, abstract_syntax: str) -> bytes:
        _, syntax = self.link.contexts[self._context_id(abstract_syntax)]
        return encode_dataset(dataset, syntax, "identifier")

    def _send(self, message: DIMSEMessage, abstract_syntax: str) -> None:
        if not self.is_established:
            raise RemoteError(f"the association with {self.where} is no longer open ({self.why or self.state})", retriable=True)
        self.link.send_threadsafe(self.link.encode_message(message, self._context_id(abstract_syntax)))

    def _responses(self, operation: str, model: str = "") -> Iterator[tuple[Dataset, Any]]:
        """Responses to the request just sent, until the final one; C-STORE
        sub-operations are answered by the inbox meanwhile."""
        self.link.last_message = time.monotonic()
        while True:
            # dimse_timeout runs from the last message of this association,
            # the ones answered or dropped on the loop included (C-STOREs,
            # bare Pending responses: see Inbox.put)
            left = self.link.last_message + self.timeouts.dimse - time.monotonic()
            item = self.inbox.get(max(0.0, left))
            if item is None:
                if self.link.last_message + self.timeouts.dimse > time.monotonic():
                    continue
                self.abort()
                raise RemoteError(
                    f"{operation} to {self.where} got no answer: no response within "
                    f"{self.timeouts.dimse:g} s (dqr's dimse_timeout fired; dqr aborted the association)",
                    retriable=True,
                )
            link, kind, payload = item
            if link is not self.link:
                continue  # e.g. a storage SCP connection of a C-MOVE ending
            if kind != "message":
                raise self._ended(operation, kind, payload)
            status = status_dataset(payload)
            if "Status" not in status:
                continue  # not a response (a peer's stray request): ignore
            identifier = None
            if payload.data and int(status.Status) in PENDING:
                _, syntax = self.link.contexts.get(payload.context_id, ("", "1.2.840.10008.1.2"))
                uid = UID(syntax)
                identifier = decode(BytesIO(payload.data), uid.is_implicit_VR, uid.is_little_endian, uid.is_deflated)
            yield status, identifier
            if int(status.Status) not in PENDING:
                return

    def _ended(self, operation: str, kind: str, payload: Any) -> RemoteError:
        if kind == "abort":
            source, reason = payload
            self.state = "aborted"
            why = f"the association was aborted by {ABORT_SOURCES.get(source, f'source {source}')} (A-ABORT, reason {reason})"
        elif kind in ("release-rq", "release-rp"):
            self.state = "released"
            why = "the PACS released the association before answering"
        elif kind == "error":
            self.state = "killed"
            why = f"the PACS {payload}; dqr aborted the association"
        else:
            self.state = "lost"
            why = "the PACS closed the connection without releasing the association"
        self.why = why
        return RemoteError(f"{operation} to {self.where} got no answer: {why}", retriable=True)


def associate(
    host: str,
    port: int,
    calling_aet: str,
    called_aet: str,
    where: str,
    contexts: list[PresentationContext],
    timeouts: Timeouts,
    roles: list[SCP_SCU_RoleSelectionNegotiation] = (),  # type: ignore[assignment]
    inbox: Inbox | None = None,
    tls: SSLContext | None = None,
) -> Association:
    """Connect (over TLS with ``tls``: the PACS's certificate is checked
    against ``host``) and negotiate; raise a classified :class:`RemoteError`."""
    inbox = inbox or Inbox()
    loop = event_loop()
    link = Link(inbox.put)

    async def connect() -> None:
        # connect_timeout bounds the TCP connect and the TLS handshake together
        await asyncio.wait_for(
            loop.loop.create_connection(
                lambda: link, host, port, ssl=tls, server_hostname=host if tls else None,
            ),
            timeouts.connect,
        )

    try:
        loop.run(connect())
    except OSError as exc:  # TimeoutError and ssl.SSLError included
        raise connect_error(exc, where, timeouts.connect) from None
    proposed_roles = {str(role.sop_class_uid): role for role in roles}
    for number, context in enumerate(contexts):
        context.context_id = 2 * number + 1
        role = proposed_roles.get(str(context.abstract_syntax))
        if role is not None:
            context.scu_role, context.scp_role = role.scu_role, role.scp_role
    request = A_ASSOCIATE()
    request.application_context_name = APPLICATION_CONTEXT
    request.calling_ae_title = calling_aet
    request.called_ae_title = called_aet
    request.presentation_context_definition_list = contexts
    request.user_information = [*_user_information(), *roles]
    link.send_threadsafe(A_ASSOCIATE_RQ(request).encode())
    deadline = time.monotonic() + timeouts.acse
    while True:
        item = inbox.get(max(0.0, deadline - time.monotonic()))
        if item is None:
            loop.call(link.abort)
            raise RemoteError(
                f"{where} did not answer the association request within {timeouts.acse:g} s "
                "(dqr's acse_timeout fired)",
                retriable=True,
            )
        _, kind, payload = item
        if kind == "associate-ac":
            break
        loop.call(link.close)
        if kind == "associate-rj":
            raise reject_error(
                int(payload.result), int(payload.source), int(payload.reason_diagnostic),
                where, calling_aet, called_aet,
            )
        if kind == "abort":
            raise RemoteError(f"{where} aborted the association while negotiating", retriable=True)
        if kind == "lost" and isinstance(payload[1], SSLError):
            # TLS 1.3: the server refuses dqr's client certificate only after
            # the handshake, with an alert that arrives on the first read
            raise connect_error(payload[1], where, timeouts.connect) from None
        if kind == "lost" and tls is not None:
            # ... or the connection is gone before the alert was read
            raise RemoteError(
                f"{where} closed the TLS connection while negotiating the association: it may have "
                "refused dqr's client certificate (check `tls.cert_file` / `tls.key_file` and that "
                "the PACS trusts their CA)",
                retriable=True,
            )
        raise RemoteError(
            f"{where} closed the connection while negotiating the association (if the PACS "
            "speaks DICOM over TLS on this port, set `tls:`)",
            retriable=True,
        )
    answer: A_ASSOCIATE = payload
    ac_roles: dict[str, tuple[bool | None, bool | None]] = {}
    for item in answer.user_information:
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation):
            ac_roles[str(item.sop_class_uid)] = (item.scu_role, item.scp_role)
        elif isinstance(item, MaximumLengthNotification):
            link.peer_max_pdu = int(item.maximum_length_received or 0)
    results = negotiate_as_requestor(
        contexts, answer.presentation_context_definition_results_list, ac_roles or None
    )
    accepted = [cx for cx in results if cx.result == 0x00]
    rejected = [cx for cx in results if cx.result != 0x00]
    link.contexts = {
        int(cx.context_id): (str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in accepted
    }
    assoc = Association(link, inbox, where, timeouts, accepted, rejected)
    loop.call(link.close_when_idle, timeouts.network)
    if not accepted:
        assoc.release()
        raise NoAcceptedContexts(
            f"{where} accepted the association but none of the proposed presentation "
            "contexts (it does not support this query/retrieve model or these SOP classes)"
        )
    return assoc


def _user_information() -> list[Any]:
    length = MaximumLengthNotification()
    length.maximum_length_received = MAX_PDU_RECEIVED
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    return [length, implementation, version]


# -- the acceptor's side: dqr's storage SCP for C-MOVE --------------------------------


class _TlsHandshake(asyncio.Protocol):
    """An accepted connection until its TLS handshake is done; then the
    :class:`Link` carries it. (asyncio's own ``create_server(ssl=...)``
    drops a failed handshake without a word: a PACS with the wrong
    certificate would look like a PACS that never sent anything.)"""

    def __init__(self, link: Link, context: SSLContext, timeout: float) -> None:
        self.link = link
        self.context = context
        self.timeout = timeout
        #: What arrived with the handshake's last bytes, before start_tls
        #: returned (DCMTK sends its A-ASSOCIATE-RQ right behind them)
        self._early: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        transport.pause_reading()  # the handshake's bytes are for start_tls
        set_nodelay(transport.get_extra_info("socket"))
        peer = transport.get_extra_info("peername") or ("", 0)
        asyncio.get_running_loop().create_task(self._handshake(transport, peer))

    async def _handshake(self, transport: Any, peer: tuple[str, int]) -> None:
        try:
            secure = await asyncio.get_running_loop().start_tls(
                transport, self, self.context, server_side=True, ssl_handshake_timeout=self.timeout
            )
        except OSError as exc:  # ssl.SSLError and TimeoutError included
            reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            log.warning(
                "storage SCP: TLS handshake with %s:%s failed: %s (does the PACS send over TLS, "
                "with a certificate tls.ca_file trusts?)", *peer[:2], reason,
            )
            transport.abort()
            return
        self.link.connection_made(secure)
        secure.set_protocol(self.link)
        for data in self._early:
            self.link.data_received(data)
        self._early.clear()

    # the application protocol until the handshake is done
    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        pass  # start_tls raises, or the link was never connected


class StorageServer:
    """A listening socket on the loop; each association is negotiated by
    ``policy`` and its C-STOREs routed by it (see
    :class:`dqr.plugins.dimse.arrivals.NativeMoveReceiver`). With ``tls``
    (a server context) every connection is TLS."""

    def __init__(
        self, host: str, port: int, policy: Any, network_timeout: float, tls: SSLContext | None = None
    ) -> None:
        self.policy = policy
        self.network_timeout = network_timeout
        self.links: set[Link] = set()
        loop = event_loop()

        def protocol() -> asyncio.Protocol:
            link = Link(self._deliver)
            return link if tls is None else _TlsHandshake(link, tls, network_timeout)

        async def start() -> asyncio.AbstractServer:
            return await loop.loop.create_server(protocol, host, port, reuse_address=True)

        self._server: asyncio.AbstractServer = loop.run(start())
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweep = loop.loop.call_soon_threadsafe(self._sweep_idle)

    # loop thread
    def _sweep_idle(self) -> None:
        now = time.monotonic()
        for link in list(self.links):
            if now - link.last_activity > self.network_timeout:
                log.info("storage SCP: closing an association idle for %.0f s (network_timeout)", self.network_timeout)
                link.abort()
        self._sweep = asyncio.get_running_loop().call_later(min(1.0, self.network_timeout), self._sweep_idle)

    def _deliver(self, link: Link, kind: str, payload: Any) -> None:
        self.links.add(link)
        if kind == "associate-rq":
            self.policy.negotiate(link, payload)
        elif kind == "message":
            if payload.is_store_request:
                self.policy.route_store(link, payload)
            elif payload.command_field == C_ECHO_RQ_FIELD:
                primitive = C_ECHO()
                primitive.MessageIDBeingRespondedTo = payload.us(MESSAGE_ID) or 0
                primitive.AffectedSOPClassUID = payload.text(AFFECTED_SOP_CLASS) or "1.2.840.10008.1.1"
                primitive.Status = 0x0000
                response = C_ECHO_RSP()
                response.primitive_to_message(primitive)
                link.write(link.encode_message(response, payload.context_id))
            else:
                link.abort()  # not a storage request: nothing dqr serves here
        elif kind in ("lost", "abort", "release-rp", "error"):
            self.links.discard(link)

    def stop(self) -> None:
        loop = event_loop()

        async def stop() -> None:
            self._sweep.cancel()
            self._server.close()
            for link in list(self.links):
                link.abort()
            await self._server.wait_closed()

        try:
            loop.run(stop(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - stopping is best effort
            log.debug("storage SCP stop: %s", exc)


def accept(link: Link, request: A_ASSOCIATE, accepted_syntaxes: Callable[[str], list[str]]) -> None:
    """Send the A-ASSOCIATE-AC for ``request`` (loop thread): each context
    whose abstract syntax ``accepted_syntaxes`` gives transfer syntaxes for
    is accepted with the first of them the requestor proposed."""
    results = []
    for context in request.presentation_context_definition_list:
        result = PresentationContext()
        result.context_id = context.context_id
        result.abstract_syntax = context.abstract_syntax
        ours = accepted_syntaxes(str(context.abstract_syntax))
        proposed = [str(ts) for ts in context.transfer_syntax]
        common = [ts for ts in ours if ts in proposed]
        if not ours:
            result.result = 0x03  # abstract syntax not supported
            result.transfer_syntax = [proposed[0]] if proposed else ["1.2.840.10008.1.2"]
        elif not common:
            result.result = 0x04  # transfer syntaxes not supported
            result.transfer_syntax = [proposed[0]] if proposed else ["1.2.840.10008.1.2"]
        else:
            result.result = 0x00
            result.transfer_syntax = [common[0]]
            link.contexts[int(context.context_id)] = (str(context.abstract_syntax), common[0])
        results.append(result)
    for item in request.user_information:
        if isinstance(item, MaximumLengthNotification):
            link.peer_max_pdu = int(item.maximum_length_received or 0)
    answer = A_ASSOCIATE()
    answer.application_context_name = APPLICATION_CONTEXT
    answer.calling_ae_title = request.calling_ae_title
    answer.called_ae_title = request.called_ae_title
    answer.result = 0x00
    answer.result_source = 0x01
    answer.presentation_context_definition_results_list = results
    answer.user_information = _user_information()
    link.write(A_ASSOCIATE_AC(answer).encode())


def reject(link: Link, result: int, source: int, diagnostic: int) -> None:
    """Send an A-ASSOCIATE-RJ and close (loop thread)."""
    pdu = A_ASSOCIATE_RJ()
    pdu.result = result
    pdu.source = source
    pdu.reason_diagnostic = diagnostic
    link.write(pdu.encode())
    link.close()
