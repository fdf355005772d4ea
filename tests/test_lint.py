"""ruff over the whole code base, and proof that its banned-import rule bites."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINTED_DIRS = [name for name in ("core", "plugins", "tests", "bench", "docs/examples") if (REPO / name).is_dir()]


def ruff_check(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    # --no-cache: never write .ruff_cache into a checkout others are using.
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--no-cache",
            "--config",
            str(REPO / "pyproject.toml"),
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_finds_no_problems() -> None:
    result = ruff_check(*LINTED_DIRS)

    assert result.returncode == 0, (
        f"ruff check {' '.join(LINTED_DIRS)}:\n{result.stdout}{result.stderr}"
    )


@pytest.mark.parametrize(
    "statement",
    ["import core.config", "from core import config", "from plugins.memory import pacs"],
)
def test_ruff_bans_importing_the_source_folders(statement: str, tmp_path: Path) -> None:
    # From the repo root `import core` works by accident; installed, only `dqr` exists.
    offender = tmp_path / "offender.py"
    offender.write_text(statement + "\n")

    result = ruff_check(str(offender), cwd=tmp_path)

    assert result.returncode == 1 and "TID251" in result.stdout, result.stdout + result.stderr
