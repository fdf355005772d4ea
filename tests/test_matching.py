"""DICOM matching semantics of the in-memory PACS (PS3.4 C.2.2.2)."""

from __future__ import annotations

import pytest

from dqr.matching import matches
from dqr.model import StudyQuery
from dqr.plugins.testpacs.memory.backend import MemoryBackend


def test_an_empty_key_matches_everything():
    assert matches("PatientID", "", "P1") and matches("PatientID", "*", "")


def test_single_value_matching_is_exact():
    assert matches("AccessionNumber", "A1", "A1") and not matches("AccessionNumber", "A1", "A12")


def test_single_value_matching_is_case_sensitive_except_for_names():
    assert not matches("StudyDescription", "mr brain", "MR BRAIN")
    assert matches("PatientName", "doe^jane", "DOE^JANE")


@pytest.mark.parametrize(
    "pattern,value,expected",
    [("DOE*", "DOE^JANE", True), ("*JANE", "DOE^JANE", True), ("D?E^JANE", "DOE^JANE", True),
     ("D?E", "DOOE", False), ("*", "", True), ("A*B", "AxxB", True), ("A*B", "AxxBx", False)],
)
def test_wildcards_star_and_question_mark(pattern, value, expected):
    assert matches("PatientName", pattern, value) is expected


def test_wildcard_characters_of_regular_expressions_are_literal():
    assert not matches("PatientID", "P.1", "PX1") and matches("PatientID", "P.1", "P.1")


@pytest.mark.parametrize(
    "pattern,value,expected",
    [("20210301-20210331", "20210315", True), ("20210301-20210331", "20210331", True),
     ("20210301-20210331", "20210401", False), ("-20210331", "19990101", True), ("20210301-", "20990101", True),
     ("20210301", "20210301", True), ("20210301-", "", False)],
)
def test_date_range_matching_is_inclusive(pattern, value, expected):
    assert matches("StudyDate", pattern, value) is expected


def test_uid_list_matches_any_uid_in_the_list():
    assert matches("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.4")
    assert not matches("StudyInstanceUID", "1.2.3\\1.2.4", "1.2.5")


def test_a_multi_valued_attribute_matches_when_any_value_does():
    assert matches("ModalitiesInStudy", "PT", ("CT", "PT"))
    assert not matches("ModalitiesInStudy", "MR", ("CT", "PT"))


# -- the memory PACS answers with these semantics -------------------------------------


def accessions(cohort, **filters) -> set[str]:
    backend = MemoryBackend(cohort)
    return {s.accession_number for s in backend.query_studies(StudyQuery(line=2, filters=filters))}


def test_memory_pacs_combines_filters_with_and(cohort):
    assert accessions(cohort, PatientID="PAT00001", ModalitiesInStudy="PT") == {"0425454454"}


def test_memory_pacs_matches_non_ascii_names_case_insensitively(cohort):
    assert accessions(cohort, PatientName="müller*") == {"0313301265", "0323382483"}


def test_memory_pacs_answers_study_counts(cohort):
    backend = MemoryBackend(cohort)
    [study] = backend.query_studies(StudyQuery(2, {"AccessionNumber": "0425454454"}))
    assert (study.n_series, study.n_instances, study.modalities) == (2, 6, ("CT", "PT"))


def test_synthetic_cohort_uids_are_unique_in_a_large_cohort():
    from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort

    datasets = list(generate_cohort(CohortSpec(patients=25, studies_per_patient=2, instances_per_series=12)))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        per_parent = {}
        for ds in datasets:
            per_parent.setdefault(getattr(ds, keyword), set()).add(
                (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)[
                    ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID").index(keyword) - 1
                ]
            )
        assert all(len(parents) == 1 for parents in per_parent.values()), keyword
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
