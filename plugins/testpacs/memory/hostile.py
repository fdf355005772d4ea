"""A PACS that misbehaves on purpose: hostile *content*, for the tests that
prove dqr trusts nothing a PACS sends. (Transport faults -- delays, rejects,
aborts, HTTP errors -- are the servers' own ``faults``; these are in their
own model so both kinds combine.)

The faults apply to the first series of each targeted study (``accession``,
or every study):

- ``study_uid``: the study is served -- in query answers and in its
  instances -- with this StudyInstanceUID;
- ``series_uid`` / ``sop_uid``: that series is served with this
  SeriesInstanceUID, its first instance with this SOPInstanceUID
  (``../../../../x``, ``/tmp/x``, 65 digits, ``1.02.3``...).
- ``foreign_study``: retrieving that series also delivers an instance of
  another study, carrying the requested SeriesInstanceUID.
- ``unrequested_instance``: ... also delivers an instance of the series
  with a SOP Instance UID no query announced.
- ``twin``: ... first delivers a copy of its first instance with other
  content (zeroed pixel data) under the same UIDs.

Used by the memory backend (``hostile:`` in a memory source) and by the
mock DIMSE and DICOMweb servers (``faults.hostile``).
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:  # pydicom stays out of `dqr --help`: the model is part of the memory source config
    from dqr.plugins.testpacs.memory.pacs import MemoryPacs, StoredInstance


class HostileFaults(BaseModel):
    """Hostile content a PACS serves (see :mod:`dqr.plugins.testpacs.memory.hostile`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    accession: str | None = Field(None, description="AccessionNumber of the study altered; None: every study")
    study_uid: str | None = Field(None, description="StudyInstanceUID the study is served with")
    series_uid: str | None = Field(None, description="SeriesInstanceUID its first series is served with")
    sop_uid: str | None = Field(None, description="SOPInstanceUID the first instance of that series is served with")
    foreign_study: bool = Field(False, description="also deliver another study's instance carrying that series' UID")
    unrequested_instance: bool = Field(False, description="also deliver an instance no query announced")
    twin: bool = Field(False, description="first deliver a copy of its first instance with zeroed pixels")

    @property
    def rewrites(self) -> bool:
        return self.study_uid is not None or self.series_uid is not None or self.sop_uid is not None

    @property
    def adds(self) -> bool:
        return self.foreign_study or self.unrequested_instance or self.twin


def _altered(instance: StoredInstance, **values: object) -> StoredInstance:
    """A copy of ``instance`` with some elements set -- to values that need
    not be valid: that is the point."""
    from pydicom import config as pydicom_config
    from pydicom import dcmread

    from dqr.plugins.testpacs.memory.pacs import StoredInstance, _index

    dataset = dcmread(BytesIO(instance.read_part10()))
    with pydicom_config.disable_value_validation():
        for keyword, value in values.items():
            if keyword == "PixelData":
                dataset.PixelData = value
            else:
                setattr(dataset, keyword, value)
                if keyword == "SOPInstanceUID":
                    dataset.file_meta.MediaStorageSOPInstanceUID = value
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
    return StoredInstance(_index(dataset), instance.transfer_syntax, part10=buffer.getvalue())


def unrequested_uid(sop_instance_uid: str) -> str:
    """The SOP Instance UID of the unrequested instance added beside ``sop_instance_uid``."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[sop_instance_uid, "unrequested"]))


def _targets(pacs: MemoryPacs, faults: HostileFaults) -> list[tuple[str, str]]:
    """(study, first series) pairs the faults apply to."""
    targets = []
    for study_uid in pacs.study_uids():
        instances = list(pacs.instances(study_uid))
        if not instances:
            continue
        if faults.accession is not None and instances[0].attributes["AccessionNumber"] != faults.accession:
            continue
        targets.append((study_uid, instances[0].series_uid))
    return targets


def rewrite(pacs: MemoryPacs, faults: HostileFaults | None) -> MemoryPacs:
    """``pacs`` as served with the UID faults: a new PACS when there are
    some (``pacs`` itself is left alone: it may be shared)."""
    from dqr.plugins.testpacs.memory.pacs import MemoryPacs

    if faults is None or not faults.rewrites:
        return pacs
    targets = set(_targets(pacs, faults))
    studies = {study for study, _ in targets}
    served = MemoryPacs()
    for study_uid in pacs.study_uids():
        first_in_series = True
        for instance in pacs.instances(study_uid):
            values: dict[str, object] = {}
            if faults.study_uid is not None and study_uid in studies:
                values["StudyInstanceUID"] = faults.study_uid
            if (study_uid, instance.series_uid) in targets:
                if faults.series_uid is not None:
                    values["SeriesInstanceUID"] = faults.series_uid
                if faults.sop_uid is not None and first_in_series:
                    values["SOPInstanceUID"] = faults.sop_uid
                first_in_series = False
            served.add(_altered(instance, **values) if values else instance)
    return served


def deliveries(
    pacs: MemoryPacs, faults: HostileFaults | None, study_uid: str, series_uid: str | None, asked: list[StoredInstance]
) -> list[StoredInstance]:
    """What a retrieval of ``asked`` (from ``study_uid``/``series_uid``)
    delivers: ``asked`` plus the hostile additions where they apply."""
    if faults is None or not faults.adds or not asked:
        return asked
    firsts = dict(_targets(pacs, faults))
    if study_uid not in firsts or (series_uid is not None and series_uid != firsts[study_uid]):
        return asked
    first = asked[0]
    served = list(asked)
    if faults.twin:
        from pydicom import dcmread

        zeros = bytes(len(dcmread(BytesIO(first.read_part10())).PixelData))
        served.insert(0, _altered(first, PixelData=zeros))
    if faults.foreign_study:
        # Of the same SOP class: a C-GET requestor accepts only the classes it expects.
        strangers = (
            instance for other in pacs.study_uids() if other != study_uid
            for instance in pacs.instances(other) if instance.sop_class_uid == first.sop_class_uid
        )
        stranger = next(strangers, None)
        if stranger is not None:
            served.append(_altered(stranger, SeriesInstanceUID=first.series_uid))
    if faults.unrequested_instance:
        served.append(_altered(first, SOPInstanceUID=unrequested_uid(first.sop_instance_uid)))
    return served
