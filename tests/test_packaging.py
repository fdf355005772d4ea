"""The built wheel: what it contains, and that it installs and runs on its own.

core/ and plugins/ are only source folders: installed, they are `dqr` and
`dqr.plugins`. These tests build the wheel from a copy of the repo, install it
into a clean venv (dependencies from the package index) and run `dqr` from an
unrelated folder, where an accidental `import core` would fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

#: Not part of a build; copying them would be slow or would leak local state.
NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "archive",
    "demo-archive",
    "*-archive",
)


def run(*command: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output if it fails."""
    # Without PYTHONPATH and away from the repo, only what is installed imports.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} exited {result.returncode}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}",
            pytrace=False,
        )
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dqr's wheel, built from a copy of the repo (a build writes build/ and
    *.egg-info/ next to the sources; not in a checkout others are using)."""
    source = tmp_path_factory.mktemp("source") / "dqr"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", ".", "-w", out, cwd=source)
    (built,) = out.glob("dqr-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_files(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


@pytest.fixture(scope="module")
def installed_dqr(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `dqr` command of a fresh venv holding only the wheel and its dependencies."""
    venv = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", venv, cwd=venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, cwd=venv)
    return venv / "bin" / "dqr"


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working directory with no core/ or plugins/ in it."""
    return tmp_path


@pytest.mark.parametrize(
    "module",
    [
        "dqr/__init__.py",
        "dqr/plugins/testpacs/memory/__init__.py",
        "dqr/plugins/testpacs/memory/pacs.py",
        "dqr/testing/orthanc.py",
    ],
)
def test_wheel_contains_module(module: str, wheel_files: set[str]) -> None:
    assert module in wheel_files


def test_wheel_has_no_top_level_core_or_plugins_package(wheel_files: set[str]) -> None:
    top_level = {name.split("/", 1)[0] for name in wheel_files}

    assert not top_level & {"core", "plugins"}, sorted(top_level)


def test_installed_dqr_help_exits_zero(installed_dqr: Path, elsewhere: Path) -> None:
    result = run(installed_dqr, "--help", cwd=elsewhere, timeout=60)

    assert "Usage" in result.stdout


def test_installed_dqr_plugins_lists_the_memory_backend(
    installed_dqr: Path, elsewhere: Path
) -> None:
    result = run(installed_dqr, "plugins", cwd=elsewhere, timeout=60)

    # A row whose first cell is `memory` (a backend type), not the plugin
    # module `dqr.plugins.testpacs.memory`: the table is plain text when piped.
    first_cells = {
        re.split(r"\s+", line.strip(" │|┃"), maxsplit=1)[0] for line in result.stdout.splitlines()
    }
    assert "memory" in first_cells, result.stdout
