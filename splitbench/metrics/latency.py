"""Per-request latency values (TTFT, TBT gaps, mean TBT, E2E, normalized), percentile sets and throughput.

Pure functions over RequestRecord lists; the formulas are spelled out in METRIC_DEFINITIONS.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from splitbench.schema.records import NOT_SENT, OK, STATUSES, RequestRecord

METRIC_DEFINITIONS = """\
### Metric definitions

All times are seconds on the run clock. Only `ok` records contribute to latency; every record is counted.

| Metric | Definition |
|---|---|
| TTFT | `first_token_s - actual_send_s` (first chunk carrying >= 1 output token) |
| E2E | `last_token_s - actual_send_s` (time to the last token); `end_s - actual_send_s` only when the record has no `last_token_s` |
| output tokens n | `actual_output_tokens` when known, else the sum of `chunk_tokens`, else `planned_output_tokens` |
| TBT (per-token gaps) | consecutive token-carrying chunks with gap g where the later chunk holds k tokens contribute k gaps of g/k; the first chunk contributes nothing (that is TTFT); gaps are pooled over all requests |
| mean TBT (per request) | `(E2E - TTFT) / (n - 1)` (Splitwise's definition); undefined for n <= 1 |
| SplitwiseSim TBT (per request) | `(E2E - TTFT) / n` (`tbt_splitwisesim_s`: SplitwiseSim's scheduler.py get_results divides by all n output tokens, so it is (n - 1) / n of mean TBT); undefined for n < 1 |
| normalized latency | `E2E / n` |
| percentile set | count, mean, p50, p90, p99, max (numpy linear-interpolated percentiles) |
| throughput window | `[min actual_send_s, max end_s]` over all sent records (those with `actual_send_s`) |
| throughput | ok requests, input tokens, output tokens per second of the window; tokens are actual when known, else planned |
| error rate | failed / attempted, where attempted = every record whose status is not `not_sent` and failed = attempted - ok |
| SLO value | the SLO's statistic of the metric's distribution across the run; met when value <= threshold |
| goodput | ok requests per second of the window whose own TTFT, E2E, normalized latency and mean TBT are <= every threshold set on that metric (a `tbt_*` SLO is applied to the request's mean TBT; requests with n <= 1 have no gaps and pass TBT SLOs; a request lacking any other constrained value is not good) |
| SLO attainment | good requests / attempted requests |
| Splitwise slowdowns | TTFT_i / ref_ttft(prompt_i); mean TBT_i / ref.tbt_s; E2E_i / (ref_ttft(prompt_i) + (n_i - 1) * ref.tbt_s), with ref_ttft(p) = max(a + b p, floor) fitted on unloaded one-at-a-time requests |
| Splitwise verdict | passes when TTFT slowdown P50/P90/P99 <= 2/3/6x, TBT and E2E slowdown P50/P90/P99 <= 1.25/1.5/5x (all nine) |
| cached fraction | sum `cached_input_tokens` / sum prompt tokens over ok records that report a cached count (metrics/cache.py); TTFT vs uncached: least-squares `TTFT = a + b x (prompt - cached tokens)` and TTFT per log2 bin of uncached tokens |
| schedule lag | `actual_send_s - intended_send_s` per sent record (p50, p99, max) |
| send rates | trace rate = (n - 1) / span of `intended_send_s` over all records; achieved = (n - 1) / span of `actual_send_s` over sent records |
| server failures | failed / attempted, counting every failed status but `cancelled` (a stop, not the server); grouped by kind (`http_error <code>`, `timeout`, `error (<ExceptionName>)`, ...); onset = intended send time of the first failed request |
| fidelity verdict | the first that holds of: `server-failures` when server failures > 5% of attempted requests; `client-behind` when lag p99 > 10 ms or achieved rate < 95% of trace rate; `over-ceiling` when the peak offered rate exceeds the calibrated client ceiling; else `ok` (defaults). Flags list every one that holds, plus `token-mismatch` when an ok record's actual input/output tokens differ from planned (actual unknown = unverified, counted apart) |
"""

PERCENTILE_KEYS = ("count", "mean", "p50", "p90", "p99", "max")


def percentile_set(values: Iterable[float]) -> dict:
    """count/mean/p50/p90/p99/max of `values` as plain floats; None everywhere but count when empty."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])  # linear interpolation (numpy default)
    return {"count": int(arr.size), "mean": float(arr.mean()), "p50": float(p50),
            "p90": float(p90), "p99": float(p99), "max": float(arr.max())}


def stat_of(values: Sequence[float], stat: str) -> float | None:
    """One statistic (mean/p50/p90/p99/max) of `values`; None when empty."""
    return percentile_set(values)[stat]


# ---------------------------------------------------------------- per-request values

def output_tokens(r: RequestRecord) -> int:
    if r.actual_output_tokens is not None:
        return int(r.actual_output_tokens)
    if r.chunk_tokens:
        return int(sum(r.chunk_tokens))
    return int(r.planned_output_tokens)


def input_tokens(r: RequestRecord) -> int:
    return int(r.actual_input_tokens if r.actual_input_tokens is not None else r.planned_input_tokens)


def ttft_s(r: RequestRecord) -> float | None:
    if not r.ok or r.actual_send_s is None or r.first_token_s is None:
        return None
    return r.first_token_s - r.actual_send_s


def e2e_s(r: RequestRecord) -> float | None:
    if not r.ok or r.actual_send_s is None:
        return None
    last = r.last_token_s if r.last_token_s is not None else r.end_s
    return None if last is None else last - r.actual_send_s


def mean_tbt_s(r: RequestRecord) -> float | None:
    """(E2E - TTFT) / (n - 1); None for n <= 1 or missing timestamps."""
    n = output_tokens(r)
    t, e = ttft_s(r), e2e_s(r)
    if n <= 1 or t is None or e is None:
        return None
    return (e - t) / (n - 1)


def tbt_splitwisesim_s(r: RequestRecord) -> float | None:
    """(E2E - TTFT) / n, as SplitwiseSim reports TBT; None for n < 1 or missing timestamps."""
    n = output_tokens(r)
    t, e = ttft_s(r), e2e_s(r)
    if n < 1 or t is None or e is None:
        return None
    return (e - t) / n


def norm_s(r: RequestRecord) -> float | None:
    n = output_tokens(r)
    e = e2e_s(r)
    return None if e is None or n <= 0 else e / n


def tbt_gaps_s(r: RequestRecord) -> list[float]:
    """Per-token gaps of one ok request: a chunk of k tokens after gap g gives k gaps of g/k."""
    if not r.ok:
        return []
    offs, toks = r.chunk_offsets_s, r.chunk_tokens
    gaps: list[float] = []
    for i in range(1, min(len(offs), len(toks))):
        k = int(toks[i])
        if k <= 0:
            continue
        gaps.extend([(offs[i] - offs[i - 1]) / k] * k)
    return gaps


PER_REQUEST = {"ttft": ttft_s, "e2e": e2e_s, "mean_tbt": mean_tbt_s, "norm": norm_s,
               "tbt_splitwisesim": tbt_splitwisesim_s}


def metric_values(records: Sequence[RequestRecord], metric: str) -> list[float]:
    """The distribution a metric name (ttft/tbt/mean_tbt/e2e/norm) refers to, over ok records."""
    if metric == "tbt":
        return [g for r in records for g in tbt_gaps_s(r)]
    fn = PER_REQUEST[metric]
    return [v for v in (fn(r) for r in records if r.ok) if v is not None]


def latency_section(records: Sequence[RequestRecord]) -> dict:
    """Percentile sets of every latency metric (ok records only)."""
    return {f"{m}_s": percentile_set(metric_values(records, m))
            for m in ("ttft", "tbt", "mean_tbt", "e2e", "norm", "tbt_splitwisesim")}


# ---------------------------------------------------------------- counts and throughput

def counts_section(records: Sequence[RequestRecord]) -> dict:
    by_status = Counter(r.status for r in records)
    attempted = sum(v for k, v in by_status.items() if k != NOT_SENT)
    ok = by_status.get(OK, 0)
    failed = attempted - ok
    ordered = {s: by_status[s] for s in STATUSES if by_status.get(s)}
    ordered.update({s: v for s, v in sorted(by_status.items()) if s not in ordered})
    return {"total": len(records), "attempted": attempted,
            "sent": sum(1 for r in records if r.actual_send_s is not None),
            "ok": ok, "failed": failed, "not_sent": by_status.get(NOT_SENT, 0),
            "by_status": ordered, "error_rate": failed / attempted if attempted else None}


def window_s(records: Sequence[RequestRecord]) -> tuple[float | None, float | None]:
    """[min actual_send_s, max end_s] over sent records; (None, None) when nothing was sent."""
    sends = [r.actual_send_s for r in records if r.actual_send_s is not None]
    ends = [r.end_s for r in records if r.actual_send_s is not None and r.end_s is not None]
    if not sends:
        return None, None
    return min(sends), (max(ends) if ends else max(sends))


def throughput_section(records: Sequence[RequestRecord]) -> dict:
    start, end = window_s(records)
    ok = [r for r in records if r.ok]
    n_in = sum(input_tokens(r) for r in ok)
    n_out = sum(output_tokens(r) for r in ok)
    span = (end - start) if start is not None else None
    rate = (lambda x: x / span) if span and span > 0 else (lambda x: None)
    return {"start_s": start, "end_s": end, "window_s": span, "ok_requests": len(ok),
            "input_tokens": n_in, "output_tokens": n_out, "requests_per_s": rate(len(ok)),
            "input_tokens_per_s": rate(n_in), "output_tokens_per_s": rate(n_out)}


def pools_section(records: Sequence[RequestRecord]) -> dict:
    """Latency percentiles per RequestRecord.pool ("split" for prefill and decode on two instances, else the
    co-located pool: mixed, baseline, ...); {} when no record names a pool."""
    pools = sorted({r.pool for r in records if r.pool is not None})
    out = {}
    for p in pools:
        sub = [r for r in records if r.pool == p]
        out[p] = {"count": len(sub), "ok": sum(1 for r in sub if r.ok), **latency_section(sub)}
    return out


def first_chunk_tokens(r: RequestRecord) -> int:
    """Tokens in a request's first response chunk (all of its output when the client saw no chunks)."""
    return int(r.chunk_tokens[0]) if r.chunk_tokens is not None and len(r.chunk_tokens) else output_tokens(r)


def coalesced(records) -> bool:
    """True when some request's FIRST response chunk held more than one token: the client cannot tell when that
    first token came (its host, or the server's frontend, was too busy), so its TTFT and mean TBT ((E2E - TTFT) /
    (n - 1)) are not exact. Tokens coalesced later in a stream leave both exact: only the first and the last
    token's times enter them."""
    return any(output_tokens(r) > 1 and first_chunk_tokens(r) > 1 for r in records)
