"""Whole-command speed of `splitbench simulate` (issue 14): imports, trace, simulation, records, summary, each case
one `python -m splitbench.cli simulate ... --json` in a subprocess under `/usr/bin/time -v` (wall clock and max
RSS; `resource` of the children where that tool is missing), the way SplitwiseSim's reference runs were timed
(/work/ssim/run_ref.sh: `/usr/bin/time -v` of its whole `python run.py ...`). Targets:

- the 42k-request, 70 req/s traces (SplitwiseSim's generate_trace.py method, conv and code lengths, 600 s) on each
  of SplitwiseSim's seven iso-power designs (40-70 machines): <= 3 s each;
- the full hour of azure-conv-2023 replayed (19,366 requests) on the same designs: <= 1 s each;
- a million requests (Poisson 800 req/s x 1250 s, conv lengths) on 500 DGX-H100s: <= 60 s and <= 2 GB;
- where SplitwiseSim's time for the same trace and design is known (benchmarks/data/splitwisesim/<design>-<trace>.json,
  `wall_s`, or $SSIM_REF), at least 20x faster.

Traces: SplitwiseSim's CSVs from $SSIM_TRACES (default /work/ssim/traces) when present, else our own equivalents
(`synth:` Poisson at 70 req/s, the catalogue's azure-conv-2023). Splitwise designs run the mixed-pool policy and the
baselines JSQ, as SplitwiseSim's configurations do. Model BLOOM-176B (its default), profile as `simulate` finds it.

`--splitwisesim DIR` (a SplitwiseSim checkout) times SplitwiseSim itself on each such case just before ours, so
both run on the same host in the same minutes (this VM's speed drifts by 30% within an hour).

Run: `python benchmarks/sim_speed.py [--only SUBSTRING] [--repeat N] [--splitwisesim DIR]`.
One line per case (wall, CPU, max RSS, target, PASS/FAIL,
TTFT p50/p99 so a fast-but-wrong run shows), a table beside SplitwiseSim's times, and as the
LAST line one JSON object. Exit 0 when every target is met. Wall times depend on the host and its load: the JSON
records the host, its load average and each case's CPU time.
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import splitbench
from splitbench import native
from splitbench.schema.runmeta import host_info

SSIM_TRACES = Path(os.environ.get("SSIM_TRACES", "/work/ssim/traces"))
# SplitwiseSim's own outputs and `wall_s` of each design x trace, as kept in the repository (sim_vs_splitwisesim.py)
SSIM_REF = Path(os.environ.get("SSIM_REF", Path(__file__).parent / "data" / "splitwisesim"))
SSIM_COLUMNS = "timestamp=arrival_timestamp,input=prompt_size,output=token_size"
DESIGNS = {   # SplitwiseSim's design name (run_ref.sh) -> our --cluster
    "baseline-a100-70": "baseline-a100:70", "baseline-h100-40": "baseline-h100:40",
    "splitwise-aa-45p25t": "splitwise-aa:45,25", "splitwise-hh-25p15t": "splitwise-hh:25,15",
    "splitwise-ha-25p26t": "splitwise-ha:25,26", "splitwise-hhcap-25p21t": "splitwise-hhcap:25,21",
    "splitwise-hh-35p5t": "splitwise-hh:35,5",
}
TRACES = {    # SplitwiseSim's trace name -> (its CSV, our equivalent, wall target s)
    "rr_conv_70": ("rr_conv_70.csv", "synth:arrivals=poisson,rate=70,duration=600,lengths=azure-conv-2023,seed=0", 3.0),
    "rr_code_70": ("rr_code_70.csv", "synth:arrivals=poisson,rate=70,duration=600,lengths=azure-code-2023,seed=0", 3.0),
    "azure_conv_replay": ("azure_conv_replay.csv", "azure-conv-2023", 1.0),
}
MILLION = ("million", "synth:arrivals=poisson,rate=800,duration=1250,lengths=azure-conv-2023,seed=0",
           "baseline-h100:500", 60.0, 2048.0)


def cases() -> list[dict]:
    out = []
    for tname, (csv, ours, target) in TRACES.items():
        path = SSIM_TRACES / csv
        trace = ["--trace", str(path), "--columns", SSIM_COLUMNS] if path.exists() else ["--trace", ours]
        for dname, cluster in DESIGNS.items():
            policy = "jsq" if dname.startswith("baseline") else "mixed-pool"
            out.append({"key": f"{dname}-{tname}", "design": dname, "trace": tname, "cluster": cluster,
                        "args": [*trace, "--cluster", cluster, "--policy", policy], "target_s": target,
                        "target_mb": None, "trace_source": str(path) if path.exists() else ours})
    name, trace, cluster, target, mb = MILLION
    out.append({"key": name, "design": cluster, "trace": trace, "cluster": cluster,
                "args": ["--trace", trace, "--cluster", cluster], "target_s": target, "target_mb": mb,
                "trace_source": trace})
    return out


def _time_tool() -> str | None:
    return "/usr/bin/time" if Path("/usr/bin/time").exists() else shutil.which("time")


def run_case(case: dict, results: str) -> dict:
    """One whole `simulate` command: wall s, CPU s, max RSS MB, requests, TTFT p50/p99."""
    cmd = [sys.executable, "-m", "splitbench.cli", "simulate", *case["args"], "--results", results, "--json"]
    tool = _time_tool()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        full = [tool, "-v", "-o", tf.name, *cmd] if tool else cmd
        before = os.times()
        t = time.perf_counter()
        p = subprocess.run(full, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t
        after = os.times()
        tv = tf.read() if tool else ""
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:300], "wall_s": wall}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", tv)
    summary = json.loads(p.stdout)
    ttft = summary["latency"]["ttft_s"]
    return {"wall_s": round(wall, 3),
            "cpu_s": round((after.children_user - before.children_user) + (after.children_system - before.children_system), 3),
            "max_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "requests": summary["counts"]["total"], "ok": summary["counts"]["ok"],
            "ttft_p50_s": ttft["p50"], "ttft_p99_s": ttft["p99"]}


def reference(case: dict) -> dict | None:
    path = SSIM_REF / f"{case['design']}-{case['trace']}.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    return {"wall_s": d.get("wall_s"), "max_rss_mb": d.get("max_rss_mb"), "n": d.get("n")}


def time_splitwisesim(case: dict, ssim_dir: Path) -> dict | None:
    """SplitwiseSim itself on this host, now: `python run.py` with the reference's Hydra overrides (trace.dir =
    $SSIM_TRACES) under /usr/bin/time -v in its checkout; None where the reference or its trace CSV is missing."""
    path, csv = SSIM_REF / f"{case['design']}-{case['trace']}.json", SSIM_TRACES / TRACES[case["trace"]][0]
    tool = _time_tool()
    if not path.exists() or not csv.exists() or not tool:
        return None
    ref = json.loads(path.read_text())
    ovr = [f"trace.dir={SSIM_TRACES}" if o.startswith("trace.dir=") else o for o in ref["source"]["overrides"]]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        p = subprocess.run([tool, "-v", "-o", tf.name, sys.executable, "run.py", *ovr], cwd=ssim_dir,
                           capture_output=True, text=True, check=False)
        tv = tf.read()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", tv)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", tv)
    if p.returncode != 0 or not wall:
        return None
    secs = 0.0
    for part in wall.group(1).split(":"):
        secs = secs * 60 + float(part)
    return {"wall_s": round(secs, 2), "max_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "n": ref.get("n"), "timed": "here, just before ours", "stored_wall_s": ref.get("wall_s")}


def judge(case: dict, res: dict, ref: dict | None) -> dict:
    ok = "error" not in res and res["wall_s"] <= case["target_s"]
    if case["target_mb"] is not None and "error" not in res:
        ok &= res["max_rss_mb"] is not None and res["max_rss_mb"] <= case["target_mb"]
    speedup = ref["wall_s"] / res["wall_s"] if ref and ref.get("wall_s") and "error" not in res else None
    if speedup is not None:
        ok &= speedup >= 20.0
    return {**case, **res, "ssim": ref, "speedup": round(speedup, 1) if speedup else None, "pass": bool(ok)}


def line(r: dict) -> str:
    if "error" in r:
        return f"{r['key']}: FAILED TO RUN ({r['error']})"
    mem = f" and <= {r['target_mb']:.0f} MB" if r["target_mb"] else ""
    sp = f"; {r['speedup']:.1f}x SplitwiseSim's {r['ssim']['wall_s']:.1f} s (target >= 20x)" if r["speedup"] else ""
    return (f"{r['key']}: {r['requests']:,} requests on {r['cluster']}: whole command {r['wall_s']:.2f} s wall, "
            f"{r['cpu_s']:.2f} s CPU, max RSS {r['max_rss_mb']} MB (target <= {r['target_s']:g} s{mem}){sp} "
            f"{'PASS' if r['pass'] else 'FAIL'}; TTFT p50/p99 {r['ttft_p50_s'] * 1e3:.0f}/{r['ttft_p99_s'] * 1e3:.0f} ms")


def table(rows: list[dict]) -> list[str]:
    known = [r for r in rows if r["ssim"]]
    if not known:
        return [f"SplitwiseSim reference times: not available (no {SSIM_REF}/*.json)"]
    out = ["SplitwiseSim vs splitbench, whole command, both under /usr/bin/time -v (wall s, max RSS MB):",
           f"{'case':42s} {'SplitwiseSim':>14s} {'splitbench':>12s} {'speedup':>8s}"]
    for r in known:
        ours = "-" if "error" in r else f"{r['wall_s']:.2f} s"
        sp = f"{r['speedup']:.1f}x" if r["speedup"] else "-"
        here = (f"  (timed here; the stored reference: {r['ssim']['stored_wall_s']:.1f} s)"
                if r["ssim"].get("timed") else "")
        out.append(f"{r['key']:42s} {r['ssim']['wall_s']:>12.1f} s {ours:>12s} {sp:>8s}{here}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the cases whose key contains this text")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case; the fastest counts")
    ap.add_argument("--splitwisesim", type=Path, default=None, metavar="DIR",
                    help="a SplitwiseSim checkout (its run.py, configs, data): time it on each case that has a "
                         "reference and a trace CSV in $SSIM_TRACES, just before ours, and judge the speedup "
                         "against that (same host, same hour) instead of the stored wall_s")
    a = ap.parse_args()
    rows = []
    # an installed package has its bytecode compiled; with PYTHONDONTWRITEBYTECODE set (as on our dev hosts) every
    # case would otherwise recompile splitbench's modules (~0.16 s measured), which no user run pays
    compileall.compile_dir(str(Path(splitbench.__file__).parent), quiet=1)
    print(f"simulator build: {native.STATUS['why']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sim-speed-") as results:
        for case in cases():
            if a.only not in case["key"]:
                continue
            ref = reference(case)
            if a.splitwisesim is not None:
                ref = time_splitwisesim(case, a.splitwisesim) or ref
            runs = [run_case(case, results) for _ in range(max(1, a.repeat))]
            best = min(runs, key=lambda x: x["wall_s"] if "error" not in x else float("inf"))
            rows.append(judge(case, best, ref))
            print(line(rows[-1]), flush=True)
    for t in table(rows):
        print(t)
    ok = all(r["pass"] for r in rows) and bool(rows)
    print(json.dumps({"benchmark": "sim_speed", "pass": ok, "cases": rows,
                      "host": {**host_info(), "loadavg": os.getloadavg(), "cpus": os.cpu_count()},
                      "simulator_build": native.STATUS,
                      "unix_s": round(time.time(), 1)}, separators=(",", ":"), default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
