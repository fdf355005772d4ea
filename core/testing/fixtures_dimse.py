"""pytest fixtures: dimse (see dqr.testing.pytest_plugin)."""
