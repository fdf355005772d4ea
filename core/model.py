"""Plain data types shared by every layer: CSV rows, queries, query answers,
retrieval requests and received instances.

They carry strings exactly as DICOM has them (dates as ``YYYYMMDD``, lists
joined by ``\\``) so that nothing is lost or reinterpreted between the CSV,
the PACS and the archive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

#: CSV search header -> DICOM keyword queried at study level (the reference's table).
SEARCH_HEADERS: Mapping[str, str] = {
    "Accession Number": "AccessionNumber",
    "Study Date": "StudyDate",
    "Patient ID": "PatientID",
    "Patient Name": "PatientName",
    "DOB": "PatientBirthDate",
    "Modality": "ModalitiesInStudy",
    "Study Instance UID": "StudyInstanceUID",
}
#: Headers combined into Patient Name as ``LAST^FIRST``.
NAME_PART_HEADERS = ("Last Name", "First Name")
#: Relabeling headers.
REMAP_HEADERS = ("Subject", "Session")

#: Keywords whose values are dates (range matching, no wildcards, no lists).
DATE_KEYWORDS = frozenset({"StudyDate", "PatientBirthDate"})
#: Keywords whose values are UIDs (list matching is standard for these).
UID_KEYWORDS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"})


class RowOutcome(StrEnum):
    """What querying one CSV row gave, per results-table line. The summary
    and ``--json`` count rows by this, never by the ``warning`` text."""

    MATCHED = "matched"
    NO_MATCH = "no match"
    AMBIGUOUS = "ambiguous"
    LABEL_COLLISION = "label collision"
    QUERY_FAILED = "query failed"
    NOT_QUERIED = "not queried"


class RowStatus(StrEnum):
    """A CSV row in the job state: ``pending`` -> ``queried`` | ``failed``."""

    PENDING = "pending"
    QUERIED = "queried"
    FAILED = "failed"


class StudyStatus(StrEnum):
    """A study in the job state: ``found`` (by a query) -> ``selected`` ->
    ``retrieving`` -> ``stored`` | ``failed`` | ``nothing selected`` (every
    series excluded: not stored, a wider filter fetches it later)."""

    FOUND = "found"
    SELECTED = "selected"
    RETRIEVING = "retrieving"
    STORED = "stored"
    FAILED = "failed"
    NOTHING_SELECTED = "nothing selected"


class SeriesStatus(StrEnum):
    """A series in the job state: ``pending`` -> ``retrieving`` -> ``stored``
    | ``failed``; ``excluded`` by the series filter."""

    PENDING = "pending"
    RETRIEVING = "retrieving"
    STORED = "stored"
    FAILED = "failed"
    EXCLUDED = "excluded"


@dataclass(frozen=True)
class RowQuery:
    """One validated CSV data row.

    ``filters`` maps DICOM keywords to the row's values, which may still hold
    ``\\``-separated lists; :func:`dqr.planner.plan_queries` fans those out.
    """

    line: int
    filters: Mapping[str, str]
    subject: str | None = None
    session: str | None = None


@dataclass
class StudyQuery:
    """A single study-level query as sent to a backend.

    ``filters`` maps DICOM keywords to DICOM match values: single values,
    ``*``/``?`` wildcards, date ranges (``A-B``, ``-B``, ``A-``), and -- only
    for UID keywords -- ``\\``-separated lists. Plugins may edit ``filters``
    in place from :func:`dqr.hookspecs.dqr_prepare_study_query`.
    """

    line: int
    filters: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    """Things a backend wants the user to know about this query's answer
    (e.g. zero matches for a value some servers mishandle). They go into the
    results table's ``warning`` column; never put patient data in them."""


@dataclass(frozen=True)
class Study:
    """One study as a study-level query answered it.

    Counts are ``None`` when the PACS did not return them.
    """

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    study_date: str = ""
    accession_number: str = ""
    modalities: tuple[str, ...] = ()
    study_description: str = ""
    study_id: str = ""
    n_series: int | None = None
    n_instances: int | None = None


@dataclass(frozen=True)
class Series:
    """One series of a study, from a series-level query.

    ``sop_class_uids`` and ``transfer_syntaxes`` are what the backend learnt
    about the series' instances, when it could (C-GET needs them to propose
    storage presentation contexts); empty when unknown.
    """

    study_uid: str
    series_uid: str
    modality: str = ""
    description: str = ""
    number: str = ""
    n_instances: int | None = None
    sop_class_uids: frozenset[str] = frozenset()
    transfer_syntaxes: frozenset[str] = frozenset()
    instance_uids: tuple[str, ...] | None = None
    """The series' SOP Instance UIDs when the series query learnt them (e.g.
    from one image-level query per study); ``None`` when unknown, and the
    engine then asks :meth:`dqr.backend.Backend.query_instances`."""


@dataclass(frozen=True)
class Instance:
    """One instance from an image-level query."""

    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ""
    transfer_syntax: str = ""


@dataclass(frozen=True)
class RetrieveRequest:
    """Retrieve one series, or only ``sop_instance_uids`` of it when set
    (a resumed retrieval asks only for what is missing)."""

    study: Study
    series: Series
    sop_instance_uids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ReceivedInstance:
    """An instance as it arrived, still encoded.

    ``dataset`` is the encoded dataset *without* preamble and file meta
    information, in ``transfer_syntax``. Keeping the bytes lets the store
    path relabel a few elements without decoding the pixel data.
    """

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: bytes


@dataclass
class RetrieveReport:
    """What a backend says about a finished retrieval.

    ``completed``/``failed``/``warning`` are the remote's own sub-operation
    counts when it gives them (C-GET/C-MOVE), else ``None``. The engine judges
    completeness by what actually arrived, not by these.
    """

    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    messages: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Labels:
    """The subject and session labels a study is stored (and relabeled) under.

    ``relabel_subject``/``relabel_session`` say whether the label came from
    the user (CSV or edited results table) and so must be written into the
    DICOM; a label derived from the study's own tags only names directories.
    """

    subject: str
    session: str
    relabel_subject: bool = False
    relabel_session: bool = False


#: Study-level attributes every backend asks for: what the results table shows.
STUDY_KEYWORDS = (
    "StudyInstanceUID",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyDate",
    "AccessionNumber",
    "ModalitiesInStudy",
    "StudyDescription",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
#: Series-level attributes every backend asks for.
SERIES_KEYWORDS = ("SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber", "NumberOfSeriesRelatedInstances")


def _count(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _multi(value: object) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("\\") if v)
    return tuple(str(v) for v in value if str(v))  # type: ignore[attr-defined]


def study_from_attributes(attributes: Mapping[str, object]) -> Study:
    """A :class:`Study` from a study-level answer given as keyword -> value
    (strings; a multi-valued attribute as a ``\\``-joined string or a
    sequence; counts as text). Backends turn their answers into this."""

    def text(keyword: str) -> str:
        value = attributes.get(keyword)
        return "" if value is None else str(value)

    return Study(
        study_uid=text("StudyInstanceUID"),
        patient_id=text("PatientID"),
        patient_name=text("PatientName"),
        patient_birth_date=text("PatientBirthDate"),
        study_date=text("StudyDate"),
        accession_number=text("AccessionNumber"),
        modalities=_multi(attributes.get("ModalitiesInStudy")),
        study_description=text("StudyDescription"),
        study_id=text("StudyID"),
        n_series=_count(attributes.get("NumberOfStudyRelatedSeries")),
        n_instances=_count(attributes.get("NumberOfStudyRelatedInstances")),
    )


def series_from_attributes(
    study_uid: str,
    attributes: Mapping[str, object],
    sop_class_uids: frozenset[str] = frozenset(),
    transfer_syntaxes: frozenset[str] = frozenset(),
    instance_uids: tuple[str, ...] | None = None,
) -> Series:
    """A :class:`Series` from a series-level answer (see :func:`study_from_attributes`)."""

    def text(keyword: str) -> str:
        value = attributes.get(keyword)
        return "" if value is None else str(value)

    return Series(
        study_uid=study_uid,
        series_uid=text("SeriesInstanceUID"),
        modality=text("Modality"),
        description=text("SeriesDescription"),
        number=text("SeriesNumber"),
        n_instances=_count(attributes.get("NumberOfSeriesRelatedInstances")),
        sop_class_uids=sop_class_uids,
        transfer_syntaxes=transfer_syntaxes,
        instance_uids=instance_uids,
    )
