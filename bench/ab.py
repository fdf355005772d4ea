"""``python -m bench.ab``: interleaved A/B of ``dqr run`` (C-GET) variants
on one private Orthanc, with the getscu loop in every repetition.

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

from bench.cases import dimse_source, labelled_csv, site_yaml
from bench.setup import CALLED_AET, CALLING_AET, FULL, Sizes, byte_compile, start_world


def _load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
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
    times: dict[str, list[float]] = {name: [] for name in [*variants, "getscu loop"]}
    try:
        studies = world.first(args.studies)
        csv = labelled_csv(root / "retrieve.csv", studies)
        for rep in range(args.repeat):
            out = root / f"getscu{rep}"
            out.mkdir()
            load, started = _load(), time.perf_counter()
            for study in studies:
                subprocess.run(
                    [world.getscu, "-S", "-aet", CALLING_AET, "-aec", CALLED_AET, "-k", "QueryRetrieveLevel=STUDY",
                     "-k", f"StudyInstanceUID={study.study_uid}", "-od", str(out), "127.0.0.1",
                     str(world.orthanc.dicom_port)],
                    check=True, capture_output=True, env={**world.child_env(), "TCP_NODELAY": "1"},
                )
            times["getscu loop"].append(time.perf_counter() - started)
            shutil.rmtree(out)
            print(f"rep {rep} getscu loop {times['getscu loop'][-1]:.2f} s, load {load}", flush=True)
            for name, env in variants.items():
                run = root / f"{name}{rep}"
                run.mkdir()
                config = site_yaml(run, dimse_source(world, "c-get"))
                load, started = _load(), time.perf_counter()
                done = subprocess.run([world.dqr, "run", "--config", str(config), "--csv", str(csv)],
                                      capture_output=True, text=True, env={**world.child_env(), **env})
                times[name].append(time.perf_counter() - started)
                files = sum(1 for _ in run.rglob("*.dcm"))
                print(f"rep {rep} {name} {times[name][-1]:.2f} s, exit {done.returncode}, {files} files, load {load}",
                      flush=True)
                shutil.rmtree(run)
        for name, values in times.items():
            print(f"{name}: median {statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})")
    finally:
        world.orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
