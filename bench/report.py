"""From ``results.json`` to the markdown table (medians, ratios, targets with
PASS/MISS) and the growth plot. Usable on its own:
``python -m bench.report bench/results/results.json``."""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

LOST = re.compile(r"(\d+) responses lost")
LOST_WAIT = 2.0  # bench.floors.LOST_RESPONSE_TIMEOUT


def median(variant: dict, key: str = "seconds") -> float | None:
    values = [run[key] for run in variant["runs"] if run.get("ok") and key in run]
    return statistics.median(values) if values else None


def _by_name(results: dict, case: str) -> dict[str, dict]:
    return {v["name"]: v for v in results["cases"].get(case, {}).get("variants", [])}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _series(results: dict, case: str) -> list[dict]:
    return sorted((v for v in _by_name(results, case).values() if v["x"] is not None), key=lambda v: v["x"])


def targets(results: dict) -> list[dict]:
    """Each target of issue 6: what is compared, the measured value, the
    threshold, PASS/MISS (or SKIP when a side did not run)."""
    rows: list[dict] = []

    def ratio_target(case: str, label: str, ours: str, theirs: str, limit: float, note: str = "") -> None:
        variants = _by_name(results, case)
        if case not in results["cases"]:
            return
        a = median(variants[ours]) if ours in variants else None
        b = median(variants[theirs]) if theirs in variants else None
        value = _ratio(a, b)
        why = next((variants[n]["skipped"] for n in (ours, theirs) if n in variants and variants[n]["skipped"]), None)
        rows.append({
            "case": case, "target": label, "value": value, "limit": limit, "kind": "ratio",
            "status": "SKIP" if value is None else ("PASS" if value <= limit else "MISS"),
            "note": why or note or ("a side had no successful run" if value is None else ""),
        })

    ratio_target("query", "dqr query / findscu loop ≤ 0.25 (4× faster)", "dqr query", "findscu loop", 0.25)
    ratio_target("query", "dqr query / raw pynetdicom 1 association ≤ 1.0", "dqr query", "pynetdicom 1 assoc", 1.0)
    ratio_target("dimse", "dqr C-GET / raw pynetdicom C-GET ≤ 1.15", "dqr run c-get", "pynetdicom C-GET", 1.15)
    ratio_target("dimse", "dqr C-MOVE / raw pynetdicom C-GET ≤ 1.15", "dqr run c-move", "pynetdicom C-GET", 1.15)
    ratio_target("dimse", "dqr C-GET / getscu loop ≤ 1.5 (issue 13)", "dqr run c-get", "getscu loop", 1.5)
    ratio_target("dimse", "dqr C-MOVE / getscu loop ≤ 2.0 (issue 13)", "dqr run c-move", "getscu loop", 2.0)
    ratio_target("dimse", "dqr C-MOVE / movescu+SCP loop ≤ 1.0 (issue 13)", "dqr run c-move", "movescu loop", 1.0)
    ratio_target("dimse", "stretch: dqr C-GET / getscu loop ≤ 1.0", "dqr run c-get", "getscu loop", 1.0)
    ratio_target("dimse-large", "large: dqr C-GET / getscu loop ≤ 1.5", "dqr run c-get", "getscu loop", 1.5)
    ratio_target("dimse-large", "large: dqr C-MOVE / getscu loop ≤ 2.0", "dqr run c-move", "getscu loop", 2.0)
    ratio_target("dimse-large", "large: dqr C-MOVE / movescu+SCP loop ≤ 1.0", "dqr run c-move", "movescu loop", 1.0)
    ratio_target("dicomweb", "dqr WADO-RS / dicomweb-client loop ≤ 1.0", "dqr run dicomweb", "dicomweb-client", 1.0)
    ratio_target("dicomweb", "dqr WADO-RS / raw HTTP ≤ 1.3", "dqr run dicomweb", "raw HTTP", 1.3)

    growth = [v for v in _series(results, "growth") if median(v) is not None]
    if "growth" in results["cases"]:
        if len(growth) >= 2:
            lo, hi = growth[0], growth[-1]
            rss = _ratio(median(hi, "peak_rss_mb"), median(lo, "peak_rss_mb"))
            rows.append({"case": "growth", "target": f"peak RSS at {hi['x']} / at {lo['x']} studies ≤ 1.2",
                         "value": rss, "limit": 1.2, "kind": "ratio", "status": "PASS" if rss <= 1.2 else "MISS", "note": ""})
        if len(growth) >= 4:
            first = (median(growth[1]) - median(growth[0])) / (growth[1]["x"] - growth[0]["x"])
            last = (median(growth[-1]) - median(growth[-2])) / (growth[-1]["x"] - growth[-2]["x"])
            value = _ratio(last, first)
            rows.append({
                "case": "growth",
                "target": f"cost per study flat: marginal s/study {growth[-2]['x']}→{growth[-1]['x']} / "
                          f"{growth[0]['x']}→{growth[1]['x']} ≤ 1.2",
                "value": value, "limit": 1.2, "kind": "ratio",
                "status": "PASS" if value is not None and value <= 1.2 else "MISS",
                "note": f"{first * 1000:.0f} → {last * 1000:.0f} ms per study",
            })
    validate = _series(results, "validate")
    if validate:
        big = validate[-1]
        value = median(big)
        limit = 5.0
        rows.append({"case": "validate", "target": f"dqr validate {big['x']:,} rows < {limit:.0f} s", "value": value,
                     "limit": limit, "kind": "seconds",
                     "status": "SKIP" if value is None else ("PASS" if value < limit else "MISS"),
                     "note": "" if big["x"] >= 100_000 else "quick mode: fewer rows than the target's 100,000"})
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def case_table(results: dict, case: str) -> list[str]:
    variants = results["cases"][case]["variants"]
    reference = next((v for v in variants if v["role"] == "reference"), None)
    floor = next((v for v in variants if v["role"] == "floor"), None)
    first = variants[0] if variants else None
    lines = ["| variant | role | median s | min–max s | runs ok | peak RSS MB | files | "
             + ("/ reference | / floor |" if reference or floor else "/ first |"),
             "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if reference or floor else "---:|")]
    for v in variants:
        ok = [r for r in v["runs"] if r.get("ok")]
        med = median(v)
        if v["skipped"]:
            span, med_text = "—", f"skipped: {v['skipped']}"
        else:
            span = f"{min(r['seconds'] for r in ok):.2f}–{max(r['seconds'] for r in ok):.2f}" if ok else "—"
            med_text = _fmt(med)
        files = ok[0].get("files", "") if ok else ""
        if v["expected_files"] is not None and ok:
            files = f"{files}/{v['expected_files']}"
        cells = [v["name"], v["role"], med_text, span, f"{len(ok)}/{len(v['runs'])}", _fmt(median(v, "peak_rss_mb"), 0), str(files)]
        if reference or floor:
            cells += [_fmt(_ratio(med, median(reference)) if reference else None),
                      _fmt(_ratio(med, median(floor)) if floor else None)]
        else:
            cells += [_fmt(_ratio(med, median(first)) if first else None)]
        lines.append("| " + " | ".join(cells) + " |")
    problems = [(v["name"], r["rep"], r["problem"]) for v in variants for r in v["runs"] if not r.get("ok")]
    for name, rep, problem in problems:
        lines.append(f"\n- **{name}**, repetition {rep + 1} (excluded): {problem.strip()[:400]}")
    for v in variants:
        lost = [int(m.group(1)) if (m := LOST.search(r.get("warning", ""))) else 0 for r in v["runs"] if r.get("ok")]
        if any(lost):
            net = statistics.median(r["seconds"] - LOST_WAIT * n for r, n in zip([r for r in v["runs"] if r.get("ok")], lost, strict=True))
            lines.append(f"\n- *{v['name']}* lost {sum(lost)} responses in {len(lost)} runs inside pynetdicom "
                         f"(pynetdicom#875), each waited for {LOST_WAIT:.0f} s then re-sent; net of those waits its "
                         f"median is {net:.2f} s (ratios above use the measured time)")
    warnings = [(v["name"], r["rep"], r["warning"]) for v in variants for r in v["runs"] if r.get("warning")]
    for name, rep, warning in warnings:
        lines.append(f"\n- *{name}*, repetition {rep + 1} (kept): {warning}")
    return lines


def series_extra(results: dict, case: str) -> list[str]:
    series = _series(results, case)
    if case == "growth":
        lines = ["", "| studies | instances | median s | s per study | marginal s per study | peak RSS MB |", "|---:|---:|---:|---:|---:|---:|"]
        previous = None
        for v in series:
            med = median(v)
            per = None if med is None else med / v["x"]
            marginal = None
            if previous is not None and med is not None and median(previous) is not None:
                marginal = (med - median(previous)) / (v["x"] - previous["x"])
            lines.append(f"| {v['x']} | {v['expected_files']} | {_fmt(med)} | {_fmt(per, 3)} | {_fmt(marginal, 3)} | "
                         f"{_fmt(median(v, 'peak_rss_mb'), 0)} |")
            previous = v
        return lines
    if case == "throttle":
        base = median(series[0]) if series else None
        lines = ["", "| max_retrievals | median s | speed-up vs 1 |", "|---:|---:|---:|"]
        for v in series:
            lines.append(f"| {v['x']} | {_fmt(median(v))} | {_fmt(_ratio(base, median(v)))} |")
        return lines
    if case == "validate":
        lines = ["", "| rows | median s | µs per row |", "|---:|---:|---:|"]
        for v in series:
            med = median(v)
            lines.append(f"| {v['x']:,} | {_fmt(med)} | {_fmt(None if med is None else med / v['x'] * 1e6, 1)} |")
        return lines
    return []


TITLES = {
    "query": "1. Query (study-level C-FIND per CSV row)",
    "dimse": "2. Retrieve over DIMSE (query, retrieve, relabel, store)",
    "dimse-large": "2b. Retrieve over DIMSE, large instances (512 x 512 16-bit, ~130 MB)",
    "dicomweb": "3. Retrieve over DICOMweb",
    "relabel": "4. Relabel + store alone (local folder, no network)",
    "growth": "5a. Growth: dqr run (C-GET) with more studies",
    "validate": "5b. dqr validate on large CSVs",
    "throttle": "6. Throttling cost: --max-retrievals",
}


def write_markdown(results: dict, path: Path, plot: Path | None = None) -> None:
    meta = results["meta"]
    machine = meta["machine"]
    sizes = meta["sizes"]
    lines = [
        "# dqr benchmark results",
        "",
        f"Run {meta['started']}{' (QUICK mode: tiny sizes, not representative)' if meta['quick'] else ''}; "
        f"{sizes['repeat']} repetition(s), variants interleaved; wall time of each process (start to exit, "
        f"interpreter start and imports included); peak RSS = the largest VmHWM of the process (tree). Medians over successful runs.",
        "",
        f"- Machine: {machine['cpu_count']} CPUs ({machine['cpu_model']}), {machine['memory_gb']} GB, Linux {machine['kernel']}",
        f"- Python {machine['python']}; " + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v),
        f"- Orthanc {machine['orthanc']} (DICOMweb plugin {machine['orthanc_dicomweb_plugin']}), started with TCP_NODELAY=1; "
        f"{machine['dcmtk'] or 'dcmtk not found'}",
        f"- dqr sources (core/, plugins/) digest at start: {meta.get('code', '?')}",
        f"- Files written to {machine['temp_dir']} ({machine['temp_fs']}); load average before {_load(meta['load_before'])}, "
        f"after {_load(meta.get('load_after'))}",
        f"- Sizes: {sizes['query_rows']} query rows; {sizes['retrieve_studies']} studies for retrieval "
        f"({sizes['instances_per_series']} instances per series, {sizes['image_size']}×{sizes['image_size']} 16-bit); "
        f"growth {sizes['growth']}; validate {sizes['validate_rows']}; max_retrievals {sizes['throttle']}",
        *[f"- Case *{case}* re-run separately ({info['started']}, load before {_load(info.get('load_before'))}): "
          f"{info['reason']}" for case, info in meta.get("reruns", {}).items()],
        *[f"- Note: {note}" for note in meta.get("notes", [])],
        "",
        "## Targets",
        "",
        "| case | target | measured | status | note |",
        "|---|---|---:|---|---|",
    ]
    for row in targets(results):
        value = _fmt(row["value"]) + (" s" if row["kind"] == "seconds" and row["value"] is not None else "")
        lines.append(f"| {row['case']} | {row['target']} | {value} | **{row['status']}** | {row['note']} |")
    for case in results["cases"]:
        lines += ["", f"## {TITLES.get(case, case)}", ""]
        code = results["cases"][case].get("code")
        if code and code[0] != code[1]:
            lines += [f"*dqr's sources changed while this case ran (code {code[0]} → {code[1]}): "
                      "its runs measured different code.*", ""]
        lines += case_table(results, case)
        lines += series_extra(results, case)
        lines += ["", "Variants:", ""]
        lines += [f"- *{v['name']}*: {v['description']}" for v in results["cases"][case]["variants"]]
    if plot is not None:
        lines += ["", f"![time per study and peak RSS vs studies]({plot.name})"]
    path.write_text("\n".join(lines) + "\n")


def _load(load) -> str:
    return "—" if not load else " / ".join(f"{x:.2f}" for x in load)


def write_plot(results: dict, path: Path) -> Path | None:
    """Time per study and peak RSS against the number of studies (growth case)."""
    series = [v for v in _series(results, "growth") if median(v) is not None]
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    xs = [v["x"] for v in series]
    per_study = [median(v) / v["x"] for v in series]
    rss = [median(v, "peak_rss_mb") for v in series]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, per_study, "o-", label="wall time / studies")
    marginal = [(median(b) - median(a)) / (b["x"] - a["x"]) for a, b in zip(series, series[1:], strict=False)]
    if marginal:
        left.plot(xs[1:], marginal, "s--", label="marginal time per added study")
    left.set_xlabel("studies retrieved (dqr run, C-GET)")
    left.set_ylabel("seconds per study")
    left.set_ylim(bottom=0)
    left.set_xscale("log", base=2)
    left.set_xticks(xs, [str(x) for x in xs])
    left.legend()
    left.grid(alpha=0.3)
    right.plot(xs, rss, "o-", color="tab:red")
    right.set_xlabel("studies retrieved (dqr run, C-GET)")
    right.set_ylabel("peak RSS of dqr (MB)")
    right.set_ylim(bottom=0)
    right.set_xscale("log", base=2)
    right.set_xticks(xs, [str(x) for x in xs])
    right.grid(alpha=0.3)
    machine = results["meta"]["machine"]
    fig.suptitle(f"dqr growth — {machine['cpu_count']} CPUs, Orthanc {machine['orthanc']}, "
                 f"{results['meta']['sizes']['repeat']} repetitions (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/results.json")
    data = json.loads(source.read_text())
    plot = write_plot(data, source.with_name("growth.png"))
    write_markdown(data, source.with_name("results.md"), plot)
