"""Where a job would write is checked when the config is loaded, before
anything is queried: exit 2 naming the key and its line, nothing created."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

COMMANDS = ["run", "retrieve", "retry", "validate"]


def invoke(dqr, command: str, config: Path, tmp_path: Path):
    if command == "run":
        return dqr("run", "--config", config, "--csv", write(tmp_path / "q.csv", "Accession Number\n1\n"))
    if command == "retrieve":
        return dqr("retrieve", "--config", config, "--results", write(tmp_path / "r.csv", "row,selected\n"))
    if command == "retry":
        return dqr("retry", "--config", config, "--failed")
    return dqr("validate", "--csv", write(tmp_path / "q.csv", "Accession Number\n1\n"), "--config", config)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def line_of(config: Path, key: str) -> int:
    return next(i for i, line in enumerate(config.read_text().splitlines(), 1) if line.startswith(f"{key}:"))


def assert_refused(result, config: Path, key: str, words: str) -> None:
    assert result.exit_code == 2, result.output
    assert f"{config}, line {line_of(config, key)}: {key}" in result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_the_file_system_root_as_archive_is_refused(dqr, site, tmp_path, command):
    config = site(archive="/")
    assert_refused(invoke(dqr, command, config, tmp_path), config, "archive", "is the file system root")


def test_an_empty_archive_is_refused_not_written_into_the_config_folder(dqr, site, tmp_path):
    config = site(archive="")
    before = sorted(tmp_path.iterdir())
    result = invoke(dqr, "run", config, tmp_path)
    assert_refused(result, config, "archive", "is the config's own folder")
    assert sorted(p for p in tmp_path.iterdir() if p.name != "q.csv") == before


def test_an_archive_that_is_a_file_is_refused_before_querying(dqr, site, tmp_path):
    (tmp_path / "archive").write_text("not a folder")
    config = site()
    assert_refused(invoke(dqr, "run", config, tmp_path), config, "archive", "is a file, not a folder")
    assert not (tmp_path / "archive-job.sqlite").exists()


def test_an_archive_below_a_file_is_refused(dqr, site, tmp_path):
    (tmp_path / "blocker").write_text("a file")
    config = site(archive="blocker/archive")
    assert_refused(invoke(dqr, "run", config, tmp_path), config, "archive", "is a file, so")


def test_a_state_that_is_a_folder_is_refused(dqr, site, tmp_path):
    (tmp_path / "state").mkdir()
    config = site(state="state")
    assert_refused(invoke(dqr, "run", config, tmp_path), config, "state", "is a folder")


@pytest.mark.parametrize("inside", ["data/archive", "data"], ids=["below", "same"])
def test_an_archive_inside_a_memory_source_folder_is_refused(dqr, site, tmp_path, inside):
    assert dqr("demo-data", tmp_path / "data", "--patients", "1").exit_code == 0
    config = site(source={"type": "memory", "path": "data"}, archive=inside)
    result = invoke(dqr, "run", config, tmp_path)
    assert result.exit_code == 2, result.output
    assert "sources.main.path: the archive" in result.stderr and "inside this source's folder" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
@pytest.mark.parametrize("key", ["archive", "state"])
def test_a_read_only_location_is_refused(dqr, site, tmp_path, key):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        config = site(**{key: f"locked/{key}"})
        assert_refused(invoke(dqr, "run", config, tmp_path), config, key, "is not writable")
    finally:
        locked.chmod(0o700)
