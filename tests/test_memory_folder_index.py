"""The memory PACS indexes a folder of files without parsing each with
pydicom, and what it indexes is what pydicom reads: plain text as stored,
anything else converted by pydicom."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian

from dqr.plugins.testpacs.memory.pacs import MemoryPacs, _index
from dqr.plugins.testpacs.memory.synthetic import CohortSpec, encode, generate_cohort, write_cohort


def edited(dataset, **values):
    changed = copy.deepcopy(dataset)
    for keyword, value in values.items():
        setattr(changed, keyword, value)
    changed.SOPInstanceUID = pydicom.uid.generate_uid()
    return changed


@pytest.fixture
def folder(tmp_path):
    """A synthetic cohort, files whose values are not plain ASCII text, an
    implicit-VR file, and a file that is not DICOM."""
    write_cohort(CohortSpec(patients=2), tmp_path)
    first = next(iter(generate_cohort(CohortSpec(patients=1))))
    unusual = {
        "latin1.dcm": edited(first, SpecificCharacterSet="ISO_IR 100", PatientName="Müller^Jürgen"),
        "leading-space.dcm": edited(first, StudyDescription=" leading space"),
        "multi-valued.dcm": edited(first, StudyDescription=["one", "two"]),
        "odd-uid.dcm": edited(first, StudyInstanceUID="1.2.3.45"),
        "numbers.dcm": edited(first, SeriesNumber="007", InstanceNumber=" 12"),
    }
    implicit = edited(first)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    unusual["implicit.dcm"] = implicit
    for name, dataset in unusual.items():
        (tmp_path / name).write_bytes(encode(dataset))
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    return tmp_path


def test_a_folder_is_indexed_as_pydicom_reads_each_file(folder):
    pacs = MemoryPacs.from_folder(folder)
    expected = {}
    for path in folder.rglob("*.dcm"):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        expected[dataset.SOPInstanceUID] = _index(dataset)
    assert {uid: instance.attributes for uid, instance in pacs._instances.items()} == expected
    assert len(expected) == len(list(generate_cohort(CohortSpec(patients=2)))) + 6
