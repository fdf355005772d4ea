"""Choose series by SeriesDescription with include/exclude globs
(case-insensitive). A series is retrieved when it matches an include
pattern and no exclude pattern."""

from __future__ import annotations

from fnmatch import fnmatchcase

import dqr
from dqr.config import SeriesFilter
from dqr.model import Series, Study


def _matches_any(text: str, patterns: list[str]) -> bool:
    folded = text.casefold()
    return any(fnmatchcase(folded, pattern.casefold()) for pattern in patterns)


@dqr.hookimpl(trylast=True)
def dqr_select_series(study: Study, series: Series, series_filter: SeriesFilter) -> bool:
    description = series.description
    return _matches_any(description, series_filter.include) and not _matches_any(description, series_filter.exclude)
