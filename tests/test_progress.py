"""Progress for people: bars on a terminal, plain lines elsewhere."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_on_a_terminal(args: list[str], cwd: Path, timeout: float = 60) -> str:
    """Run a command with a pseudo-terminal as stdout/stderr; return what it showed."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    process = subprocess.Popen(args, cwd=cwd, stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # the terminal closed: the command is done
                    break
                if not chunk:
                    break
                shown += chunk
            elif process.poll() is not None:
                break
    finally:
        process.kill()
        process.wait()
        os.close(leader)
    return shown.decode("utf-8", "replace")


def test_a_terminal_gets_progress_bars_with_counts(tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    shown = run_on_a_terminal([sys.executable, "-m", "dqr", "run", "--config", "configs/demo.yaml"], tmp_path)
    assert "━" in shown  # a bar
    assert "rows queried" in shown and "4/4" in shown
    assert "instances stored" in shown and "21/21" in shown


def test_without_a_terminal_progress_is_plain_log_lines(tmp_path, dqr):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    result = dqr("run", "--config", tmp_path / "configs" / "demo.yaml")
    assert "━" not in result.stderr
    assert "INFO instances stored: 21 done" in result.stderr
