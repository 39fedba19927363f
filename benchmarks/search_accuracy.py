"""Accuracy of `splitbench search` on the stub, whose capacity is known by construction: `--stub-max-concurrency K`
serves K requests at once (FIFO, later ones queue) and each takes S = TTFT + (output - 1) x TPOT, so it sustains
K / S requests/s; the rate meeting a TTFT SLO on a probe of D seconds is computed exactly by replaying the probe's
own arrivals through the same FIFO (true_capacity). Prints found vs true capacity, CI and its coverage.

Usage: python benchmarks/search_accuracy.py [--slots 4] [--ttft-ms 20] [--tpot-ms 5] [--output 17]
           [--probe-duration 4] [--slo-ms 120] [--stat p90] [--repeats 1] [--results /tmp/search-accuracy]
Run it under the heavy lock on a shared host (its figures are timing): flock /work/wt/heavy.lock python ...
"""
from __future__ import annotations

import argparse
import heapq
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from splitbench.app.search import SearchSpec, probe_workload, warmup_ignored
from splitbench.workload.load import WorkloadSpec, load


def fifo_ttft_s(arrival_s: np.ndarray, slots: int, service_s: float, ttft_s: float) -> np.ndarray:
    """Each request's TTFT through K FIFO slots of fixed service time: its wait for a slot plus the stub's TTFT."""
    free = [0.0] * slots
    out = np.empty(len(arrival_s))
    for j, a in enumerate(arrival_s):
        start = max(a, heapq.heappop(free))
        heapq.heappush(free, start + service_s)
        out[j] = start - a + ttft_s
    return out


def lengths_trace(output_tokens: int) -> str:
    return f"synth:arrivals=poisson,rate=10,count=50,lengths=fixed,input=16,output={output_tokens}"


def meets(rate: float, a, spec: SearchSpec, base) -> bool:
    w = probe_workload(base, spec, rate)
    ignore = warmup_ignored(w, spec)
    keep = ~np.isin(w.trace_index, list(ignore)) if ignore else np.ones(len(w), bool)
    t = fifo_ttft_s(w.arrival_s, a.slots, (a.ttft_ms + (a.output - 1) * a.tpot_ms) / 1e3, a.ttft_ms / 1e3)[keep]
    q = {"p50": 50, "p90": 90, "p99": 99}[a.stat]
    return float(np.percentile(t, q)) <= a.slo_ms / 1e3


def true_capacity(a, spec: SearchSpec) -> float:
    """The highest rate whose probe (the search's own workload at that rate) meets the SLO in the exact FIFO model:
    a scan up from half the slot capacity, refined by bisection."""
    base = load(WorkloadSpec(lengths_trace(a.output)))
    cap = a.slots / ((a.ttft_ms + (a.output - 1) * a.tpot_ms) / 1e3)
    lo, hi = 0.5 * cap, 0.5 * cap
    while meets(hi, a, spec, base):
        lo, hi = hi, hi * 1.02
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid, a, spec, base) else (lo, mid)
    return lo


def search_command(a, results: str, search_id: str) -> list[str]:
    return [sys.executable, "-m", "splitbench.cli", "search", "--backend", "stub", "--stub-max-concurrency",
            str(a.slots), "--stub-ttft-ms", str(a.ttft_ms), "--stub-tpot-ms", str(a.tpot_ms), "--trace",
            lengths_trace(a.output), "--arrivals", "gamma", "--cv", str(a.cv), "--probe-duration",
            str(a.probe_duration), "--slo", f"ttft_{a.stat}={a.slo_ms}ms", "--start-rate", str(a.start_rate),
            "--growth", "1.5", "--max-probes", str(a.max_probes), "--results", results, "--search-id", search_id,
            "--json", "--seed", str(a.seed)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--tpot-ms", type=float, default=5.0)
    p.add_argument("--output", type=int, default=17)
    p.add_argument("--probe-duration", type=float, default=4.0)
    p.add_argument("--slo-ms", type=float, default=120.0)
    p.add_argument("--stat", default="p90", choices=("p50", "p90", "p99"))
    p.add_argument("--cv", type=float, default=0.01)
    p.add_argument("--start-rate", type=float, default=30.0)
    p.add_argument("--max-probes", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--results", default=None)
    a = p.parse_args()
    results = a.results or tempfile.mkdtemp(prefix="search-accuracy-")
    rows = []
    for rep in range(a.repeats):
        a.seed = rep
        spec = SearchSpec(arrivals="gamma", cv=a.cv, probe_duration_s=a.probe_duration, seed=a.seed,
                          slos=f"ttft_{a.stat}={a.slo_ms}ms")
        truth = true_capacity(a, spec)
        out = subprocess.run(search_command(a, results, f"accuracy-{rep}"), capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"search failed ({out.returncode}): {out.stderr[-2000:]}")
        cap = json.loads(out.stdout)["searches"][0]["capacity"]
        err = (cap["rps"] - truth) / truth
        covered = cap["ci_lo_rps"] is not None and cap["ci_lo_rps"] <= truth <= (cap["ci_hi_rps"] or float("inf"))
        rows.append({"seed": rep, "truth_rps": truth, "slots_over_service_rps": a.slots / (
            (a.ttft_ms + (a.output - 1) * a.tpot_ms) / 1e3), "found_rps": cap["rps"], "ci": [cap["ci_lo_rps"],
                                                                                             cap["ci_hi_rps"]],
            "error": err, "covered": covered, "probes": cap["probes"], "stop": cap["stop"]})
        r = rows[-1]
        print(f"seed {rep}: true {truth:.2f} req/s (K/S {r['slots_over_service_rps']:.2f}), found {cap['rps']:.2f} "
              f"[{cap['ci_lo_rps']:.2f}, {cap['ci_hi_rps']:.2f}] error {err:+.2%} covered {covered} "
              f"({cap['probes']} probes, {cap['stop']})", flush=True)
    print(json.dumps({"results": str(Path(results)), "rows": rows}))


if __name__ == "__main__":
    main()
