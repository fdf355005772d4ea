"""A 10,000-row CSV in one run against the memory PACS: nothing to cut
into batches by hand, nothing lost. (The time is benchmarked in bench/,
not asserted here.)"""

from __future__ import annotations

import json

import pytest

from dqr.plugins.testpacs.memory.synthetic import CohortSpec, accession_number

SPEC = CohortSpec(patients=1000, studies_per_patient=2, instances_per_series=1)
ROWS = 10_000


@pytest.mark.slow
def test_a_10000_row_csv_completes_in_one_run(site, write_csv, dqr, tmp_path):
    studies = [accession_number(SPEC, p, s) for p in range(SPEC.patients) for s in range(SPEC.studies_per_patient)]
    # Each study asked for by five rows: the later ones are flagged, not fetched twice.
    rows = [studies[i % len(studies)] for i in range(ROWS)]
    config = site(
        source={"type": "memory", "synthetic": {"patients": 1000, "studies_per_patient": 2, "instances_per_series": 1}},
        csv=str(write_csv("Accession Number\n" + "\n".join(rows) + "\n")),
    )
    result = dqr("run", "--config", config, "--json")
    assert result.exit_code == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["rows"] == ROWS
    assert summary["rows_without_match"] == [] and summary["failures"] == []
    assert summary["studies_stored"] == len(studies) == 2000
    status = json.loads(dqr("status", "--config", config, "--json").stdout)
    assert status["counts"]["rows"] == {"queried": ROWS}
    assert status["counts"]["studies"] == {"stored": 2000}
    assert summary["instances_stored"] == status["counts"]["instances"]["stored"]
    assert "missing" not in status["counts"]["instances"]
    stored_files = sum(1 for _ in (tmp_path / "archive").rglob("*.dcm"))
    assert stored_files == summary["instances_stored"]
