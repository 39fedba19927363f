"""The summary's prefix-cache section: cached prompt tokens per request (server usage or the simulator's cache),
their fraction per pool and instance, TTFT against uncached prompt tokens (a line fit and log2 bins), and each
instance's own prefix-cache counters from the scraped /metrics. One computation over arrays serves RequestRecord
lists and RecordColumns alike, so live and simulated runs give the same section.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from splitbench.metrics.latency import input_tokens, ttft_s
from splitbench.metrics.vectors import percentile_set_of
from splitbench.schema.records import RequestRecord

# vLLM V1's prefix-cache counters (tokens; prometheus_client adds _total), as the scraper keeps them
SERVER_COUNTERS = {"queries_tokens": "vllm:prefix_cache_queries_total",
                   "hits_tokens": "vllm:prefix_cache_hits_total",
                   "external_queries_tokens": "vllm:external_prefix_cache_queries_total",
                   "external_hits_tokens": "vllm:external_prefix_cache_hits_total"}


def _tokens(cached: np.ndarray, n_in: np.ndarray, rows: np.ndarray) -> dict:
    """Cached-token totals over `rows` (ok records with a cached count)."""
    prompt, hit = int(n_in[rows].sum()), int(cached[rows].sum())
    return {"requests": int(rows.sum()), "requests_hit": int((rows & (cached > 0)).sum()), "prompt_tokens": prompt,
            "cached_tokens": hit, "cached_fraction": hit / prompt if prompt else None}


def ttft_fit(x: np.ndarray, y: np.ndarray) -> dict | None:
    """Least-squares TTFT = a + b * uncached tokens -> {n, intercept_s, per_token_s, r2}; None with fewer than two
    distinct x values."""
    if x.size < 2 or np.all(x == x[0]):
        return None
    mx, my = x.mean(), y.mean()
    b = float(((x - mx) * (y - my)).sum() / ((x - mx) ** 2).sum())
    a = float(my - b * mx)
    ss = float(((y - my) ** 2).sum())
    r2 = 1.0 - float(((y - a - b * x) ** 2).sum()) / ss if ss > 0 else None
    return {"n": int(x.size), "intercept_s": a, "per_token_s": b, "r2": r2}


def ttft_bins(x: np.ndarray, y: np.ndarray) -> list[dict]:
    """TTFT percentile sets per bin of uncached tokens: [0, 1), then [2^k, 2^(k+1))."""
    k = np.where(x >= 1, np.floor(np.log2(np.maximum(x, 1))).astype(np.int64), -1)
    out = []
    for b in np.unique(k).tolist():
        lo, hi = (0, 1) if b < 0 else (1 << b, 1 << (b + 1))
        out.append({"lo_tokens": lo, "hi_tokens": hi, "ttft_s": percentile_set_of(y[k == b])})
    return out


def server_section(server_metrics: dict | None) -> dict | None:
    """Per instance prefix-cache counter increases over the run (metrics/summary.json) and hit rates; None when no
    instance reported them."""
    out = {}
    for iid, d in sorted((server_metrics or {}).items()):
        counters = (d or {}).get("counters") or {}
        if SERVER_COUNTERS["queries_tokens"] not in counters:
            continue
        row = {k: (int(counters[name]) if name in counters else None) for k, name in SERVER_COUNTERS.items()}
        q, h, eq, eh = (row[k] for k in SERVER_COUNTERS)
        row["hit_rate"] = h / q if q else None
        row["external_hit_rate"] = eh / eq if eq and eh is not None else None
        out[iid] = row
    return out or None


def cache_from(ok: np.ndarray, n_in: np.ndarray, cached: np.ndarray, ttft: np.ndarray,
               groups: dict[str, dict[str, np.ndarray]], server_metrics: dict | None = None) -> dict | None:
    """The cache section from per-request arrays (cached -1 = not reported, ttft NaN = none) and row masks per
    pool and per (prefill) instance; None when no ok request has a cached count and no instance has counters."""
    rows = ok & (cached >= 0)
    server = server_section(server_metrics)
    if not rows.any() and server is None:
        return None
    timed = rows & (ttft == ttft)
    x, y = (n_in - cached)[timed].astype(np.float64), ttft[timed]
    per = {name: {k: _tokens(cached, n_in, rows & m) for k, m in sorted(masks.items()) if (rows & m).any()}
           for name, masks in groups.items()}
    return {"ok_requests": int(ok.sum()), **_tokens(cached, n_in, rows), **per, "ttft_vs_uncached": {"fit": ttft_fit(x, y), "bins": ttft_bins(x, y)},
            "server": server}


def cache_section(records: Sequence[RequestRecord], server_metrics: dict | None = None) -> dict | None:
    """cache_from() over RequestRecords: pools by RequestRecord.pool, instances by the prefill instance."""
    n = len(records)
    ok = np.fromiter((r.ok for r in records), bool, n)
    n_in = np.fromiter((input_tokens(r) for r in records), np.int64, n)
    cached = np.fromiter((-1 if r.cached_input_tokens is None else r.cached_input_tokens for r in records),
                         np.int64, n)
    ttft = np.fromiter((np.nan if (t := ttft_s(r)) is None else t for r in records), np.float64, n)
    groups: dict[str, dict[str, np.ndarray]] = {"pools": {}, "instances": {}}
    for key, get in (("pools", lambda r: r.pool), ("instances", lambda r: r.prefill_instance or r.instance)):
        names = [get(r) for r in records]
        for name in set(names) - {None}:
            groups[key][name] = np.fromiter((v == name for v in names), bool, n)
    return cache_from(ok, n_in, cached, ttft, groups, server_metrics)
