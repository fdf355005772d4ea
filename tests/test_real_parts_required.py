"""The real parts (Orthanc, PostgreSQL) skip a test on a developer's machine
that lacks them, and fail it in CI, where a skip would hide a suite that
never ran against them."""

from __future__ import annotations

import pytest

from dqr.testing import fixtures_orthanc, fixtures_postgres

REAL_PARTS = [
    pytest.param(fixtures_orthanc, "find_orthanc", fixtures_orthanc.require_orthanc, id="orthanc"),
    pytest.param(fixtures_postgres, "find_postgres_bin", fixtures_postgres.require_postgres, id="postgres"),
]


@pytest.mark.parametrize(("module", "finder", "require"), REAL_PARTS)
def test_a_missing_real_part_skips_the_test_naming_how_to_install_it(module, finder, require, monkeypatch):
    monkeypatch.setattr(module, finder, lambda: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install"):
        require()


@pytest.mark.parametrize(("module", "finder", "require"), REAL_PARTS)
def test_a_missing_real_part_fails_the_test_in_ci(module, finder, require, monkeypatch):
    monkeypatch.setattr(module, finder, lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require()
