"""Pacing precision of the stub server in its own process, seen by a client: TTFT, inter-chunk gap and last-chunk
error against the configured TTFT/TPOT, and the stub's own chunk lateness. A speed target, so it lives here and not
in the tests (tests/test_stub.py checks only what holds on any host: never early, lateness reported honestly).

Usage: python benchmarks/stub_pacing.py [--streams 16] [--ttft-ms 30] [--tpot-ms 10] [--tokens 6] [--repeats 3]
PASS (idle host): median TTFT error < 3 ms, |median gap - TPOT| < 1 ms, median last-chunk error < 3 ms.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import urllib.request

import aiohttp

from splitbench.backends.stub import StubBackend


async def _stream(url: str, n_out: int, delay_s: float) -> list[float]:
    """Offsets (s after the client sent) of each token chunk of one streamed completion."""
    await asyncio.sleep(delay_s)
    times = []
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": n_out, "stream": True}) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    times.append(time.perf_counter() - t0)
    return times[:n_out]


def measure(streams: int, ttft_s: float, tpot_s: float, n_out: int) -> dict:
    be = StubBackend(ttft_s=ttft_s, tpot_s=tpot_s)
    be.start()
    try:
        async def go():
            return await asyncio.gather(*(_stream(be.endpoint(), n_out, i * 0.004) for i in range(streams)))
        offsets = asyncio.run(go())
        with urllib.request.urlopen(be.endpoint() + "/metrics", timeout=30) as r:
            lateness = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in r.read().decode().splitlines()
                        if ln.startswith("splitbench_stub_chunk_lateness_seconds{")}
    finally:
        be.stop()
    return {"ttft_err_ms": (statistics.median(o[0] for o in offsets) - ttft_s) * 1e3,
            "gap_err_ms": (statistics.median(b - a for o in offsets for a, b in zip(o, o[1:])) - tpot_s) * 1e3,
            "last_err_ms": (statistics.median(o[-1] for o in offsets) - (ttft_s + (n_out - 1) * tpot_s)) * 1e3,
            "min_ttft_err_ms": (min(o[0] for o in offsets) - ttft_s) * 1e3,
            "stub_lateness_s": lateness}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--ttft-ms", type=float, default=30.0)
    ap.add_argument("--tpot-ms", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    runs = [measure(a.streams, a.ttft_ms / 1e3, a.tpot_ms / 1e3, a.tokens) for _ in range(a.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in ("ttft_err_ms", "gap_err_ms", "last_err_ms")}
    ok = med["ttft_err_ms"] < 3 and abs(med["gap_err_ms"]) < 1 and med["last_err_ms"] < 3
    for r in runs:
        print(json.dumps(r))
    print(f"median over {a.repeats}: TTFT error {med['ttft_err_ms']:.3f} ms, gap error {med['gap_err_ms']:.3f} ms, "
          f"last-chunk error {med['last_err_ms']:.3f} ms -> {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
