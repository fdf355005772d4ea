"""The store path's middle step: decode what relabeling needs, let the
``dqr_relabel`` hooks change it, and encode a Part-10 file.

Only element headers are parsed; values (pixel data above all) stay raw
bytes unless a hook touches them, so they are written back byte-identical.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID

from dqr.model import Labels, ReceivedInstance, Series, Study

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
IMPLEMENTATION_VERSION = "DQR_010"


@dataclass
class RelabelContext:
    """One received instance on its way to the destination.

    Hooks change elements with :meth:`set`, which keeps the first original
    value of each keyword in ``replaced`` (the manifest's provenance).
    """

    dataset: Dataset
    labels: Labels
    study: Study
    series: Series
    replaced: dict[str, str] = field(default_factory=dict)

    def set(self, keyword: str, value: Any) -> None:
        """Set ``keyword`` to ``value``, remembering what it was."""
        original = self.dataset.get(keyword, None)
        original_text = "" if original is None else str(original)
        if original_text == str(value):
            return
        self.replaced.setdefault(keyword, original_text)
        setattr(self.dataset, keyword, value)


def decode(received: ReceivedInstance) -> Dataset:
    """Parse the received dataset lazily (element values stay raw)."""
    data = received.dataset
    if received.transfer_syntax == DEFLATED:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    implicit = received.transfer_syntax == IMPLICIT_LITTLE
    little = received.transfer_syntax != EXPLICIT_BIG
    return read_dataset(BytesIO(data), is_implicit_VR=implicit, is_little_endian=little)


def encode_part10(dataset: Dataset, received: ReceivedInstance) -> bytes:
    """The dataset as a Part-10 file in the transfer syntax it arrived in."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(received.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(received.sop_instance_uid)
    meta.TransferSyntaxUID = UID(received.transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    dataset.file_meta = meta
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
