"""``python -m bench.ab``: interleaved A/B of ``dqr run`` variants on one
private Orthanc, with the case's reference in every repetition: C-GET
(``--case c-get``, the default) against the getscu loop, or memory ->
C-STORE to a second Orthanc (``--case c-store``) against ``storescu +sd``.

Each variant is a set of environment variables for the dqr process, e.g. an
older checkout's sources first on ``PYTHONPATH``::

    git archive <commit> core plugins | tar -x -C /tmp/old   # then:
    mv /tmp/old/core /tmp/old/dqr && mv /tmp/old/plugins /tmp/old/dqr/plugins
    python -m bench.ab --studies 20 --repeat 3 --variant old PYTHONPATH=/tmp/old --variant new

Prints each run (seconds, exit code, files, load average) and the medians.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cases import (
    Variant,
    cstore_case,
    dimse_source,
    labelled_csv,
    site_yaml,
    stop_destination_orthanc,
)
from bench.setup import CALLED_AET, CALLING_AET, FULL, Sizes, byte_compile, start_world


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("c-get", "c-store"), default="c-get")
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "VAR=VALUE"), required=True)
    args = parser.parse_args(argv)
    variants = {name: dict(pair.split("=", 1) for pair in env) for name, *env in args.variant}
    sizes = Sizes(**{**FULL.__dict__, "query_rows": 1, "retrieve_studies": args.studies, "growth": (args.studies,)})
    root = Path(tempfile.mkdtemp(prefix="dqr-ab-"))
    world = start_world(sizes, root)
    for env in variants.values():  # each variant's own sources, compiled as the main checkout's are
        byte_compile(world.python, *filter(None, env.get("PYTHONPATH", "").split(":")))
    try:
        reference, dqr_run = (_cget if args.case == "c-get" else _cstore)(world, root)
        times: dict[str, list[float]] = {name: [] for name in [*variants, reference.name]}
        for rep in range(args.repeat):
            run = root / f"reference{rep}"
            run.mkdir()
            load = _load()
            times[reference.name].append(_timed(reference, run, world.child_env()))
            print(f"rep {rep} {reference.name} {times[reference.name][-1]:.2f} s, load {load}", flush=True)
            for name, env in variants.items():
                run = root / f"{name}{rep}"
                run.mkdir()
                load = _load()
                times[name].append(_timed(dqr_run, run, {**world.child_env(), **env}))
                print(f"rep {rep} {name} {times[name][-1]:.2f} s, load {load}", flush=True)
        for name, values in times.items():
            print(f"{name}: median {statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})")
    finally:
        stop_destination_orthanc()
        world.orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _timed(variant: Variant, run: Path, env: dict[str, str]) -> float:
    """Run one variant in ``run`` (removed after); its wall time. A failed
    run or a wrong result is said, not hidden."""
    argv = variant.command(run)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=run, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    problem = f"exit {done.returncode}: {done.stderr[-300:]}" if done.returncode else None
    if problem is None and variant.files_dir is not None:
        pattern = variant.params.get("files", "*")
        files = sum(1 for path in variant.files_dir(run).rglob(pattern) if path.is_file())
        if files != variant.expected_files:
            problem = f"{files} files, expected {variant.expected_files}"
    if problem is None and variant.check is not None:
        problem = variant.check(done.stdout)
    if problem:
        print(f"  {variant.name}: {problem}", flush=True)
    shutil.rmtree(run, ignore_errors=True)
    return seconds


def _cget(world, root: Path) -> tuple[Variant, Variant]:
    studies = world.first(world.sizes.retrieve_studies)
    csv = labelled_csv(root / "retrieve.csv", studies)
    script = root / "getscu.sh"
    script.write_text("set -e\nexport TCP_NODELAY=1\n" + "".join(
        f'{world.getscu} -S -aet {CALLING_AET} -aec {CALLED_AET} -k QueryRetrieveLevel=STUDY '
        f'-k StudyInstanceUID={study.study_uid} -od "$1" 127.0.0.1 {world.orthanc.dicom_port}\n'
        for study in studies
    ))

    def dqr(run: Path) -> list[str]:
        config = site_yaml(run, dimse_source(world, "c-get"))
        return [world.dqr, "run", "--config", str(config), "--csv", str(csv)]

    expected = world.instances(len(studies))
    return (
        Variant("ab", "getscu loop", lambda run: ["bash", str(script), str(run)], "getscu loop",
                files_dir=lambda run: run, expected_files=expected),
        Variant("ab", "dqr", dqr, "dqr run over C-GET", files_dir=lambda run: run / "archive",
                expected_files=expected, params={"files": "*.dcm"}),
    )


def _cstore(world, root: Path) -> tuple[Variant, Variant]:
    by_name = {variant.name: variant for variant in cstore_case(world)}
    return by_name["storescu +sd"], by_name["dqr run memory->C-STORE"]  # not verified


if __name__ == "__main__":
    sys.exit(main())
