"""What the summary, ``--json`` and the exit code say is counted from typed
outcomes and the job state -- never from warning text -- and "stored" means
every selected series arrived as the PACS announced it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import archive_files

import dqr as dqr_package
from dqr.pluginmanager import get_plugin_manager

CT_STUDY = "0557639308"  # CT: 2 series x 3 instances
UNKNOWN_STUDY_UID = "1.2.826.0.1.3680043.8.498.999999999"


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_table(path: Path, records: list[dict[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


class RemarkOnEveryQuery:
    """A plugin remarking on every query, as the DICOMweb backend does for
    values some servers mishandle."""

    @dqr_package.hookimpl
    def dqr_prepare_study_query(self, query, source, config):
        query.warnings.append("a remark from a plugin")


@pytest.fixture
def remarking_plugin():
    plugin = RemarkOnEveryQuery()
    get_plugin_manager().register(plugin, name="remark-on-every-query")
    yield
    get_plugin_manager().unregister(name="remark-on-every-query")


@pytest.fixture
def queried(site, write_csv, dqr, tmp_path):
    """A results table of one CT study, as `dqr query` wrote it."""
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")))
    assert dqr("query", "--config", config, "-o", tmp_path / "table.csv").exit_code == 0
    return config, read_table(tmp_path / "table.csv")


def test_a_row_without_match_is_counted_even_when_a_plugin_remarks_on_it(site, write_csv, dqr, remarking_plugin):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\nNO_SUCH_ACC\n")))
    result = dqr("run", "--config", config, "--json")
    summary = json.loads(result.stdout)
    assert summary["rows_without_match"] == [3]
    assert "rows with no match" in result.stderr


def test_the_warning_column_renders_the_outcome_and_the_remark(site, write_csv, dqr, tmp_path, remarking_plugin):
    config = site(csv=str(write_csv("Accession Number\nNO_SUCH_ACC\n")))
    dqr("run", "--config", config)
    (line,) = read_table(tmp_path / "archive-results.csv")
    assert line["warning"] == "no study matched; a remark from a plugin"


def test_a_selected_study_the_pacs_no_longer_has_is_a_failure_not_stored(queried, dqr, tmp_path):
    config, records = queried
    records[0]["StudyInstanceUID"] = UNKNOWN_STUDY_UID
    result = dqr("retrieve", "--config", config, "--results", write_table(tmp_path / "edited.csv", records), "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["studies_stored"] == 0
    assert "listed no series" in summary["failures"][0]["reason"]


def test_fewer_instances_than_announced_is_a_failure_naming_the_counts(queried, dqr, tmp_path):
    config, records = queried
    records[0]["NumberOfStudyRelatedInstances"] = "9"
    result = dqr("retrieve", "--config", config, "--results", write_table(tmp_path / "edited.csv", records), "--json")
    assert result.exit_code == 1
    reason = json.loads(result.stdout)["failures"][0]["reason"]
    assert "announced 2 series, 9 instances" in reason and "found 6 instances" in reason


def test_a_study_with_every_series_excluded_is_nothing_selected_and_a_wider_run_fetches_it(queried, dqr, tmp_path):
    config, _ = queried
    narrow = json.loads(dqr("run", "--config", config, "--exclude", "*", "--json").stdout)
    assert (narrow["studies_stored"], narrow["studies_nothing_selected"]) == (0, 1)
    wide = dqr("run", "--config", config, "--json")
    assert wide.exit_code == 0
    assert json.loads(wide.stdout)["studies_stored"] == 1
    assert len(archive_files(tmp_path / "archive")) == 6


def test_counts_the_pacs_did_not_give_make_the_summary_say_unverified(queried, dqr, tmp_path):
    config, records = queried
    records[0]["NumberOfStudyRelatedSeries"] = records[0]["NumberOfStudyRelatedInstances"] = ""
    result = dqr("retrieve", "--config", config, "--results", write_table(tmp_path / "edited.csv", records), "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["studies_unverified"] == 1
    assert "unverified" in result.stderr


def test_a_corrupt_job_database_says_so_and_suggests_new_job(site, write_csv, dqr, tmp_path):
    config = site(csv=str(write_csv(f"Accession Number\n{CT_STUDY}\n")))
    (tmp_path / "archive-job.sqlite").write_bytes(b"this is not a database" * 100)
    result = dqr("run", "--config", config)
    assert result.exit_code == 2
    assert "cannot be read" in result.stderr and "--new-job" in result.stderr
    assert dqr("run", "--config", config, "--new-job").exit_code == 0


def test_a_failures_file_that_cannot_be_written_still_prints_the_summary_and_leaves_no_temp_file(
    queried, dqr, tmp_path
):
    config, records = queried
    records[0]["StudyInstanceUID"] = UNKNOWN_STUDY_UID
    (tmp_path / "archive-failures.csv").mkdir()  # writing the file fails, as on a full or read-only disk
    result = dqr("retrieve", "--config", config, "--results", write_table(tmp_path / "edited.csv", records))
    assert result.exit_code == 1
    assert "0 studies stored" in result.stderr and "could not write the failures file" in result.stderr
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("columns", [80, 120])
def test_the_terminal_table_keeps_one_line_per_study_within_the_width(site, write_csv, tmp_path, columns):
    import os
    import subprocess
    import sys

    rows = "\n".join(f"PAT0000{p},Subject_with_a_long_label_{p},Session_label_{p}" for p in range(4))
    # one line per study: two studies per patient
    config = site(csv=str(write_csv(f"Patient ID,Subject,Session\n{rows}\n")))
    env = {**os.environ, "COLUMNS": str(columns)}
    result = subprocess.run(
        [sys.executable, "-m", "dqr", "query", "--config", str(config)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    lines = result.stderr.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("row ")))
    table = lines[header : header + 9]
    assert [line.split(" ", 1)[0] for line in table[1:]] == ["2", "2", "3", "3", "4", "4", "5", "5"]
    assert all(len(line) <= columns for line in table)
    assert "the full table is" in lines[header + 9]
