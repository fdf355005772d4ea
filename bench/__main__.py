"""``python -m bench``: run dqr's benchmarks against dcmtk and hand-written
pynetdicom / dicomweb-client / pydicom code on a private Orthanc.

Run from the repository root (needs Orthanc with its DICOMweb plugin, dcmtk,
and dqr installed: ``bash scripts/test.sh`` sets all of that up)::

    python -m bench                    # everything, 5 repetitions (~20 min on 2 cores)
    python -m bench --quick            # tiny sizes, 1 repetition (the smoke test)
    python -m bench --cases query dimse --repeat 3
    python -m bench --cases cstore stow --repeat 3   # forwarding: C-STORE / STOW-RS to a 2nd Orthanc
    python -m bench --shm              # write files to /dev/shm instead of disk
"""

from __future__ import annotations

import argparse
import sys

from bench.cases import CASES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark dqr against dcmtk and raw pynetdicom/dicomweb-client on a private Orthanc.",
        epilog="Writes <out>/results.json, <out>/results.md and <out>/growth.png.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 repetition (smoke test)")
    parser.add_argument("--repeat", type=int, metavar="N", help="repetitions of every variant (default 5; quick 1)")
    parser.add_argument("--cases", nargs="+", choices=CASES, metavar="CASE",
                        help=f"cases to run: {' '.join(CASES)} (default all but cstore stow)")
    parser.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--shm", action="store_true", help="work (Orthanc storage, archives) in /dev/shm (tmpfs)")
    where.add_argument("--tmp", metavar="DIR", help="work in DIR (default: the system temp dir, disk-backed here)")
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    from bench.run import main as run

    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
