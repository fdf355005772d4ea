"""``python -m bench.profile``: where the time of one ``dqr run`` over DIMSE goes.

Starts the benchmark's private Orthanc (the retrieve cohort only), runs the
getscu loop once for reference, then ``dqr run`` once per retrieve mode under
py-spy (``pip install py-spy``) and prints, per mode, the wall time and the
share of samples by leaf function and by module (all threads, idle included:
a thread that sleeps in a poll loop shows as that loop)::

    python -m bench.profile --studies 40 --retrieve c-get c-move --transport native pynetdicom
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.cases import dimse_source, labelled_csv, lines_file, site_yaml, store_port
from bench.setup import CALLED_AET, CALLING_AET, FULL, Sizes, start_world


def summarize(raw: Path, top: int) -> list[str]:
    leaf: collections.Counter[str] = collections.Counter()
    module: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        last = frames[-1]
        where = last[last.find("(") + 1 : last.rfind(":")] if "(" in last else last
        module[where.rsplit("site-packages/", 1)[-1]] += n
    lines = [f"  samples: {total}"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in leaf.most_common(top)]
    lines.append("  by file:")
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in module.most_common(top)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--retrieve", nargs="+", default=["c-get"])
    parser.add_argument("--transport", nargs="+", default=["native"])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    sizes = Sizes(**{**FULL.__dict__, "query_rows": 1, "retrieve_studies": args.studies,
                     "growth": (args.studies,), "image_size": args.image_size})
    root = Path(tempfile.mkdtemp(prefix="dqr-profile-"))
    world = start_world(sizes, root)
    try:
        studies = world.first(args.studies)
        csv = labelled_csv(root / "retrieve.csv", studies)
        uids = lines_file(root / "uids.txt", [s.study_uid for s in studies])
        out = root / "getscu"
        out.mkdir()
        started = time.perf_counter()
        for study in studies:
            subprocess.run(
                [world.getscu, "-S", "-aet", CALLING_AET, "-aec", CALLED_AET, "-k", "QueryRetrieveLevel=STUDY",
                 "-k", f"StudyInstanceUID={study.study_uid}", "-od", str(out), "127.0.0.1",
                 str(world.orthanc.dicom_port)], check=True, capture_output=True,
                env={**world.child_env(), "TCP_NODELAY": "1"},
            )
        print(f"getscu loop: {time.perf_counter() - started:.2f} s, {world.instances(args.studies)} instances ({uids})")
        for retrieve in args.retrieve:
            for transport in args.transport:
                run = root / f"{retrieve}-{transport}"
                run.mkdir()
                source = dimse_source(world, retrieve)
                if transport != "default":
                    source["transport"] = transport
                if retrieve == "c-move":
                    source["store_port"] = store_port(world)
                config = site_yaml(run, source)
                raw = run / "profile.txt"
                started = time.perf_counter()
                subprocess.run(
                    [py_spy, "record", "-r", "250", "--idle", "--threads", "-o", str(raw), "--format", "raw",
                     "--", world.dqr, "run", "--config", str(config), "--csv", str(csv)],
                    check=True, capture_output=True, env=world.child_env(),
                )
                print(f"\ndqr run {retrieve} transport={transport}: {time.perf_counter() - started:.2f} s (under py-spy)")
                print("\n".join(summarize(raw, args.top)))
    finally:
        world.orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
