"""The manifest: one JSON line per stored instance, beside what it describes
(``manifest.jsonl`` in each archive session; a network destination may keep
one beside the job state).

A line says where the instance is (``path``, relative to the manifest's
folder), which instance it is (Study, Series and SOP Instance UIDs), what
relabeling replaced (``replaced``: keyword -> original value), under which
labels (``labels``), and a digest of the stored Part-10 bytes (``sha256``)
with their ``size``. The digest is what lets dqr tell its own file from a
twin, a stray or a file relabeled differently: a file is trusted as already
stored only when its bytes match its line.

Provenance must survive ``kill -9``: the line is written *before* the file
is linked into place (an intent), so a file in place always has its line. A
line whose file never arrived is dropped when the manifest is next loaded,
and so is every line a later one for the same path superseded: each stored
file keeps exactly one line. Lines are appended with one ``write(2)``; they
are made durable by the destination's commit (fsync or syncfs), together
with the files.

Older manifests (lines without ``sha256`` or ``labels``) are read as they
are: such a line is provenance, but not proof of content.

A network destination, which cannot hold the manifest, keeps one per
session beside the job state, written as each acknowledgement arrives
(:func:`append_records`); it also appends a ``"missing"`` line when
verification finds an acknowledged instance gone: the last line about an
instance says whether it counts as held (:func:`held_instances`).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dqr.model import Labels

MANIFEST = "manifest.jsonl"


def digest(data: bytes) -> str:
    """The digest a manifest line holds: sha256 of the stored bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def labels_record(labels: Labels) -> dict[str, Any]:
    """How a manifest line records the labels an instance was stored under."""
    return asdict(labels)


@dataclass(frozen=True)
class ManifestRecord:
    """One manifest line."""

    path: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    size: int
    replaced: dict[str, str]
    stored: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    sha256: str | None = None
    labels: dict[str, Any] | None = None

    def to_json(self) -> str:
        record: dict[str, Any] = {
            "path": self.path,
            "StudyInstanceUID": self.study_uid,
            "SeriesInstanceUID": self.series_uid,
            "SOPInstanceUID": self.sop_instance_uid,
            "size": self.size,
            "replaced": self.replaced,
            "stored": self.stored,
        }
        if self.sha256 is not None:
            record["sha256"] = self.sha256
        if self.labels is not None:
            record["labels"] = self.labels
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> ManifestRecord | None:
        """The record of one line; ``None`` for a line that is not one (a
        torn last line, a hand edit)."""
        try:
            data = json.loads(line)
            return cls(
                path=str(data["path"]),
                study_uid=str(data["StudyInstanceUID"]),
                series_uid=str(data["SeriesInstanceUID"]),
                sop_instance_uid=str(data["SOPInstanceUID"]),
                size=int(data.get("size", 0)),
                replaced=dict(data.get("replaced") or {}),
                stored=str(data.get("stored", "")),
                sha256=data.get("sha256"),
                labels=data.get("labels"),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @property
    def proves_content(self) -> bool:
        """Whether this line can vouch for a file's bytes (older lines cannot)."""
        return self.sha256 is not None


def read_records(path: Path) -> list[ManifestRecord]:
    """Every valid line of a manifest file, in order (none if it is absent)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [record for line in text.splitlines() if line.strip() and (record := ManifestRecord.from_json(line))]


class Manifest:
    """One manifest file, indexed by path; thread-safe. Get it with
    :func:`open_manifest`, which keeps one per file in this process."""

    def __init__(self, path: Path, present: Callable[[str], bool] | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._records: dict[str, ManifestRecord] = {}
        self._stale = False
        # Open from the first append until the next sync: one open a commit
        # (a series), not one an instance; never more than the series being
        # stored at once, however many sessions a job has.
        self._fd: int | None = None
        lines = read_records(path)
        for record in lines:
            self._records[record.path] = record  # the last line for a path wins
        if present is not None:  # lines of intents whose file never arrived
            self._records = {key: record for key, record in self._records.items() if present(key)}
        if len(self._records) != len(lines):
            self._rewrite()

    def get(self, path: str) -> ManifestRecord | None:
        with self._lock:
            return self._records.get(path)

    def records(self) -> list[ManifestRecord]:
        with self._lock:
            return list(self._records.values())

    def append(self, record: ManifestRecord) -> None:
        """Add a line (before the file it describes is in place). A line for
        a path that has one supersedes it; the file is compacted at sync."""
        data = (record.to_json() + "\n").encode("utf-8")
        with self._lock:
            if record.path in self._records:
                self._stale = True
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._fd, data)  # one write(2): a killed process leaves whole lines
            self._records[record.path] = record

    def forget(self, path: str) -> None:
        """Drop the line of a file that was set aside."""
        with self._lock:
            if self._records.pop(path, None) is not None:
                self._stale = True

    def sync(self) -> None:
        """Compact if lines were superseded, and close the file until the
        next append; the caller makes the file durable."""
        with self._lock:
            self._close()
            if self._stale:
                self._rewrite()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _rewrite(self) -> None:
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write("".join(record.to_json() + "\n" for record in self._records.values()))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
        self._stale = False


class Manifests:
    """The manifests one destination has open, each loaded (and compacted)
    once; thread-safe."""

    def __init__(self) -> None:
        self._open: dict[Path, Manifest] = {}
        self._guard = threading.Lock()

    def close(self) -> None:
        with self._guard:
            for manifest in self._open.values():
                manifest.close()

    def open(self, path: Path, present: Callable[[str], bool] | None = None) -> Manifest:
        """The :class:`Manifest` at ``path``; ``present(line_path)`` says
        whether a line's file exists (lines of absent files are dropped)."""
        with self._guard:
            manifest = self._open.get(path)
            if manifest is None:
                manifest = self._open[path] = Manifest(path, present)
            return manifest


# -- the lines a network destination keeps ------------------------------------------

_append_locks: dict[Path, threading.Lock] = {}
_append_locks_guard = threading.Lock()


def now() -> str:
    """The manifest's timestamp format (local time with offset), to the
    second: formatted once a second, not for each of the instances stored in it."""
    global _now
    second = int(time.time())
    if _now[0] != second:
        _now = (second, time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second)))
    return _now[1]


_now: tuple[int, str] = (-1, "")


def append_records(manifest: Path, records: Iterable[dict[str, Any]], fsync: bool = True) -> None:
    """Append ``records`` as JSON lines (creating the folders); thread-safe
    for one file within the process. ``fsync=False`` only hands them to the
    OS (they survive the process being killed, not a power cut): for a
    caller that fsyncs once later, before reporting anything stored."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    if not lines:
        return
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with _append_locks_guard:
        lock = _append_locks.setdefault(manifest, threading.Lock())
    with lock, open(manifest, "a", encoding="utf-8") as handle:
        handle.write("".join(lines))
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())


class ManifestAppender:
    """One writer's appends to a network destination's manifest: the file
    is opened at the first line and kept open until :meth:`sync` makes it
    durable and closes it -- one open and one fsync per commit instead of
    an open per instance. Each append is one ``write(2)`` on an
    ``O_APPEND`` descriptor, so the lines of writers sharing the file (a
    session's series) never interleave, and a killed process leaves whole
    lines; they survive the process being killed as soon as written, a
    power cut once synced."""

    def __init__(self, manifest: Path) -> None:
        self.manifest = manifest
        self._fd: int | None = None
        self._lock = threading.Lock()

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        self.append_lines("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))

    def append_lines(self, lines: str) -> None:
        """Append JSON lines already encoded (each ending in a newline)."""
        data = lines.encode("utf-8")
        if not data:
            return
        with self._lock:
            if self._fd is None:
                self.manifest.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            view = memoryview(data)
            while view:  # one write(2) for lines of any sane size
                view = view[os.write(self._fd, view) :]

    def sync(self) -> bool:
        """Make the file durable (fsync covers every writer's lines) and
        close it until the next append; ``False`` if nothing was appended."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is None:
            return False
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True


def _raw_lines(manifest: Path) -> Iterator[dict[str, Any]]:
    """Every complete line as a mapping (a torn last line, left by a crash
    mid-append, is skipped: it was never reported stored)."""
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def held_instances(manifest: Path, series_uid: str) -> set[str]:
    """SOP Instance UIDs of ``series_uid`` whose last line says stored (not
    later found missing)."""
    held: set[str] = set()
    for record in _raw_lines(manifest):
        if record.get("SeriesInstanceUID") != series_uid:
            continue
        uid = record.get("SOPInstanceUID")
        if not isinstance(uid, str):
            continue
        if record.get("missing"):
            held.discard(uid)
        else:
            held.add(uid)
    return held
