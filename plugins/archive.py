"""The ``archive`` destination: a directory tree

    <archive>/<project>/<subject>/<session>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

Each file is written unnamed (``O_TMPFILE``, made ahead of need by
:class:`SpareFiles`; elsewhere a temp file in the same directory) and linked
into place, so a reader (or a crash) never sees half a file and an existing
different file is never overwritten. ``commit()`` fsyncs the files and their
directories -- once per batch, not per instance -- before anything is
reported stored. Each session keeps ``manifest.jsonl`` (:mod:`dqr.manifest`):
one line per stored instance with the original values relabeling replaced,
its labels and the digest of its bytes, written before the file is linked.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import dqr
from dqr.backend import VerifyMode
from dqr.config import DestinationConfig
from dqr.errors import RemoteError
from dqr.manifest import MANIFEST, ManifestRecord, Manifests, digest, file_digest, labels_record
from dqr.model import Labels, Series, Study
from dqr.uids import check_uid, quoted

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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


#: Whether O_TMPFILE files can be made here (Linux, and a file system that
#: supports it); found out on first use.
_TMPFILE_WORKS = [hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")]
_proc_fd_dir: tuple[int, int] | None = None  # (pid, fd of /proc/<pid>/fd)


def _proc_fds() -> int:
    """An fd of this process's /proc/<pid>/fd (opened again after a fork)."""
    global _proc_fd_dir
    pid = os.getpid()
    if _proc_fd_dir is None or _proc_fd_dir[0] != pid:
        _proc_fd_dir = (pid, os.open(f"/proc/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY))
    return _proc_fd_dir[1]


class SpareFiles:
    """Unnamed files (``O_TMPFILE``) made ahead of need by a thread of their own.

    Making the inode is most of what storing a small instance costs on the
    file systems measured here (150-300 us of kernel time, against ~35 us to
    write 12 KB into it and link it into place), and it needs no name. Made
    ahead on another thread (the GIL is released during the call), it is
    off the thread that stores instances -- on a C-GET or C-MOVE the one
    that answers each C-STORE, which the PACS waits for before it sends the
    next instance. A spare is linked into any directory of its file system
    (``linkat``); where that fails with ``EXDEV`` (another file system
    mounted inside the archive) the spares stop and each file is made where
    it goes, as without them. Nothing is left behind: an unlinked unnamed
    file vanishes when its descriptor is closed, or with the process."""

    def __init__(self, directory: Path, keep: int = 32) -> None:
        self.directory = directory
        self.keep = keep
        self._ready: collections.deque[int] = collections.deque()
        self._wanted = threading.Event()
        self._lock = threading.Lock()  # between making a spare and close()
        self._closed = False
        self._thread: threading.Thread | None = None

    def take(self) -> int | None:
        """A spare's descriptor, now the caller's to close; ``None`` when
        none is ready (the caller makes its own file)."""
        if self._thread is None and not self._closed:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._fill, name="dqr-spare-files", daemon=True)
                    self._thread.start()
        try:
            fd = self._ready.popleft()
        except IndexError:
            fd = None
        if len(self._ready) <= self.keep // 2:
            self._wanted.set()
        return fd

    def _fill(self) -> None:
        while not self._closed:
            self._wanted.wait()
            self._wanted.clear()
            while len(self._ready) < self.keep:
                with self._lock:
                    if self._closed:
                        return
                    try:
                        self._ready.append(os.open(self.directory, os.O_TMPFILE | os.O_WRONLY, 0o666))
                    except OSError:  # disk full, folder gone...: the stores make their own and say why
                        self._closed = True
                        return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            while self._ready:
                os.close(self._ready.popleft())
        self._wanted.set()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArchiveError(Exception):
    """The archive refused or failed to store an instance. Messages name
    instances by UIDs (``<study>/<series>/<sop>.dcm``), never by the label
    directories, which may be derived from patient names."""


class ArchiveCollisionError(ArchiveError):
    """A different file already exists where an instance would be stored."""


class UnsafePathError(ArchiveError):
    """A value would make a path outside the archive (or is no UID)."""


class ArchiveWriteError(ArchiveError, OSError):
    """The file system refused (permissions, disk full...)."""


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` is ``root`` or below it, symlinks resolved."""
    return path.resolve().is_relative_to(root.resolve())


class SeriesDirectory:
    """Writes one series of a session (a :class:`dqr.backend.SeriesWriter`).

    An instance is stored once: a file already at its path is accepted only
    when its bytes are those the manifest recorded under this run's labels
    (:meth:`exists`) or those just relabeled (:meth:`write`); anything else
    is a conflict naming the instance, and nothing is overwritten.
    """

    def __init__(
        self,
        archive_root: Path,
        session_dir: Path,
        study: Study,
        series: Series,
        labels: Labels | None = None,
        manifests: Manifests | None = None,
        spares: SpareFiles | None = None,
    ) -> None:
        self.archive_root = archive_root
        self._spares = spares
        self.session_dir = session_dir
        self.study = study
        self.series = series
        where = f"{study.study_uid}/{series.series_uid}"
        for keyword, uid in (("StudyInstanceUID", study.study_uid), ("SeriesInstanceUID", series.series_uid)):
            problem = check_uid(uid)
            if problem:
                raise UnsafePathError(f"series {quoted(where)}: {keyword} {problem}; nothing stored")
        self.dir = session_dir / series.series_uid
        if not inside(archive_root, self.dir):  # checked before anything is created
            raise UnsafePathError(f"series {where}: its directory would be outside the archive; nothing stored")
        self._labels = None if labels is None else labels_record(labels)
        self._pending: dict[str, int] = {}
        self._conflicted: set[str] = set()
        self._lock = threading.Lock()
        with self._errors(f"cannot create the directory of series {where}"):
            self._created_dirs = self._make_dirs()
            if self.dir not in self._created_dirs:  # a new directory has none
                self._remove_stale_temp_files()
        self.manifest = (manifests or Manifests()).open(
            session_dir / MANIFEST, present=lambda relative: (session_dir / relative).is_file()
        )

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """OS errors carry full paths (label directories): say what failed by UIDs."""
        try:
            yield
        except ArchiveError:
            raise
        except OSError as error:
            raise ArchiveWriteError(f"{what}: {error.strerror or type(error).__name__}") from None

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

    def where(self, sop_instance_uid: str) -> str:
        """An instance named for messages: archive-relative by UIDs."""
        return f"{self.study.study_uid}/{self.series.series_uid}/{sop_instance_uid}.dcm"

    def path_of(self, sop_instance_uid: str) -> Path:
        problem = check_uid(sop_instance_uid)
        if problem:
            raise UnsafePathError(
                f"instance of series {self.study.study_uid}/{self.series.series_uid}: "
                f"SOPInstanceUID {problem}; not stored"
            )
        return self.dir / f"{sop_instance_uid}.dcm"

    def _relative(self, sop_instance_uid: str) -> str:
        return f"{self.series.series_uid}/{sop_instance_uid}.dcm"

    def exists(self, sop_instance_uid: str) -> bool:
        """Whether the instance is stored: its file is there and its bytes
        and labels are what its manifest line says. A file without a line
        that proves it (a stray, an older dqr's) is not: fetching the
        instance again lets :meth:`write` compare it."""
        if check_uid(sop_instance_uid):  # never a path; refused when it arrives (dqr.acceptance)
            return False
        path = self.path_of(sop_instance_uid)
        where = self.where(sop_instance_uid)
        with self._errors(f"cannot read {where}"):
            if not path.is_file():
                return False
            known = self.manifest.get(self._relative(sop_instance_uid))
            if known is None or not known.proves_content:
                return False
            if file_digest(path) != known.sha256:
                raise ArchiveCollisionError(f"{where} already exists with different content than its manifest line records; not overwritten")
            if self._labels is not None and known.labels is not None and known.labels != self._labels:
                changed = sorted(key for key in self._labels if known.labels.get(key) != self._labels[key])
                raise ArchiveCollisionError(
                    f"{where} was stored under other labels ({', '.join(changed)} differ) and is not relabeled "
                    "as this run asks; not overwritten"
                )
            with self._lock:  # present from an earlier run: make it durable and report it
                self._pending.setdefault(sop_instance_uid, known.size)
        return True

    def write(self, sop_instance_uid: str, part10: bytes, replaced: dict[str, str]) -> None:
        final = self.path_of(sop_instance_uid)
        record = ManifestRecord(
            path=self._relative(sop_instance_uid),
            study_uid=self.study.study_uid,
            series_uid=self.series.series_uid,
            sop_instance_uid=sop_instance_uid,
            size=len(part10),
            replaced=replaced,
            sha256=digest(part10),
            labels=self._labels,
        )
        with self._errors(f"cannot store {self.where(sop_instance_uid)}"):
            with self._lock:
                if sop_instance_uid in self._conflicted or os.path.lexists(final):
                    self._accept_existing(final, part10, record)
                    return
                known = self.manifest.get(record.path)
                if known is None or (known.sha256, known.labels) != (record.sha256, record.labels):
                    self.manifest.append(record)  # the intent, before the file is in place
            try:
                self._link_new(final, part10)  # fails if the name exists: never overwrite
            except FileExistsError:
                with self._lock:
                    self._accept_existing(final, part10, record)
                return
            with self._lock:
                self._pending[sop_instance_uid] = len(part10)

    def _link_new(self, final: Path, part10: bytes) -> None:
        """Put a new file with ``part10`` at ``final``, whole or not at all;
        ``FileExistsError`` if something is there. On Linux the file is
        written unnamed (``O_TMPFILE``) and linked into place: no temp name
        to create and remove (half the cost of writing a small instance), and
        nothing left behind by a kill. Elsewhere: a named temp file."""
        if _TMPFILE_WORKS[0] and self._link_unnamed(final, part10):
            return
        temp = self.dir / f".{final.stem}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"
        with open(temp, "wb") as handle:
            handle.write(part10)
        try:
            os.link(temp, final)
        finally:
            temp.unlink(missing_ok=True)

    def _link_unnamed(self, final: Path, part10: bytes) -> bool:
        """:meth:`_link_new` with O_TMPFILE; ``False`` when this system
        cannot (named temp files from then on)."""
        try:
            fds = _proc_fds()
        except OSError:  # no /proc
            _TMPFILE_WORKS[0] = False
            return False
        spares = self._spares
        fd = spares.take() if spares is not None else None
        if fd is None:
            try:
                fd = os.open(self.dir, os.O_TMPFILE | os.O_WRONLY, 0o666)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise  # e.g. the directory is gone, or the disk full: as for a named file
                _TMPFILE_WORKS[0] = False  # this file system cannot
                return False
            spares = None
        try:
            _write_all(fd, part10)
            # linkat(2) (a dir fd given) follows the /proc link (link(2) would not)
            os.link(str(fd), final, src_dir_fd=fds, follow_symlinks=True)
        except OSError as error:
            if spares is None or error.errno != errno.EXDEV:
                raise
            spares.close()  # the spares' file system is not this directory's
            self._spares = None
            return self._link_unnamed(final, part10)
        finally:
            os.close(fd)
        return True

    def _accept_existing(self, final: Path, part10: bytes, record: ManifestRecord) -> None:
        """A file is already where ``record`` goes (the lock is held)."""
        uid = record.sop_instance_uid
        where = self.where(uid)
        if uid not in self._conflicted and not final.is_symlink() and final.is_file() and final.read_bytes() == part10:
            known = self.manifest.get(record.path)
            if known is None or (known.sha256, known.labels) != (record.sha256, record.labels):
                self.manifest.append(record)  # its line was lost (older dqr, power loss): proven equal, adopted
            self._pending.setdefault(uid, record.size)
            return
        if uid in self._pending or uid in self._conflicted:
            # Two different instances with one SOP Instance UID arrived in
            # this run: which one is right cannot be told. Neither is stored.
            self._set_aside(final, part10, record)
            raise ArchiveCollisionError(
                f"{where}: two different instances arrived with this SOP Instance UID; both were set aside "
                "(*.conflict files in its series directory) and neither is stored"
            )
        raise ArchiveCollisionError(
            f"{where} already exists with different content (not stored by dqr under these labels); not overwritten"
        )

    def _set_aside(self, final: Path, part10: bytes, record: ManifestRecord) -> None:
        uid = record.sop_instance_uid
        if os.path.lexists(final):
            first = file_digest(final) if final.is_file() else "link"
            final.rename(self.dir / f"{uid}.{first[:12]}.conflict")
        (self.dir / f"{uid}.{record.sha256[:12]}.conflict").write_bytes(part10)  # type: ignore[index]
        self._pending.pop(uid, None)
        self._conflicted.add(uid)
        self.manifest.forget(record.path)

    def commit(self) -> list[str]:
        with self._lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return []
        where = f"{self.study.study_uid}/{self.series.series_uid}"
        with self._errors(f"cannot make series {where} durable"):
            self.manifest.sync()
            directories = [self.dir, *self._created_dirs, *(d.parent for d in self._created_dirs)]
            _make_durable([*(self.path_of(uid) for uid in pending), self.manifest.path], directories)
        self._created_dirs = []
        return list(pending)


class Archive:
    """A :class:`dqr.backend.Destination` writing a directory tree."""

    #: verify() lists the series folder: files a commit made durable.
    #: its files are proven (digest) and fsync'd at commit: nothing to ask afterwards
    verify_mode = VerifyMode.LOCAL

    def __init__(self, root: Path, project: str) -> None:
        self.root = root
        self.project = project
        self.manifests = Manifests()
        self._spares: SpareFiles | None = None

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
        self.manifests.close()
        if self._spares is not None:
            self._spares.close()
            self._spares = None

    def session_dir(self, subject: str, session: str) -> Path:
        return self.root / self.project / subject / session

    def open_series(
        self, study: Study, series: Series, subject: str, session: str, labels: Labels | None = None
    ) -> SeriesDirectory:
        """``labels``: the run's labels, relabel flags included; a found
        file stored under other ones is a conflict, not "already stored"."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ArchiveWriteError(f"cannot create the archive {self.root}: {error.strerror}") from None
        if self._spares is None and _TMPFILE_WORKS[0]:
            self._spares = SpareFiles(self.root)
        return SeriesDirectory(
            self.root, self.session_dir(subject, session), study, series, labels, self.manifests,
            self._spares if _TMPFILE_WORKS[0] else None,
        )


class ArchiveConfig(DestinationConfig):
    """``destination: {type: archive}``: the site config's ``archive:`` folder."""

    type: Literal["archive"] = "archive"


def make_archive(config: ArchiveConfig, context) -> Archive:
    return Archive(context.archive, context.project)


@dqr.hookimpl
def dqr_register_destinations(register):
    register("archive", make_archive, ArchiveConfig)
