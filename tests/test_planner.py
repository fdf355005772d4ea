"""From CSV rows to the queries sent: list fan-out."""

from __future__ import annotations

from dqr.config import MatchingOptions
from dqr.model import RowQuery
from dqr.planner import plan_queries


def filters_of(row: RowQuery, **matching) -> list[dict[str, str]]:
    return [q.filters for q in plan_queries(row, MatchingOptions(**matching))]


def test_a_row_without_lists_is_one_query():
    assert filters_of(RowQuery(2, {"PatientID": "P1", "StudyDate": "2021-"})) == [{"PatientID": "P1", "StudyDate": "2021-"}]


def test_a_non_uid_list_fans_out_into_one_query_per_value():
    assert filters_of(RowQuery(2, {"AccessionNumber": "A1\\A2"})) == [{"AccessionNumber": "A1"}, {"AccessionNumber": "A2"}]


def test_two_list_columns_give_every_combination():
    row = RowQuery(2, {"PatientID": "P1\\P2", "ModalitiesInStudy": "CT\\MR"})
    assert len(filters_of(row)) == 4


def test_a_uid_list_goes_as_one_list_query():
    assert filters_of(RowQuery(2, {"StudyInstanceUID": "1.2\\1.3"})) == [{"StudyInstanceUID": "1.2\\1.3"}]


def test_a_uid_list_fans_out_for_a_source_that_refuses_lists():
    assert len(filters_of(RowQuery(2, {"StudyInstanceUID": "1.2\\1.3"}), uid_lists=False)) == 2


def test_value_lists_are_kept_for_a_source_that_matches_them():
    assert filters_of(RowQuery(2, {"AccessionNumber": "A1\\A2"}), value_lists=True) == [{"AccessionNumber": "A1\\A2"}]


def test_repeated_list_values_are_queried_once():
    assert len(filters_of(RowQuery(2, {"AccessionNumber": "A1\\A1"}))) == 1
