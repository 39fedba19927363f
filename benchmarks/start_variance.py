"""How much one vLLM instance's decode speed depends on the start it got: the floor under sim-vs-live on this host.

Each of --starts starts two tiny-model instances, one pinned to each of two cores (as a live tiny cluster runs
them), and measures lone decodes (512 prompt tokens, 256 output tokens, one request at a time) on A and B in
alternation over --rounds rounds. Per instance start: the mean token gap. Then three spreads, as % of the mean:
  within   a start's round means around that start's mean (what repeats of one profile see);
  between  the instance means of all starts on one core (what a profile and a live run, two starts, see);
  common   how A's and B's round means move together (a host-wide speed change, not a start's own).

  python benchmarks/start_variance.py --starts 4 --json docs/data/start-variance.json
--runs RUN...: no starts; the same lone-decode gap (no other request on the instance, prompt < 1024 tokens) per
instance of live runs already made, to compare runs of one workload.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
import pyarrow.parquet as pq
from decode_stalls import lone_gaps
from neighbour_factor import start_all, stream_gaps, write_json

from splitbench.servers.launcher import DEFAULT_ENV, TINY_CPU_ARGS, VllmServer, free_port
from splitbench.servers.tiny_model import ensure_tiny_model


def one_start(model: str, cores: tuple[int, int], rounds: int, requests: int, n_in: int, n_out: int,
              seed: int) -> dict:
    """Start A and B, warm both up, then `rounds` rounds of `requests` lone requests on A, then on B."""
    servers = [VllmServer(model, port=free_port(), cpu_cores=[c], extra_args=list(TINY_CPU_ARGS),
                          env=dict(DEFAULT_ENV)) for c in cores]
    rng = random.Random(seed)
    try:
        start_all(servers)
        for s in servers:   # the first requests after a start are slow
            for _ in range(3):
                stream_gaps(s.url, s.model_name, n_in, 64, rng)
        means: list[list[float]] = [[], []]
        for _ in range(rounds):
            for k, s in enumerate(servers):
                gaps = [g for _ in range(requests) for g in stream_gaps(s.url, s.model_name, n_in, n_out, rng)]
                means[k].append(float(np.mean(gaps)) * 1e3)
    finally:
        for s in servers:
            s.stop()
    return {"cores": list(cores), "round_mean_gap_ms": means}


def spreads(starts: list[dict]) -> dict:
    """within / between / common spreads (% of the grand mean) of the starts' round means."""
    grand = statistics.fmean(m for s in starts for inst in s["round_mean_gap_ms"] for m in inst)
    within = [m - statistics.fmean(inst) for s in starts for inst in s["round_mean_gap_ms"] for m in inst]
    between = {}
    for k in (0, 1):
        inst_means = [statistics.fmean(s["round_mean_gap_ms"][k]) for s in starts]
        between[f"core_{starts[0]['cores'][k]}"] = (100 * statistics.stdev(inst_means) / grand
                                                     if len(inst_means) > 1 else None)
    a = np.array([m - statistics.fmean(s["round_mean_gap_ms"][0]) for s in starts for m in s["round_mean_gap_ms"][0]])
    b = np.array([m - statistics.fmean(s["round_mean_gap_ms"][1]) for s in starts for m in s["round_mean_gap_ms"][1]])
    corr = float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else None
    return {"grand_mean_gap_ms": grand, "within_pct": 100 * float(np.std(within, ddof=1)) / grand,
            "between_pct": between, "common_corr": corr}


def run_lone_gaps_ms(run: str) -> dict[str, np.ndarray]:
    """Instance -> token gaps (ms) of a run's ok requests while nothing else ran on it, prompts under 1024 tokens."""
    recs = [r for r in pq.read_table(f"{run}/records.parquet").to_pylist() if r["status"] == "ok"]
    return {k: (g[:, 1] - g[:, 0]) * 1e3 for k, g in lone_gaps(recs, max_prompt_tokens=1024).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2, help="lone requests per instance and round [2]")
    ap.add_argument("--cores", default="0,1", help="A's and B's core [0,1]")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the result here")
    ap.add_argument("--runs", nargs="+", default=None, help="live run directories: their lone-decode gaps only")
    a = ap.parse_args()
    if a.runs:
        for run in a.runs:
            print(run + ": " + "; ".join(f"{i}: median {np.median(g):.2f} ms, mean {np.mean(g):.2f} ms ({len(g)} gaps)"
                                        for i, g in sorted(run_lone_gaps_ms(run).items())))
        return 0
    cores = tuple(int(c) for c in a.cores.split(","))
    model = ensure_tiny_model()
    starts = []
    for k in range(a.starts):
        t0 = time.time()
        s = one_start(model, cores, a.rounds, a.requests, a.prompt_tokens, a.output_tokens, seed=k)
        s["started_unix_s"] = t0
        starts.append(s)
        print(f"start {k + 1}: " + "; ".join(
            f"core {c}: mean gap {statistics.fmean(m):.2f} ms (rounds {min(m):.2f}-{max(m):.2f})"
            for c, m in zip(cores, s["round_mean_gap_ms"])), flush=True)
    out = {"what": "lone decode mean token gap per instance start and round", "prompt_tokens": a.prompt_tokens,
           "output_tokens": a.output_tokens, "requests_per_round": a.requests, "starts": starts, **spreads(starts)}
    between = ", ".join(f"{k} {v:.1f}%" for k, v in out["between_pct"].items() if v is not None)
    print(f"grand mean {out['grand_mean_gap_ms']:.2f} ms; within a start {out['within_pct']:.1f}%; "
          f"between starts {between}; A-B correlation of round means "
          f"{'n/a' if out['common_corr'] is None else format(out['common_corr'], '.2f')}")
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
