"""The ``archive`` destination: a directory tree

    <archive>/<project>/<subject>/<session>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Each file is written to a temp file in the same directory and linked into
place, so a reader (or a crash) never sees half a file and an existing
different file is never overwritten. ``commit()`` fsyncs the files and their
directories -- once per batch, not per instance -- before anything is
reported stored. Each session keeps ``manifest.jsonl``: one line per stored
instance with the original values relabeling replaced.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Literal

import dqr
from dqr.backend import VerifyMode
from dqr.config import DestinationConfig
from dqr.errors import RemoteError
from dqr.manifest import MANIFEST, append_records
from dqr.manifest import now as manifest_now
from dqr.model import Series, Study

TEMP_SUFFIX = ".dqr-tmp"


def _load_syncfs():
    """libc's syncfs(2), where there is one (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_syncfs = _load_syncfs()


def _make_durable(files: list[Path], directories: list[Path]) -> None:
    """fsync what a commit wrote. On Linux one syncfs(2) of the archive's
    filesystem replaces an fsync per file and directory: one journal commit
    instead of dozens (a fifth of dqr's per-instance time otherwise)."""
    if _syncfs is not None and directories:
        fd = os.open(directories[0], os.O_RDONLY)
        try:
            if _syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in [*files, *directories]:
        _fsync_path(path)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sop_instance_uid_of(path: Path) -> str | None:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    except (InvalidDicomError, OSError, AttributeError, ValueError, EOFError):
        return None


class ArchiveCollisionError(Exception):
    """A different file already exists where an instance would be stored."""


class SeriesDirectory:
    """Writes one series of a session (a :class:`dqr.backend.SeriesWriter`)."""

    def __init__(self, archive_root: Path, session_dir: Path, study: Study, series: Series) -> None:
        self.archive_root = archive_root
        self.session_dir = session_dir
        self.dir = session_dir / series.series_uid
        self.study = study
        self.series = series
        self._pending: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._created_dirs = self._make_dirs()
        self._remove_stale_temp_files()

    def _make_dirs(self) -> list[Path]:
        created = []
        for directory in reversed([self.dir, *self.dir.parents]):
            if directory == self.archive_root or not directory.is_relative_to(self.archive_root):
                continue
            if not directory.exists():
                directory.mkdir(exist_ok=True)
                created.append(directory)
        return created

    def _remove_stale_temp_files(self) -> None:
        # Left by a run killed mid-write; never complete, never reported.
        for stale in self.dir.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    def path_of(self, sop_instance_uid: str) -> Path:
        return self.dir / f"{sop_instance_uid}.dcm"

    def exists(self, sop_instance_uid: str) -> bool:
        path = self.path_of(sop_instance_uid)
        if not path.exists():
            return False
        # Found, not recorded: trust it only if it is that instance (a file
        # put there by someone else must not pass for ours).
        if _sop_instance_uid_of(path) != sop_instance_uid:
            raise ArchiveCollisionError(f"{path} already exists with different content; not overwritten")
        with self._lock:  # present from an earlier run: make it durable and report it
            self._pending.setdefault(sop_instance_uid, {"replaced": None, "size": path.stat().st_size})
        return True

    def write(self, sop_instance_uid: str, part10: bytes, replaced: dict[str, str]) -> None:
        final = self.path_of(sop_instance_uid)
        temp = self.dir / f".{sop_instance_uid}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"
        with open(temp, "wb") as handle:
            handle.write(part10)
        try:
            os.link(temp, final)  # fails if the name exists: never overwrite
        except FileExistsError:
            if final.read_bytes() != part10:
                raise ArchiveCollisionError(
                    f"{final} already exists with different content; not overwritten"
                ) from None
        finally:
            temp.unlink(missing_ok=True)
        with self._lock:
            self._pending[sop_instance_uid] = {"replaced": replaced, "size": len(part10)}

    def commit(self) -> list[str]:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return []
        directories = [self.dir, *self._created_dirs, *(d.parent for d in self._created_dirs)]
        _make_durable([self.path_of(uid) for uid in pending], directories)
        self._created_dirs = []
        self._append_manifest(pending)
        return list(pending)

    def _append_manifest(self, pending: dict[str, dict]) -> None:
        now = manifest_now()
        lines = []
        for sop_instance_uid, info in pending.items():
            if info["replaced"] is None:
                continue  # found from an earlier run, whose manifest line exists
            record = {
                "path": str(self.path_of(sop_instance_uid).relative_to(self.session_dir)),
                "StudyInstanceUID": self.study.study_uid,
                "SeriesInstanceUID": self.series.series_uid,
                "SOPInstanceUID": sop_instance_uid,
                "size": info["size"],
                "replaced": info["replaced"],
                "stored": now,
            }
            lines.append(record)
        append_records(self.session_dir / MANIFEST, lines)


class Archive:
    """A :class:`dqr.backend.Destination` writing a directory tree."""

    #: verify() lists the series folder: files a commit made durable.
    verify_mode = VerifyMode.QUERY

    def __init__(self, root: Path, project: str) -> None:
        self.root = root
        self.project = project

    def describe(self) -> str:
        return f"archive {self.root / self.project}"

    def echo(self) -> str:
        folder = next((p for p in [self.root, *self.root.parents] if p.exists()), self.root)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise RemoteError(f"{self.describe()}: {folder} is not writable")
        return f"{self.describe()} (writable)"

    def verify(self, study: Study, series: Series, sop_instance_uids: list[str]) -> list[str]:
        # The labels are not known here: look for the series folder under the project.
        held = {p.stem for p in (self.root / self.project).glob(f"*/*/{series.series_uid}/*.dcm")}
        return [uid for uid in sop_instance_uids if uid not in held]

    def close(self) -> None:
        pass

    def session_dir(self, subject: str, session: str) -> Path:
        return self.root / self.project / subject / session

    def open_series(self, study: Study, series: Series, subject: str, session: str) -> SeriesDirectory:
        self.root.mkdir(parents=True, exist_ok=True)
        return SeriesDirectory(self.root, self.session_dir(subject, session), study, series)


class ArchiveConfig(DestinationConfig):
    """``destination: {type: archive}``: the site config's ``archive:`` folder."""

    type: Literal["archive"] = "archive"


def make_archive(config: ArchiveConfig, context) -> Archive:
    return Archive(context.archive, context.project)


@dqr.hookimpl
def dqr_register_destinations(register):
    register("archive", make_archive, ArchiveConfig)
