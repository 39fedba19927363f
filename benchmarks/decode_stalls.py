"""Where a live run's slow decode steps fall: lone-decode token gaps (no other request on the instance) over twice
their instance's median, against the events that could cause them: a request sent, a first token, a request
ended (anywhere in the cluster) and the run's own /metrics scrapes of that instance.

  python benchmarks/decode_stalls.py results/live-base3 [results/other ...] [--windows 20]

--windows S: also each instance's mean lone gap per S seconds of the run (windows with 50 gaps or more), and the
correlation between two instances' windows: near 1 when the whole host slows, near 0 for one core's own spells.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

NEAR_SCRAPE_S = 0.03   # a scrape that started this long before a gap, or during it, counts as near it


def lone_gaps(recs: list[dict], max_prompt_tokens: int | None = None) -> dict[str, np.ndarray]:
    """Instance -> (start, end) run-clock seconds of each token gap while nothing else ran on it (of requests with
    fewer than max_prompt_tokens prompt tokens, when given)."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for r in recs:
        spans.setdefault(r["decode_instance"], []).append((r["actual_send_s"], r["last_token_s"]))
    out: dict[str, list[tuple[float, float]]] = {}
    for r in recs:
        if max_prompt_tokens is not None and r["planned_input_tokens"] >= max_prompt_tokens:
            continue
        ts = r["actual_send_s"] + np.asarray(r["chunk_offsets_s"])
        for a, b in zip(ts[:-1], ts[1:]):
            m = (a + b) / 2
            if sum(1 for x, y in spans[r["decode_instance"]] if x < m < y) == 1:
                out.setdefault(r["decode_instance"], []).append((a, b))
    return {k: np.asarray(v) for k, v in out.items()}


def within(events: np.ndarray, gaps: np.ndarray, before_s: float = 0.0) -> np.ndarray:
    """Per gap: whether an event (sorted times) fell in [start - before_s, end]."""
    return np.searchsorted(events, gaps[:, 1]) > np.searchsorted(events, gaps[:, 0] - before_s)


def report(run: Path) -> None:
    recs = [r for r in pq.read_table(run / "records.parquet").to_pylist() if r["status"] == "ok"]
    t0 = json.loads((run / "run.json").read_text())["t0_unix_s"]
    events = {name: np.sort([r[k] for r in recs]) for name, k in
              (("a request sent", "actual_send_s"), ("a first token", "first_token_s"), ("a request ended", "end_s"))}
    for inst, g in sorted(lone_gaps(recs).items()):
        ms = (g[:, 1] - g[:, 0]) * 1e3
        slow, normal = ms > 2 * np.median(ms), ms <= 1.2 * np.median(ms)
        line = [f"{run.name} {inst}: {len(ms)} lone gaps, median {np.median(ms):.2f} ms, mean {ms.mean():.2f}; "
                f"{slow.mean():.1%} over 2x the median"]
        for name, ev in events.items():
            hit = within(ev, g)
            line.append(f"{name} in the gap: slow {hit[slow].mean():.2f}, normal {hit[normal].mean():.3f}")
        scrapes = run / "metrics" / f"{inst}.jsonl"
        if scrapes.is_file():
            st = np.sort([json.loads(x)["t_unix_s"] - t0 for x in scrapes.read_text().splitlines() if x.strip()])
            hit = within(st, g, NEAR_SCRAPE_S)
            line.append(f"near a /metrics scrape: slow {hit[slow].mean():.2f}, normal {hit[normal].mean():.3f} "
                        f"(mean gap {ms[hit].mean():.2f} ms near one, {ms[~hit].mean():.2f} ms not)")
        print("\n  ".join(line))


def windows(run: Path, window_s: float) -> None:
    """Each instance's mean lone gap per window_s of the run, and the correlation of two instances' windows."""
    recs = [r for r in pq.read_table(run / "records.parquet").to_pylist() if r["status"] == "ok"]
    gaps = lone_gaps(recs)
    insts = sorted(gaps)
    end_s = max(float(g[:, 1].max()) for g in gaps.values())
    rows = []
    for k in range(int(end_s // window_s) + 1):
        row = []
        for inst in insts:
            g = gaps[inst]
            ms = (g[:, 1] - g[:, 0])[(g[:, 0] >= k * window_s) & (g[:, 0] < (k + 1) * window_s)] * 1e3
            row.append(float(ms.mean()) if len(ms) >= 50 else float("nan"))
        rows.append(row)
        print(f"{run.name} t {k * window_s:5.0f} s: " + "  ".join(f"{i} {x:5.2f} ms" for i, x in zip(insts, row)))
    full = np.array([r for r in rows if not np.isnan(r).any()])
    if len(insts) == 2 and len(full) >= 3:
        print(f"{run.name}: correlation of the two instances' windows {np.corrcoef(full[:, 0], full[:, 1])[0, 1]:.2f} "
              f"over {len(full)} windows")


def main() -> int:
    args = sys.argv[1:]
    window_s = None
    if "--windows" in args:
        i = args.index("--windows")
        window_s, args = float(args[i + 1]), args[:i] + args[i + 2:]
    if not args:
        raise SystemExit(__doc__)
    for run in args:
        report(Path(run))
        if window_s:
            windows(Path(run), window_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
