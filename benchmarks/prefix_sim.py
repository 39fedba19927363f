"""Prefix reuse at paper scale in the simulator (issue 15): the Mooncake conversation trace (prefix-hash ids, 512-token
blocks; its whole hour, 12,031 requests, or --duration S) on a co-located baseline and a Splitwise design of the same
machine count, each under JSQ and the prefix-aware policy (the router's PrefixAware object), with each prompt
machine's LRU prefix cache on. Prints the prefix-cache hit fraction (cached / prompt tokens), TTFT, TBT, E2E and
the Splitwise SLO attainment, and whether P/D still pays off when prefixes are reused.

Run: `python benchmarks/prefix_sim.py [--model llama2-70b] [--duration 3537] [--rate-scale 1]`; needs the trace
(SPLITBENCH_TRACE_DIR or `splitbench traces fetch mooncake-conversation`) and the SplitwiseSim profiles.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import pyarrow.compute as pc
import pyarrow.parquet as pq

from splitbench.app.simrun import SimOptions, simulate_run

DESIGNS = {"baseline-h100:40": "40 co-located H100 DGX", "splitwise-hh:25,15": "25 prompt + 15 token H100 DGX"}


def hit_fraction(run_dir) -> float:
    """Sum of cached_input_tokens / sum of prompt tokens over the ok records."""
    t = pq.read_table(run_dir / "records.parquet", columns=["status", "planned_input_tokens", "cached_input_tokens"])
    t = t.filter(pc.equal(t["status"], "ok"))
    return (pc.sum(t["cached_input_tokens"]).as_py() or 0) / max(1, pc.sum(t["planned_input_tokens"]).as_py() or 0)


def one(design: str, policy: str, a, results: str) -> dict:
    run_dir, summary = simulate_run(SimOptions(cluster=design, trace="mooncake-conversation", duration_s=a.duration,
                                               rate_scale=a.rate_scale, model=a.model, policy=policy,
                                               results_dir=results, run_id=f"{design}-{policy}".replace(":", "_")))
    lat = summary["latency"]
    sw = summary.get("splitwise") or {}
    return {"design": design, "policy": policy, "hit": hit_fraction(run_dir),
            "ttft_p50_s": lat["ttft_s"]["p50"], "ttft_p99_s": lat["ttft_s"]["p99"],
            "tbt_p50_s": lat["tbt_s"]["p50"], "e2e_p50_s": lat["e2e_s"]["p50"], "e2e_p99_s": lat["e2e_s"]["p99"],
            "splitwise_pass": (not sw.get("failed")) if sw else None, "requests": summary["counts"]["ok"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama2-70b")
    ap.add_argument("--duration", type=float, default=None, help="seconds of the trace [all of it]")
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as results:
        rows = [one(d, p, a, results) for d in DESIGNS for p in ("jsq", "prefix")]
    print(f"Mooncake conversation, {a.model}, rate scale {a.rate_scale}, {rows[0]['requests']} requests\n")
    print("| design | policy | prefix-cache hits | TTFT p50 / p99 (s) | TBT p50 (ms) | E2E p50 / p99 (s) | Splitwise SLOs |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['design']} | {r['policy']} | {r['hit']:.1%} | {r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.2f} | "
              f"{r['tbt_p50_s'] * 1e3:.1f} | {r['e2e_p50_s']:.2f} / {r['e2e_p99_s']:.2f} | "
              f"{'pass' if r['splitwise_pass'] else 'fail' if r['splitwise_pass'] is not None else '-'} |")
    key = lambda r: (not r["splitwise_pass"], r["e2e_p50_s"])   # noqa: E731  (SLOs met first, then E2E p50)
    base, split = (min((r for r in rows if r["design"] == d), key=key) for d in DESIGNS)
    better = key(split) < key(base)
    print(f"\nbest of each design (Splitwise SLOs met first, then E2E p50): baseline with {base['policy']} "
          f"(SLOs {'met' if base['splitwise_pass'] else 'missed'}, E2E p50 {base['e2e_p50_s']:.2f} s), Splitwise with "
          f"{split['policy']} (SLOs {'met' if split['splitwise_pass'] else 'missed'}, E2E p50 {split['e2e_p50_s']:.2f} "
          f"s) -> P/D {'pays off' if better else 'does not pay off'} on this trace at this load")
    if a.json:
        open(a.json, "w").write(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
