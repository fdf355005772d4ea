"""The benchmark harness (bench/, issue 6) runs end to end in --quick mode.

The timings themselves are not asserted (docs/performance.md publishes
them); this checks that one ``python -m bench --quick`` starts its own
Orthanc, runs every case with every competitor, and writes the results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dqr.testing.fixtures_orthanc import require_orthanc

REPO = Path(__file__).resolve().parent.parent
EXPECTED_CASES = ["query", "dimse", "dimse-large", "dicomweb", "relabel", "growth", "validate", "throttle"]

pytestmark = [pytest.mark.slow, pytest.mark.orthanc]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_orthanc()
    out = tmp_path_factory.mktemp("bench-results")
    work = tmp_path_factory.mktemp("bench-work")
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--repeat", "1", "--out", str(out), "--tmp", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.timeout(90)
def test_quick_benchmark_writes_every_case_to_the_json(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())

    assert list(results["cases"]) == EXPECTED_CASES
    for case, data in results["cases"].items():
        for variant in data["variants"]:
            ran = variant["skipped"] or (variant["runs"] and all(run["ok"] for run in variant["runs"]))
            assert ran, f"{case} / {variant['name']}: {variant['runs']}"


@pytest.mark.timeout(90)
def test_quick_benchmark_records_the_machine_and_tool_versions(quick_run: Path) -> None:
    machine = json.loads((quick_run / "results.json").read_text())["meta"]["machine"]

    assert machine["cpu_count"] and machine["python"] and machine["orthanc"]
    assert {"pynetdicom", "pydicom", "dicomweb-client"} <= set(machine["packages"])


@pytest.mark.timeout(90)
def test_quick_benchmark_writes_a_markdown_table_with_targets(quick_run: Path) -> None:
    markdown = (quick_run / "results.md").read_text()

    assert "## Targets" in markdown
    for title in ("1. Query", "2. Retrieve over DIMSE", "3. Retrieve over DICOMweb", "4. Relabel",
                  "5a. Growth", "5b. dqr validate", "6. Throttling"):
        assert f"## {title}" in markdown
    assert "PASS" in markdown or "MISS" in markdown
