"""Session manifests: ``manifest.jsonl``, one JSON line per stored instance
with the original values relabeling replaced (the provenance).

The archive keeps one in each session folder; a network destination, which
cannot hold it, keeps one per session beside the job state. Lines are only
ever appended, and fsynced before a caller reports anything stored.

A network destination also appends a ``"missing"`` line when verification
finds an acknowledged instance gone: the last line about an instance says
whether it counts as held.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.jsonl"
_locks: dict[Path, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def now() -> str:
    """The manifest's timestamp format (local time with offset)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def append_records(manifest: Path, records: Iterable[dict[str, Any]], fsync: bool = True) -> None:
    """Append ``records`` as JSON lines (creating the folders); thread-safe
    for one file within the process. ``fsync=False`` only hands them to the
    OS (they survive the process being killed, not a power cut): for a
    caller that fsyncs once later, before reporting anything stored."""
    lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
    if not lines:
        return
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with _lock(manifest), open(manifest, "a", encoding="utf-8") as handle:
        handle.write("".join(lines))
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())


def read_records(manifest: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of a manifest (a torn last line, left by a
    crash mid-append, is skipped: it was never reported stored)."""
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
    """SOP Instance UIDs of ``series_uid`` whose last record says stored
    (not later found missing)."""
    held: set[str] = set()
    for record in read_records(manifest):
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
