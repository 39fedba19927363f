"""Simulator speed targets (issue 5), one core:

1. the full 1-hour azure-conv-2023 (19,366 requests) on a 70-machine Splitwise-HA cluster: <= 5 s;
2. a paper-scale sweep point, Poisson 250 requests/s for 600 s (~150,000 requests, conv lengths) on 250 machines
   (Splitwise-HA sized as the design search says 250 req/s needs): <= 30 s.

Measured on this 2-core machine (taskset -c 0):
  azure-conv-2023 full hour, 70 machines: 19,366 requests, simulated in 0.82 s (target <= 5 s) PASS
  Poisson 250 req/s x 600 s, 250 machines: 150,914 requests, simulated in 13.79 s (target <= 30 s) PASS

Run: `taskset -c 0 python benchmarks/sim_speed.py` (BLOOM-176B, SplitwiseSim's profile from ../shared/profiles or the
cache). Prints the wall time of the simulation itself (workload loading and record writing excluded, shown apart),
events, and p50/p99 TTFT so a fast-but-wrong run is visible. Exit 0 when both targets are met.
"""
from __future__ import annotations

import sys
import time

from splitbench.sim.cluster import SimPool
from splitbench.workload.load import WorkloadSpec, load
from splitbench.metrics.latency import metric_values, stat_of
from splitbench.app.simrun import build_setup, run_sim, sim_config

CASES = (
    ("azure-conv-2023 full hour, 70 machines", "azure-conv-2023",
     [SimPool("prompt", "dgx-h100", 30), SimPool("token", "dgx-a100", 40)], 5.0),
    ("Poisson 250 req/s x 600 s, 250 machines (sized to meet the SLOs)", "synth:arrivals=poisson,rate=250,duration=600,lengths=azure-conv-2023,seed=1",
     [SimPool("prompt", "dgx-h100", 60), SimPool("token", "dgx-a100", 190)], 30.0),
)


def main() -> int:
    setup = build_setup(["dgx-h100", "dgx-a100"], model="bloom-176b")
    ok = True
    for name, trace, pools, target_s in CASES:
        t = time.perf_counter()
        w = load(WorkloadSpec(trace, fetch=False))
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        res = run_sim(w, sim_config(pools, layers=setup.shape.layers), setup)
        sim_s = time.perf_counter() - t
        ttft = metric_values(res.records, "ttft")
        passed = sim_s <= target_s
        ok &= passed
        print(f"{name}: {len(w):,} requests, simulated in {sim_s:.2f} s (target <= {target_s:g} s) "
              f"{'PASS' if passed else 'FAIL'}; load {load_s:.2f} s; events {res.stats.get('events'):,}; "
              f"TTFT p50/p99 {stat_of(ttft, 'p50') * 1e3:.0f}/{stat_of(ttft, 'p99') * 1e3:.0f} ms; "
              f"errors {sum(1 for r in res.records if not r.ok)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
