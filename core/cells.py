"""Cells of the CSV files dqr writes for people to open in a spreadsheet
(the results table, the failures file): formula injection is neutralised.

A spreadsheet runs a cell starting with ``=``, ``+``, ``-`` or ``@`` (or a
tab or carriage return before one) as a formula, so a PACS value such as
``=HYPERLINK("http://evil","open me")`` or ``=cmd|' /C calc'!A0`` would
act when the table is opened. The OWASP rule: such a cell gets a leading
single quote, which spreadsheets show as text. Reading the table back
removes exactly that quote, so every value survives the round trip: a value
that itself starts with quotes followed by one of those characters (``'=x``)
gets one quote more (``''=x``), which :func:`restore` removes again.
"""

from __future__ import annotations

import re

#: Characters that make a spreadsheet read a cell as a formula (OWASP).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Quotes first: `'=x` must become `''=x`, or reading back would lose its quote.
_NEEDS_QUOTE = re.compile(r"'*[=+\-@\t\r]")


def neutralise(cell: str) -> str:
    """The cell as written to a CSV: quoted if a spreadsheet would run it."""
    return "'" + cell if _NEEDS_QUOTE.match(cell) else cell


def restore(cell: str) -> str:
    """Undo :func:`neutralise` (a cell it did not change stays as it is)."""
    return cell[1:] if cell.startswith("'") and _NEEDS_QUOTE.match(cell, 1) else cell


def neutralise_row(cells: list[str]) -> list[str]:
    """:func:`neutralise` each cell of a CSV row."""
    return [neutralise(cell) for cell in cells]
