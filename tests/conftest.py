"""Shared fixtures: a site config on the memory PACS and a CLI runner."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dqr.cli import app
from dqr.plugins.testpacs.memory.pacs import MemoryPacs
from dqr.plugins.testpacs.memory.synthetic import DEFAULT_COHORT, generate_cohort


@pytest.fixture(scope="session")
def cohort() -> MemoryPacs:
    """The default synthetic cohort, indexed (to look up expected values)."""
    return MemoryPacs.from_datasets(generate_cohort(DEFAULT_COHORT))


@pytest.fixture
def site(tmp_path: Path) -> Callable[..., Path]:
    """Write a site config (memory PACS by default) and return its path.

    Keyword arguments replace top-level keys; ``source=`` replaces the
    source section.
    """

    def write(source: dict[str, Any] | None = None, **overrides: Any) -> Path:
        config: dict[str, Any] = {
            "project": "Test",
            "sources": {"main": source or {"type": "memory", "synthetic": {"patients": 4}}},
            "archive": "archive",
            "limits": {"backoff_initial": 0.01, "backoff_max": 0.05},
        }
        config.update(overrides)
        path = tmp_path / "site.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    return write


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "queries.csv") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


class CliResult:
    def __init__(self, result) -> None:
        self.exit_code = result.exit_code
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.output = result.output
        self.exception = result.exception


@pytest.fixture
def dqr() -> Callable[..., CliResult]:
    """Run the dqr CLI in-process: ``dqr("run", "--config", path)``."""
    runner = CliRunner()

    def invoke(*args: Any) -> CliResult:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return CliResult(result)

    return invoke


def archive_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm"))


def assert_study_archived_relabeled(session_dir: Path, originals: dict[str, Any], subject: str, session: str) -> None:
    """Every original instance (by SOP Instance UID) is in ``session_dir``,
    relabeled with ``subject``/``session``, pixel data untouched, under its series."""
    import pydicom

    files = archive_files(session_dir)
    assert sorted(p.stem for p in files) == sorted(originals)
    for path in files:
        stored = pydicom.dcmread(path)
        original = originals[stored.SOPInstanceUID]
        assert (str(stored.PatientName), stored.PatientID) == (subject, subject)
        assert (stored.StudyID, stored.AccessionNumber) == (session, session)
        assert stored.PixelData == original.PixelData
        assert stored.SeriesInstanceUID == original.SeriesInstanceUID == path.parent.name
