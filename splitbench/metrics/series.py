"""Plot data for the compare report: latency CDFs, in-flight requests, per-instance scraped gauges, TTFT breakdown.

Pure functions over RequestRecords, run.json dicts and already-read metrics rows; no I/O here.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from splitbench.metrics.latency import e2e_s, tbt_gaps_s, ttft_s
from splitbench.schema.records import RequestRecord

# Split requests' router phases, in order (splitbench.servers.phaselog).
SPLIT_PHASES = ("router_recv", "prefill_sent", "prefill_done", "decode_sent", "first_token")
TTFT_COMPONENTS = ("client_to_router", "router_queue", "prefill", "handoff", "kv_transfer_and_decode_start",
                   "relay_to_client")
_RUNNING, _WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
_KV_KEYS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # newer vLLM name first


def cdf_points(values: Iterable[float], max_points: int = 400) -> dict:
    """Empirical CDF {"x": sorted values, "p": rank / n}, downsampled evenly in rank (min and max always kept)."""
    arr = np.sort(np.asarray([v for v in values if v is not None], dtype=np.float64))
    n = arr.size
    if n == 0:
        return {"x": [], "p": []}
    if n > max_points >= 2:
        idx = np.unique(np.rint(np.linspace(0, n - 1, max_points)).astype(np.int64))
    else:
        idx = np.arange(n)
    return {"x": arr[idx].tolist(), "p": ((idx + 1) / n).tolist()}


def inflight_series(records: Sequence[RequestRecord], step_s: float = 0.25) -> dict:
    """Requests in flight (sent, not yet ended: actual_send_s <= t < end_s) sampled every step_s on the run clock,
    from 0 to the last end. A sent record without end_s counts as in flight until the end of the series."""
    if not step_s > 0:
        raise ValueError(f"step_s must be > 0, got {step_s}")
    sent = [r for r in records if r.actual_send_s is not None]
    if not sent:
        return {"t_s": [], "requests": []}
    starts = np.sort(np.asarray([r.actual_send_s for r in sent], dtype=np.float64))
    ends = np.sort(np.asarray([np.inf if r.end_s is None else r.end_s for r in sent], dtype=np.float64))
    finite = ends[np.isfinite(ends)]
    last = max(float(starts[-1]), float(finite[-1]) if finite.size else 0.0)
    t = np.arange(0.0, last + step_s, step_s)
    n = np.searchsorted(starts, t, side="right") - np.searchsorted(ends, t, side="right")
    return {"t_s": t.tolist(), "requests": n.astype(int).tolist()}


def _kv_usage(gauges: dict) -> float | None:
    for k in _KV_KEYS:
        if k in gauges:
            return float(gauges[k])
    return None


def instance_series(rows_by_instance: dict[str, list[dict]], instances: list[dict],
                    t0_unix_s: float) -> dict[str, dict]:
    """Per instance {"pool", "t_s", "running", "waiting", "kv_usage" (fraction 0..1)} from scraped /metrics rows
    (metrics/<id>.jsonl); t_s on the run clock. Failed scrapes are skipped; a missing gauge is None."""
    pools = {str(i.get("id")): i.get("pool") or i.get("role") for i in instances or []}
    out: dict[str, dict] = {}
    for iid in list(pools) + sorted(k for k in rows_by_instance if k not in pools):
        rows = sorted((r for r in rows_by_instance.get(iid, ()) if r.get("ok") and "t_unix_s" in r),
                      key=lambda r: r["t_unix_s"])
        s: dict = {"pool": pools.get(iid), "t_s": [], "running": [], "waiting": [], "kv_usage": []}
        for r in rows:
            g = r.get("gauges") or {}
            s["t_s"].append(float(r["t_unix_s"]) - t0_unix_s)
            s["running"].append(float(g[_RUNNING]) if _RUNNING in g else None)
            s["waiting"].append(float(g[_WAITING]) if _WAITING in g else None)
            s["kv_usage"].append(_kv_usage(g))
        out[iid] = s
    return out


def ttft_components(r: RequestRecord) -> dict[str, float] | None:
    """One split request's TTFT cut at the router's phase timestamps (all on the client's run clock); the
    components telescope, so they sum to first_token_s - actual_send_s. None unless ok with every split phase."""
    ph = r.phases_s or {}
    if not r.ok or r.actual_send_s is None or r.first_token_s is None or any(p not in ph for p in SPLIT_PHASES):
        return None
    return {
        "client_to_router": ph["router_recv"] - r.actual_send_s,
        "router_queue": ph["prefill_sent"] - ph["router_recv"],
        "prefill": ph["prefill_done"] - ph["prefill_sent"],
        "handoff": ph["decode_sent"] - ph["prefill_done"],
        "kv_transfer_and_decode_start": ph["first_token"] - ph["decode_sent"],
        "relay_to_client": r.first_token_s - ph["first_token"],
    }


def ttft_breakdown(records: Sequence[RequestRecord]) -> dict | None:
    """Mean/p50/p99 of each TTFT component over the split requests; None when no record has split phases."""
    per = [c for c in (ttft_components(r) for r in records) if c is not None]
    if not per:
        return None
    ttfts = [ttft_s(r) for r in records if ttft_components(r) is not None]
    cols = {k: np.asarray([c[k] for c in per], dtype=np.float64) for k in TTFT_COMPONENTS}
    return {"requests": len(per), "components": list(TTFT_COMPONENTS),
            "mean_s": {k: float(v.mean()) for k, v in cols.items()},
            "p50_s": {k: float(np.percentile(v, 50)) for k, v in cols.items()},
            "p99_s": {k: float(np.percentile(v, 99)) for k, v in cols.items()},
            "ttft_mean_s": float(np.mean(ttfts))}


def run_series(records: Sequence[RequestRecord], run_meta: dict,
               rows_by_instance: dict[str, list[dict]] | None = None) -> dict:
    """Every plot series of one run: latency CDFs, in-flight requests, per-instance gauges, TTFT breakdown."""
    ok = [r for r in records if r.ok]
    backend = run_meta.get("backend") if isinstance(run_meta.get("backend"), dict) else {}
    t0 = run_meta.get("t0_unix_s")
    instances = {}
    if rows_by_instance and t0 is not None:
        instances = instance_series(rows_by_instance, backend.get("instances") or [], float(t0))
    return {
        "cdf": {"ttft_s": cdf_points(ttft_s(r) for r in ok),
                "tbt_s": cdf_points(g for r in ok for g in tbt_gaps_s(r)),
                "e2e_s": cdf_points(e2e_s(r) for r in ok)},
        "inflight": inflight_series(records),
        "instances": instances,
        "ttft_breakdown": ttft_breakdown(records),
    }
