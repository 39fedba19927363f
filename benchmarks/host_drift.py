"""How much this host's CPU speed drifts over minutes, per core: what bounds sim-vs-live agreement on a shared VM.

One pure-Python block of fixed work (100k multiply-adds), timed again and again by a process pinned to one core:
each core alone, then all the listed cores at once (as a live tiny cluster runs its instances). It prints, per
phase and core, the block time's p5/p50/p95 and the mean of each --block-s window: a profile measured in a fast
window and a replay in a slow one differ by the ratio of those means, whatever the simulator models.

  python benchmarks/host_drift.py --cores 0,1 --phase-s 30 --json docs/data/host-drift-1207.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import numpy as np

WORK = 100_000   # multiply-adds per timed block (4-20 ms on the 2-core VMs issue 14 ran on)


def spin(core: int, seconds: float, queue) -> None:
    """Pinned to core: time the block until seconds have passed; put (core, [(start_s, block_ms), ...])."""
    os.sched_setaffinity(0, [core])
    out, t_end = [], time.time() + seconds
    while time.time() < t_end:
        t0 = time.perf_counter()
        x = 0
        for i in range(WORK):
            x += i * i
        out.append((time.time(), (time.perf_counter() - t0) * 1e3))
    queue.put((core, out))


def run_phase(cores: list[int], seconds: float) -> dict[int, list[tuple[float, float]]]:
    """One process per core, all started together; their samples by core."""
    queue = mp.Queue()
    procs = [mp.Process(target=spin, args=(c, seconds, queue)) for c in cores]
    for p in procs:
        p.start()
    got = dict(queue.get() for _ in procs)
    for p in procs:
        p.join()
    return got


def describe(samples: list[tuple[float, float]], block_s: float) -> dict:
    """Quantiles of block time (ms), the mean of each block_s window, and the slowest/fastest window ratio."""
    t = np.array([s[0] for s in samples])
    ms = np.array([s[1] for s in samples])
    win = ((t - t[0]) // block_s).astype(int)
    means = [float(ms[win == w].mean()) for w in np.unique(win) if (win == w).sum() >= 5]
    p5, p50, p95 = np.percentile(ms, [5, 50, 95])
    return {"blocks": len(ms), "p5_ms": round(p5, 2), "p50_ms": round(p50, 2), "p95_ms": round(p95, 2),
            "window_means_ms": [round(m, 2) for m in means],
            "slow_over_fast": round(max(means) / min(means), 3) if means else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", default="0,1", help="cores to pin to (comma-separated)")
    ap.add_argument("--phase-s", type=float, default=30.0, help="seconds per phase (each core alone, then all)")
    ap.add_argument("--block-s", type=float, default=10.0, help="window for the window means")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    cores = [int(c) for c in a.cores.split(",")]
    phases = [(f"core {c} alone", [c]) for c in cores] + [("all together", cores)]
    report = {"work": WORK, "phase_s": a.phase_s, "block_s": a.block_s, "cpus": os.cpu_count(), "phases": {}}
    print(f"{'phase':<16}{'core':>5}{'blocks':>8}{'p5 ms':>8}{'p50 ms':>8}{'p95 ms':>8}{'slow/fast':>10}  window means ms")
    for name, cs in phases:
        got = run_phase(cs, a.phase_s)
        report["phases"][name] = {c: describe(got[c], a.block_s) for c in cs}
        for c in cs:
            d = report["phases"][name][c]
            print(f"{name:<16}{c:>5}{d['blocks']:>8}{d['p5_ms']:>8}{d['p50_ms']:>8}{d['p95_ms']:>8}"
                  f"{d['slow_over_fast']:>10}  {' '.join(str(m) for m in d['window_means_ms'])}")
    all_means = [m for ph in report["phases"].values() for d in ph.values() for m in d["window_means_ms"]]
    report["slow_over_fast_all"] = round(max(all_means) / min(all_means), 3)
    print(f"slowest / fastest {a.block_s:g}-s window over all phases and cores: {report['slow_over_fast_all']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
