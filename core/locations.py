"""Where a job writes, checked before anything is queried: the archive, the
files beside it (results table, failures) and the job state.

Each problem names the config key and its line: an archive that is the file
system root or the config's own folder, one that is a file or cannot be
created or written, a state path that is a folder or cannot be written, an
archive inside a source's own ``path:`` (the next run would serve the
relabeled copies back as if they were the PACS's).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dqr.errors import Problem

if TYPE_CHECKING:
    from dqr.config import LoadedConfig


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _writable_folder(path: Path) -> str | None:
    """Why a folder cannot be created or written at ``path``, or ``None``."""
    existing = _nearest_existing(path)
    if existing != path and not existing.is_dir():
        return f"{existing} is a file, so {path} cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK) or _read_only_filesystem(existing):
        return f"{existing} is not writable" if existing == path else f"{path} cannot be created: {existing} is not writable"
    return None


def _read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_locations(config: LoadedConfig, lines: dict[tuple[Any, ...], int] | None = None) -> list[Problem]:
    """Every problem with where ``config`` would write; ``lines`` maps key
    paths to YAML lines (read from the config file when not given)."""
    if lines is None:
        from dqr.config import _key_lines

        lines = _key_lines(config.path.read_text(encoding="utf-8-sig"))
    file = str(config.path)
    problems: list[Problem] = []

    def problem(key: tuple[Any, ...], message: str) -> None:
        line = lines.get(key) if key in lines else lines.get(key[:1])
        problems.append(Problem(file, f"{'.'.join(map(str, key))}: {message}", line))

    archive = config.site.archive
    if archive.name == "" or archive == Path(archive.anchor):
        problem(("archive",), f"{str(archive)!r} is the file system root; give the archive a folder of its own")
    elif archive == config.dir:
        problem(("archive",), "is the config's own folder; give the archive a folder of its own (e.g. `archive: ./archive`)")
    elif os.path.lexists(archive) and not archive.is_dir():
        problem(("archive",), f"{archive} is a file, not a folder")
    else:
        why = _writable_folder(archive) or _writable_folder(archive.parent)
        if why:
            problem(("archive",), why)

    state = config.site.state or (config.state_path if archive.name else None)
    state_key = ("state",) if config.site.state is not None else ("archive",)
    if state is None:
        pass  # beside a root archive: already refused
    elif state.is_dir():
        problem(state_key, f"the job state {state} is a folder; `state:` names a file (e.g. ./job.sqlite)")
    elif os.path.lexists(state) and not os.access(state, os.R_OK | os.W_OK):
        problem(state_key, f"the job state {state} is not writable")
    else:
        why = _writable_folder(state.parent)
        if why:
            problem(state_key, f"the job state cannot be written: {why}")

    for name, source in config.sources.items():
        folder = getattr(source, "path", None)
        if not isinstance(folder, str) or not folder:
            continue
        expanded = Path(os.path.expanduser(folder))
        served = (expanded if expanded.is_absolute() else config.dir / expanded).resolve()
        if archive.resolve().is_relative_to(served):
            problem(
                ("sources", name, "path"),
                f"the archive {archive} is inside this source's folder {served}: the next run would serve the "
                "relabeled copies as if they were the PACS's; put the archive elsewhere",
            )
    return problems
