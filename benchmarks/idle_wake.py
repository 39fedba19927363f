"""A lone request's TTFT after its instance idled for S seconds (docs/sim-vs-live.md, set 1207n): start one
tiny-model instance pinned to core 0 with a launched cluster's arguments, then send one-token requests of fresh
random prompts, each after an idle gap drawn in turn from --idle-s, and print the median TTFT per gap over the
gap-0 median (requests sent back to back, as a profile's batch-1 points are).

  python benchmarks/idle_wake.py [--idle-s 0,0.25,0.5,1,2,4] [--rounds 8] [--prompt-tokens 256] [--json F]

vLLM's shared-memory readers busy-wait for 1 s after a read and then sleep; a shared VM may also give an idle
vCPU's caches to another tenant. Either makes the first prefill after an idle spell slower than a profile shows.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import httpx
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


def measure(url: str, model: str, idle_s: list[float], rounds: int, prompt_tokens: int, seed: int) -> dict:
    """TTFT samples per idle gap; gaps are interleaved within each round so a host drift hits them alike."""
    rng = random.Random(seed)
    samples: dict[float, list[float]] = {s: [] for s in idle_s}
    with httpx.Client(timeout=120) as client:
        for _ in range(3):   # warm-up: this prompt length's first prefills
            one_request(client, url, model, [rng.randint(VOCAB_LOW, VOCAB_HIGH) for _ in range(prompt_tokens)])
        for _ in range(rounds):
            order = list(idle_s)
            rng.shuffle(order)
            for s in order:
                time.sleep(s)
                tokens = [rng.randint(VOCAB_LOW, VOCAB_HIGH) for _ in range(prompt_tokens)]
                samples[s].append(one_request(client, url, model, tokens))
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idle-s", default="0,0.25,0.5,1,2,4", help="idle gaps before a request, seconds")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the samples here")
    a = ap.parse_args()
    idle_s = sorted({float(x) for x in a.idle_s.split(",")})
    args = [x for x in TINY_CPU_ARGS if x != "--disable-log-stats"]
    model_dir = ensure_tiny_model()
    server = VllmServer(model_dir, port=free_port(), cpu_cores=[0], env=dict(DEFAULT_ENV),
                        extra_args=args + cache_args(args, True))
    try:
        start_all([server])
        samples = measure(server.url, server.model_name, idle_s, a.rounds, a.prompt_tokens, a.seed)
    finally:
        server.stop()
    base = statistics.median(samples[idle_s[0]])
    print(f"{a.prompt_tokens}-token prompts, {a.rounds} rounds, TTFT median (ms) and over the {idle_s[0]:g}-s gap's")
    for s in idle_s:
        med, low = statistics.median(samples[s]), sorted(samples[s])[len(samples[s]) // 10]
        print(f"  idle {s:5.2f} s: {med * 1e3:7.1f} ms  x{med / base:.2f}  (p10 {low * 1e3:.1f} ms)")
    write_json(a.json, {"prompt_tokens": a.prompt_tokens, "rounds": a.rounds,
                        "ttft_s": {str(s): v for s, v in samples.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
