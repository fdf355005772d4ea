"""The CSV query file: headers and values checked against the rules of XNAT
DQR's *Import CSV*, every problem reported at once.

A valid file becomes a list of :class:`dqr.model.RowQuery`, one per
non-blank data row, carrying its CSV line number.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import math
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import date
from pathlib import Path

from dqr.cells import restore
from dqr.errors import InputError, Problem
from dqr.labels import validate_label
from dqr.model import NAME_PART_HEADERS, REMAP_HEADERS, SEARCH_HEADERS, RowQuery

KNOWN_HEADERS = (*SEARCH_HEADERS, *NAME_PART_HEADERS, *REMAP_HEADERS)
#: Columns dqr itself adds (the failures CSV's ``reason``): accepted and ignored,
#: so that a failures file can be fixed and run again as it is.
IGNORED_HEADERS = ("reason",)

_DATE = re.compile(r"\d{8}")
_SCIENTIFIC = re.compile(r"[+-]?\d+(?:[.,]\d+)?[eE][+-]?\d+")
_TRAILING_ZERO = re.compile(r"\d+\.0+")
_UID = re.compile(r"(0|[1-9]\d*)(\.(0|[1-9]\d*))*")
_CS = re.compile(r"[A-Z0-9_ ]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOOKS_LIKE_DATE = re.compile(r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}")

#: Most alternatives in one ``\\`` list, and most queries one row may fan out
#: into (the product of its lists' lengths): beyond, split the row.
MAX_ALTERNATIVES = 1000
MAX_QUERIES_PER_ROW = 1000
#: Python's csv module refuses longer fields (``csv.field_size_limit()``).
MAX_FIELD = 128 * 1024
#: Separators a spreadsheet may have used instead of commas, by name.
OTHER_SEPARATORS = {";": "semicolon", "\t": "tab"}

#: Longest value the DICOM VR of each search attribute allows.
MAX_LENGTH = {"AccessionNumber": 16, "PatientID": 64, "PatientName": 64 * 5, "ModalitiesInStudy": 16, "StudyInstanceUID": 64}


def _normal(header: str) -> str:
    return re.sub(r"[^a-z0-9]", "", header.lower())


def suggest_header(header: str) -> str | None:
    """The valid header a misspelt one was probably meant to be."""
    by_normal = {_normal(h): h for h in KNOWN_HEADERS}
    if _normal(header) in by_normal:
        return by_normal[_normal(header)]
    close = difflib.get_close_matches(_normal(header), list(by_normal), n=1, cutoff=0.6)
    return by_normal[close[0]] if close else None


#: Every header a dqr CSV may have, normalised (see :func:`_normal`).
_KNOWN_NORMAL = frozenset(_normal(h) for h in (*KNOWN_HEADERS, *IGNORED_HEADERS, "row", "selected", "subject", "session"))


def _spreadsheet_problem(value: str) -> str | None:
    if _SCIENTIFIC.fullmatch(value):
        return (
            f"{value!r} is in scientific notation: a spreadsheet probably turned this value into a "
            "number (format the column as Text and re-enter it)"
        )
    if _TRAILING_ZERO.fullmatch(value):
        return (
            f"{value!r} ends in '.0': a spreadsheet probably turned this value into a number "
            "(format the column as Text; leading zeros may have been lost too)"
        )
    return None


def check_date(value: str) -> str | None:
    """What is wrong with a date or date-range value, or ``None``."""
    if "*" in value or "?" in value:
        return f"{value!r}: wildcards cannot be used with dates; expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD"
    if "\\" in value:
        return f"{value!r}: lists (\\) cannot be used with dates; expected YYYYMMDD or a range YYYYMMDD-YYYYMMDD"
    mangled = _spreadsheet_problem(value)
    if mangled:
        return mangled
    parts = value.split("-")
    if len(parts) > 2 or value == "-":
        if _LOOKS_LIKE_DATE.fullmatch(value):
            return f"{value!r} looks reformatted (by a spreadsheet?); expected YYYYMMDD, e.g. {_guess(value)}"
        return f"{value!r}: expected YYYYMMDD, a range YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-"
    for part in parts:
        if part and not _DATE.fullmatch(part):
            if _LOOKS_LIKE_DATE.fullmatch(value):
                return f"{value!r} looks reformatted (by a spreadsheet?); expected YYYYMMDD, e.g. {_guess(value)}"
            return f"{value!r}: expected YYYYMMDD, a range YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-"
        if part:
            try:
                date(int(part[:4]), int(part[4:6]), int(part[6:]))
            except ValueError:
                return f"{part!r} is not a calendar date (YYYYMMDD)"
    if len(parts) == 2 and all(parts) and parts[0] > parts[1]:
        return f"{value!r}: the range starts after it ends"
    return None


def _guess(value: str) -> str:
    numbers = re.split(r"[-/.]", value)
    if len(numbers[0]) == 4:
        year, month, day = numbers
    else:
        year = numbers[2]
        month, day = numbers[0], numbers[1]
    return f"{year.zfill(4)}{month.zfill(2)}{day.zfill(2)}"


def _check_list(value: str, check_one: Callable[[str], str | None]) -> str | None:
    items = value.split("\\")
    if len(items) > MAX_ALTERNATIVES:
        return (
            f"a list of {len(items)} values; at most {MAX_ALTERNATIVES} are allowed in one row "
            "(split it over several rows)"
        )
    if any(not item.strip() for item in items):
        return f"{value!r} has an empty value in its \\-separated list"
    for item in items:
        item = item.strip()
        problem = _formula_problem(item) if item[:1] in _FORMULA_STARTS else check_one(item)
        if problem:
            return problem
    return None


#: A value starting so is run as a formula by a spreadsheet (tab and CR are
#: control characters, refused anyway). Not checked in dates: ``-YYYYMMDD``.
_FORMULA_STARTS = frozenset("=+-@")


def _formula_problem(value: str) -> str:
    return (
        f"{value!r} starts with {value[0]!r}: a spreadsheet would run it as a formula, "
        "and no DICOM value of this kind starts so"
    )


def _check_id(keyword: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        mangled = _spreadsheet_problem(value)
        if mangled:
            return mangled
        bare = value.replace("*", "").replace("?", "")
        if len(bare) > MAX_LENGTH[keyword]:
            return f"{value!r} is longer than the {MAX_LENGTH[keyword]} characters DICOM allows here"
        return None

    return check


def check_uid(value: str) -> str | None:
    if "*" in value or "?" in value:
        return f"{value!r}: wildcards cannot be used with UIDs"
    mangled = _spreadsheet_problem(value)
    if mangled:
        return mangled
    if len(value) > 64 or not _UID.fullmatch(value):
        return f"{value!r} is not a UID (digits and dots, at most 64 characters, no leading zeros)"
    return None


def check_modality(value: str) -> str | None:
    if value.upper() != value and _CS.fullmatch(value.upper()):
        return f"{value!r}: modalities are upper case; write {value.upper()!r}"
    if not _CS.fullmatch(value.replace("*", "").replace("?", "") or "X") or len(value) > 16:
        return f"{value!r} is not a modality code (upper-case letters and digits, e.g. CT, MR, PT)"
    return None


def check_name(value: str) -> str | None:
    if value.count("^") > 4:
        return f"{value!r} has more than 5 name components (LAST^FIRST^MIDDLE^PREFIX^SUFFIX)"
    return None


#: keyword -> checker of one value (lists are split before checking)
CHECKS: dict[str, Callable[[str], str | None]] = {
    "AccessionNumber": _check_id("AccessionNumber"),
    "PatientID": _check_id("PatientID"),
    "PatientName": check_name,
    "ModalitiesInStudy": check_modality,
    "StudyInstanceUID": check_uid,
}


def check_value(keyword: str, value: str) -> str | None:
    """What is wrong with a search value for ``keyword``, or ``None``."""
    if _CONTROL.search(value):
        return f"{value!r} contains a control character"
    if keyword in ("StudyDate", "PatientBirthDate"):
        return check_date(value)
    return _check_list(value, CHECKS[keyword])


class CsvQueryFile:
    """Parses and validates one CSV query file."""

    def __init__(self, text: str, file: str) -> None:
        self.text = text
        self.file = file
        self.problems: list[Problem] = []
        self.header_problems = 0

    def problem(self, message: str, line: int | None = None, column: str | None = None) -> None:
        self.problems.append(Problem(self.file, message, line, column))

    def parse(self) -> list[RowQuery]:
        records = read_records(self.text, self.file, self.problems)
        if not records:
            if not self.problems:
                self.problem("the file is empty; expected a header row such as 'Accession Number,Subject'", 1)
            raise InputError(self.problems)
        header_line, header = records[0]
        separator = other_separator(header, self.file, header_line)
        if separator:
            raise InputError(separator)
        columns = self._check_header(header, header_line)
        rows = [row for line, cells in records[1:] if (row := self._parse_row(line, cells, header, columns))]
        if not rows and not self.problems:
            self.problem("no data rows after the header", header_line)
        if self.problems:
            raise InputError(self.problems)
        return rows

    def _check_header(self, header: list[str], line: int) -> dict[int, str]:
        columns: dict[int, str] = {}
        seen: dict[str, int] = {}
        for index, name in enumerate(header):
            name = name.strip()
            if not name:
                self.problem(f"column {index + 1} of the header is blank", line)
                continue
            if name in seen:
                self.problem(f"header {name!r} appears twice (columns {seen[name] + 1} and {index + 1})", line, name)
                continue
            seen[name] = index
            if name in IGNORED_HEADERS:
                continue
            if name in KNOWN_HEADERS:
                columns[index] = name
            elif "studyinstanceuid" in _normal(name) or "studyuid" in _normal(name):
                self.problem(
                    f"unknown header {name!r}: remapping the Study Instance UID is not supported "
                    "('Study Instance UID' is a search header only)",
                    line,
                    name,
                )
            else:
                hint = suggest_header(name)
                expected = f"did you mean {hint!r}?" if hint else "valid headers: " + ", ".join(KNOWN_HEADERS)
                self.problem(f"unknown header {name!r}; {expected}", line, name)
        names = set(columns.values())
        self.header_problems = len(self.problems)
        if not names & (set(SEARCH_HEADERS) | set(NAME_PART_HEADERS)) and not self.header_problems:
            self.problem(
                "no search header: the header row needs at least one of " + ", ".join((*SEARCH_HEADERS, *NAME_PART_HEADERS)),
                line,
            )
        if "Patient Name" in names and names & set(NAME_PART_HEADERS):
            self.problem("use either 'Patient Name' or 'Last Name'/'First Name', not both", line)
        self.header_problems = len(self.problems)
        return columns

    def _parse_row(self, line: int, cells: list[str], header: list[str], columns: dict[int, str]) -> RowQuery | None:
        if not any(cell.strip() for cell in cells):
            return None  # entirely blank rows are skipped
        if len(cells) > len(header):
            extra = [c for c in cells[len(header) :] if c.strip()]
            if extra:
                self.problem(f"{len(cells)} values but the header has {len(header)} columns (extra: {extra!r})", line)
        values = {name: cells[i].strip() if i < len(cells) else "" for i, name in columns.items()}
        for name, value in values.items():
            if value[:1] == "'":  # a cell dqr neutralised (see dqr.cells)
                values[name] = restore(value)
        filters: dict[str, str] = {}
        ok = True
        for name, value in values.items():
            if not value or name in REMAP_HEADERS or name in NAME_PART_HEADERS:
                continue
            keyword = SEARCH_HEADERS[name]
            problem = check_value(keyword, value)
            if problem:
                self.problem(problem, line, name)
                ok = False
            filters[keyword] = value
        name_value = _combined_name(values.get("Last Name", ""), values.get("First Name", ""))
        if name_value:
            for part in NAME_PART_HEADERS:
                problem = values.get(part) and check_value("PatientName", values[part])
                if problem:
                    self.problem(problem, line, part)
                    ok = False
            filters["PatientName"] = name_value
        labels = {}
        for name in REMAP_HEADERS:
            value = values.get(name, "")
            if value:
                problem = validate_label(value, name)
                if problem:
                    self.problem(f"label {problem}", line, name)
                    ok = False
                labels[name] = value
        if not filters:
            if not self.header_problems:  # else every row would repeat the header's problem
                self.problem("no search value in this row; each row needs at least one (values are AND-ed)", line)
            return None
        if not ok:
            return None
        lists = [value for value in filters.values() if "\\" in value]
        queries = math.prod(len(set(value.split("\\"))) for value in lists) if lists else 1
        if queries > MAX_QUERIES_PER_ROW:
            self.problem(
                f"the lists in this row combine into {queries} queries (every value of each list with every "
                f"value of the others); at most {MAX_QUERIES_PER_ROW} are allowed: split the row",
                line,
            )
            return None
        return RowQuery(line=line, filters=filters, subject=labels.get("Subject"), session=labels.get("Session"))


def _combined_name(last: str, first: str) -> str:
    """``Last Name``/``First Name`` as a PN query: ``LAST^FIRST``, ``LAST^*``, ``*^FIRST``."""
    if not last and not first:
        return ""
    return f"{last or '*'}^{first or '*'}"


def _records(reader: Iterator[list[str]]) -> Iterable[tuple[int, int, list[str]]]:
    """Rows with the lines they start and end on (a quoted field may span lines)."""
    line = 1
    for cells in reader:
        end = reader.line_num  # type: ignore[attr-defined]
        yield line, end, cells
        line = end + 1


def read_records(
    text: str, file: str, problems: list[Problem], line_breaks: bool = False
) -> list[tuple[int, list[str]]]:
    """The CSV's records with the line each starts on. A record that cannot
    be right becomes a problem instead: a quote never closed, a value
    holding a line break (unless ``line_breaks``: the results table's free
    text may), a field the csv module refuses (reading stops there)."""
    # skipinitialspace: `a, "b"` is a quoted field after a space, as users mean it
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    records: list[tuple[int, list[str]]] = []
    next_line = 1
    total_lines = text.count("\n") + (not text.endswith("\n"))
    try:
        for line, end, cells in _records(reader):
            next_line = end + 1
            if end > line and any("\n" in cell or "\r" in cell for cell in cells):
                unclosed = end >= total_lines and _quote_never_closed(text, line)
                if unclosed or not line_breaks:
                    if unclosed:
                        where = "it is never closed, so the rest of the file became one value"
                    else:
                        where = f"the quoted value runs to line {end} (a value cannot hold a line break)"
                    problems.append(Problem(file, f"unbalanced quote starting on line {line}: {where}", line))
                    if not records:  # the header: nothing after it can be read by column
                        return []
                    continue
            records.append((line, cells))
    except csv.Error as exc:
        if "field larger than field limit" in str(exc):
            message = (
                f"a value starting on line {next_line} is longer than {MAX_FIELD // 1024} KiB: split a long \\ list "
                "over several rows, or look for an unbalanced quote"
            )
        else:
            message = f"cannot read this line as CSV: {exc}"
        problems.append(Problem(file, message, next_line))
    return records


def _quote_never_closed(text: str, line: int) -> bool:
    """Whether the record starting on ``line`` (the last one) ends inside a quote."""
    tail = text.split("\n", line - 1)[-1] if line > 1 else text
    try:
        for _ in csv.reader(io.StringIO(tail, newline=""), skipinitialspace=True, strict=True):
            pass
    except csv.Error as exc:
        return "unexpected end of data" in str(exc)
    return False


def other_separator(header: list[str], file: str, line: int) -> Problem | None:
    """A header row that was saved with ``;`` or tabs instead of commas."""
    for separator, name in OTHER_SEPARATORS.items():
        parts = [part.strip() for cell in header for part in cell.split(separator)]
        if len(parts) > len(header) and any(_normal(part) in _KNOWN_NORMAL for part in parts):
            return Problem(
                file,
                f"this looks like a {name}-separated file; save as comma-separated (\"CSV UTF-8\")",
                line,
            )
    return None


#: Byte-order marks of encodings a spreadsheet may save as (UTF-32 first:
#: its little-endian mark starts with UTF-16's).
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _wrong_encoding(data: bytes, file: str) -> Problem | None:
    """UTF-16/32 (with or without a byte-order mark) or NUL bytes."""
    for bom, name in _BOMS:
        if data.startswith(bom):
            return Problem(file, f"the file is {name} (it starts with a {name} byte-order mark); save it as 'CSV UTF-8'", 1)
    nul = data.find(b"\0")
    if nul < 0:
        return None
    sample = data[:512]
    if sample[1::2].count(0) > len(sample) // 4 or sample[0::2].count(0) > len(sample) // 4:
        return Problem(file, "the file is UTF-16 (every other byte is NUL); save it as 'CSV UTF-8'", 1)
    line = data[:nul].count(b"\n") + 1
    return Problem(file, "contains a NUL byte: not a text CSV; save it as 'CSV UTF-8'", line)


def read_text(path: Path) -> str:
    """Read a CSV as UTF-8 (with or without BOM), reporting undecodable bytes."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read the file: {exc.strerror}", file=str(path)) from exc
    wrong = _wrong_encoding(data, str(path))
    if wrong:
        raise InputError(wrong)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise InputError(
            Problem(str(path), f"not UTF-8 (byte 0x{data[exc.start]:02x}); save the CSV as 'CSV UTF-8'", line)
        ) from exc


def read_csv_queries(path: Path) -> list[RowQuery]:
    """Parse and validate a CSV query file; raise :class:`InputError` listing every problem."""
    return CsvQueryFile(read_text(path), str(path)).parse()
