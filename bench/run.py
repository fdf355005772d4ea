"""The benchmark run: start the world, run each case's variants interleaved
with repetitions, write ``results.json``, ``results.md`` and ``growth.png``."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.cases import BUILDERS, DEFAULT_CASES, Variant
from bench.measure import count_files, kill_current, run_measured
from bench.report import write_markdown, write_plot
from bench.setup import FULL, QUICK, REPO, World, start_world


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _fs_type(path: Path) -> str:
    """The filesystem the path is on (from /proc/mounts), e.g. ext4 or tmpfs."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3 and (resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return ((result.stdout or result.stderr).strip().splitlines() or ["unavailable"])[0]


def code_fingerprint() -> str:
    """A digest of dqr's sources: others may edit the checkout while the
    benchmark runs (it drives the editable install), so each case records
    the code it measured."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("core/**/*.py"), *REPO.glob("plugins/**/*.py")]):
        digest.update(str(path.relative_to(REPO)).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            pass
    return digest.hexdigest()[:12]


def machine_info(world: World, tmp_base: Path) -> dict:
    cpu_model = ""
    try:
        cpu_model = next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")), ""
        )
    except OSError:
        pass
    try:
        mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal")))
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    system = world.orthanc.session.get(world.orthanc.http_url + "/system", timeout=10).json()
    try:
        dicomweb = world.orthanc.session.get(world.orthanc.http_url + "/plugins/dicom-web", timeout=10).json().get("Version")
    except Exception:  # noqa: BLE001 - informational
        dicomweb = None
    packages = subprocess.run(
        [world.python, "-c",
         "import importlib.metadata as m, json, sys\n"
         "names = ['dqr', 'pynetdicom', 'pydicom', 'dicomweb-client', 'requests', 'numpy']\n"
         "out = {}\n"
         "for n in names:\n"
         "    try: out[n] = m.version(n)\n"
         "    except m.PackageNotFoundError: out[n] = None\n"
         "out['python'] = sys.version.split()[0]\n"
         "print(json.dumps(out))"],
        capture_output=True, text=True, timeout=60,
    )
    versions = json.loads(packages.stdout) if packages.returncode == 0 else {}
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": versions.get("python"),
        "harness_python": platform.python_version(),
        "orthanc": system.get("Version"),
        "orthanc_dicomweb_plugin": dicomweb,
        "orthanc_tcp_nodelay": True,
        "dcmtk": _first_line([world.getscu, "--version"]) if world.getscu else None,
        "findscu": world.findscu,
        "getscu": world.getscu,
        "packages": {k: v for k, v in versions.items() if k != "python"},
        "dqr_binary": world.dqr,
        "dqr_bytecode": "compiled before measuring (bench.setup.byte_compile), as an installed copy is",
        "temp_dir": str(tmp_base),
        "temp_fs": _fs_type(tmp_base),
    }


def run_variant(world: World, variant: Variant, rep: int) -> dict:
    run_dir = world.root / "runs" / variant.case / _slug(variant.name) / f"rep{rep}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    load = os.getloadavg()[0]
    measured = run_measured(variant.command(run_dir), cwd=run_dir, env=world.child_env(),
                            logs=run_dir / "logs", timeout=world.sizes.timeout)
    record = {
        "rep": rep,
        "seconds": round(measured.seconds, 4),
        "peak_rss_mb": round(measured.peak_rss_mb, 1),
        "exit_code": measured.exit_code,
        "load1_before": round(load, 2),
    }
    problems = []
    if measured.timed_out:
        problems.append(f"timed out after {world.sizes.timeout:.0f} s")
    elif measured.exit_code != 0:
        problems.append(f"exit code {measured.exit_code}: {measured.stderr_tail[-600:]}")
    if variant.files_dir is not None:
        record["files"] = count_files(variant.files_dir(run_dir))
        if variant.expected_files is not None and record["files"] != variant.expected_files:
            problems.append(f"{record['files']} files written, expected {variant.expected_files}")
    if variant.check is not None and not problems:
        problem = variant.check(measured.stdout)
        if problem and variant.role == "floor":
            # A hand-written floor has no retry: pynetdicom's lost-response race
            # (pynetdicom#875) shows up as a missing answer. Timed all the same.
            record["warning"] = problem
        elif problem:
            problems.append(problem)
    record["ok"] = not problems
    if problems:
        record["problem"] = "; ".join(problems)
    shutil.rmtree(run_dir, ignore_errors=True)  # archives never outlive their repetition
    return record


def run_case(world: World, case: str, variants: list[Variant], repeat: int) -> dict:
    results = {
        v.name: {
            "name": v.name, "role": v.role, "description": v.description, "x": v.x, "units": v.units,
            "expected_files": v.expected_files, "skipped": v.skipped, "runs": [],
        }
        for v in variants
    }
    for variant in variants:
        if variant.skipped:
            log(f"[{case}] {variant.name}: skipped ({variant.skipped})")
    active = [v for v in variants if not v.skipped]
    for rep in range(repeat):
        for variant in active:  # interleaved: A B C, A B C, ...
            record = run_variant(world, variant, rep)
            results[variant.name]["runs"].append(record)
            status = "ok" if record["ok"] else f"PROBLEM: {record['problem'][:300]}"
            if record.get("warning"):
                status += f" (warning: {record['warning']})"
            log(f"[{case}] {rep + 1}/{repeat} {variant.name}: {record['seconds']:.2f} s, "
                f"{record['peak_rss_mb']:.0f} MB, load {record['load1_before']:.2f} — {status}")
    return {"variants": list(results.values())}


def _interrupt_on_sigterm() -> None:
    """SIGTERM (and SIGHUP) stop the run like Ctrl-C: child and Orthanc killed by PID.
    SIGINT too, even when a non-interactive shell started us with it ignored."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, handler)


def main(args) -> int:
    _interrupt_on_sigterm()
    sizes = QUICK if args.quick else FULL
    if args.repeat:
        sizes = type(sizes)(**{**asdict(sizes), "repeat": args.repeat})
    cases = args.cases or list(DEFAULT_CASES)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp_base = Path(args.tmp) if args.tmp else Path("/dev/shm" if args.shm else tempfile.gettempdir())
    root = Path(tempfile.mkdtemp(prefix="dqr-bench-", dir=tmp_base))
    started = time.time()
    world = None
    try:
        log(f"work dir {root} ({_fs_type(root)}); starting Orthanc and seeding…")
        t0 = time.perf_counter()
        world = start_world(sizes, root)
        log(f"Orthanc pid {world.orthanc.pid} on DICOM {world.orthanc.dicom_port} / HTTP {world.orthanc.http_port}, "
            f"seeded in {time.perf_counter() - t0:.1f} s")
        results = {
            "meta": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                "quick": args.quick,
                "sizes": asdict(sizes),
                "cases": cases,
                "machine": machine_info(world, tmp_base),
                "load_before": os.getloadavg(),
                "seconds_seeding": round(time.perf_counter() - t0, 1),
                "code": code_fingerprint(),
            },
            "cases": {},
        }
        for case in cases:
            variants = BUILDERS[case](world)
            code_before = code_fingerprint()
            results["cases"][case] = run_case(world, case, variants, sizes.repeat)
            results["cases"][case]["load_after"] = os.getloadavg()
            results["cases"][case]["code"] = [code_before, code_fingerprint()]
            if code_before != results["cases"][case]["code"][1]:
                log(f"[{case}] dqr's sources changed while this case ran ({code_before} -> {code_fingerprint()})")
        results["meta"]["load_after"] = os.getloadavg()
        results["meta"]["seconds_total"] = round(time.time() - started, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        plot = write_plot(results, out / "growth.png")
        write_markdown(results, out / "results.md", plot)
        log(f"wrote {out / 'results.json'} and {out / 'results.md'}" + (f" and {plot}" if plot else ""))
        return 0
    except KeyboardInterrupt:
        log("interrupted: stopping the running child and Orthanc")
        kill_current()
        return 130
    finally:
        kill_current()
        if world is not None:
            world.orthanc.stop()
        shutil.rmtree(root, ignore_errors=True)
