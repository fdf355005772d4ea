"""The store path's own decoder and plain-text relabeling give what pydicom
gives: the same raw elements, the same original values, the same bytes."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dqr.model import Labels, ReceivedInstance, Series, Study
from dqr.part10 import dataset_offset
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort
from dqr.relabel import RelabelContext, decode, encode_part10

SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
LABELS = {"PatientName": "Subj1", "PatientID": "Subj1", "StudyID": "Sess1", "AccessionNumber": "Sess1"}


def instance(**values) -> Dataset:
    dataset = next(generate_cohort(CohortSpec(patients=1, studies_per_patient=1, instances_per_series=1)))
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    return dataset


def received_from(dataset: Dataset, syntax: str) -> ReceivedInstance:
    dataset.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return ReceivedInstance(dataset.SOPClassUID, dataset.SOPInstanceUID, syntax, data[dataset_offset(data) :])


def relabeled(received: ReceivedInstance, labels=LABELS) -> tuple[bytes, dict[str, str]]:
    decoded = decode(received)
    context = RelabelContext(decoded.dataset, Labels("Subj1", "Sess1", True, True), Study("1"), Series("1", "2"))
    for keyword, value in labels.items():
        context.set(keyword, value)
    return encode_part10(decoded, received), context.replaced


def by_pydicom(received: ReceivedInstance, labels=LABELS) -> tuple[bytes, dict[str, str]]:
    """The same relabeling done the plain pydicom way: the dataset's bytes and what was replaced."""
    syntax = pydicom.uid.UID(received.transfer_syntax)
    dataset = read_dataset(BytesIO(received.dataset), syntax.is_implicit_VR, True)
    replaced = {}
    for keyword, value in labels.items():
        original = str(dataset.get(keyword, ""))
        if original != value:
            replaced[keyword] = original
            setattr(dataset, keyword, value)
    buffer = pydicom.filebase.DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = syntax.is_implicit_VR, True
    pydicom.filewriter.write_dataset(buffer, dataset)
    return buffer.getvalue(), replaced


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_the_decoder_makes_the_raw_elements_pydicom_makes(syntax):
    received = received_from(instance(ReferringPhysicianName="", StudyDescription=""), syntax)
    ours = decode(received).dataset._dict
    theirs = read_dataset(BytesIO(received.dataset), syntax == ImplicitVRLittleEndian, True)._dict
    assert list(ours.items()) == list(theirs.items())


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_relabeling_plain_text_gives_pydicoms_bytes_and_original_values(syntax):
    received = received_from(instance(PatientName="DOE^JANE", AccessionNumber="A1 "), syntax)
    part10, replaced = relabeled(received)
    expected, expected_replaced = by_pydicom(received)
    assert part10[dataset_offset(part10) :] == expected
    assert replaced == expected_replaced and replaced["PatientName"] == "DOE^JANE"


@pytest.mark.parametrize(
    "values, labels",
    [
        ({"PatientName": "MÜLLER^JÖRG", "SpecificCharacterSet": "ISO_IR 100"}, LABELS),  # original not ASCII
        ({"SpecificCharacterSet": "ISO_IR 192"}, {**LABELS, "PatientName": "Ünal"}),  # label not ASCII
        ({"PatientID": "A\\B"}, LABELS),  # two values
        ({"SpecificCharacterSet": "ISO 2022 IR 87"}, LABELS),  # code extensions
    ],
    ids=["latin1-original", "utf8-label", "multi-valued", "iso2022"],
)
def test_values_that_are_not_plain_ascii_are_relabeled_as_pydicom_does(values, labels):
    received = received_from(instance(**values), ExplicitVRLittleEndian)
    part10, replaced = relabeled(received, labels)
    expected, expected_replaced = by_pydicom(received, labels)
    assert part10[dataset_offset(part10) :] == expected
    assert replaced == expected_replaced


def test_a_value_already_equal_to_the_label_is_not_replaced():
    received = received_from(instance(PatientID="Subj1"), ExplicitVRLittleEndian)
    _, replaced = relabeled(received)
    assert "PatientID" not in replaced


def test_a_hook_reads_the_value_it_set():
    received = received_from(instance(), ExplicitVRLittleEndian)
    decoded = decode(received)
    context = RelabelContext(decoded.dataset, Labels("S", "E", True, True), Study("1"), Series("1", "2"))
    context.set("PatientName", "Subj1")
    assert str(decoded.dataset.PatientName) == "Subj1"


def test_a_truncated_dataset_is_left_to_pydicom():
    received = received_from(instance(), ExplicitVRLittleEndian)
    cut = ReceivedInstance(received.sop_class_uid, received.sop_instance_uid, received.transfer_syntax,
                           received.dataset[:-3])
    theirs = read_dataset(BytesIO(cut.dataset), False, True)._dict
    assert list(decode(cut).dataset._dict.items()) == list(theirs.items())
