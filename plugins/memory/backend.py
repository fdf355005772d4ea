"""The memory backend: queries and retrieves straight from a MemoryPacs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dqr.backend import StoreCallback
from dqr.model import (
    Instance,
    ReceivedInstance,
    RetrieveReport,
    RetrieveRequest,
    Series,
    Study,
    StudyQuery,
)
from dqr.plugins.memory.pacs import MemoryPacs


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def study_from_attributes(attributes: dict[str, Any]) -> Study:
    """A :class:`Study` from a study-level answer (keyword -> value)."""
    modalities = attributes.get("ModalitiesInStudy", ())
    if isinstance(modalities, str):
        modalities = tuple(m for m in modalities.split("\\") if m)
    return Study(
        study_uid=attributes["StudyInstanceUID"],
        patient_id=attributes.get("PatientID", ""),
        patient_name=attributes.get("PatientName", ""),
        patient_birth_date=attributes.get("PatientBirthDate", ""),
        study_date=attributes.get("StudyDate", ""),
        accession_number=attributes.get("AccessionNumber", ""),
        modalities=tuple(modalities),
        study_description=attributes.get("StudyDescription", ""),
        study_id=attributes.get("StudyID", ""),
        n_series=_int(attributes.get("NumberOfStudyRelatedSeries")),
        n_instances=_int(attributes.get("NumberOfStudyRelatedInstances")),
    )


class MemoryBackend:
    """A :class:`dqr.backend.Backend` over an in-process :class:`MemoryPacs`."""

    def __init__(self, pacs: MemoryPacs) -> None:
        self.pacs = pacs

    def echo(self) -> str:
        return f"in-memory PACS with {len(self.pacs)} instances of {len(self.pacs.study_uids())} studies"

    def query_studies(self, query: StudyQuery) -> Iterator[Study]:
        for attributes in self.pacs.find("STUDY", query.filters):
            yield study_from_attributes(attributes)

    def query_series(self, study: Study) -> Iterator[Series]:
        for a in self.pacs.find("SERIES", {"StudyInstanceUID": study.study_uid}):
            yield Series(
                study_uid=study.study_uid,
                series_uid=a["SeriesInstanceUID"],
                modality=a["Modality"],
                description=a["SeriesDescription"],
                number=a["SeriesNumber"],
                n_instances=_int(a["NumberOfSeriesRelatedInstances"]),
                sop_class_uids=frozenset(a["SOPClassesInSeries"]),
                transfer_syntaxes=frozenset(a["TransferSyntaxesInSeries"]),
            )

    def query_instances(self, study: Study, series: Series) -> Iterator[Instance]:
        for stored in self.pacs.instances(study.study_uid, series.series_uid):
            yield Instance(series.series_uid, stored.sop_instance_uid, stored.sop_class_uid, stored.transfer_syntax)

    def retrieve(self, request: RetrieveRequest, store: StoreCallback) -> RetrieveReport:
        completed = 0
        for stored in self.pacs.instances(request.study.study_uid, request.series.series_uid, request.sop_instance_uids):
            store(
                ReceivedInstance(
                    sop_class_uid=stored.sop_class_uid,
                    sop_instance_uid=stored.sop_instance_uid,
                    transfer_syntax=stored.transfer_syntax,
                    dataset=stored.read_dataset(),
                )
            )
            completed += 1
        return RetrieveReport(completed=completed, failed=0, warning=0)

    def close(self) -> None:
        pass
