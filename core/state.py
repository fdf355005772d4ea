"""Persistent job state in SQLite: every CSV row, matched study, series and
expected instance, with its status, attempts and last error.

This is what makes a run resumable: finished work is skipped, a partly
retrieved series asks only for the instances that are missing, and nothing
is reported stored before the destination made it durable. Every write is
one transaction. The database belongs to one site config (project, source
and archive); studies, series and instances are keyed by their UIDs, so any
input -- the CSV or an edited results table -- continues the same job.

Statuses are the enums of :mod:`dqr.model` (:class:`RowStatus`,
:class:`StudyStatus`, :class:`SeriesStatus`), stored as their text.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from dqr.errors import InputError, Problem
from dqr.model import (
    Instance,
    Labels,
    RowOutcome,
    RowQuery,
    RowStatus,
    Series,
    SeriesStatus,
    Study,
    StudyStatus,
)
from dqr.results import RowAnswer, study_from_dict

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inputs (
    id INTEGER PRIMARY KEY, fingerprint TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,
    path TEXT NOT NULL, rows INTEGER NOT NULL, started REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    input INTEGER NOT NULL, line INTEGER NOT NULL, query TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    warnings TEXT, PRIMARY KEY (input, line));
CREATE TABLE IF NOT EXISTS matches (
    input INTEGER NOT NULL, line INTEGER NOT NULL, position INTEGER NOT NULL, study_uid TEXT NOT NULL,
    PRIMARY KEY (input, line, study_uid));
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, data TEXT NOT NULL,
    subject TEXT, session TEXT, relabel_subject INTEGER, relabel_session INTEGER, line INTEGER,
    status TEXT NOT NULL DEFAULT 'found', attempts INTEGER NOT NULL DEFAULT 0, error TEXT, updated REAL);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, data TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', expected INTEGER, stored INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, updated REAL);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, stored INTEGER NOT NULL DEFAULT 0,
    size INTEGER, run INTEGER, warning TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_uid, stored);
CREATE INDEX IF NOT EXISTS series_by_study ON series (study_uid);
CREATE INDEX IF NOT EXISTS instances_by_run ON instances (run, stored, size);
"""


#: Columns added since schema 1, added to an older database when it is opened.
ADDED_COLUMNS = {"instances": {"size": "INTEGER", "run": "INTEGER", "warning": "TEXT"}}


#: A series' count of stored instances (parameter: the series UID)...
_STORED_COUNT = "(SELECT COUNT(*) FROM instances WHERE series_uid = ? AND stored = 1)"
#: ...recounted from its instances (parameters: the series UID twice) after marks change.
_RECOUNT_STORED = f"UPDATE series SET stored = {_STORED_COUNT} WHERE series_uid = ?"


_SELECT_STUDY = (
    "UPDATE studies SET subject = ?, session = ?, relabel_subject = ?, relabel_session = ?, line = ?, "
    "status = CASE WHEN status IN (?, ?) THEN status ELSE ? END, updated = ? "
    "WHERE study_uid = ?"
)

_SET_STUDY_STATUS = (
    "UPDATE studies SET status = ?, error = ?, attempts = attempts + ?, updated = ? WHERE study_uid = ?"
)
_RECORD_STUDY = (
    "INSERT INTO studies (study_uid, data, updated) VALUES (?, ?, ?) "
    "ON CONFLICT (study_uid) DO UPDATE SET data = excluded.data WHERE studies.status = ?"
)
_ROW_QUERIED = (
    "UPDATE rows SET status = ?, attempts = attempts + 1, error = NULL, warnings = ? WHERE input = ? AND line = ?"
)


def _warnings_json(warnings: Iterable[str]) -> str | None:
    return json.dumps(list(dict.fromkeys(warnings))) if warnings else None


#: A series listed again keeps its progress (stored, being retrieved,
#: failed) if the filter still selects it; else it takes the new status.
_KEEP_PROGRESS = (
    f"CASE WHEN series.status IN ('{SeriesStatus.STORED}', '{SeriesStatus.RETRIEVING}', '{SeriesStatus.FAILED}') "
    f"AND excluded.status = '{SeriesStatus.PENDING}' THEN series.status ELSE excluded.status END"
)


def _series_data(series: Series) -> str:
    """A series row's ``data``; its instance UIDs live in the instances table, not in every series row."""
    return json.dumps({**asdict(series), "sop_class_uids": sorted(series.sop_class_uids),
                       "transfer_syntaxes": sorted(series.transfer_syntaxes), "instance_uids": None})


def _listed_status(selected: bool) -> SeriesStatus:
    return SeriesStatus.PENDING if selected else SeriesStatus.EXCLUDED


#: Keys in one ``IN (...)`` at most (SQLite allows 32,766 parameters; a
#: chunk also bounds one answer's size).
_CHUNK = 500


def _chunks(keys: Iterable[str]) -> Iterator[tuple[list[str], str]]:
    """``keys`` in chunks, each with its ``?, ?, ...`` placeholders."""
    keys = list(keys)
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start:start + _CHUNK]
        yield chunk, ",".join("?" * len(chunk))


@dataclass(frozen=True)
class SeriesCounts:
    """What the job state knows of a series' instances (:meth:`JobState.studies_instance_counts`)."""

    expected_known: bool  # its listing named them (else only the PACS's announced count is known)
    known: int  # instances recorded: the expected ones, and any stored
    stored: int


class StateMismatchError(InputError):
    """The state database belongs to a different project, source or archive."""


class CorruptStateError(InputError):
    """The job database cannot be read (corrupt, truncated, not SQLite)."""


class JobState:
    """A thread-safe handle on one job database."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; after a power loss the
            # last few marks may be lost, which is safe: the destination's files
            # were fsync'd first and a resumed run finds them on disk.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            self._add_missing_columns()
            self._db.execute("SELECT COUNT(*) FROM meta").fetchone()
        except sqlite3.DatabaseError as exc:
            raise CorruptStateError(
                Problem(
                    str(path),
                    f"the job database cannot be read ({exc}); it may be corrupt or truncated. "
                    "Run with --new-job to set it aside and start afresh (files already in the "
                    "archive are found again and not fetched twice).",
                )
            ) from exc

    def _add_missing_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def begin_run(self) -> int:
        """Record that a run starts; instances it stores carry its id."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO runs (started, pid, host) VALUES (?, ?, ?)", (time.time(), os.getpid(), socket.gethostname())
            )
            return int(cursor.lastrowid)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    #: How a write transaction starts: IMMEDIATE takes SQLite's write lock at
    #: once, so two writers never deadlock upgrading a read lock.
    BEGIN = "BEGIN IMMEDIATE"

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; inside another of this thread it is part of that
        one (the lock is reentrant, and only its holder has one open)."""
        with self._lock:
            if self._db.in_transaction:
                yield self._db
                return
            self._db.execute(self.BEGIN)
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, *params: Any) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _write(self, sql: str, params: tuple) -> None:
        """One statement as a transaction of its own."""
        with self.transaction() as db:
            db.execute(sql, params)

    # -- job identity ------------------------------------------------------------

    def check_identity(self, identity: dict[str, str]) -> None:
        """Record or verify what this database belongs to.

        Mixing two projects, sources or archives in one state would make
        "already stored" wrong, so a mismatch is an error that says what
        changed.
        """
        with self.transaction() as db:
            stored = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                db.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", str(SCHEMA_VERSION)), *identity.items()])
                return
        changed = [
            f"{key} was {stored[key]!r}, now {value!r}"
            for key, value in identity.items()
            if key in stored and stored[key] != value
        ]
        if changed:
            raise StateMismatchError(
                Problem(
                    str(self.path),
                    "this job state was made with a different config ("
                    + "; ".join(changed)
                    + "). Resuming would mix two jobs: point `state:` at a new file, "
                    "or run with --new-job to set the old state aside.",
                )
            )

    def learnt(self, source: str) -> dict[str, str]:
        """What the source's backend learnt on earlier runs (see :meth:`remember`)."""
        prefix = f"learnt:{source}:"
        return {key[len(prefix):]: value for key, value in self._query(
            "SELECT key, value FROM meta WHERE key LIKE ? ESCAPE '\\'", _like_prefix(prefix))}

    def remember(self, source: str, facts: dict[str, str]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(f"learnt:{source}:{key}", str(value)) for key, value in facts.items()],
            )

    # -- inputs and rows ---------------------------------------------------------

    def begin_input(self, kind: str, path: str, fingerprint: str, rows: Iterable[RowQuery]) -> int:
        """Register an input (CSV or results table) and its rows; an input
        seen before (same fingerprint) is resumed."""
        rows = list(rows)
        now = time.time()
        with self.transaction() as db:
            found = db.execute("SELECT id FROM inputs WHERE fingerprint = ?", (fingerprint,)).fetchone()
            if found:
                db.execute("UPDATE inputs SET updated = ?, path = ? WHERE id = ?", (now, path, found[0]))
                return found[0]
            cursor = db.execute(
                "INSERT INTO inputs (fingerprint, kind, path, rows, started, updated) VALUES (?, ?, ?, ?, ?, ?)",
                (fingerprint, kind, path, len(rows), now, now),
            )
            input_id = cursor.lastrowid
            db.executemany(
                "INSERT INTO rows (input, line, query) VALUES (?, ?, ?)",
                [(input_id, row.line, json.dumps(asdict(row))) for row in rows],
            )
            return input_id

    def latest_input(self) -> tuple[int, str, str] | None:
        found = self._query("SELECT id, kind, path FROM inputs ORDER BY updated DESC LIMIT 1")
        return found[0] if found else None

    def pending_rows(self, input_id: int) -> list[int]:
        return [line for (line,) in self._query(
            "SELECT line FROM rows WHERE input = ? AND status != ? ORDER BY line", input_id, RowStatus.QUERIED)]

    def row_query(self, input_id: int, line: int) -> RowQuery:
        """One CSV row as registered (a step elsewhere reads its work from here)."""
        (query,) = self._query("SELECT query FROM rows WHERE input = ? AND line = ?", input_id, line)[0]
        return _row_from_json(query)

    def record_row_matches(self, input_id: int, line: int, studies: list[Study], warnings: list[str] = ()) -> None:
        with self.transaction() as db:
            for position, study in enumerate(studies):
                db.execute(
                    _RECORD_STUDY,
                    (study.study_uid, json.dumps(asdict(study)), time.time(), StudyStatus.FOUND),
                )
                db.execute(
                    "INSERT OR IGNORE INTO matches VALUES (?, ?, ?, ?)", (input_id, line, position, study.study_uid)
                )
            db.execute(_ROW_QUERIED, (RowStatus.QUERIED, _warnings_json(warnings), input_id, line))

    def record_row_failure(self, input_id: int, line: int, error: str, still_pending: bool = False) -> None:
        """Record why a row's query failed; ``still_pending`` leaves it to do
        (the source was unreachable: not the row's fault)."""
        self._write(
            "UPDATE rows SET status = ?, attempts = attempts + 1, error = ? WHERE input = ? AND line = ?",
            (RowStatus.PENDING if still_pending else RowStatus.FAILED, error, input_id, line),
        )

    def row_answers(self, input_id: int) -> list[RowAnswer]:
        """What each row of an input gave so far, in CSV order."""
        rows = self._query(
            "SELECT line, query, status, error, warnings FROM rows WHERE input = ? ORDER BY line", input_id)
        matches: dict[int, list[Study]] = {}
        for line, data in self._query(
            "SELECT m.line, s.data FROM matches m JOIN studies s USING (study_uid) "
            "WHERE m.input = ? ORDER BY m.line, m.position", input_id):
            matches.setdefault(line, []).append(study_from_dict(json.loads(data)))
        answers = []
        for line, query, status, error, warnings in rows:
            row = _row_from_json(query)
            if status == RowStatus.QUERIED:
                outcome, reason = RowOutcome.MATCHED, ""
            elif status == RowStatus.FAILED:
                outcome, reason = RowOutcome.QUERY_FAILED, error or ""
            else:
                outcome, reason = RowOutcome.NOT_QUERIED, error or "interrupted"
            notes = tuple(_warnings_from(warnings)) if status == RowStatus.QUERIED else ()
            answers.append(
                RowAnswer(line, row.subject, row.session, matches.get(line, []) if status == RowStatus.QUERIED else [],
                          outcome, reason, notes)
            )
        return answers

    # -- studies -------------------------------------------------------------------

    def selected_study(self, study_uid: str) -> tuple[Study, Labels, int]:
        """A selected study, its labels and the CSV line it is retrieved for."""
        data, subject, session, rs, rss, line = self._query(
            "SELECT data, subject, session, relabel_subject, relabel_session, line FROM studies WHERE study_uid = ?",
            study_uid)[0]
        return study_from_dict(json.loads(data)), Labels(subject, session, bool(rs), bool(rss)), line

    def set_study_status(self, study_uid: str, status: StudyStatus, error: str | None = None) -> None:
        self._write(_SET_STUDY_STATUS, (status, error, int(status == StudyStatus.FAILED), time.time(), study_uid))

    def study_status(self, study_uid: str) -> StudyStatus | None:
        found = self._query("SELECT status FROM studies WHERE study_uid = ?", study_uid)
        return StudyStatus(found[0][0]) if found else None

    # A job's studies are planned and judged many at a time: one statement per
    # chunk of studies, not a few per study, which on the queue database are
    # round trips the driver makes one after the other (~6 a study before the
    # retrieval and ~6 after it: 1.2 million for 100,000 studies).

    def studies_labels(self, study_uids: Iterable[str]) -> dict[str, tuple[Labels | None, StudyStatus]]:
        """Per study: the labels it was selected under (``None`` if never) and
        its status; a study the job does not know is absent."""
        found: dict[str, tuple[Labels | None, StudyStatus]] = {}
        for chunk, marks in _chunks(study_uids):
            for uid, subject, session, rs, rss, status in self._query(
                    "SELECT study_uid, subject, session, relabel_subject, relabel_session, status FROM studies "
                    f"WHERE study_uid IN ({marks})", *chunk):
                labels = None if subject is None else Labels(subject, session, bool(rs), bool(rss))
                found[uid] = (labels, StudyStatus(status))
        return found

    def select_studies(self, selected: Iterable[tuple[Study, Labels, int]]) -> None:
        """Select studies ``(study, labels, CSV line)`` for retrieval, in one
        transaction: a study stored or being retrieved keeps its status."""
        selected = list(selected)
        if not selected:
            return
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO studies (study_uid, data, updated) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [(study.study_uid, json.dumps(asdict(study)), now) for study, _, _ in selected],
            )
            db.executemany(
                _SELECT_STUDY,
                [(labels.subject, labels.session, int(labels.relabel_subject), int(labels.relabel_session), line,
                  StudyStatus.STORED, StudyStatus.RETRIEVING, StudyStatus.SELECTED, now, study.study_uid)
                 for study, labels, line in selected],
            )

    def set_study_statuses(self, outcomes: Iterable[tuple[str, StudyStatus, str | None]]) -> None:
        """:meth:`set_study_status` of many studies ``(uid, status, error)``, in one transaction."""
        outcomes = list(outcomes)
        if not outcomes:
            return
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                _SET_STUDY_STATUS,
                [(status, error, int(status == StudyStatus.FAILED), now, uid) for uid, status, error in outcomes],
            )

    # -- series and instances ------------------------------------------------------

    def known_series(self, study_uid: str) -> list[tuple[Series, SeriesStatus]]:
        rows = self._query("SELECT data, status FROM series WHERE study_uid = ? ORDER BY rowid", study_uid)
        return [(_series_from_json(data), SeriesStatus(status)) for data, status in rows]

    def studies_series(self, study_uids: Iterable[str]) -> dict[str, list[tuple[Series, SeriesStatus]]]:
        """:meth:`known_series` of many studies (each one's as listed, in order)."""
        study_uids = list(study_uids)
        found: dict[str, list[tuple[Series, SeriesStatus]]] = {uid: [] for uid in study_uids}
        for chunk, marks in _chunks(study_uids):
            for study_uid, data, status in self._query(
                    f"SELECT study_uid, data, status FROM series WHERE study_uid IN ({marks}) ORDER BY rowid", *chunk):
                found[study_uid].append((_series_from_json(data), SeriesStatus(status)))
        return found

    def studies_instance_counts(self, study_uids: Iterable[str]) -> dict[str, SeriesCounts]:
        """Per series of these studies: whether its expected instances are
        known, how many instances the job knows of it and how many are stored."""
        found: dict[str, SeriesCounts] = {}
        for chunk, marks in _chunks(study_uids):
            for series_uid, expected, known, stored in self._query(
                    "SELECT s.series_uid, s.expected, COUNT(i.sop_uid), COALESCE(SUM(i.stored), 0) FROM series s "
                    "LEFT JOIN instances i ON i.series_uid = s.series_uid "
                    f"WHERE s.study_uid IN ({marks}) GROUP BY s.series_uid, s.expected", *chunk):
                found[series_uid] = SeriesCounts(expected is not None, int(known), int(stored))
        return found

    def study_instances(self, study_uid: str) -> dict[str, tuple[list[str] | None, set[str]]]:
        """Per series of a study: its expected instances (:meth:`expected_instances`)
        and its stored ones (:meth:`stored_instances`), in one read."""
        found: dict[str, tuple[list[str] | None, set[str]]] = {}
        for series_uid, expected, sop_uid, stored in self._query(
                "SELECT s.series_uid, s.expected, i.sop_uid, i.stored FROM series s "
                "LEFT JOIN instances i ON i.series_uid = s.series_uid WHERE s.study_uid = ?", study_uid):
            uids, done = found.setdefault(series_uid, ([] if expected is not None else None, set()))
            if sop_uid is not None:
                if uids is not None:
                    uids.append(sop_uid)
                if stored:
                    done.add(sop_uid)
        return found

    def series_status(self, series_uid: str) -> SeriesStatus | None:
        found = self._query("SELECT status FROM series WHERE series_uid = ?", series_uid)
        return SeriesStatus(found[0][0]) if found else None

    def series_error(self, series_uid: str) -> str | None:
        found = self._query("SELECT error FROM series WHERE series_uid = ?", series_uid)
        return found[0][0] if found else None

    def series(self, series_uid: str) -> Series:
        (data,) = self._query("SELECT data FROM series WHERE series_uid = ?", series_uid)[0]
        return _series_from_json(data)

    def record_series(self, series: Series, selected: bool) -> None:
        self._write(
            "INSERT INTO series (series_uid, study_uid, data, status, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (series_uid) DO UPDATE SET data = excluded.data, status = " + _KEEP_PROGRESS,
            (series.series_uid, series.study_uid, _series_data(series), _listed_status(selected), time.time()),
        )

    def record_listing(self, listing: list[tuple[Series, bool]]) -> None:
        """A study's series as the source listed them (each with whether the
        series filter selects it), and the expected instances of the selected
        ones whose listing named them, in one transaction. A study that knows
        any series is not listed again, so a run killed while recording them
        must leave all or none: with some, the resumed study failed for ever
        as "incomplete"."""
        with self.transaction():
            self._record_each(listing)

    def _record_each(self, listing: list[tuple[Series, bool]]) -> None:
        for series, selected in listing:
            self.record_series(series, selected)
            if selected and series.instance_uids is not None:  # saves an image-level query per series
                self.record_expected(series.series_uid, [Instance(series.series_uid, uid) for uid in series.instance_uids])

    def set_series_status(
        self, series_uid: str, status: SeriesStatus, error: str | None = None, attempt: bool = False
    ) -> None:
        self._write(
            "UPDATE series SET status = ?, error = ?, attempts = attempts + ?, updated = ? WHERE series_uid = ?",
            (status, error, int(attempt), time.time(), series_uid),
        )

    def set_series_statuses(self, series_uids: Iterable[str], status: SeriesStatus) -> None:
        """:meth:`set_series_status` of many series (no error, no attempt counted)."""
        for chunk, marks in _chunks(series_uids):
            self._write(
                f"UPDATE series SET status = ?, error = NULL, updated = ? WHERE series_uid IN ({marks})",
                (status, time.time(), *chunk),
            )

    def record_expected(self, series_uid: str, instances: list[Instance]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO instances (sop_uid, series_uid) VALUES (?, ?)",
                [(i.sop_instance_uid, series_uid) for i in instances],
            )
            db.execute("UPDATE series SET expected = ? WHERE series_uid = ?", (len(instances), series_uid))

    def expected_instances(self, series_uid: str) -> list[str] | None:
        found = self._query("SELECT expected FROM series WHERE series_uid = ?", series_uid)
        if not found or found[0][0] is None:
            return None
        return [uid for (uid,) in self._query("SELECT sop_uid FROM instances WHERE series_uid = ?", series_uid)]

    def stored_instances(self, series_uid: str) -> set[str]:
        return {uid for (uid,) in self._query(
            "SELECT sop_uid FROM instances WHERE series_uid = ? AND stored = 1", series_uid)}

    def mark_stored(self, series_uid: str, sop_uids: list[str], run: int | None = None,
                    sizes: dict[str, int] | None = None, warnings: dict[str, str] | None = None) -> None:
        """Record instances the destination has made durable (by run ``run``,
        with their sizes when known, and the warning a destination stored
        one with, e.g. a C-STORE 0xB000 "coercion of data elements")."""
        if not sop_uids:
            return
        sizes = sizes or {}
        warnings = warnings or {}
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO instances (sop_uid, series_uid, stored, size, run, warning) VALUES (?, ?, 1, ?, ?, ?) "
                "ON CONFLICT (sop_uid) DO UPDATE SET stored = 1, size = excluded.size, run = excluded.run, "
                "warning = excluded.warning WHERE instances.stored = 0",
                [(uid, series_uid, sizes.get(uid), run, warnings.get(uid)) for uid in sop_uids],
            )
            db.execute(
                _RECOUNT_STORED,
                (series_uid, series_uid),
            )

    def unmark_stored(self, series_uid: str, sop_uids: list[str]) -> None:
        """The destination turned out not to hold these after all (verification)."""
        with self.transaction() as db:
            db.executemany("UPDATE instances SET stored = 0 WHERE sop_uid = ?", [(uid,) for uid in sop_uids])
            db.execute(
                _RECOUNT_STORED,
                (series_uid, series_uid),
            )

    # -- summaries -----------------------------------------------------------------

    def stored_with_warning(self, run: int | None = None) -> list[tuple[str, str, str]]:
        """Stored instances the destination acknowledged with a warning
        ``(series_uid, sop_uid, warning)``: those of run ``run``, or all."""
        sql = "SELECT series_uid, sop_uid, warning FROM instances WHERE stored = 1 AND warning IS NOT NULL"
        if run is None:
            return [tuple(r) for r in self._query(sql + " ORDER BY series_uid, sop_uid")]
        return [tuple(r) for r in self._query(sql + " AND run = ? ORDER BY series_uid, sop_uid", run)]

    def stored_by_run(self, run: int) -> tuple[int, int]:
        """Instances a run stored (and still stored: not found missing by a
        verification since), and their bytes. From the index on run alone:
        the queue's driver asks several times a second."""
        count, size = self._query(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances WHERE run = ? AND stored = 1", run
        )[0]
        return int(count), int(size)

    def counts(self) -> dict[str, dict[str, int]]:
        """Counts per status of rows (latest input), studies and series."""
        result: dict[str, dict[str, int]] = {}
        latest = self.latest_input()
        if latest:
            result["rows"] = dict(self._query("SELECT status, COUNT(*) FROM rows WHERE input = ? GROUP BY status", latest[0]))
        result["studies"] = dict(self._query(
            "SELECT status, COUNT(*) FROM studies WHERE subject IS NOT NULL GROUP BY status"))
        result["series"] = dict(self._query("SELECT status, COUNT(*) FROM series GROUP BY status"))
        result["instances"] = dict(self._query(
            "SELECT CASE stored WHEN 1 THEN 'stored' ELSE 'missing' END, COUNT(*) FROM instances GROUP BY stored"))
        return result

    def failures(self) -> list[dict[str, Any]]:
        """Every failed row, study and series with its reason and attempts."""
        failed: list[dict[str, Any]] = []
        latest = self.latest_input()
        if latest:
            for line, error, attempts in self._query(
                    "SELECT line, error, attempts FROM rows WHERE input = ? AND status = ?", latest[0], RowStatus.FAILED):
                failed.append({"kind": "row", "row": line, "error": error, "attempts": attempts})
        for uid, line, error, attempts in self._query(
                "SELECT study_uid, line, error, attempts FROM studies WHERE status = ?", StudyStatus.FAILED):
            failed.append({"kind": "study", "row": line, "StudyInstanceUID": uid, "error": error, "attempts": attempts})
        for uid, study_uid, error, attempts in self._query(
                "SELECT series_uid, study_uid, error, attempts FROM series WHERE status = ?", SeriesStatus.FAILED):
            failed.append({"kind": "series", "StudyInstanceUID": study_uid, "SeriesInstanceUID": uid,
                           "error": error, "attempts": attempts})
        return failed


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _row_from_json(data: str) -> RowQuery:
    return RowQuery(**json.loads(data))


def _warnings_from(text: str | None) -> list[str]:
    """Backend remarks on a row: a JSON list (schema 1 kept one '; '-joined string)."""
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return [text]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _series_from_json(data: str) -> Series:
    values = json.loads(data)
    values["sop_class_uids"] = frozenset(values.get("sop_class_uids", ()))
    values["transfer_syntaxes"] = frozenset(values.get("transfer_syntaxes", ()))
    values.pop("instance_uids", None)
    return Series(**values)


# -- the same job state in PostgreSQL (the queue executor's) --------------------------

#: The schema above in PostgreSQL's words: ids are identities, times double
#: precision, and series keep their arrival order in ``ord`` (SQLite's rowid).
POSTGRES_SCHEMA = (
    SCHEMA.replace("id INTEGER PRIMARY KEY", "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
    .replace(" REAL", " DOUBLE PRECISION")
    .replace("series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, data TEXT NOT NULL,",
             "series_uid TEXT PRIMARY KEY, ord BIGINT GENERATED ALWAYS AS IDENTITY, study_uid TEXT NOT NULL, "
             "data TEXT NOT NULL,")
)
#: dqr's tables live next to the queue engine's, under their own schema.
POSTGRES_SCHEMA_NAME = "dqr"


@lru_cache(maxsize=256)  # the same few dozen statements, thousands of times a job
def _postgres_sql(sql: str) -> str:
    """One statement of :class:`JobState` in PostgreSQL's dialect."""
    sql = sql.replace("?", "%s").replace("ORDER BY rowid", "ORDER BY ord")
    if sql.startswith("INSERT OR IGNORE INTO"):
        sql = "INSERT INTO" + sql[len("INSERT OR IGNORE INTO"):] + " ON CONFLICT DO NOTHING"
    if sql.startswith(("INSERT INTO runs", "INSERT INTO inputs")):
        sql += " RETURNING id"
    return sql


class _PostgresCursor:
    def __init__(self, cursor: Any, returning: bool) -> None:
        self._cursor = cursor
        self.lastrowid = cursor.fetchone()[0] if returning else None

    def fetchone(self) -> Any:
        return self._cursor.fetchone()

    def fetchall(self) -> list[tuple]:
        return self._cursor.fetchall()


class _PostgresConnection:
    """The few sqlite3.Connection methods JobState uses, over psycopg."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Iterable[Any] = ()) -> _PostgresCursor:
        translated = _postgres_sql(sql)
        return _PostgresCursor(self._conn.execute(translated, tuple(params)), translated.endswith("RETURNING id"))

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(_postgres_sql(sql), [tuple(r) for r in rows])

    def close(self) -> None:
        self._conn.close()


class PostgresJobState(JobState):
    """The job state in a PostgreSQL database (schema ``dqr``), shared by every
    process of a cluster: ``dqr run``, the workers, ``dqr status`` and ``dqr
    retry`` on any machine read and write the same job. Same statements as
    the SQLite state, translated (placeholders, ``INSERT OR IGNORE``, rowid).
    ``label`` names it in messages instead of the URL, which is a secret."""

    BEGIN = "BEGIN"

    def __init__(self, url: str, label: str = "the queue database") -> None:
        import psycopg

        self.path = Path(label)
        self._lock = threading.RLock()
        self._url = url
        self._label = label
        self._local = threading.local()
        self._connections: list[Any] = []
        try:
            conn = self._connect()
            with conn.transaction():
                # Concurrent first starts would race on CREATE ... IF NOT EXISTS.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('dqr-state-schema'))")
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {POSTGRES_SCHEMA_NAME}")
                conn.execute(f"SET search_path TO {POSTGRES_SCHEMA_NAME}")
                for statement in POSTGRES_SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                for table, columns in ADDED_COLUMNS.items():  # a database made by an older dqr
                    for name, kind in columns.items():
                        conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
        except psycopg.Error as exc:
            raise self._unusable(exc) from None

    def _connect(self) -> Any:
        """A new connection, configured, as this thread's."""
        import psycopg

        conn = psycopg.connect(self._url, autocommit=True, application_name="dqr-state")
        with self._lock:
            self._connections.append(conn)
        self._configure(conn)
        self._local.db = _PostgresConnection(conn)
        return conn

    def _unusable(self, exc: Exception) -> CorruptStateError:
        from dqr.cluster_limits import mask_url

        return CorruptStateError(
            Problem(self._label, f"the job state in the queue database cannot be used: {mask_url(str(exc))}")
        )

    @staticmethod
    def _configure(conn: Any) -> None:
        conn.execute(f"SET search_path TO {POSTGRES_SCHEMA_NAME}")
        # As the SQLite state's synchronous=NORMAL: a commit does not wait
        # for its WAL flush (a round trip to the disk per mark, most of
        # what a step cost in the database). A crash of the *database
        # server* may lose the last marks, which is safe: the destination
        # made each instance durable (or acknowledged it) before it was
        # marked, so a resumed run finds it in the archive again (or sends
        # it once more to a network destination, which keeps one copy per
        # SOP Instance UID). A killed dqr process loses nothing: the
        # server has the commit.
        conn.execute("SET synchronous_commit TO off")

    # One connection per thread: the server orders concurrent transactions
    # (as it does those of other processes), so the steps running in this
    # process do not queue behind one connection -- and the driver's
    # progress reads behind none of them -- as they would on SQLite's one
    # writer, where the lock costs nothing next to a commit.

    @property
    def _db(self) -> _PostgresConnection:
        if getattr(self._local, "db", None) is None:
            import psycopg

            try:
                self._connect()
            except psycopg.Error as exc:
                raise self._unusable(exc) from None
        return self._local.db

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        db = self._db
        db.execute(self.BEGIN)
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def record_listing(self, listing: list[tuple[Series, bool]]) -> None:
        # The SQLite state's statements, series after series, as one
        # statement: atomic by itself, one round trip for the whole study
        # instead of BEGIN, two per series and COMMIT.
        rows: dict[str, tuple[str, str, str, int | None]] = {}
        instances: list[tuple[str, str]] = []
        for series, selected in listing:
            expected = None
            if selected and series.instance_uids is not None:
                expected = len(series.instance_uids)
                instances += [(uid, series.series_uid) for uid in series.instance_uids]
            # a series listed twice is written once (one statement may not
            # update a row twice), in first place, as one after the other would
            # leave it: the last listing's data and status, the last count
            if expected is None and series.series_uid in rows:
                expected = rows[series.series_uid][3]
            rows[series.series_uid] = (series.study_uid, _series_data(series), _listed_status(selected), expected)
        if not rows:
            return
        uids = list(rows)
        self._write(
            "WITH added AS (INSERT INTO instances (sop_uid, series_uid) "
            "SELECT u, s FROM unnest(?::text[], ?::text[]) AS i (u, s) ON CONFLICT DO NOTHING) "
            "INSERT INTO series (series_uid, study_uid, data, status, updated, expected) "
            "SELECT uid, study, data, status, ?, expected "
            "FROM unnest(?::text[], ?::text[], ?::text[], ?::text[], ?::integer[]) WITH ORDINALITY "
            "AS t (uid, study, data, status, expected, n) ORDER BY n "
            "ON CONFLICT (series_uid) DO UPDATE SET data = excluded.data, status = " + _KEEP_PROGRESS
            + ", expected = COALESCE(excluded.expected, series.expected)",
            ([u for u, _ in instances], [s for _, s in instances], time.time(),
             uids, [rows[u][0] for u in uids], [rows[u][1] for u in uids], [rows[u][2] for u in uids],
             [rows[u][3] for u in uids]),
        )

    def record_row_matches(self, input_id: int, line: int, studies: list[Study], warnings: list[str] = ()) -> None:
        # The SQLite state's statements as one: the row's studies and matches
        # and its status, one round trip instead of five or more.
        data: dict[str, str] = {}
        for study in studies:  # a study answered twice: recorded once, as last answered
            data[study.study_uid] = json.dumps(asdict(study))
        uids = list(data)
        self._write(
            "WITH found AS (INSERT INTO studies (study_uid, data, updated) "
            "SELECT u, d, ? FROM unnest(?::text[], ?::text[]) AS t (u, d) "
            "ON CONFLICT (study_uid) DO UPDATE SET data = excluded.data WHERE studies.status = ?), "
            "matched AS (INSERT INTO matches SELECT ?, ?, p - 1, u FROM unnest(?::text[]) WITH ORDINALITY AS m (u, p) "
            "ON CONFLICT DO NOTHING) " + _ROW_QUERIED,
            (time.time(), uids, [data[u] for u in uids], StudyStatus.FOUND,
             input_id, line, [study.study_uid for study in studies],
             RowStatus.QUERIED, _warnings_json(warnings), input_id, line),
        )

    def _query(self, sql: str, *params: Any) -> list[tuple]:
        return self._db.execute(sql, params).fetchall()

    def _write(self, sql: str, params: tuple) -> None:
        # In autocommit a statement is a transaction of its own: no BEGIN
        # and COMMIT around it (two statements fewer for each status set).
        self._db.execute(sql, params)

    # The instances of a series go in as arrays, one statement for them all
    # (an executemany sends one per instance). Same rows as the SQLite state's.

    def record_expected(self, series_uid: str, instances: list[Instance]) -> None:
        # both in one statement, a transaction by itself
        self._write(
            "WITH added AS (INSERT INTO instances (sop_uid, series_uid) SELECT u, ? FROM unnest(?::text[]) AS u "
            "ON CONFLICT DO NOTHING) UPDATE series SET expected = ? WHERE series_uid = ?",
            (series_uid, [i.sop_instance_uid for i in instances], len(instances), series_uid),
        )

    def mark_stored(self, series_uid: str, sop_uids: list[str], run: int | None = None,
                    sizes: dict[str, int] | None = None, warnings: dict[str, str] | None = None) -> None:
        if not sop_uids:
            return
        sizes = sizes or {}
        warnings = warnings or {}
        # once each: one statement may not update a row twice
        sop_uids = list(dict.fromkeys(sop_uids))
        # One statement, a transaction by itself (not BEGIN, insert, recount,
        # COMMIT: four round trips a series). Its recount reads the rows as
        # they were before it, so the instances it newly stored are added:
        # those RETURNING names (inserted, or updated from not stored).
        self._write(
            "WITH added AS (INSERT INTO instances (sop_uid, series_uid, stored, size, run, warning) "
            "SELECT u, ?, 1, s, ?, w FROM unnest(?::text[], ?::integer[], ?::text[]) AS t (u, s, w) "
            "ON CONFLICT (sop_uid) DO UPDATE SET stored = 1, size = excluded.size, run = excluded.run, "
            "warning = excluded.warning WHERE instances.stored = 0 RETURNING 1) "
            f"UPDATE series SET stored = {_STORED_COUNT} + (SELECT COUNT(*) FROM added) WHERE series_uid = ?",
            (series_uid, run, sop_uids, [sizes.get(uid) for uid in sop_uids],
             [warnings.get(uid) for uid in sop_uids], series_uid, series_uid),
        )

    def expected_instances(self, series_uid: str) -> list[str] | None:
        # One statement, not two: called a few times a series by each step.
        rows = self._query(
            "SELECT s.expected, i.sop_uid FROM series s LEFT JOIN instances i ON i.series_uid = s.series_uid "
            "WHERE s.series_uid = ?",
            series_uid,
        )
        if not rows or rows[0][0] is None:
            return None
        return [uid for _, uid in rows if uid is not None]

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


    def job_id(self) -> str:
        """This job's id, made when first asked: the queue executor puts it
        into every step's workflow id, so a new job's steps are never taken
        for an earlier job's (its run ids start at 1 again)."""
        import uuid

        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", ("job", uuid.uuid4().hex[:12]))
            return str(db.execute("SELECT value FROM meta WHERE key = ?", ("job",)).fetchone()[0])

    @staticmethod
    def set_aside(conn: Any) -> str | None:
        """Move the job in this database (schema ``dqr``) aside to schema
        ``dqr_<date>_<time>``, kept as it was (as ``--new-job`` renames a
        SQLite state); the next :class:`PostgresJobState` starts an empty job.
        The new schema's name, or None if there was no job. ``conn``: an
        autocommit psycopg connection."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('dqr-state-schema'))")
            exists = conn.execute(
                "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (POSTGRES_SCHEMA_NAME,)
            ).fetchone()
            if not exists:
                return None
            stamp = time.strftime("%Y%m%d_%H%M%S")
            aside, n = f"{POSTGRES_SCHEMA_NAME}_{stamp}", 1
            while conn.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (aside,)).fetchone():
                n += 1
                aside = f"{POSTGRES_SCHEMA_NAME}_{stamp}_{n}"
            conn.execute(f'ALTER SCHEMA {POSTGRES_SCHEMA_NAME} RENAME TO "{aside}"')
        return aside
