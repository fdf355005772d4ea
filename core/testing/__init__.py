"""Test helpers for dqr and for authors of dqr plugins: a private Orthanc
(:mod:`dqr.testing.orthanc`), mock PACS servers and pytest fixtures
(:mod:`dqr.testing.pytest_plugin`, loaded automatically by pytest)."""

from __future__ import annotations

import os

import pytest


def require(installed: bool, message: str, what_must_run: str) -> None:
    """Skip the current test when a real part (Orthanc, PostgreSQL, dcmtk) is
    not ``installed``; fail it instead under ``CI=true``, where a skip would
    hide that ``what_must_run`` never ran."""
    if installed:
        return
    if os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}:
        pytest.fail(f"{message} (CI=true: {what_must_run} must run, not skip)", pytrace=False)
    pytest.skip(message)
