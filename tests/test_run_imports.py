"""`dqr run` imports only what its config uses: over DIMSE no DICOMweb
client, over DICOMweb not dicomweb-client either (dqr speaks HTTP with
requests itself), and never the queue executor's database libraries (each costs
interpreter start time a user waits for). (requests is imported by pydicom
itself, for its test-data downloader.)"""

from __future__ import annotations

import os
import subprocess
import sys

from dqr.plugins.testpacs.memory.synthetic import DEFAULT_COHORT, generate_cohort

NOT_NEEDED = ("dbos", "dicomweb_client", "psycopg", "procrastinate", "sqlalchemy")


def imported_by(args: list[str], cwd) -> set[str]:
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run([sys.executable, "-m", "dqr", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    if os.environ.get("DQR_IMPORTTIME_OUT"):  # to look at where the time goes
        with open(os.environ["DQR_IMPORTTIME_OUT"], "w") as out:
            out.write(done.stderr)
    return {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}


def test_a_dimse_run_imports_no_http_or_queue_libraries(site, write_csv, tmp_path, mock_dimse_pacs):
    accession = next(generate_cohort(DEFAULT_COHORT)).AccessionNumber
    config = site(
        source={"type": "dimse", "host": "127.0.0.1", "port": mock_dimse_pacs.port, "called_aet": "MOCKPACS",
                "retrieve": "c-get"},
        csv=str(write_csv(f"Accession Number,Subject,Session\n{accession},S1,S1_A\n")),
    )
    modules = imported_by(["run", "--config", str(config)], tmp_path)
    assert "dqr.plugins.dimse.backend" in modules  # it did run over DIMSE
    top_level = {name.split(".")[0] for name in modules}
    assert sorted(top_level & set(NOT_NEEDED)) == []


def test_a_dicomweb_run_imports_no_dicomweb_client_or_queue_libraries(site, write_csv, tmp_path, mock_dicomweb_pacs):
    accession = next(generate_cohort(DEFAULT_COHORT)).AccessionNumber
    config = site(
        source={"type": "dicomweb", "url": mock_dicomweb_pacs.url},
        csv=str(write_csv(f"Accession Number,Subject,Session\n{accession},S1,S1_A\n")),
    )
    modules = imported_by(["run", "--config", str(config)], tmp_path)
    assert "dqr.plugins.dicomweb.backend" in modules  # it did run over DICOMweb
    top_level = {name.split(".")[0] for name in modules}
    assert sorted(top_level & set(NOT_NEEDED)) == []
