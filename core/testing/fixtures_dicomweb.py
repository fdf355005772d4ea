"""pytest fixtures: dicomweb (see dqr.testing.pytest_plugin)."""
