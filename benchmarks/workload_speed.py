"""Workload speed targets (the wall-clock checks that used to sit in tests/test_traces.py and tests/test_prompts.py):

1. each shared Azure 2023 trace (azure-conv-2023: 19,366 rows; azure-code-2023: 8,819 rows), parsed, validated and
   hashed through workload.load: <= 1 s;
2. a 10 s window at 500 s of a 200,000-row 2024-style CSV (UTC offsets, 100 req/s) streamed in 256 KiB batches, so
   only the rows up to the window are read: <= 2 s;
3. a 1000-token token-id prompt body (TokenIdPrompts.payload, Llama-3-sized vocabulary): <= 200 us per request.

Run: `python benchmarks/workload_speed.py [--shared ../shared/traces]`. Prints each case's wall time (best of 3) against
its target; exit 0 when every target is met. Timing targets live here, never in tests (a busy host is not a bug).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from splitbench.workload import traces
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.prompts import TokenIdPrompts

ROOT = Path(__file__).resolve().parents[1]


def _write_2024_style(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    t_us = np.arange(n, dtype=np.int64) * 10_000 + rng.integers(1, 5_000, n)
    s = np.datetime_as_string(np.datetime64("2024-05-10T00:00:00", "us") + t_us.astype("timedelta64[us]"), unit="us")
    lines = [ts.replace("T", " ") + f"+00:00,{i},{o}"
             for ts, i, o in zip(s.tolist(), rng.integers(1, 8000, n).tolist(), rng.integers(1, 700, n).tolist())]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(lines))


def best_of(n: int, fn) -> tuple[float, object]:
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = next((p for p in (ROOT.parent / "shared" / "traces", ROOT.parent.parent / "shared" / "traces")
                    if p.is_dir()), ROOT.parent / "shared" / "traces")
    ap.add_argument("--shared", type=Path, default=default)
    args = ap.parse_args()
    ok = True
    for name in ("azure-conv-2023", "azure-code-2023"):
        secs, w = best_of(3, lambda: load(WorkloadSpec(name, trace_dir=str(args.shared), fetch=False)))
        good = secs <= 1.0
        ok &= good
        print(f"{name}: {len(w):,} requests loaded in {secs:.3f} s (target <= 1 s) {'PASS' if good else 'FAIL'}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "week.csv"
        _write_2024_style(path, 200_000)
        traces.BLOCK_BYTES = 256 << 10
        secs, w = best_of(3, lambda: load(WorkloadSpec(str(path), start_s=500, duration_s=10)))
        good = secs <= 2.0
        ok &= good
        print(f"200,000-row CSV, 10 s window at 500 s: {len(w):,} requests, {w.source['rows_read']:,} rows read in "
              f"{secs:.3f} s (target <= 2 s) {'PASS' if good else 'FAIL'}")
    p = TokenIdPrompts(128_256, set(range(128_000, 128_256)))
    secs, _ = best_of(3, lambda: [p.payload(i, 1000) for i in range(2000)])
    good = secs / 2000 <= 200e-6
    ok &= good
    print(f"token-id payload, 1000 tokens: {secs / 2000 * 1e6:.1f} us per request (target <= 200 us) "
          f"{'PASS' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
