"""How much slower a prefill is when its prompt length is new to the instance (docs/sim-vs-live.md, 2026-12-07).

Two views of one effect:
  --profile-run DIR   a `splitbench profile` run directory: per batch-1 point, the first repeat's TTFT (that
                      length's first prefill on the instance, unless an earlier point had it) over the median of
                      the later repeats (the same length again, which the profile CSV keeps).
  --live RUN          a live run: TTFT of each request that found its instance idle over the --fit profile's lone
                      prompt time, by prompt size (median and mean).
  python benchmarks/cold_prefill.py --profile-run results/<profile run> --live results/e-len-fixed \
      --live results/e-len-uniform --fit base.csv
"""
from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from splitbench.sim.perfmodel import get_perf_model, load_profiles

POINT = re.compile(r"p(\d+)-b(\d+)-t(\d+)-r(\d+)$")
BUCKETS = (0, 256, 512, 768, 1024, 1536, 2048, 4096, 1 << 30)


def _ttft_ms(rec: dict) -> float:
    return (rec["first_token_s"] - rec["actual_send_s"]) * 1e3


def first_repeat_ratios(run: Path) -> list[tuple[int, int, float]]:
    """(prompt, output, first repeat / median of later repeats) per batch-1 point with >= 2 repeats."""
    by_point: dict[tuple[int, int], dict[int, float]] = defaultdict(dict)
    for f in (run / "points").glob("*/*/records.parquet"):
        m = POINT.match(f.parent.parent.name)
        if not m or int(m.group(2)) != 1:
            continue
        p, _, t, k = map(int, m.groups())
        by_point[(p, t)][k] = statistics.fmean(_ttft_ms(r) for r in pq.read_table(f).to_pylist())
    return [(p, t, v[0] / statistics.median(x for k, x in v.items() if k))
            for (p, t), v in sorted(by_point.items()) if 0 in v and len(v) > 1]


def lone_ratios(run: Path, pm) -> dict[int, list[float]]:
    """Bucket -> TTFT / fit of the ok requests that arrived while nothing else ran on their prefill instance."""
    recs = [r for r in pq.read_table(run / "records.parquet").to_pylist() if r["status"] == "ok"]
    busy = defaultdict(list)
    for r in recs:
        busy[r["prefill_instance"]].append((r["actual_send_s"], r["last_token_s"], r["request_id"]))
    out: dict[int, list[float]] = defaultdict(list)
    for r in recs:
        t = r["actual_send_s"]
        if any(a < t < b and i != r["request_id"] for a, b, i in busy[r["prefill_instance"]]):
            continue
        p = r["planned_input_tokens"]
        out[int(np.digitize(p, BUCKETS))].append(_ttft_ms(r) / (pm.lone_prompt_s(p) * 1e3))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile-run", action="append", default=[], type=Path)
    ap.add_argument("--live", action="append", default=[], type=Path)
    ap.add_argument("--fit", default=None, help="profile CSV whose fit the live TTFTs are divided by")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--hardware", default="cpu-core")
    a = ap.parse_args()
    for run in a.profile_run:
        rows = first_repeat_ratios(run)
        print(f"{run.name}: first repeat / later repeats, batch 1 (prompt x output: ratio)")
        print("  " + ", ".join(f"{p}x{t}: {x:.2f}" for p, t, x in rows))
    if a.live:
        if not a.fit:
            raise SystemExit("--live needs --fit PROFILE.csv")
        pm = get_perf_model(load_profiles(a.fit), a.model, a.hardware, 1)
        for run in a.live:
            by = lone_ratios(run, pm)
            every = [x for v in by.values() for x in v]
            print(f"{run.name}: lone TTFT / fit, all {len(every)}: median {np.median(every):.2f}, "
                  f"mean {np.mean(every):.2f}")
            for b in sorted(by):
                print(f"  prompt [{BUCKETS[b - 1]}, {BUCKETS[b] if b < len(BUCKETS) - 1 else 'inf'}): "
                      f"n {len(by[b])}, median {np.median(by[b]):.2f}, mean {np.mean(by[b]):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
