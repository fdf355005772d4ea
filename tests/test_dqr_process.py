"""The `dqr` process itself: it reuses the memory of the instances it has
stored for the next ones (dqr.allocator) -- a C-GET of large instances does
not fault in fresh pages for each of them, as glibc's default trimming made
it do (four page faults for every page stored, a fifth of the run's time) --
and it ends without the interpreter's teardown, but with its exit functions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dqr.plugins.testpacs.memory.synthetic import CohortSpec, generate_cohort

PAGE = os.sysconf("SC_PAGE_SIZE")
#: 2 series of 24 instances of 512 x 512 16-bit pixels: ~25 MB in all
LARGE = CohortSpec(patients=1, studies_per_patient=1, instances_per_series=24, rows=512, columns=512, seed=5)


def page_faults_of_dqr(args: list[str], cwd: Path) -> int:
    """The minor page faults of one ``dqr`` process run to its end (exit 0)."""
    with open(cwd / "dqr-stderr.txt", "w+b") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "dqr", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        assert process.returncode == 0, stderr.read().decode(errors="replace")[-3000:]
    return usage.ru_minflt


def test_a_c_get_of_large_instances_faults_in_fewer_pages_than_it_stores(site, write_csv, tmp_path, mock_dimse_factory):
    pacs = mock_dimse_factory(spec=LARGE)
    accession = next(generate_cohort(LARGE)).AccessionNumber
    config = site(
        source={"type": "dimse", "host": "127.0.0.1", "port": pacs.port, "called_aet": "MOCKPACS",
                "retrieve": "c-get"},
        csv=str(write_csv(f"Accession Number,Subject,Session\n{accession},S1,S1_A\n")),
    )
    args = ["run", "--config", str(config)]
    storing = page_faults_of_dqr(args, tmp_path)
    starting = page_faults_of_dqr(args, tmp_path)  # the same process with nothing left to fetch
    stored_pages = sum(p.stat().st_size for p in (tmp_path / "archive").rglob("*.dcm")) // PAGE
    assert stored_pages > 5000
    assert storing - starting < stored_pages / 2


#: A program that imports dqr's entry point with an exit function and an
#: object whose finalizer runs only if the interpreter tears its modules down.
ENDING = """
import atexit, sys
from pathlib import Path

out = Path(sys.argv[1])


class TornDown:
    def __del__(self):
        (out / "torn-down").write_text("the interpreter tore the modules down")


kept = TornDown()
atexit.register(lambda: (out / "exit-function").write_text("run"))
sys.argv = ["dqr", *sys.argv[2:]]
from dqr.cli import main

main()
"""


def test_the_process_ends_with_its_exit_functions_and_code_but_no_teardown(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", ENDING, str(tmp_path), "validate", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "Error" in done.stderr  # click refuses a --config that does not exist
    assert (tmp_path / "exit-function").read_text() == "run"
    assert not (tmp_path / "torn-down").exists()
