"""Every registered type -- source, destination, executor -- and its keys are
validated when the config is loaded: a typo exits 2 naming the key and its
line, before anything is queried."""

from __future__ import annotations

import pytest

QUERY_CSV = "Patient ID\nP1\n"


@pytest.fixture
def queries(write_csv):
    return write_csv(QUERY_CSV)


def test_a_misspelt_destination_type_fails_validate_naming_the_closest_type(site, dqr, queries):
    result = dqr("validate", "--csv", queries, "--config", site(destination={"type": "archiv"}))
    assert result.exit_code == 2
    assert "destination.type: unknown destination type 'archiv'" in result.stderr
    assert "did you mean 'archive'" in result.stderr and "line " in result.stderr


def test_a_misspelt_destination_type_stops_run_before_anything_is_queried(site, dqr, queries, tmp_path):
    result = dqr("run", "--config", site(destination={"type": "archiv"}), "--csv", queries)
    assert result.exit_code == 2
    assert "nothing was queried" in result.stderr
    assert not (tmp_path / "archive-job.sqlite").exists()
    assert not (tmp_path / "archive-failures.csv").exists()


def test_an_unknown_destination_key_is_named_with_its_line(site, dqr, queries):
    result = dqr("validate", "--csv", queries, "--config", site(destination={"type": "archive", "pth": "x"}))
    assert result.exit_code == 2
    assert "unknown key 'destination.pth'" in result.stderr


def test_a_misspelt_executor_fails_validate(site, dqr, queries):
    result = dqr("validate", "--csv", queries, "--config", site(executor="locl"))
    assert result.exit_code == 2
    assert "executor.type: unknown executor type 'locl'" in result.stderr and "did you mean 'local'" in result.stderr


def test_the_executor_may_be_given_as_a_mapping(site, dqr, queries):
    result = dqr("validate", "--csv", queries, "--config", site(executor={"type": "local"}))
    assert result.exit_code == 0, result.stderr
