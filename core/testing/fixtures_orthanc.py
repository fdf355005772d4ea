"""pytest fixtures: orthanc (see dqr.testing.pytest_plugin)."""
