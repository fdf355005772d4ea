"""Test helpers for dqr and for authors of dqr plugins: a private Orthanc
(:mod:`dqr.testing.orthanc`), mock PACS servers and pytest fixtures
(:mod:`dqr.testing.pytest_plugin`, loaded automatically by pytest)."""
