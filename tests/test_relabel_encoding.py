"""The store path's encoder splices: what relabeling did not touch is copied
byte for byte, and the result equals re-encoding the whole dataset."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dqr.model import Labels, ReceivedInstance, Series, Study
from dqr.part10 import dataset_offset
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, encode, generate_cohort
from dqr.relabel import RelabelContext, _encode_whole, decode, encode_part10


def received_from(dataset: Dataset, transfer_syntax: str) -> ReceivedInstance:
    dataset.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return ReceivedInstance(dataset.SOPClassUID, dataset.SOPInstanceUID, transfer_syntax, data[dataset_offset(data) :])


def relabel(received: ReceivedInstance, extra=None):
    decoded = decode(received)
    context = RelabelContext(decoded.dataset, Labels("Subj1", "Sess1", True, True), Study("1"), Series("1", "2"))
    for keyword in ("PatientName", "PatientID", "StudyID", "AccessionNumber"):
        context.set(keyword, "Subj1" if keyword.startswith("Patient") else "Sess1")
    if extra:
        extra(decoded.dataset)
    return decoded


def first_instance() -> Dataset:
    return next(generate_cohort(CohortSpec(patients=1, studies_per_patient=1, instances_per_series=1)))


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_splicing_equals_re_encoding_the_whole_dataset(syntax):
    received = received_from(first_instance(), syntax)
    spliced = encode_part10(relabel(received), received)
    whole = _encode_whole(relabel(received).dataset, received)
    assert spliced == whole


def test_untouched_pixel_data_is_copied_byte_for_byte():
    original = first_instance()
    received = received_from(original, ExplicitVRLittleEndian)
    stored = pydicom.dcmread(BytesIO(encode_part10(relabel(received), received)))
    assert stored.PixelData == original.PixelData and str(stored.PatientName) == "Subj1"


def test_a_sequence_and_encapsulated_pixel_data_survive_splicing():
    dataset = first_instance()
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-A0100", "SRT", "Brain"
    dataset.AnatomicRegionSequence = Sequence([item])
    dataset.PixelData = encapsulate([b"\xff\xd8frame\xff\xd9" + b"\0"])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    received = received_from(dataset, JPEGBaseline8Bit)
    received = ReceivedInstance(received.sop_class_uid, received.sop_instance_uid, JPEGBaseline8Bit, received.dataset)
    stored = pydicom.dcmread(BytesIO(encode_part10(relabel(received), received)))
    assert stored.AnatomicRegionSequence[0].CodeMeaning == "Brain"
    assert stored.PixelData == dataset.PixelData and stored.PatientID == "Subj1"


def test_an_element_a_hook_adds_or_deletes_is_spliced_in_or_out():
    received = received_from(first_instance(), ExplicitVRLittleEndian)

    def edit(dataset):
        dataset.PatientIdentityRemoved = "YES"
        del dataset.ReferringPhysicianName

    stored = pydicom.dcmread(BytesIO(encode_part10(relabel(received, edit), received)))
    assert stored.PatientIdentityRemoved == "YES" and "ReferringPhysicianName" not in stored


def test_a_stale_group_length_of_a_changed_group_is_dropped():
    dataset = first_instance()
    dataset.add_new(0x00100000, "UL", 999)
    received = received_from(dataset, ExplicitVRLittleEndian)
    stored = pydicom.dcmread(BytesIO(encode_part10(relabel(received), received)))
    assert 0x00100000 not in stored


def test_the_synthetic_encoder_round_trips():
    dataset = first_instance()
    assert pydicom.dcmread(BytesIO(encode(dataset))).SOPInstanceUID == dataset.SOPInstanceUID


def test_raw_text_reads_a_uid_without_converting_the_element():
    from pydicom.dataelem import RawDataElement

    from dqr.relabel import raw_text

    original = first_instance()
    decoded = decode(received_from(original, ExplicitVRLittleEndian))
    assert raw_text(decoded, 0x0020000E) == original.SeriesInstanceUID
    assert isinstance(decoded.dataset._dict[0x0020000E], RawDataElement)  # still copied verbatim when splicing
    assert raw_text(decoded, 0x00181030) is None
