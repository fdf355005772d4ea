"""The native transport's receive path: P-DATA reassembly and the command
sets it decodes by hand, checked against what pynetdicom's own encoder
sends and its decoder reads."""

from __future__ import annotations

from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_GET_RSP, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_GET, C_STORE
from pynetdicom.pdu import P_DATA_TF

from dqr.plugins.dimse import native

CT = "1.2.840.10008.5.1.4.1.1.2"
ODD_UID = "1.2.3.4.5.6.7.8.9"  # 17 characters: padded with a NUL on the wire
EVEN_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"


def pdus(message, max_pdu: int = 16382, context_id: int = 1) -> bytes:
    """``message`` as pynetdicom sends it: P-DATA-TF PDUs of at most ``max_pdu``."""
    return b"".join(P_DATA_TF(p).encode() for p in message.encode_msg(context_id, max_pdu))


def pynetdicom_reads(data: bytes):
    """The command set pynetdicom's own decoder reads from ``data`` (PDUs)."""
    message = DIMSEMessage()
    offset = 0
    while offset < len(data):
        end = offset + 6 + int.from_bytes(data[offset + 2 : offset + 6], "big")
        pdu = P_DATA_TF()
        pdu.decode(data[offset:end])
        done = message.decode_msg(pdu.to_primitive())
        offset = end
    assert done
    return message.command_set


def store_request(
    sop_class: str = CT, sop_instance: str = ODD_UID, message_id: int = 7, priority: int = 2,
    originator: tuple[str, int] | None = None, dataset: bytes = b"\x08\x00\x16\x00\x00\x00\x00\x00",
) -> C_STORE_RQ:
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Priority = priority
    if originator is not None:
        primitive.MoveOriginatorApplicationEntityTitle, primitive.MoveOriginatorMessageID = originator
    primitive.DataSet = BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return message


class Wire:
    """A Link fed by hand (``chunk`` bytes a read): the messages it delivers."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, object]] = []
        self.link = native.Link(lambda link, kind, payload: self.delivered.append((kind, payload)))

    def feed(self, data: bytes, chunk: int | None = None) -> list[native.Received]:
        step = chunk or len(data)
        for start in range(0, len(data), step):
            self.link.data_received(data[start : start + step])
        return [payload for kind, payload in self.delivered if kind == "message"]


@pytest.mark.parametrize("sop_instance", [ODD_UID, EVEN_UID])
@pytest.mark.parametrize("originator", [None, ("MOCKPACS", 3), ("AE_OF_16_CHARSXX", 65535)])
@pytest.mark.parametrize(("message_id", "priority"), [(1, 0), (65535, 1), (300, 2)])
def test_a_c_store_request_reads_as_pynetdicom_reads_it(sop_instance, originator, message_id, priority):
    message = store_request(sop_instance=sop_instance, message_id=message_id, priority=priority,
                            originator=originator)  # fmt: skip
    [received] = Wire().feed(pdus(message))
    expected = pynetdicom_reads(pdus(message))
    assert received.is_store_request
    assert received.text(native.AFFECTED_SOP_CLASS) == expected.AffectedSOPClassUID == CT
    assert received.text(native.AFFECTED_SOP_INSTANCE) == expected.AffectedSOPInstanceUID == sop_instance
    assert received.us(native.MESSAGE_ID) == expected.MessageID == message_id
    assert received.us(native.PRIORITY) == expected.Priority == priority
    assert received.us(native.MOVE_ORIGINATOR_ID) == (originator[1] if originator else None)
    assert received.text(native.MOVE_ORIGINATOR_AET) == (originator[0] if originator else "")
    assert {tag.element for tag in expected.keys()} == set(received.command)


@pytest.mark.parametrize("chunk", [7, 1000, 4096 + 3, None])
def test_a_large_data_set_in_many_pdus_and_reads_arrives_whole_and_exact(chunk):
    dataset = bytes(range(256)) * 2048  # 512 KB, every byte value
    message = store_request(dataset=dataset)
    received = Wire().feed(pdus(message, max_pdu=4096) * 2, chunk)  # two instances back to back
    assert [r.data == dataset for r in received] == [True, True]


def c_get_response(status: int, **fields) -> C_GET_RSP:
    """A C-GET-RSP as pynetdicom encodes it, with ``fields`` of the primitive set."""
    primitive = C_GET()
    primitive.MessageIDBeingRespondedTo = 5
    primitive.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.3"
    primitive.Status = status
    for name, value in fields.items():
        setattr(primitive, name, value)
    message = C_GET_RSP()
    message.primitive_to_message(primitive)
    return message


def test_a_c_get_response_gives_the_status_pynetdicom_would():
    message = c_get_response(
        0xA702,
        NumberOfRemainingSuboperations=3,
        NumberOfCompletedSuboperations=2,
        NumberOfFailedSuboperations=1,
        NumberOfWarningSuboperations=0,
        ErrorComment="out of disk",
        OffendingElement=[0x00100010, 0x0020000D],
    )
    [received] = Wire().feed(pdus(message))
    status = native.status_dataset(received)
    assert status.Status == 0xA702
    assert (status.NumberOfRemainingSuboperations, status.NumberOfCompletedSuboperations,
            status.NumberOfFailedSuboperations, status.NumberOfWarningSuboperations) == (3, 2, 1, 0)  # fmt: skip
    assert status.ErrorComment == "out of disk"
    assert [int(tag) for tag in status.OffendingElement] == [0x00100010, 0x0020000D]
    assert not received.is_bare_pending_retrieve_response


def test_a_bare_pending_c_get_response_is_known_as_such():
    [received] = Wire().feed(pdus(c_get_response(0xFF00, NumberOfRemainingSuboperations=3)))
    assert received.is_bare_pending_retrieve_response


def _command_pdu(command: bytes, context_id: int = 1) -> bytes:
    pdv = (len(command) + 2).to_bytes(4, "big") + bytes([context_id, 0x03]) + command
    return bytes([native.P_DATA, 0]) + len(pdv).to_bytes(4, "big") + pdv


def _element(element: int, value: bytes, group: int = 0) -> bytes:
    return group.to_bytes(2, "little") + element.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value


def _errors(wire: Wire) -> list[str]:
    return [str(payload) for kind, payload in wire.delivered if kind == "error"]


def test_a_command_set_that_overruns_its_fragment_is_a_clear_error():
    wire = Wire()
    wire.feed(_command_pdu(_element(0x0100, b"\x01\x00") + _element(0x0110, b"\x07")[:-1] + b"\xff\xff\xff"))
    [error] = _errors(wire)
    assert "could not decode" in error and "CommandError" in error
    assert wire.link.closed


def test_a_c_store_request_without_a_message_id_is_a_clear_error():
    command = (_element(0x0002, native._uid_bytes(CT)) + _element(0x0100, b"\x01\x00")
               + _element(0x0800, b"\x01\x01") + _element(0x1000, native._uid_bytes(ODD_UID)))  # fmt: skip
    wire = Wire()
    wire.feed(_command_pdu(command))
    [error] = _errors(wire)
    assert "without its Message ID (0000,0110)" in error


def test_a_data_set_fragment_without_a_command_is_a_clear_error():
    pdv = (4).to_bytes(4, "big") + bytes([1, 0x02]) + b"\x00\x00"
    wire = Wire()
    wire.feed(bytes([native.P_DATA, 0]) + len(pdv).to_bytes(4, "big") + pdv)
    [error] = _errors(wire)
    assert "a data set fragment before its command set" in error
