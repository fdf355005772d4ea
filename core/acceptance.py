"""Which arriving instances a retrieval accepts.

A PACS may send more than was asked (an instance of another study carrying
the requested SeriesInstanceUID, an instance nobody asked for) or name an
instance with a value that is no UID -- which would become a file name. An
instance is accepted only when its Study, Series and SOP Instance UIDs are
the request's: the study and series asked for, a SOP Instance UID that is a
UID, the one the sender announced, and one of the series' expected instances
when those are known. Everything else is refused, with a reason that names
UIDs only (no patient data), and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from dqr.errors import UntrustedValueError
from dqr.model import ReceivedInstance, RetrieveRequest
from dqr.relabel import DecodedInstance, raw_text
from dqr.uids import check_uid, quoted

log = logging.getLogger("dqr.acceptance")

STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018


@dataclass(frozen=True)
class ArrivalUids:
    """The UIDs an arriving instance carries (``None``: absent)."""

    announced: str
    """The SOP Instance UID the sender gave (C-STORE Affected SOP Instance
    UID, or the dataset's own): it names the file."""
    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None


def arrival_uids(decoded: DecodedInstance, received: ReceivedInstance) -> ArrivalUids:
    """The UIDs of a decoded arrival, read from its raw bytes."""
    return ArrivalUids(
        announced=received.sop_instance_uid,
        study_uid=raw_text(decoded, STUDY_INSTANCE_UID),
        series_uid=raw_text(decoded, SERIES_INSTANCE_UID),
        sop_instance_uid=raw_text(decoded, SOP_INSTANCE_UID),
    )


def check_arrival(
    arrival: ArrivalUids, request: RetrieveRequest, expected: Collection[str] | None = None
) -> str | None:
    """Why ``arrival`` is refused for ``request``, or ``None`` when accepted.

    ``expected``: every SOP Instance UID of the series, when known (defaults
    to the request's own ``sop_instance_uids``).
    """
    uid = arrival.announced
    problem = check_uid(uid)
    if problem:
        return f"an arriving instance's SOPInstanceUID {problem}"
    if arrival.sop_instance_uid != uid:
        return f"instance {uid} carries SOPInstanceUID {quoted(arrival.sop_instance_uid or '')}"
    if arrival.study_uid != request.study.study_uid:
        return (
            f"instance {uid} is of study {quoted(arrival.study_uid or '')}, not of the requested study "
            f"{request.study.study_uid}"
        )
    if arrival.series_uid != request.series.series_uid:
        return (
            f"instance {uid} is of series {quoted(arrival.series_uid or '')}, not of the requested series "
            f"{request.series.series_uid}"
        )
    wanted = expected if expected is not None else request.sop_instance_uids
    if wanted is not None and uid not in wanted:
        return f"instance {uid} was not requested: it is not among the instances of series {request.series.series_uid}"
    return None


def accept_arrival(
    decoded: DecodedInstance, received: ReceivedInstance, request: RetrieveRequest, expected: Collection[str] | None = None
) -> None:
    """Raise :class:`UntrustedValueError` (and log it) unless the arrival is accepted."""
    problem = check_arrival(arrival_uids(decoded, received), request, expected)
    if problem:
        log.warning("refused an arriving instance: %s", problem)
        raise UntrustedValueError(f"refused: {problem}")
