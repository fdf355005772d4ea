"""The native transport's C-STORE-RSP, encoded directly, is the PDU
pynetdicom's encoder makes, and pynetdicom decodes it back."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from dqr.plugins.dimse.native import store_response_pdu

MR = "1.2.840.10008.5.1.4.1.1.4"  # odd length: padded with a NUL
CT = "1.2.840.10008.5.1.4.1.1.2"


def by_pynetdicom(context_id, message_id, sop_class, sop_instance, status) -> bytes:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    primitive.Status = status
    response = C_STORE_RSP()
    response.primitive_to_message(primitive)
    return b"".join(P_DATA_TF(p).encode() for p in response.encode_msg(context_id, 16382))


@pytest.mark.parametrize(
    "context_id, message_id, sop_class, sop_instance, status",
    [
        (1, 1, MR, "1.2.3.4", 0x0000),
        (3, 65535, CT, "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901", 0xA700),
        (255, 42, MR, "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012", 0xC001),
    ],
)
def test_the_response_is_the_pdu_pynetdicom_encodes(context_id, message_id, sop_class, sop_instance, status):
    ours = store_response_pdu(context_id, message_id, sop_class, sop_instance, status)
    assert ours == by_pynetdicom(context_id, message_id, sop_class, sop_instance, status)


def test_pynetdicom_decodes_the_response():
    pdu = P_DATA_TF()
    pdu.decode(store_response_pdu(5, 9, CT, "1.2.3.4.5", 0xB000))
    message = DIMSEMessage()
    assert message.decode_msg(pdu.to_primitive())
    command = message.command_set
    assert (command.CommandField, command.MessageIDBeingRespondedTo, command.Status) == (0x8001, 9, 0xB000)
    assert (command.AffectedSOPClassUID, command.AffectedSOPInstanceUID) == (CT, "1.2.3.4.5")
    assert message.context_id == 5
