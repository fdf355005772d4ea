"""QIDO-RS queries of the dicomweb backend, against the mock PACS (in its
Orthanc-like mode: no percent-decoding) and against a real Orthanc."""

from __future__ import annotations

import json

import pytest

from dqr.model import Study, StudyQuery
from dqr.plugins.testpacs.memory.synthetic import accession_number


@pytest.fixture(params=["mock", "orthanc"])
def web_url(request, mock_dicomweb_factory) -> str:
    """A DICOMweb server holding the default cohort that, like Orthanc,
    does not percent-decode QIDO values."""
    if request.param == "orthanc":
        return request.getfixturevalue("orthanc").dicomweb_url
    return mock_dicomweb_factory(decode_percent_escapes=False).url


def studies(backend, **filters: str) -> list[Study]:
    return list(backend.query_studies(StudyQuery(line=2, filters=filters)))


def expected_studies(pacs, **filters: str) -> set[str]:
    return {answer["StudyInstanceUID"] for answer in pacs.find("STUDY", filters)}


def test_query_by_accession_number_finds_that_study(web_url, dicomweb_backend_factory, dicomweb_cohort_spec):
    accession = accession_number(dicomweb_cohort_spec, 1, 0)

    found = studies(dicomweb_backend_factory(web_url), AccessionNumber=accession)

    assert [s.accession_number for s in found] == [accession]
    assert found[0].patient_id == "PAT00001" and found[0].patient_name == "SMITH^JOHN"
    assert found[0].study_description and found[0].n_series and found[0].n_instances


def test_patient_name_with_caret_matches_in_raw_escaping(web_url, dicomweb_backend_factory, dicomweb_memory_pacs):
    found = studies(dicomweb_backend_factory(web_url), PatientName="DOE^JANE")

    assert {s.study_uid for s in found} == expected_studies(dicomweb_memory_pacs, PatientName="DOE^JANE")
    assert len(found) == 2


def test_wildcard_patient_name_matches(web_url, dicomweb_backend_factory):
    found = studies(dicomweb_backend_factory(web_url), PatientName="NGUYEN^ANH*")

    assert {s.patient_name for s in found} == {"NGUYEN^ANH^Q"} and len(found) == 2


def test_non_ascii_patient_name_matches(web_url, dicomweb_backend_factory):
    found = studies(dicomweb_backend_factory(web_url), PatientName="MÜLLER^JÜRGEN")

    assert {s.patient_name for s in found} == {"MÜLLER^JÜRGEN"} and len(found) == 2


def test_question_mark_wildcard_matches(web_url, dicomweb_backend_factory):
    found = studies(dicomweb_backend_factory(web_url), PatientID="PAT0000?")

    assert len(found) == 8


def test_widened_value_does_not_match_more_than_asked(web_url, dicomweb_backend_factory):
    # A space cannot be sent raw: it goes out as `?`, which also matches the
    # `^` of DOE^JANE on the server; the backend must drop that answer.
    found = studies(dicomweb_backend_factory(web_url), PatientName="DOE JANE")

    assert found == []


def test_percent_escaping_zero_matches_come_with_a_warning(web_url, dicomweb_backend_factory, dqr_log):
    backend = dicomweb_backend_factory(web_url, query_value_escaping="percent")
    query = StudyQuery(line=7, filters={"PatientName": "DOE^JANE"})

    found = list(backend.query_studies(query))

    assert found == []
    assert len(query.warnings) == 1
    assert "CSV line 7" in query.warnings[0] and "query_value_escaping: raw" in query.warnings[0]
    assert "DOE" not in query.warnings[0] and "DOE" not in dqr_log.text  # names stay out of logs
    assert "CSV line 7" in dqr_log.text


def test_percent_escaping_matches_on_a_decoding_server(mock_dicomweb_pacs, dicomweb_backend_factory):
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url, query_value_escaping="percent")

    assert len(studies(backend, PatientName="DOE^JANE")) == 2
    assert len(studies(backend, PatientName="MÜLLER^J*")) == 2


def test_date_range_matches_inclusively(web_url, dicomweb_backend_factory, dicomweb_memory_pacs):
    found = studies(dicomweb_backend_factory(web_url), StudyDate="20160101-20191231")

    expected = expected_studies(dicomweb_memory_pacs, StudyDate="20160101-20191231")
    assert {s.study_uid for s in found} == expected and 0 < len(expected) < 8


def test_modalities_in_study_survives_paging(web_url, site, write_csv, dqr, tmp_path, dicomweb_memory_pacs):
    # Orthanc pages a ModalitiesInStudy query wrongly: it is matched on the answers instead.
    source = {"type": "dicomweb", "url": web_url, "page_size": 2, "query_value_escaping": "raw"}
    config = site(source=source, csv=str(write_csv("Modality\nCT\\PT\n")))

    result = dqr("query", "--config", config, "--format", "json")

    found = {line["StudyInstanceUID"] for line in json.loads(result.stdout)}
    assert found == expected_studies(dicomweb_memory_pacs, ModalitiesInStudy="CT\\PT")
    assert len(found) == 5


def test_paging_returns_every_match(web_url, dicomweb_backend_factory):
    found = studies(dicomweb_backend_factory(web_url, page_size=3))

    assert len({s.study_uid for s in found}) == 8


def test_paging_asks_page_by_page(mock_dicomweb_pacs, dicomweb_backend_factory):
    studies(dicomweb_backend_factory(mock_dicomweb_pacs.url, page_size=3))

    assert mock_dicomweb_pacs.requests["qido-studies"] == 3  # 3 + 3 + 2


def test_long_uid_list_is_chunked(web_url, dicomweb_backend_factory, dicomweb_memory_pacs):
    uids = dicomweb_memory_pacs.study_uids()
    backend = dicomweb_backend_factory(web_url, max_uid_list_length=140)  # two UIDs per request

    found = studies(backend, StudyInstanceUID="\\".join(uids))

    assert sorted(s.study_uid for s in found) == sorted(uids)


def test_uid_list_chunks_are_separate_requests(mock_dicomweb_pacs, dicomweb_backend_factory, dicomweb_memory_pacs):
    uids = dicomweb_memory_pacs.study_uids()
    backend = dicomweb_backend_factory(mock_dicomweb_pacs.url, max_uid_list_length=140)

    studies(backend, StudyInstanceUID="\\".join(uids))

    assert mock_dicomweb_pacs.requests["qido-studies"] == 4


def test_series_query_gives_description_modality_and_count(web_url, dicomweb_backend_factory, dicomweb_memory_pacs):
    backend = dicomweb_backend_factory(web_url)
    study = studies(backend, PatientName="NGUYEN^ANH^Q")[0]

    series = list(backend.query_series(study))

    expected = dicomweb_memory_pacs.find("SERIES", {"StudyInstanceUID": study.study_uid})
    assert {(s.series_uid, s.modality, s.description, s.number, s.n_instances) for s in series} == {
        (a["SeriesInstanceUID"], a["Modality"], a["SeriesDescription"], a["SeriesNumber"], 3) for a in expected
    }


def test_instance_query_gives_sop_uids_and_classes(web_url, dicomweb_backend_factory, dicomweb_memory_pacs):
    backend = dicomweb_backend_factory(web_url)
    study = studies(backend, PatientName="DOE^JANE")[0]
    series = next(iter(backend.query_series(study)))

    instances = list(backend.query_instances(study, series))

    stored = dicomweb_memory_pacs.instances(study.study_uid, series.series_uid)
    assert {(i.sop_instance_uid, i.sop_class_uid) for i in instances} == {
        (s.sop_instance_uid, s.sop_class_uid) for s in stored
    }


def test_echo_describes_the_service(web_url, dicomweb_backend_factory):
    assert "answered QIDO-RS" in dicomweb_backend_factory(web_url).echo()
