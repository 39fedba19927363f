"""latency.py's per-request values as arrays over RecordColumns, and the TBT distribution from per-chunk
(gap, tokens) pairs: exactly the percentiles of the expanded per-token gaps, without expanding them.

A chunk of k tokens after a gap g stands for k gaps of g / k (METRIC_DEFINITIONS); its pair is (g / k, k).
Percentiles are found in two passes over blocks of chunks: a histogram of the gaps' order-preserving bit
patterns locates each needed order statistic's bucket, the second pass sorts only those buckets, and numpy's
linear interpolation is then applied as np.percentile applies it. The mean is sum(g) / count (the expanded
array's pairwise sum may differ from it in the last bits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitbench.schema.columns import RecordColumns

BLOCK_CHUNKS = 1 << 20        # chunks per block of a pass
_BITS = 20                    # histogram buckets: the top bits of the order-preserving key
_QUANTILES = (50, 90, 99)


@dataclass
class Vectors:
    """Per-request values (NaN where latency.py returns None)."""
    ok: np.ndarray
    n_in: np.ndarray          # input_tokens(r)
    n_out: np.ndarray         # output_tokens(r)
    ttft: np.ndarray
    e2e: np.ndarray
    mean_tbt: np.ndarray
    norm: np.ndarray
    tbt_splitwisesim: np.ndarray   # (E2E - TTFT) / n, latency.tbt_splitwisesim_s


def vectors(c: RecordColumns) -> Vectors:
    ok = c.status == c.statuses.index("ok")
    send, first = c.times["actual_send_s"], c.times["first_token_s"]
    last = np.where(c.times["last_token_s"] == c.times["last_token_s"], c.times["last_token_s"], c.times["end_s"])
    n_chunks = np.diff(c.tokens_at)
    has = np.flatnonzero(n_chunks > 0)
    chunk_sum = np.zeros(len(c), np.int64)
    if has.size:   # segments between the starts of records that have chunks (the others hold none)
        chunk_sum[has] = np.add.reduceat(c.chunk_tokens, c.tokens_at[has], dtype=np.int64)
    n_out = np.where(c.actual_output_tokens >= 0, c.actual_output_tokens,
                     np.where(n_chunks > 0, chunk_sum, c.planned_output_tokens))
    n_in = np.where(c.actual_input_tokens >= 0, c.actual_input_tokens, c.planned_input_tokens)
    nan = np.full(len(c), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        ttft = np.where(ok, first - send, nan)
        e2e = np.where(ok, last - send, nan)
        mean_tbt = np.where(n_out > 1, (e2e - ttft) / (n_out - 1), nan)
        norm = np.where(n_out > 0, e2e / n_out, nan)
        tbt_ssim = np.where(n_out >= 1, (e2e - ttft) / n_out, nan)
    return Vectors(ok, n_in, n_out, ttft, e2e, mean_tbt, norm, tbt_ssim)


def percentile_set_of(values: np.ndarray) -> dict:
    """latency.percentile_set of an array, NaN = None."""
    arr = values[values == values]
    if arr.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(arr, list(_QUANTILES))
    return {"count": int(arr.size), "mean": float(arr.mean()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(arr.max())}


# ---------------------------------------------------------------- TBT pairs

def _gap_blocks(c: RecordColumns, ok: np.ndarray):
    """(row of each pair, gap, tokens) per block of records; only ok records, chunks after the first, k > 0."""
    if not np.array_equal(c.offsets_at, c.tokens_at):
        yield _unequal(c, ok)
        return
    at, n = c.offsets_at, len(c)
    lo = 0
    while lo < n:
        hi = max(int(np.searchsorted(at, at[lo] + BLOCK_CHUNKS, side="right")) - 1, lo + 1)
        hi = min(hi, n)
        a, b = int(at[lo]), int(at[hi])
        offs, toks = c.chunk_offsets_s[a:b], c.chunk_tokens[a:b]
        lens = np.diff(at[lo:hi + 1])
        rows = np.repeat(np.arange(lo, hi), lens)
        keep = (toks > 0) & ok[rows]
        keep[(at[lo:hi] - a)[lens > 0]] = False          # a record's first chunk is its TTFT, not a gap
        d = np.empty(len(offs))
        d[1:] = offs[1:] - offs[:-1]
        k = toks[keep]
        yield rows[keep], d[keep] / k, k
        lo = hi


def _unequal(c: RecordColumns, ok: np.ndarray):
    """Pairs of records whose offset and token lists may differ in length (latency.tbt_gaps_s's loop)."""
    rows, gaps, ks = [], [], []
    for i in np.flatnonzero(ok).tolist():
        offs = c.chunk_offsets_s[c.offsets_at[i]:c.offsets_at[i + 1]].tolist()
        toks = c.chunk_tokens[c.tokens_at[i]:c.tokens_at[i + 1]].tolist()
        for j in range(1, min(len(offs), len(toks))):
            if toks[j] > 0:
                rows.append(i), gaps.append((offs[j] - offs[j - 1]) / toks[j]), ks.append(toks[j])
    return np.array(rows, np.int64), np.array(gaps, np.float64), np.array(ks, np.int64)


def _key(g: np.ndarray) -> np.ndarray:
    """Unsigned keys in the order of the floats (negative ones flipped)."""
    bits = g.view(np.uint64)
    return np.where(bits >> np.uint64(63), ~bits, bits | np.uint64(1 << 63))


def tbt_sets(c: RecordColumns, ok: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, dict]:
    """The TBT percentile set of each group of rows (a boolean row mask per group), as
    percentile_set(metric_values(rows, "tbt")) gives it."""
    shift = np.uint64(64 - _BITS)
    acc = {g: {"hist": np.zeros(1 << _BITS), "n": 0, "sum": 0.0, "max": -np.inf} for g in groups}
    for rows, gaps, k in _gap_blocks(c, ok):
        bucket = (_key(gaps) >> shift).astype(np.int64)
        for name, mask in groups.items():
            sel = mask[rows]
            a = acc[name]
            a["hist"] += np.bincount(bucket[sel], weights=k[sel], minlength=1 << _BITS)
            a["n"] += int(k[sel].sum())
            a["sum"] += float((gaps[sel] * k[sel]).sum())
            if sel.any():
                a["max"] = max(a["max"], float(gaps[sel].max()))
    wanted = {}
    for name, a in acc.items():
        if a["n"]:
            a["ranks"] = _ranks(a["n"])
            a["cum"] = np.cumsum(a["hist"])
            a["buckets"] = np.searchsorted(a["cum"], [r for r, _ in a["ranks"]], side="right")
            wanted[name] = np.unique(a["buckets"])
    found = {name: ([], []) for name in wanted}
    for rows, gaps, k in _gap_blocks(c, ok):
        bucket = (_key(gaps) >> shift).astype(np.int64)
        for name, buckets in wanted.items():
            sel = groups[name][rows] & np.isin(bucket, buckets)
            found[name][0].append(gaps[sel]), found[name][1].append(k[sel])
    out = {}
    for name, a in acc.items():
        if not a["n"]:
            out[name] = {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
            continue
        vals = _order_stats(a, np.concatenate(found[name][0]), np.concatenate(found[name][1]))
        out[name] = {"count": a["n"], "mean": a["sum"] / a["n"],
                     **{f"p{q}": float(v) for q, v in zip(_QUANTILES, vals)}, "max": a["max"]}
    return out


def _ranks(n: int) -> list[tuple[int, float]]:
    """Per quantile, the two 0-based ranks of the expanded sorted array np.percentile interpolates between and
    the virtual index, as numpy's linear method computes them."""
    q = np.true_divide(np.array(_QUANTILES, dtype=np.float64), np.float64(100))
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    out = []
    for v, p in zip(virtual.tolist(), prev.tolist()):
        lo = n - 1 if v >= n - 1 else int(p)
        hi = n - 1 if v >= n - 1 else int(p) + 1
        out += [(lo, v), (hi, v)]
    return out


def _order_stats(a: dict, gaps: np.ndarray, k: np.ndarray) -> list[float]:
    """Interpolated percentiles from the candidate buckets' pairs (numpy's _lerp, gamma = virtual - floor)."""
    order = np.argsort(gaps, kind="stable")
    gaps, cumk = gaps[order], np.cumsum(k[order])
    before = {b: (a["cum"][b - 1] if b else 0.0) for b in a["buckets"].tolist()}
    keys = (_key(gaps) >> np.uint64(64 - _BITS)).astype(np.int64)
    stats = []
    for (rank, _), b in zip(a["ranks"], a["buckets"].tolist()):
        inb = keys == b
        local = cumk[inb] - (cumk[inb][0] - k[order][inb][0])     # cumulative weight inside the bucket
        stats.append(gaps[inb][int(np.searchsorted(local, rank - before[b], side="right"))])
    out = []
    for j in range(0, len(stats), 2):
        lo_v, hi_v, virtual = stats[j], stats[j + 1], a["ranks"][j][1]
        rank_lo = a["ranks"][j][0]
        t = np.float64(virtual - (-1 if virtual >= a["n"] - 1 else rank_lo))
        diff = np.float64(hi_v) - np.float64(lo_v)
        out.append(hi_v - diff * (1 - t) if t >= 0.5 else lo_v + diff * t)
    return out
