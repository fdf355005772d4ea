"""The memory backend: queries and retrieves straight from a MemoryPacs."""

from __future__ import annotations

from collections.abc import Iterator

from dqr.backend import StoreCallback
from dqr.config import Limits
from dqr.model import (
    Instance,
    ReceivedInstance,
    RetrieveReport,
    RetrieveRequest,
    Series,
    Study,
    StudyQuery,
    StudyRetrieveRequest,
    series_from_attributes,
    study_from_attributes,
)
from dqr.plugins.testpacs.memory.hostile import HostileFaults, deliveries
from dqr.plugins.testpacs.memory.pacs import MemoryPacs
from dqr.throttle import Deadline


class MemoryBackend:
    """A :class:`dqr.backend.Backend` over an in-process :class:`MemoryPacs`."""

    def __init__(self, pacs: MemoryPacs, hostile: HostileFaults | None = None, limits: Limits | None = None) -> None:
        self.pacs = pacs
        self.hostile = hostile
        self.limits = limits or Limits()

    def echo(self) -> str:
        return f"in-memory PACS with {len(self.pacs)} instances of {len(self.pacs.study_uids())} studies"

    def query_studies(self, query: StudyQuery) -> Iterator[Study]:
        for attributes in self.pacs.find("STUDY", query.filters):
            yield study_from_attributes(attributes)

    def query_series(self, study: Study) -> Iterator[Series]:
        for a in self.pacs.find("SERIES", {"StudyInstanceUID": study.study_uid}):
            uids = tuple(i.sop_instance_uid for i in self.pacs.instances(study.study_uid, a["SeriesInstanceUID"]))
            yield series_from_attributes(
                study.study_uid, a, frozenset(a["SOPClassesInSeries"]), frozenset(a["TransferSyntaxesInSeries"]), uids
            )

    def query_instances(self, study: Study, series: Series) -> Iterator[Instance]:
        for stored in self.pacs.instances(study.study_uid, series.series_uid):
            yield Instance(series.series_uid, stored.sop_instance_uid, stored.sop_class_uid, stored.transfer_syntax)

    def retrieve(self, request: RetrieveRequest, store: StoreCallback) -> RetrieveReport:
        asked = list(self.pacs.instances(request.study.study_uid, request.series.series_uid, request.sop_instance_uids))
        served = deliveries(self.pacs, self.hostile, request.study.study_uid, request.series.series_uid, asked)
        return self._deliver(served, store, f"retrieve of series {request.series.series_uid}")

    def retrieve_study(self, request: StudyRetrieveRequest, store: StoreCallback) -> RetrieveReport:
        asked = list(self.pacs.instances(request.study.study_uid))
        served = deliveries(self.pacs, self.hostile, request.study.study_uid, None, asked)
        return self._deliver(served, store, f"retrieve of study {request.study.study_uid}")

    def _deliver(self, served, store: StoreCallback, what: str) -> RetrieveReport:
        deadline = Deadline(self.limits.retrieve_timeout, "retrieve_timeout")
        completed = 0
        for stored in served:
            deadline.check(what)
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
