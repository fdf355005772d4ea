"""The results table: one line per (CSV row, matched study), plus a line for
each row that matched nothing.

It is what the user reviews, edits (``selected``, ``subject``, ``session``)
and feeds back with ``dqr retrieve --results``. The column names are a public
contract: scripts read them.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from dqr.cells import neutralise, restore
from dqr.errors import InputError, Problem
from dqr.labels import validate_label
from dqr.model import STUDY_KEYWORDS, RowOutcome, Study

#: The results table's columns, a public contract (tests pin the exact header):
#: the selection and labels, then the study-level attributes every backend returns.
COLUMNS = ("row", "selected", "subject", "session", *STUDY_KEYWORDS, "warning")
REQUIRED_COLUMNS = ("row", "selected", "subject", "session", "StudyInstanceUID")
#: Longest cell accepted in an edited table: far beyond any value dqr writes.
MAX_CELL = 10_000
#: Control characters refused in any cell (tab, LF and CR may be in free text:
#: a PACS description can hold them, and the CSV quotes them).
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: A line number or a count: ASCII digits only (``str.isdigit()`` accepts
#: ``²`` and ``٣``, which ``int()`` refuses), at most 9 of them.
_NUMBER = re.compile(r"[0-9]{1,9}")
COUNT_COLUMNS = ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
TRUE_WORDS = frozenset({"true", "yes", "y", "1", "x"})
FALSE_WORDS = frozenset({"false", "no", "n", "0", ""})


#: How each outcome opens the ``warning`` column (a matched line says nothing).
OUTCOME_TEXT = {
    RowOutcome.MATCHED: "",
    RowOutcome.NO_MATCH: "no study matched",
    RowOutcome.AMBIGUOUS: "ambiguous",
    RowOutcome.LABEL_COLLISION: "label collision",
    RowOutcome.QUERY_FAILED: "query failed",
    RowOutcome.NOT_QUERIED: "not queried yet",
}


@dataclass(frozen=True)
class ResultLine:
    """One line of the results table. ``subject``/``session`` are the labels
    the user asked for (blank: derived from the study's tags).

    ``outcome`` says what the row's query gave (``reason`` details it, e.g.
    the query's error); ``notes`` are everything else worth telling (a study
    matched by another row, a backend's remark). The ``warning`` column is
    a rendering of the three, never parsed back.
    """

    row: int
    selected: bool
    subject: str
    session: str
    study: Study | None
    outcome: RowOutcome = RowOutcome.MATCHED
    reason: str = ""
    notes: tuple[str, ...] = ()

    @property
    def warning(self) -> str:
        head = OUTCOME_TEXT[self.outcome]
        if head and self.reason:
            head = f"{head}: {self.reason}"
        return "; ".join(part for part in (head, *self.notes) if part)

    def noted(self, *notes: str) -> ResultLine:
        """This line with more notes (repeats dropped)."""
        return replace(self, notes=tuple(dict.fromkeys((*self.notes, *(n for n in notes if n)))))

    def as_record(self) -> dict[str, str]:
        study = self.study or Study(study_uid="")
        counts = (study.n_series, study.n_instances)
        return {
            "row": str(self.row),
            "selected": "true" if self.selected else "false",
            "subject": self.subject,
            "session": self.session,
            "StudyInstanceUID": study.study_uid,
            "PatientID": study.patient_id,
            "PatientName": study.patient_name,
            "PatientBirthDate": study.patient_birth_date,
            "StudyDate": study.study_date,
            "AccessionNumber": study.accession_number,
            "ModalitiesInStudy": "\\".join(study.modalities),
            "StudyDescription": study.study_description,
            "StudyID": study.study_id,
            "NumberOfStudyRelatedSeries": "" if counts[0] is None else str(counts[0]),
            "NumberOfStudyRelatedInstances": "" if counts[1] is None else str(counts[1]),
            "warning": self.warning,
        }


@dataclass(frozen=True)
class RowAnswer:
    """What the job state knows of one CSV row: its query, whether it was
    queried (``status``), why not or what the backend remarked
    (``reason``/``notes``), and the studies it matched in answer order."""

    line: int
    subject: str | None
    session: str | None
    studies: list[Study]
    outcome: RowOutcome = RowOutcome.MATCHED
    reason: str = ""
    notes: tuple[str, ...] = ()


def build_table(answers: Iterable[RowAnswer], select_all: bool = False) -> list[ResultLine]:
    """Lines for each row's matches, with the selection rules applied.

    - a row matching nothing gets one unselected line saying so (likewise a
      row whose query failed or was not sent yet);
    - a row with labels matching several studies is *ambiguous*: relabeling
      would give them all the same labels, so none is selected unless
      ``select_all``;
    - a study matched by several rows is selected once: for the first row
      that labels it (the user said what to call it), else the first row.
    """
    rows = list(answers)
    owner = _owning_rows(rows, select_all)
    lines: list[ResultLine] = []
    for answer in rows:
        subject, session = answer.subject or "", answer.session or ""
        if not answer.studies:
            outcome = RowOutcome.NO_MATCH if answer.outcome == RowOutcome.MATCHED else answer.outcome
            lines.append(ResultLine(answer.line, False, subject, session, None, outcome, answer.reason, answer.notes))
            continue
        ambiguous = len(answer.studies) > 1 and bool(subject or session)
        for study in answer.studies:
            entry = ResultLine(answer.line, not ambiguous or select_all, subject, session, study, notes=answer.notes)
            if ambiguous:
                entry = replace(
                    entry,
                    outcome=RowOutcome.AMBIGUOUS,
                    reason=f"row matched {len(answer.studies)} studies and relabels them all alike"
                    + ("" if select_all else "; not selected (choose one, or use --select all)"),
                )
            first = owner.get(study.study_uid)
            if first is not None and first != answer.line:
                entry = replace(entry, selected=False).noted(f"also matched by row {first}; retrieved once, for row {first}")
            lines.append(entry)
    return lines


def _owning_rows(rows: list[RowAnswer], select_all: bool) -> dict[str, int]:
    """For each study, the row it is retrieved for."""
    owner: dict[str, int] = {}
    labelled: dict[str, int] = {}
    for answer in rows:
        has_labels = bool(answer.subject or answer.session)
        selectable = len(answer.studies) == 1 or not has_labels or select_all
        for study in answer.studies:
            owner.setdefault(study.study_uid, answer.line)
            if has_labels and selectable:
                labelled.setdefault(study.study_uid, answer.line)
    owner.update(labelled)
    return owner


def flag_label_collisions(lines: Sequence[ResultLine], labels_of) -> list[ResultLine]:
    """Deselect selected studies that would be stored under the same
    subject/session as a different study (``labels_of(line) -> (subject,
    session)``), naming the other rows."""
    by_label: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, line in enumerate(lines):
        if line.selected and line.study:
            by_label[labels_of(line)].append(index)
    result = list(lines)
    for (subject, session), indexes in by_label.items():
        if len({lines[i].study.study_uid for i in indexes}) < 2:  # type: ignore[union-attr]
            continue
        rows = ", ".join(str(lines[i].row) for i in indexes)
        for i in indexes:
            result[i] = replace(
                result[i],
                selected=False,
                outcome=RowOutcome.LABEL_COLLISION,
                reason=f"rows {rows} would all be stored as {subject}/{session}; not selected",
            )
    return result


@dataclass(frozen=True)
class ResultsTable:
    """The results table with what the summary before a retrieval shows:
    the rows of each outcome and what the selection expects."""

    lines: list[ResultLine]

    def rows_with(self, outcome: RowOutcome) -> list[int]:
        return sorted({line.row for line in self.lines if line.outcome == outcome})

    @property
    def rows(self) -> int:
        return len({line.row for line in self.lines})

    @property
    def selected(self) -> list[ResultLine]:
        return [line for line in self.lines if line.selected and line.study]

    @property
    def expected_series(self) -> int | None:
        counts = [line.study.n_series for line in self.selected]  # type: ignore[union-attr]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]

    @property
    def expected_instances(self) -> int | None:
        counts = [line.study.n_instances for line in self.selected]  # type: ignore[union-attr]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]

    def counts(self) -> dict[str, list[int]]:
        """Rows by outcome, under the ``--json`` summary's names."""
        return {
            "rows_without_match": self.rows_with(RowOutcome.NO_MATCH),
            "rows_not_queried": self.rows_with(RowOutcome.NOT_QUERIED),
            "rows_ambiguous": self.rows_with(RowOutcome.AMBIGUOUS),
            "label_collisions": self.rows_with(RowOutcome.LABEL_COLLISION),
            "rows_failed": self.rows_with(RowOutcome.QUERY_FAILED),
        }


# -- writing -------------------------------------------------------------------


def to_csv(lines: Iterable[ResultLine]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for line in lines:
        # PACS values go into a file users open in a spreadsheet: see dqr.cells
        writer.writerow({column: neutralise(value) for column, value in line.as_record().items()})
    return buffer.getvalue()


def to_json(lines: Iterable[ResultLine]) -> str:
    return json.dumps([line.as_record() for line in lines], indent=2, ensure_ascii=False) + "\n"


def write_table(lines: Sequence[ResultLine], path: Path, format: str = "csv") -> None:
    """Write atomically, so a half-written table never replaces a good one."""
    text = to_json(lines) if format == "json" else to_csv(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(text, encoding="utf-8")
        temp.replace(path)
    finally:  # a full disk must not leave a half-written temp file behind
        temp.unlink(missing_ok=True)


# -- reading an edited table -----------------------------------------------------


def parse_selected(value: str) -> bool | None:
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def _int_or_none(value: str) -> int | None:
    return int(value) if _NUMBER.fullmatch(value.strip()) else None


def read_table(path: Path) -> list[ResultLine]:
    """Read a results table (CSV as written by dqr, possibly edited in a
    spreadsheet); every problem is reported at once."""
    from dqr.csvquery import check_uid, other_separator, read_records, read_text

    file = str(path)
    problems: list[Problem] = []
    records = read_records(read_text(path), file, problems, line_breaks=True)
    if not records:
        raise InputError(problems or [Problem(file, "not a dqr results table: the file is empty", 1)])
    header_line, cells = records[0]
    separator = other_separator(cells, file, header_line)
    if separator:
        raise InputError(separator)
    header: dict[str, int] = {}
    for index, name in enumerate(cell.strip() for cell in cells):
        if name in header:
            problems.append(Problem(file, f"column {name!r} appears twice (columns {header[name] + 1} and {index + 1})", header_line))
        else:
            header[name] = index
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(Problem(file, f"not a dqr results table: missing columns {', '.join(missing)}", header_line))
    lines: list[ResultLine] = []
    for line_no, cells in records[1:]:
        record = {name: restore(cells[i].strip()) if i < len(cells) else "" for name, i in header.items() if name}
        if not any(record.values()):
            continue
        line = _read_line(record, line_no, file, problems, check_uid)
        if line:
            lines.append(line)
    if problems:
        raise InputError(problems)
    return lines


def _cell_problem(value: str) -> str | None:
    """What makes any cell of an edited table unacceptable, whatever its column."""
    if len(value) > MAX_CELL:
        return f"is {len(value)} characters long; at most {MAX_CELL} are accepted"
    control = _CONTROL.search(value)
    if control:
        # the value itself is not echoed: it may be a patient's name, or a terminal escape
        return f"contains a control character (U+{ord(control.group()):04X}) at position {control.start() + 1}"
    return None


def _read_line(record: dict[str, str], line_no: int, file: str, problems: list[Problem], check_uid) -> ResultLine | None:
    bad = len(problems)
    for column, value in record.items():
        problem = _cell_problem(value)
        if problem:
            problems.append(Problem(file, problem, line_no, column))
    if len(problems) > bad:
        return None
    selected = parse_selected(record["selected"])
    if selected is None:
        problems.append(Problem(file, f"{record['selected']!r}: expected true/false (or yes/no, 1/0, x)", line_no, "selected"))
    for column in ("subject", "session"):
        if record[column]:
            problem = validate_label(record[column], column.capitalize())
            if problem:
                problems.append(Problem(file, f"label {problem}", line_no, column))
    uid = record["StudyInstanceUID"]
    if uid and check_uid(uid):
        problems.append(Problem(file, check_uid(uid) or "", line_no, "StudyInstanceUID"))
    if selected and not uid:
        problems.append(Problem(file, "selected, but no StudyInstanceUID (this row matched nothing)", line_no, "selected"))
    row = _int_or_none(record["row"])
    if row is None:
        problems.append(Problem(file, f"{record['row']!r}: expected the CSV line number (digits 0-9)", line_no, "row"))
    for column in COUNT_COLUMNS:
        value = record.get(column, "")
        if value and not _NUMBER.fullmatch(value):
            problems.append(Problem(file, f"{value!r}: expected a count (digits 0-9) or nothing", line_no, column))
    if len(problems) > bad:
        return None
    study = None
    if uid:
        study = Study(
            study_uid=uid,
            patient_id=record.get("PatientID", ""),
            patient_name=record.get("PatientName", ""),
            patient_birth_date=record.get("PatientBirthDate", ""),
            study_date=record.get("StudyDate", ""),
            accession_number=record.get("AccessionNumber", ""),
            modalities=tuple(m for m in record.get("ModalitiesInStudy", "").split("\\") if m),
            study_description=record.get("StudyDescription", ""),
            study_id=record.get("StudyID", ""),
            n_series=_int_or_none(record.get("NumberOfStudyRelatedSeries", "")),
            n_instances=_int_or_none(record.get("NumberOfStudyRelatedInstances", "")),
        )
    # The warning column is output only: outcomes are judged afresh.
    outcome = RowOutcome.MATCHED if study else RowOutcome.NO_MATCH
    return ResultLine(row or 0, bool(selected), record["subject"], record["session"], study, outcome)


def study_to_dict(study: Study) -> dict:
    return asdict(study)


def study_from_dict(data: dict) -> Study:
    known = {f.name for f in fields(Study)}
    data = {k: v for k, v in data.items() if k in known}
    data["modalities"] = tuple(data.get("modalities", ()))
    return Study(**data)
