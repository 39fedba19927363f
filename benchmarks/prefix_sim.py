"""Does P/D still pay off when prefixes are reused? (issue 15 item 6, simulator half; docs/prefix-caching.md)

The Mooncake conversation trace (12,031 requests over 3,537 s, hash ids of 512-token blocks) on iso-power paper-scale
clusters of the Splitwise profiles (Llama2-70B, TP 8, DGX-H100: 40 x 10.2 kW): Baseline-H100 40 vs Splitwise-HH 25P/15T
vs Splitwise-HHcap 25P/21T (power-capped token machines, 407 kW), each under
  jsq, no cache     the reference: every prompt prefilled whole;
  jsq               the simulator's prefix cache on (per prompt/co-located machine, LRU over its KV memory), JSQ;
  prefix            the prefix cache and the prefix-aware policy (its index sized to a machine's KV in blocks),
at the trace's rate times each --rate-scale. BLOOM-176B is left out: its KV (4 MiB a token) holds ~60k tokens per
DGX-H100, less than 2.5% of the trace's prompts need.

Run: `python benchmarks/prefix_sim.py [--rate-scale 1,4,8] [--model llama2-70b] [--max-requests N]` (a minute or two
on one free core). Prints one table (hit rate = cached / input tokens of the finished requests; TTFT, E2E in s) and
the answer; the LAST line is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from splitbench.app.simrun import build_setup, parse_cluster, run_sim, sim_config
from splitbench.schema.records import OK, STATUSES
from splitbench.workload.hashtrace import read_hash_trace
from splitbench.workload.prefix import expected_hit_fraction
from splitbench.workload.transforms import limit, scale_rate

TRACE = "mooncake_conversation_trace.jsonl"
# (label, cluster, batching of baseline machines): the chunked baseline prices each 2048-token chunk as a fresh
# prompt of that size (no attention to the chunks before it), a prompt machine a whole prompt as one iteration;
# the prompt-first baseline prices prompts as the prompt machines do
CLUSTERS = (("baseline-h100:40", "baseline-h100:40", "chunked"),
            ("baseline-h100:40 prompt-first", "baseline-h100:40", "prompt-first"),
            ("splitwise-hh:25,15", "splitwise-hh:25,15", "chunked"),
            ("splitwise-hhcap:25,21", "splitwise-hhcap:25,21", "chunked"))
RUNS = (("jsq, no cache", "jsq", False), ("jsq", "jsq", True), ("prefix", "prefix", True))


def metrics(res, w) -> dict:
    """Hit rate, TTFT and E2E percentiles of a simulation's finished requests."""
    c = res.columns
    ok = c.status == STATUSES.index(OK)
    t = c.times
    ttft = (t["first_token_s"] - t["actual_send_s"])[ok]
    e2e = (t["last_token_s"] - t["actual_send_s"])[ok]
    cached = c.counts.get("cached_input_tokens")
    hit = float(np.maximum(cached[ok], 0).sum() / w.input_tokens[ok].sum()) if cached is not None else 0.0
    q = lambda x, p: float(np.percentile(x, p)) if len(x) else float("nan")  # noqa: E731
    return {"requests": int(len(ok)), "failed": int((~ok).sum()), "hit_rate": round(hit, 4),
            "ttft_p50_s": q(ttft, 50), "ttft_p99_s": q(ttft, 99), "e2e_p50_s": q(e2e, 50), "e2e_p99_s": q(e2e, 99)}


def run_all(a) -> list[dict]:
    w0 = read_hash_trace(Path(a.trace_dir) / TRACE)
    if a.max_requests:
        w0 = limit(w0, a.max_requests)
    machines = sorted({p.machine for _, c, _ in CLUSTERS for p in parse_cluster(c)})
    setup = build_setup(machines, model=a.model, profile=a.profile)
    rows = []
    for scale in a.rate_scale:
        w = scale_rate(w0, scale) if scale != 1 else w0
        for name, cluster, batching in CLUSTERS:
            pools = parse_cluster(cluster)
            blocks = min(setup.kv_capacity_tokens[p.machine] for p in pools) // w.block_tokens
            for label, policy, cache in RUNS:
                params = {"capacity_blocks": max(1, blocks)} if policy == "prefix" else {}
                cfg = sim_config(pools, policy=policy, policy_params=params, layers=setup.shape.layers,
                                 prefix_cache=cache, seed=a.seed, batching=batching)
                t = time.perf_counter()
                res = run_sim(w, cfg, setup)
                rows.append({"rate_scale": scale, "cluster": name, "run": label,
                             "sim_wall_s": round(time.perf_counter() - t, 2), **metrics(res, w)})
                print(_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _row(r: dict) -> str:
    return (f"| {r['rate_scale']:g} | {r['cluster']} | {r['run']} | {r['hit_rate']:.3f} | {r['ttft_p50_s']:.3f} | "
            f"{r['ttft_p99_s']:.2f} | {r['e2e_p50_s']:.2f} | {r['e2e_p99_s']:.2f} | {r['failed']} |")


def _verdict(ratio: float) -> str:
    return "pays off" if ratio > 1.05 else "does not pay off" if ratio < 0.95 else "is even"


def answer(rows: list[dict]) -> list[str]:
    """Per rate, with the cache on: the best baseline and the best split run (design and policy) by TTFT p99 and by
    E2E p99, and whether P/D pays off on each (baseline / split > 1.05)."""
    out = []
    for scale in dict.fromkeys(r["rate_scale"] for r in rows):
        cands = [r for r in rows if r["rate_scale"] == scale and r["run"] != "jsq, no cache"]
        parts = []
        for key, what in (("ttft_p99_s", "TTFT p99"), ("e2e_p99_s", "E2E p99")):
            base = min((r for r in cands if r["cluster"].startswith("baseline")), key=lambda r: r[key])
            split = min((r for r in cands if r["cluster"].startswith("splitwise")), key=lambda r: r[key])
            ratio = base[key] / split[key] if split[key] > 0 else float("inf")
            parts.append(f"{what}: baseline {base[key]:.2f} s ({base['cluster']}, {base['run']}) vs split "
                         f"{split[key]:.2f} s ({split['cluster']}, {split['run']}): P/D {_verdict(ratio)} "
                         f"(x{ratio:.2f})")
        out.append(f"rate x{scale:g}: " + "; ".join(parts))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace-dir", default=os.environ.get("SPLITBENCH_TRACE_DIR", "/work/shared/traces"))
    p.add_argument("--model", default="llama2-70b")
    p.add_argument("--profile", default=None, help="profile CSV [../shared/profiles, /work/shared/profiles]")
    p.add_argument("--rate-scale", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 4.0, 8.0])
    p.add_argument("--max-requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.profile is None and Path("/work/shared/profiles/perf_model.csv").exists():
        a.profile = "/work/shared/profiles/perf_model.csv"
    w = read_hash_trace(Path(a.trace_dir) / TRACE)
    ideal = expected_hit_fraction(w, 512)
    rows = run_all(a)
    print(f"Mooncake conversation, {a.model}; never-evicting single-cache hit rate {ideal:.3f}")
    print("| rate x | cluster | run | hit rate | TTFT p50 s | TTFT p99 s | E2E p50 s | E2E p99 s | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))
    lines = answer(rows)
    print("\n".join(lines))
    print(json.dumps({"model": a.model, "trace": TRACE, "ideal_hit_rate": ideal, "rows": rows, "answer": lines}))


if __name__ == "__main__":
    main()
