"""How much a busy neighbour slows a machine's decode steps on a shared host: `simulate --neighbour-busy-factor`.

Two vLLM instances of the embedded tiny model, one pinned to each of two cores (as a live tiny cluster runs them).
Instance A decodes lone requests (512 prompt tokens, 128 output tokens, one at a time) while instance B is idle,
then while B serves a steady mixed load (two streams of 512-token prompts with 128 output tokens, back to back),
alternating over rounds. Clients are not pinned, as in a live run. The factor is the mean over rounds of A's mean
token gap with B busy / with B idle (the simulator's step spread keeps the mean, so the means are what compose).

  python benchmarks/neighbour_factor.py --rounds 4 --json docs/data/neighbour-factor.json
GPU machines of one server are separate GPUs: there the factor is 1 (no flag). Two instances sharing one GPU (the
Splitwiser layout) are neighbours: `--gpu 0 --model-dir M --vllm-args "..." --load prefill` measures the token
instance's decode while the prompt instance prefills (B's load: 2048-token prompts, one output token, back to back).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import threading
import time

import httpx
import numpy as np

from splitbench.servers.launcher import DEFAULT_ENV, TINY_CPU_ARGS, VllmServer
from splitbench.servers.tiny_model import ensure_tiny_model


def stream_gaps(url: str, model: str, n_in: int, n_out: int, rng: random.Random) -> list[float]:
    """One streamed completion of n_in random token ids and exactly n_out tokens: the gaps (s) between its token
    chunks after the first."""
    body = {"model": model, "prompt": [rng.randrange(10, 300) for _ in range(n_in)], "max_tokens": n_out,
            "min_tokens": n_out, "ignore_eos": True, "stream": True, "temperature": 0}
    ts = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ts.append(time.perf_counter())
    return list(np.diff(ts)) if len(ts) > 2 else []


def start_all(servers: list[VllmServer], timeout_s: float = 300) -> None:
    """Spawn the servers together and wait until every one answers /health."""
    for s in servers:
        s.spawn()
    deadline = time.monotonic() + timeout_s
    while not all(s.poll_ready() for s in servers):
        if time.monotonic() > deadline:
            raise SystemExit(f"the {len(servers)} vLLM instances were not healthy after {timeout_s:g} s")
        time.sleep(0.5)


def write_json(path: str | None, out: dict) -> None:
    """The result as indented JSON at path (nothing when None)."""
    if path:
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


LOADS = {"mixed": (2, 512, 128), "prefill": (1, 2048, 1)}   # B's streams, prompt tokens, output tokens


def background_load(url: str, model: str, stop: threading.Event, load: str = "mixed") -> list[threading.Thread]:
    """LOADS[load]: that many clients sending such requests back to back until `stop` is set."""
    streams, n_in, n_out = LOADS[load]

    def loop(k: int) -> None:
        rng = random.Random(1000 + k)
        while not stop.is_set():
            stream_gaps(url, model, n_in, n_out, rng)
    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(streams)]
    for t in threads:
        t.start()
    return threads


def measure(a: VllmServer, b: VllmServer, rounds: int, requests: int, load: str = "mixed") -> dict:
    """Alternate rounds of A's lone decodes with B idle and with B busy; per round the mean gap of each."""
    rng = random.Random(0)
    for server in (a, b):   # first requests after start are slow
        for _ in range(3):
            stream_gaps(server.url, server.model_name, 512, 64, rng)
    rows = []
    for k in range(rounds):
        row = {}
        for state in ("idle", "busy"):
            stop = threading.Event()
            threads = background_load(b.url, b.model_name, stop, load) if state == "busy" else []
            if threads:
                time.sleep(1.0)
            gaps = [g for _ in range(requests) for g in stream_gaps(a.url, a.model_name, 512, 128, rng)]
            stop.set()
            for t in threads:
                t.join()
            row[f"{state}_mean_gap_ms"] = float(np.mean(gaps)) * 1e3
            row[f"{state}_median_gap_ms"] = float(np.median(gaps)) * 1e3
        row["ratio"] = row["busy_mean_gap_ms"] / row["idle_mean_gap_ms"]
        print(f"round {k + 1}: A's mean gap {row['idle_mean_gap_ms']:.2f} ms with B idle, "
              f"{row['busy_mean_gap_ms']:.2f} ms with B busy: x{row['ratio']:.3f}", flush=True)
        rows.append(row)
    factor = statistics.fmean(r["ratio"] for r in rows)
    return {"what": "decode step time of a machine while its neighbour on the same host is busy / while it is idle",
            "neighbour_busy_factor": factor, "rounds": rows, "requests_per_round": requests, "load": load,
            "cores": {"a": a.cpu_cores, "b": b.cpu_cores}, "gpus": {"a": a.gpu_ids, "b": b.gpu_ids}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=6, help="A's lone requests per round and state [6]")
    ap.add_argument("--cores", default="0,1", help="the two cores: A's, B's [0,1]")
    ap.add_argument("--gpu", type=int, default=None, help="both instances on this GPU instead of one core each")
    ap.add_argument("--model-dir", default=None, help="model to serve [the embedded tiny model]")
    ap.add_argument("--vllm-args", default=None, help="vLLM arguments of both instances [the tiny CPU ones]")
    ap.add_argument("--load", choices=sorted(LOADS), default="mixed", help="B's load when busy [mixed]")
    ap.add_argument("--json", default=None, help="also write the result here")
    a = ap.parse_args()
    core_a, core_b = (int(c) for c in a.cores.split(","))
    model = a.model_dir or ensure_tiny_model()
    args = shlex.split(a.vllm_args) if a.vllm_args else list(TINY_CPU_ARGS)
    if a.gpu is not None and "--gpu-memory-utilization" not in args:
        args += ["--gpu-memory-utilization", "0.45"]   # two instances on one GPU, as the Splitwiser layout shares it
    place = ([{"gpu_ids": [a.gpu]}] * 2 if a.gpu is not None else [{"cpu_cores": [core_a]}, {"cpu_cores": [core_b]}])
    servers = [VllmServer(model, port=port, extra_args=list(args), env=dict(DEFAULT_ENV), **where)
               for port, where in zip((18431, 18432), place)]
    try:
        start_all(servers)
        out = measure(servers[0], servers[1], a.rounds, a.requests, a.load)
    finally:
        for s in servers:
            s.stop()
    print(f"neighbour_busy_factor {out['neighbour_busy_factor']:.3f} "
          f"(simulate --neighbour-busy-factor {out['neighbour_busy_factor']:.2f})")
    write_json(a.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
