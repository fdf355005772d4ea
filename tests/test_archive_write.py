"""The archive writes each file whole or not at all, with either way of
making it: unnamed (O_TMPFILE, Linux) or a named temp file (elsewhere)."""

from __future__ import annotations

import os

import pytest

from dqr.manifest import digest, read_records
from dqr.model import Labels, Series, Study
from dqr.plugins import archive as archive_module
from dqr.plugins.archive import TEMP_SUFFIX, Archive, ArchiveCollisionError, ArchiveWriteError

STUDY = Study("1.2.3")
SERIES = Series("1.2.3", "1.2.3.4")
LABELS = Labels("S1", "E1", True, True)


@pytest.fixture(params=["unnamed", "named"])
def archive(request, tmp_path, monkeypatch):
    if request.param == "named":
        monkeypatch.setattr(archive_module, "_TMPFILE_WORKS", [False])
    elif not archive_module._TMPFILE_WORKS[0]:
        pytest.skip("no O_TMPFILE here")
    archive = Archive(tmp_path / "archive", "P")
    yield archive
    archive.close()


def series_dir(archive: Archive):
    return archive.session_dir("S1", "E1") / SERIES.series_uid


def test_a_written_file_has_its_bytes_its_line_and_no_temp_file(archive):
    writer = archive.open_series(STUDY, SERIES, "S1", "E1", labels=LABELS)
    data = b"\0" * 128 + b"DICM" + os.urandom(5000)
    writer.write("1.2.3.4.5", data, {"PatientName": "X"})
    assert writer.commit() == ["1.2.3.4.5"]
    folder = series_dir(archive)
    assert (folder / "1.2.3.4.5.dcm").read_bytes() == data
    assert sorted(p.name for p in folder.iterdir()) == ["1.2.3.4.5.dcm"]
    (line,) = read_records(folder.parent / "manifest.jsonl")
    assert line.sha256 == digest(data) and line.replaced == {"PatientName": "X"}


def test_a_different_file_already_in_place_is_not_overwritten(archive):
    writer = archive.open_series(STUDY, SERIES, "S1", "E1", labels=LABELS)
    writer.write("1.2.3.4.5", b"first", {})
    writer.commit()
    other = archive.open_series(STUDY, SERIES, "S1", "E1", labels=Labels("S1", "E1", True, False))
    with pytest.raises(ArchiveCollisionError):
        other.write("1.2.3.4.5", b"second", {})
    assert (series_dir(archive) / "1.2.3.4.5.dcm").read_bytes() == b"first"


def test_a_temp_file_left_by_a_killed_run_is_removed_when_the_series_is_opened_again(archive):
    archive.open_series(STUDY, SERIES, "S1", "E1", labels=LABELS)
    stale = series_dir(archive) / f".1.2.3.4.5.999.1{TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    archive.open_series(STUDY, SERIES, "S1", "E1", labels=LABELS)
    assert not stale.exists()


def test_a_vanished_series_directory_fails_the_write_and_keeps_unnamed_files_on(tmp_path):
    if not archive_module._TMPFILE_WORKS[0]:
        pytest.skip("no O_TMPFILE here")
    archive = Archive(tmp_path / "archive", "P")
    writer = archive.open_series(STUDY, SERIES, "S1", "E1", labels=LABELS)
    series_dir(archive).rmdir()
    with pytest.raises(ArchiveWriteError):
        writer.write("1.2.3.4.5", b"data", {})
    assert archive_module._TMPFILE_WORKS[0]  # a missing folder says nothing about the file system


def _open_below(folder) -> list[str]:
    """This process's open files below ``folder`` (unnamed ones included)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


def _wait_for_spares(spares, count: int) -> None:
    import time

    deadline = time.monotonic() + 10
    first = spares.take()  # starts the thread that makes them (the first take finds none)
    if first is not None:
        os.close(first)
    while len(spares._ready) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_files_made_ahead_are_linked_whole_and_closing_the_archive_frees_the_rest(tmp_path):
    if not archive_module._TMPFILE_WORKS[0]:
        pytest.skip("no O_TMPFILE here")
    archive = Archive(tmp_path / "archive", "P")
    writer = archive.open_series(STUDY, SERIES, "S1", "E1", labels=LABELS)
    _wait_for_spares(archive._spares, archive._spares.keep)
    payloads = {f"1.2.3.4.{n}": os.urandom(3000 + n) for n in range(40)}  # more than are kept ready
    for uid, data in payloads.items():
        writer.write(uid, data, {})
    assert sorted(writer.commit()) == sorted(payloads)
    folder = series_dir(archive)
    assert {p.stem: p.read_bytes() for p in folder.iterdir()} == payloads
    assert _open_below(tmp_path)  # spares made for the next files
    archive.close()
    assert _open_below(tmp_path) == []


def test_spares_of_another_file_system_are_given_up_and_the_file_is_made_in_place(tmp_path):
    if not archive_module._TMPFILE_WORKS[0] or not os.path.isdir("/dev/shm"):
        pytest.skip("no O_TMPFILE or no /dev/shm here")
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the temp dir's file system")
    spares = archive_module.SpareFiles(archive_module.Path("/dev/shm"))
    _wait_for_spares(spares, 1)
    (tmp_path / "archive").mkdir()
    writer = archive_module.SeriesDirectory(
        tmp_path / "archive", tmp_path / "archive" / "P" / "S1" / "E1", STUDY, SERIES, spares=spares
    )
    writer.write("1.2.3.4.5", b"data", {})
    assert writer.commit() == ["1.2.3.4.5"]
    assert (series_dir(Archive(tmp_path / "archive", "P")) / "1.2.3.4.5.dcm").read_bytes() == b"data"
    assert spares.take() is None  # closed: no more spares made there
