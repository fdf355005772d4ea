"""From CSV rows to the study-level queries actually sent.

DICOM standardises ``\\`` list matching only for UIDs, so a list in any other
column is fanned out into one query per value (the answers are merged and
de-duplicated by Study Instance UID). Several list columns in one row give
every combination: all values in a row are AND-ed.
"""

from __future__ import annotations

import itertools

from dqr.config import MatchingOptions
from dqr.model import UID_KEYWORDS, RowQuery, StudyQuery


def _alternatives(keyword: str, value: str, matching: MatchingOptions) -> list[str]:
    if "\\" not in value:
        return [value]
    keeps_list = matching.uid_lists if keyword in UID_KEYWORDS else matching.value_lists
    if keeps_list:
        return [value]
    # dict.fromkeys: drop repeated values but keep the user's order
    return list(dict.fromkeys(item.strip() for item in value.split("\\")))


def plan_queries(row: RowQuery, matching: MatchingOptions = MatchingOptions()) -> list[StudyQuery]:
    """The study-level queries that together answer one CSV row."""
    keywords = list(row.filters)
    choices = [_alternatives(k, row.filters[k], matching) for k in keywords]
    return [StudyQuery(line=row.line, filters=dict(zip(keywords, combo, strict=True))) for combo in itertools.product(*choices)]
