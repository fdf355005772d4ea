"""What both network destinations share: reading a Part-10 file's meta
header, the local manifest of acknowledged instances, and the writer
bookkeeping that only ever reports acknowledged instances.

The manifest is the destination's memory of what it acknowledged: it is
appended as soon as an acknowledgement arrives (one ``write(2)`` on a
descriptor the series keeps open, so a ``kill -9`` loses nothing; fsynced
at commit), and ``exists()`` answers from
it, so a run killed after the destination acknowledged an instance but
before the job state recorded it never sends that instance twice.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dqr.backend import DestinationContext
from dqr.manifest import MANIFEST, ManifestAppender, append_records, held_instances
from dqr.manifest import now as manifest_now
from dqr.model import Labels, Series, Study
from dqr.throttle import AdaptiveLimit, CircuitBreaker, SourceDownError, call_with_retries

_json = functools.partial(json.dumps, ensure_ascii=False)

#: Explicit-VR element headers with a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


#: C-STORE warnings (PS3.4 B.2.3): stored, with the warning kept.
STORE_WARNINGS = {
    0xB000: "coercion of data elements",
    0xB007: "data set does not match SOP class",
    0xB006: "elements discarded",
}
STORE_FAILURES = {
    0x0110: "processing failure",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
}


def describe_store_status(status: int) -> str:
    """A C-STORE status in hex and words."""
    if status in STORE_WARNINGS:
        return f"0x{status:04X} (warning: {STORE_WARNINGS[status]})"
    if status in STORE_FAILURES:
        return f"0x{status:04X} ({STORE_FAILURES[status]})"
    if 0xA700 <= status <= 0xA7FF:
        return f"0x{status:04X} (refused: out of resources)"
    if 0xA900 <= status <= 0xA9FF:
        return f"0x{status:04X} (error: data set does not match SOP class)"
    if 0xC000 <= status <= 0xCFFF:
        return f"0x{status:04X} (error: cannot understand)"
    return f"0x{status:04X} (unknown status)"


@dataclass(frozen=True)
class Part10:
    """A Part-10 file split into what a sender needs."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int
    """Where the dataset (after the file meta group) starts."""


def parse_part10(data: bytes) -> Part10:
    """Read the file meta group of a Part-10 file (explicit VR little endian)."""
    if data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part-10 file (no DICM prefix)")
    offset = 132
    meta: dict[int, bytes] = {}
    while offset + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, offset)
        if group != 0x0002:
            break
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            (length,) = struct.unpack_from("<I", data, offset + 8)
            start = offset + 12
        else:
            (length,) = struct.unpack_from("<H", data, offset + 6)
            start = offset + 8
        meta[element] = data[start : start + length]
        offset = start + length

    def text(element: int) -> str:
        return meta.get(element, b"").decode("ascii", "replace").rstrip("\0 ")

    return Part10(text(0x0002), text(0x0003), text(0x0010), offset)


def manifest_root(context: DestinationContext) -> Path:
    """``<state dir>/<state stem>-manifest``: the manifests live beside the
    job state, since the destination cannot hold them."""
    if context.state_path is not None:
        state = Path(context.state_path)
        return state.with_name(f"{state.stem}-manifest")
    archive = Path(context.archive)
    return archive.with_name(f"{archive.name}-manifest")


class AcknowledgedSeries:
    """Bookkeeping of one series' writer: what was acknowledged since the
    last commit, the manifest lines for it, and what an earlier run had
    already had acknowledged."""

    def __init__(self, manifest: Path, destination: str, study: Study, series: Series) -> None:
        self.manifest = manifest
        self.destination = destination
        self.study = study
        self.series = series
        self.lock = threading.Lock()
        self._earlier = held_instances(manifest, series.series_uid)
        self._appender = ManifestAppender(manifest)
        # What every line of the series shares, encoded once (the closing brace left off).
        self._line_start = _json({
            "destination": destination, "StudyInstanceUID": study.study_uid, "SeriesInstanceUID": series.series_uid,
        })[:-1]
        self._unreported: list[str] = []
        #: SOP Instance UID -> the destination's warning (stored nonetheless).
        self.warnings: dict[str, str] = {}

    def held_earlier(self, sop_instance_uid: str) -> bool:
        """Acknowledged to an earlier run (per the manifest): reported at the next commit."""
        if sop_instance_uid not in self._earlier:
            return False
        with self.lock:
            if sop_instance_uid not in self._unreported:
                self._unreported.append(sop_instance_uid)
        return True

    def acknowledged(self, items: list[tuple[str, int, dict[str, str]]], warnings: dict[str, str] | None = None) -> None:
        """Record acknowledged instances ``(uid, size, replaced)``: manifest
        lines now (flushed, not yet fsynced), reported at the next commit."""
        if not items:
            return
        stored = _json(manifest_now())
        lines = []
        for uid, size, replaced in items:
            # json.dumps of the whole record, key for key, without building it:
            # one line per C-STORE, and the shared part was most of its cost.
            line = f'{self._line_start}, "SOPInstanceUID": {_json(uid)}, "size": {int(size)}, "replaced": {_json(replaced)}, "stored": {stored}'
            if warnings and uid in warnings:
                line += f', "warning": {_json(warnings[uid])}'
            lines.append(line + "}\n")
        self._appender.append_lines("".join(lines))
        with self.lock:
            self._unreported.extend(uid for uid, _, _ in items)
            if warnings:
                self.warnings.update(warnings)

    def take(self) -> list[str]:
        """The acknowledged UIDs not reported yet, made durable in the manifest first."""
        with self.lock:
            taken, self._unreported = self._unreported, []
        if not self._appender.sync() and taken and self.manifest.exists():  # an earlier run's lines, adopted
            fd = os.open(self.manifest, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return taken


def record_missing(manifest: Path, destination: str, study: Study, series: Series, missing: list[str]) -> None:
    """Verification found acknowledged instances gone: later runs send them again."""
    append_records(
        manifest,
        [
            {
                "destination": destination,
                "StudyInstanceUID": study.study_uid,
                "SeriesInstanceUID": series.series_uid,
                "SOPInstanceUID": uid,
                "missing": manifest_now(),
            }
            for uid in missing
        ],
    )


def session_manifest(root: Path, project: str, subject: str, session: str) -> Path:
    return root / project / subject / session / MANIFEST


class DestinationDownError(SourceDownError):
    """The destination stayed unreachable through every cool-down: the job
    stops (what it acknowledged is kept; the next run resumes)."""


class NetworkDestination:
    """What the dimse and dicomweb destinations share: their limits, retries
    and breaker, one local manifest per session, series writers that only
    report acknowledged instances, and noting what verification found
    missing. A subclass names its ``writer`` class and ``describe()``s itself."""

    writer: type

    def _share(self, context: DestinationContext, limits: Any, concurrency: int, what: str) -> None:
        self.project = context.project
        self.retry_limits = limits.retry_limits()
        self.limit = AdaptiveLimit(concurrency, what)
        self.breaker = CircuitBreaker(
            self.retry_limits.breaker_failures, self.retry_limits.breaker_cooldown, self.retry_limits.breaker_max_cooldowns
        )
        self.manifests = manifest_root(context)
        self._series_manifest: dict[str, Path] = {}

    def describe(self) -> str:
        raise NotImplementedError

    def open_series(self, study: Study, series: Series, subject: str, session: str, labels: Labels | None = None):
        manifest = session_manifest(self.manifests, self.project, subject, session)
        self._series_manifest[series.series_uid] = manifest
        return self.writer(self, AcknowledgedSeries(manifest, self.describe(), study, series))

    def _call(self, action):
        """``action`` with the destination's retries, limit and breaker."""
        try:
            return call_with_retries(action, self.retry_limits, self.limit, breaker=self.breaker)
        except SourceDownError as error:
            raise DestinationDownError(
                f"{self.describe()} could not be reached: {str(error).replace('the source', 'it', 1)}",
                unreachable=True,
            ) from error

    def _note_missing(self, study: Study, series: Series, missing: list[str]) -> list[str]:
        """Verification found these gone: noted in the manifest, so later runs send them again."""
        manifest = self._series_manifest.get(series.series_uid)
        if missing and manifest is not None:
            record_missing(manifest, self.describe(), study, series, missing)
        return missing


class AcknowledgingWriter:
    """The part of both series writers that is bookkeeping: what an earlier
    run had acknowledged, and the warnings the destination gave."""

    def __init__(self, destination: NetworkDestination, acknowledged: AcknowledgedSeries) -> None:
        self.destination = destination
        self.acknowledged = acknowledged

    @property
    def warnings(self) -> dict[str, str]:
        """SOP Instance UID -> the destination's warning, for instances stored with one."""
        return self.acknowledged.warnings

    def exists(self, sop_instance_uid: str) -> bool:
        return self.acknowledged.held_earlier(sop_instance_uid)
