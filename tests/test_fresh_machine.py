"""The suite proves what a fresh machine gets: only what `.venv` holds.

A venv made from inside a venv so that it sees "system" site packages sees the
*base* interpreter's packages, not the venv's -- so a test built that way
passes only where dqr happens to be installed in the base Python by hand.
These checks make CI fail on that mistake wherever it runs.
"""

from __future__ import annotations

import site
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_suite_runs_in_a_venv_that_does_not_see_the_base_interpreters_packages():
    assert sys.prefix != sys.base_prefix, "run the suite from .venv (bash scripts/test.sh), not the base Python"
    base_site = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"]
    assert base_site not in sys.path, f"the base interpreter's {base_site} is importable from the test venv"
    assert base_site not in site.getsitepackages()


def test_no_test_or_script_makes_a_venv_that_sees_the_base_interpreter():
    flag = "--system-" + "site-packages"  # spelt apart so this file does not match itself
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("tests", "scripts", ".ci", "bench")
        for path in (REPO / folder).rglob("*")
        if path.is_file() and path != Path(__file__) and flag in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert not offenders, f"{flag} in {offenders}: install what the venv needs into it instead"
