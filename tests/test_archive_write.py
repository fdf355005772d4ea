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
    return Archive(tmp_path / "archive", "P")


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
