"""A lone request's TTFT after its instance idled for S seconds (docs/sim-vs-live.md, set 1207n): start one
tiny-model instance pinned to core 0 with a launched cluster's arguments, then send one-token requests of fresh
random prompts, each after an idle gap drawn in turn from --idle-s, and print the median TTFT per gap over the
gap-0 median (requests sent back to back, as a profile's batch-1 points are).

  python benchmarks/idle_wake.py [--idle-s 0,0.25,0.5,1,2,4] [--rounds 8] [--prompt-tokens 256] [--json F]
  python benchmarks/idle_wake.py --probe      # the same gaps before a 20 MB float32 matrix-vector product, no vLLM
  python benchmarks/idle_wake.py --runs RUN...  # live runs: TTFT of prompts <= 1024 tokens by the instance's idle time

vLLM's shared-memory readers busy-wait for 1 s after a read and then sleep; a shared VM may also give an idle
vCPU's caches to another tenant. Either makes the first prefill after an idle spell slower than a profile shows.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import httpx
import numpy as np
import pandas as pd
from neighbour_factor import start_all, write_json

from splitbench.servers.launcher import DEFAULT_ENV, TINY_CPU_ARGS, VllmServer, cache_args
from splitbench.servers.ports import free_port
from splitbench.servers.tiny_model import ensure_tiny_model

VOCAB_LOW, VOCAB_HIGH = 10, 4000   # token ids within the tiny model's 4096-token vocabulary


def one_request(client: httpx.Client, url: str, model: str, tokens: list[int]) -> float:
    """Seconds until the completion of a one-token request (its TTFT, as nothing else is generated)."""
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/completions", json={"model": model, "prompt": tokens, "max_tokens": 1,
                                                   "temperature": 0.0})
    r.raise_for_status()
    return time.perf_counter() - t0


def after_gaps(idle_s: list[float], rounds: int, rng: random.Random, work) -> dict[float, list[float]]:
    """work()'s seconds after each idle gap, rounds times; the gaps are shuffled within each round so a host drift
    hits them alike."""
    samples: dict[float, list[float]] = {s: [] for s in idle_s}
    for _ in range(rounds):
        order = list(idle_s)
        rng.shuffle(order)
        for s in order:
            time.sleep(s)
            samples[s].append(work())
    return samples


def measure(url: str, model: str, idle_s: list[float], rounds: int, prompt_tokens: int, seed: int) -> dict:
    """TTFT samples per idle gap, each request a fresh random prompt (no prefix-cache hit)."""
    rng = random.Random(seed)
    with httpx.Client(timeout=120) as client:
        def work() -> float:
            return one_request(client, url, model, [rng.randint(VOCAB_LOW, VOCAB_HIGH) for _ in range(prompt_tokens)])
        for _ in range(3):   # warm-up: this prompt length's first prefills
            work()
        return after_gaps(idle_s, rounds, rng, work)


def probe(idle_s: list[float], rounds: int, seed: int) -> dict[float, list[float]]:
    """Seconds of 5 products of a 20 MB float32 matrix by a vector (the tiny model's weights are 5.5 MB), pinned to
    core 0, after each idle gap: the host's own cost of the first work after idling, with no server in the way."""
    os.sched_setaffinity(0, {0})
    rng, gen = random.Random(seed), np.random.default_rng(seed)
    w, x = gen.random((2500, 2048), dtype=np.float32), gen.random(2048, dtype=np.float32)

    def work() -> float:
        t0 = time.perf_counter()
        for _ in range(5):
            w @ x
        return time.perf_counter() - t0
    for _ in range(20):
        work()
    return after_gaps(idle_s, rounds, rng, work)


IDLE_BINS_S = [-2, 0, 0.25, 0.5, 1.0, 1.5, 3, 1e9]   # -1: another request was in flight on the instance


def runs_table(run_dir: str) -> pd.DataFrame:
    """A live run's TTFT (ms) of prompts <= 1024 tokens by how long the request's (prefill) instance had been idle
    when it was sent: count and median per bin."""
    d = pd.read_parquet(f"{run_dir}/records.parquet").sort_values("actual_send_s").reset_index(drop=True)
    d["ttft_ms"] = (d.first_token_s - d.actual_send_s) * 1e3
    d["inst"] = d.prefill_instance.where(d.prefill_instance.notna(), d.instance)
    idle = []
    for i, r in d.iterrows():
        prev = d[(d.inst == r.inst) & (d.index != i) & (d.actual_send_s < r.actual_send_s)]
        idle.append(np.nan if prev.empty else -1.0 if (prev.end_s > r.actual_send_s).any()
                    else r.actual_send_s - prev.end_s.max())
    d["idle_s"] = idle
    d = d[d.actual_input_tokens <= 1024]
    return d.groupby(pd.cut(d.idle_s, IDLE_BINS_S), observed=True).ttft_ms.agg(["count", "median"]).round(1).T


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle-s", default="0,0.25,0.5,1,2,4", help="idle gaps before a request, seconds")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the samples here")
    ap.add_argument("--probe", action="store_true", help="time a matrix-vector product instead of a vLLM instance")
    ap.add_argument("--runs", nargs="+", default=None, help="live run directories to tabulate instead")
    a = ap.parse_args()
    idle_s = sorted({float(x) for x in a.idle_s.split(",")})
    if a.runs:
        for run in a.runs:
            print(f"{run}: TTFT (ms) of prompts <= 1024 tokens by the instance's idle time before the request (s; "
                  f"(-2, 0]: another request in flight)\n{runs_table(run).to_string()}")
        return 0
    if a.probe:
        return report(probe(idle_s, a.rounds, a.seed), idle_s, "5 x (20 MB matrix x vector)", a)
    args = [x for x in TINY_CPU_ARGS if x != "--disable-log-stats"]
    model_dir = ensure_tiny_model()
    server = VllmServer(model_dir, port=free_port(), cpu_cores=[0], env=dict(DEFAULT_ENV),
                        extra_args=args + cache_args(args, True))
    try:
        start_all([server])
        samples = measure(server.url, server.model_name, idle_s, a.rounds, a.prompt_tokens, a.seed)
    finally:
        server.stop()
    return report(samples, idle_s, f"{a.prompt_tokens}-token prompts' TTFT", a)


def report(samples: dict[float, list[float]], idle_s: list[float], what: str, a) -> int:
    """Median per gap, over the first gap's, and the samples as JSON where --json says."""
    base = statistics.median(samples[idle_s[0]])
    print(f"{what}, {a.rounds} rounds: median (ms) and over the {idle_s[0]:g}-s gap's")
    for s in idle_s:
        med, low = statistics.median(samples[s]), sorted(samples[s])[len(samples[s]) // 10]
        print(f"  idle {s:5.2f} s: {med * 1e3:7.1f} ms  x{med / base:.2f}  (p10 {low * 1e3:.1f} ms)")
    write_json(a.json, {"what": what, "rounds": a.rounds, "seconds": {str(s): v for s, v in samples.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
