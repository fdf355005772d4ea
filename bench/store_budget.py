"""Where dqr's store path spends its time, per instance, with no network.

    python -m bench.store_budget [--studies 40] [--repeat 3] [--dir /tmp]

Writes the benchmark's retrieve set (64x64 16-bit, 21 instances a series)
as files once, then feeds each series through the public store path
(:func:`dqr.steps.store_study_instance` into an archive, one commit per
series) with a timer around each stage, and prints microseconds per
instance: the stages are wrapped where ``dqr.steps`` calls them, so the
figures are of the real path, not a copy of it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from itertools import groupby
from pathlib import Path
from types import SimpleNamespace


def _timed(totals: dict[str, float], name: str, function):
    """Wall time into ``totals[name]``, this thread's CPU time (user and
    system: what the machine's other load does not inflate as much) into
    ``totals["cpu " + name]``."""
    def wrapper(*args, **kwargs):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
            totals["cpu " + name] += time.thread_time() - cpu

    return wrapper


def write_set(folder: Path, studies: int) -> list[Path]:
    from bench.setup import FULL, retrieve_specs
    from dqr.plugins.testpacs.memory.synthetic import write_cohort

    paths: list[Path] = []
    for spec in retrieve_specs(FULL, studies):
        paths += write_cohort(spec, folder)
    return sorted(paths)


def run_once(source: list[Path], out: Path) -> tuple[int, dict[str, float], float]:
    from pydicom import dcmread

    import dqr.steps as steps
    from dqr.context import Reporter
    from dqr.model import Labels, RetrieveRequest, Series, Study
    from dqr.pluginmanager import get_plugin_manager
    from dqr.plugins.archive import Archive, SeriesDirectory
    from dqr.plugins.dicomweb.multipart import received_instance

    totals: dict[str, float] = defaultdict(float)
    hooks = get_plugin_manager().hook
    ctx = SimpleNamespace(hooks=SimpleNamespace(dqr_relabel=_timed(totals, "relabel", hooks.dqr_relabel)),
                          stop=threading.Event(), reporter=Reporter())
    originals = {name: getattr(steps, name) for name in ("decode", "accept_arrival", "encode_part10")}
    for name, function in originals.items():
        setattr(steps, name, _timed(totals, name, function))
    write, commit = SeriesDirectory.write, SeriesDirectory.commit
    SeriesDirectory.write = _timed(totals, "write", write)
    SeriesDirectory.commit = _timed(totals, "commit", commit)
    try:
        archive = Archive(out, "Bench")
        labels = Labels("BENCH_SUBJ", "BENCH_SESS", relabel_subject=True, relabel_session=True)
        count = 0
        wall = 0.0
        for _folder, group in groupby(source, key=lambda p: p.parent):
            paths = list(group)
            meta = dcmread(paths[0], stop_before_pixels=True)
            study = Study(study_uid=meta.StudyInstanceUID, patient_id=meta.PatientID)
            series = Series(study_uid=meta.StudyInstanceUID, series_uid=meta.SeriesInstanceUID)
            arrived = [received_instance(p.read_bytes()) for p in paths]
            start = time.perf_counter()
            open_start = time.perf_counter()
            writer = archive.open_series(study, series, labels.subject, labels.session, labels=labels)
            totals["open_series"] += time.perf_counter() - open_start
            targets = {series.series_uid: steps.StoreTarget(RetrieveRequest(study, series), labels, writer,
                                                            [a.sop_instance_uid for a in arrived])}
            store = _timed(totals, "store_instance (all)", steps.store_study_instance)
            for received in arrived:
                store(ctx, received, targets)
                count += 1
            writer.commit()
            wall += time.perf_counter() - start
    finally:
        for name, function in originals.items():
            setattr(steps, name, function)
        SeriesDirectory.write, SeriesDirectory.commit = write, commit
    return count, totals, wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_budget", description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp directory)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="dqr-store-budget-", dir=args.dir))
    try:
        source = write_set(work / "source", args.studies)
        runs = []
        for number in range(args.repeat):
            out = work / f"out{number}"
            runs.append(run_once(source, out))
            shutil.rmtree(out)
        count = runs[0][0]
        names = sorted({name for _, totals, _ in runs for name in totals if not name.startswith("cpu ")})
        print(f"{count} instances, {args.repeat} runs, load average {Path('/proc/loadavg').read_text().split()[:3]}")
        print(f"{'stage':<24} {'wall us/instance':>18} {'min-max':>16} {'CPU us/instance':>16}")
        for name in names:
            values = [totals[name] / count * 1e6 for _, totals, _ in runs]
            cpu = statistics.median(totals["cpu " + name] / count * 1e6 for _, totals, _ in runs)
            print(f"{name:<24} {statistics.median(values):>18.1f} {min(values):>7.1f}-{max(values):<8.1f} {cpu:>16.1f}")
        walls = [wall / count * 1e6 for _, _, wall in runs]
        print(f"{'wall per instance':<24} {statistics.median(walls):>22.1f} {min(walls):>7.1f}-{max(walls):<8.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
