"""summarize()'s sections computed over RecordColumns with arrays: the same dicts, value for value, as the
per-record functions of latency, slo, fidelity and efficiency give (tests/test_columnar.py holds them equal), in
time linear in the records and memory that does not grow with the tokens.
"""
from __future__ import annotations

from collections import namedtuple
from dataclasses import asdict
from typing import Sequence

import numpy as np

from splitbench.metrics.cache import cache_from
from splitbench.metrics.efficiency import efficiency_from
from splitbench.metrics.fidelity import failures_summary, fidelity_from, peak_rate_rps
from splitbench.metrics.slo import SLO, SPLITWISE_CHECKS, Reference
from splitbench.metrics.vectors import Vectors, percentile_set_of, tbt_sets, vectors
from splitbench.schema.columns import RecordColumns
from splitbench.schema.records import CANCELLED, NOT_SENT, STATUSES

METRICS = ("ttft", "tbt", "mean_tbt", "e2e", "norm", "tbt_splitwisesim")   # latency.py's, same order
_Failed = namedtuple("_Failed", "status http_status error")


class Frame:
    """RecordColumns with their per-request vectors and, once asked for, TBT sets per group of rows."""

    def __init__(self, c: RecordColumns):
        self.c, self.v = c, vectors(c)
        self.sent = c.times["actual_send_s"] == c.times["actual_send_s"]
        self._tbt: dict[str, dict] = {}
        self._seen: dict[str, np.ndarray] = {}   # group -> its ok rows, for groups already computed

    def tbt(self, groups: dict[str, np.ndarray]) -> dict[str, dict]:
        """TBT sets of row groups, computed once per distinct set of ok rows (a pool that holds every record
        costs no second pass over the chunks)."""
        todo, twins = {}, {}
        for k, m in groups.items():
            if k in self._tbt:
                continue
            rows = m & self.v.ok
            twin = next((j for j, seen in self._seen.items() if np.array_equal(seen, rows)), None)
            if twin is None:
                self._seen[k], todo[k] = rows, m
            else:
                twins[k] = twin
        if todo:
            self._tbt.update(tbt_sets(self.c, self.v.ok, todo))
        for k, j in twins.items():
            self._tbt[k] = dict(self._tbt[j])
        return {k: self._tbt[k] for k in groups}

    def values(self, metric: str, mask: np.ndarray | None = None) -> np.ndarray:
        v = getattr(self.v, metric)
        sel = self.v.ok if mask is None else self.v.ok & mask
        return v[sel]


def counts_section(f: Frame) -> dict:
    c = f.c
    counts = np.bincount(c.status, minlength=len(c.statuses)).tolist()
    by_status = {s: n for s, n in zip(c.statuses, counts) if n}
    attempted = sum(n for s, n in by_status.items() if s != NOT_SENT)
    ok = by_status.get("ok", 0)
    ordered = {s: by_status[s] for s in STATUSES if by_status.get(s)}
    ordered.update({s: v for s, v in sorted(by_status.items()) if s not in ordered})
    return {"total": len(c), "attempted": attempted, "sent": int(f.sent.sum()), "ok": ok, "failed": attempted - ok,
            "not_sent": by_status.get(NOT_SENT, 0), "by_status": ordered,
            "error_rate": (attempted - ok) / attempted if attempted else None}


def latency_section(f: Frame, mask: np.ndarray | None = None, tbt_group: str = "all") -> dict:
    tbt = f.tbt({tbt_group: np.ones(len(f.c), bool) if mask is None else mask})[tbt_group]
    return {f"{m}_s": tbt if m == "tbt" else percentile_set_of(f.values(m, mask)) for m in METRICS}


def window(f: Frame) -> tuple[float | None, float | None]:
    sends = f.c.times["actual_send_s"][f.sent]
    if not sends.size:
        return None, None
    ends = f.c.times["end_s"][f.sent]
    ends = ends[ends == ends]
    return float(sends.min()), float(ends.max() if ends.size else sends.max())


def throughput_section(f: Frame) -> dict:
    start, end = window(f)
    ok = f.v.ok
    n_in, n_out, n_ok = int(f.v.n_in[ok].sum()), int(f.v.n_out[ok].sum()), int(ok.sum())
    span = (end - start) if start is not None else None
    rate = (lambda x: x / span) if span and span > 0 else (lambda x: None)
    return {"start_s": start, "end_s": end, "window_s": span, "ok_requests": n_ok,
            "input_tokens": n_in, "output_tokens": n_out, "requests_per_s": rate(n_ok),
            "input_tokens_per_s": rate(n_in), "output_tokens_per_s": rate(n_out)}


def good(f: Frame, slos: Sequence[SLO]) -> np.ndarray:
    """slo.request_is_good of every row."""
    v: Vectors = f.v
    out = v.ok.copy()
    for s in slos:
        if s.metric in ("tbt", "mean_tbt"):
            x = v.mean_tbt
            passes = (x <= s.threshold_s) | ((x != x) & (v.n_out <= 1) & (v.e2e == v.e2e))
        else:
            x = getattr(v, s.metric)
            passes = x <= s.threshold_s
        out &= passes
    return out


def evaluate_slos(f: Frame, slos: Sequence[SLO]) -> dict:
    items = []
    for s in slos:
        dist = f.tbt({"all": np.ones(len(f.c), bool)})["all"] if s.metric == "tbt" else \
            percentile_set_of(f.values(s.metric))
        value = dist[s.stat]
        items.append({"name": s.name, "metric": s.metric, "stat": s.stat, "value_s": value,
                      "threshold_s": s.threshold_s, "met": value is not None and value <= s.threshold_s})
    if not slos:
        return {"items": [], "all_met": None, "good_requests": None, "goodput_rps": None, "attainment": None}
    n_good = int(good(f, slos).sum())
    attempted = int((f.c.status != f.c.statuses.index(NOT_SENT)).sum())
    span = throughput_section(f)["window_s"]
    return {"items": items, "all_met": all(i["met"] for i in items), "good_requests": n_good,
            "goodput_rps": n_good / span if span and span > 0 else None,
            "attainment": n_good / attempted if attempted else None}


def splitwise_verdict(f: Frame, ref: Reference) -> dict:
    v, ok = f.v, f.v.ok
    rt = np.maximum(ref.ttft_intercept_s + ref.ttft_per_token_s * v.n_in, ref.ttft_floor_s)
    re_ = rt + np.maximum(v.n_out - 1, 0) * ref.tbt_s
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = {"ttft": (v.ttft / rt)[ok & (v.ttft == v.ttft) & (rt > 0)],
              "tbt": (v.mean_tbt / ref.tbt_s)[ok & (v.mean_tbt == v.mean_tbt)] if ref.tbt_s > 0 else np.zeros(0),
              "e2e": (v.e2e / re_)[ok & (v.e2e == v.e2e) & (re_ > 0)]}
    checks = []
    for metric, stat, limit in SPLITWISE_CHECKS:
        value = percentile_set_of(sd[metric])[stat]
        checks.append({"name": f"{metric}_{stat}", "metric": metric, "stat": stat, "slowdown": value,
                       "limit": limit, "met": value is not None and value <= limit})
    failed = [c["name"] for c in checks if not c["met"]]
    return {"checks": checks, "passed": not failed, "failed": failed, "reference": asdict(ref)}


def _rate(times: np.ndarray) -> float | None:
    if times.size < 2:
        return None
    span = float(times.max()) - float(times.min())
    return (times.size - 1) / span if span > 0 else None


def _tokens(f: Frame) -> dict:
    c, ok = f.c, f.v.ok
    out = {}
    bad = np.zeros(len(c), bool)
    for side, actual, planned in (("input", c.actual_input_tokens, c.planned_input_tokens),
                                  ("output", c.actual_output_tokens, c.planned_output_tokens)):
        out[f"{side}_mismatch"] = int((ok & (actual >= 0) & (actual != planned)).sum())
        out[f"{side}_unverified"] = int((ok & (actual < 0)).sum())
        bad |= ok & (actual >= 0) & (actual != planned)
    ids = c.request_ids().to_pylist() if bad.any() else []
    none = lambda x: None if x < 0 else int(x)  # noqa: E731
    out = {"input_mismatch": out["input_mismatch"], "output_mismatch": out["output_mismatch"],
           "input_unverified": out["input_unverified"], "output_unverified": out["output_unverified"],
           "examples": [{"request_id": ids[i], "planned": [int(c.planned_input_tokens[i]),
                                                           int(c.planned_output_tokens[i])],
                         "actual": [none(c.actual_input_tokens[i]), none(c.actual_output_tokens[i])]}
                        for i in np.flatnonzero(bad)[:5].tolist()]}
    return out


def _failures(f: Frame) -> dict:
    c = f.c
    attempted = c.status != c.statuses.index(NOT_SENT)
    cancelled = c.status == (c.statuses.index(CANCELLED) if CANCELLED in c.statuses else -9)
    failed = attempted & ~f.v.ok & ~cancelled
    rows = np.flatnonzero(failed).tolist()
    onset = float(c.intended_send_s[failed].min()) if rows else None
    after = attempted & ~cancelled & (c.intended_send_s >= onset) if rows else np.zeros(len(c), bool)
    rate_after = float((after & ~f.v.ok).sum()) / int(after.sum()) if after.any() else None
    return failures_summary(int(attempted.sum()), [_Failed(c.statuses[c.status[i]], c.http_status.get(i),
                                                           c.error.get(i)) for i in rows], onset, rate_after)


def fidelity_section(f: Frame, limits: dict | None = None) -> dict:
    c = f.c
    lags = (c.times["actual_send_s"] - c.intended_send_s)[f.sent]
    return fidelity_from(lags, _rate(c.intended_send_s), _rate(c.times["actual_send_s"][f.sent]), _tokens(f),
                         peak_rate_rps(c.intended_send_s), _failures(f), limits)


def pools_section(f: Frame) -> dict:
    c = f.c
    codes = c.placement["pool"]
    names = sorted({c.names[k] for k in np.unique(codes).tolist() if k >= 0})
    masks = {p: codes == c.names.index(p) for p in names}
    f.tbt({f"pool:{p}": m for p, m in masks.items()})
    return {p: {"count": int(m.sum()), "ok": int((m & f.v.ok).sum()), **latency_section(f, m, f"pool:{p}")}
            for p, m in masks.items()}


def efficiency_section(f: Frame, run_meta: dict, *, slos: Sequence[SLO] = (),
                       measured_energy: dict | None = None) -> dict | None:
    hw = run_meta.get("hardware")
    if not hw:
        return None
    c, ok = f.c, f.v.ok
    pools_by_instance = {a["instance"]: a["pool"] for a in hw["allocations"]}
    distinct = set(pools_by_instance.values())
    default = next(iter(distinct)) if len(distinct) == 1 else "unknown"
    pool_names = sorted(distinct | {default})
    idx = {p: k for k, p in enumerate(pool_names)}
    of_code = np.array([idx[pools_by_instance.get(n, default)] for n in c.names] + [idx[default]], np.int64)
    pre = np.where(c.placement["prefill_instance"] >= 0, c.placement["prefill_instance"], c.placement["instance"])
    dec = np.where(c.placement["decode_instance"] >= 0, c.placement["decode_instance"], pre)
    p_pre, p_dec = of_code[pre], of_code[dec]            # code -1 -> the default pool (last entry)
    is_good = good(f, slos) if slos else np.zeros(len(c), bool)
    k = len(pool_names)
    count = lambda where, w=None: np.bincount(where, weights=w, minlength=k)  # noqa: E731
    both = ok & (p_pre != p_dec)
    n_ok = count(p_pre[ok]) + count(p_dec[both])
    n_good = count(p_pre[ok & is_good]) + count(p_dec[both & is_good])
    usage = {p: {"ok_requests": int(n_ok[j]), "good_requests": int(n_good[j]) if slos else None,
                 "input_tokens": int(count(p_pre[ok], f.v.n_in[ok])[j]),
                 "output_tokens": int(count(p_dec[ok], f.v.n_out[ok])[j])}
             for j, p in enumerate(pool_names) if n_ok[j]}
    total = {"ok_requests": int(ok.sum()), "good_requests": int(is_good.sum()) if slos else None,
             "input_tokens": int(f.v.n_in[ok].sum()), "output_tokens": int(f.v.n_out[ok].sum())}
    return efficiency_from(hw, window(f), usage, total, slos, measured_energy)


def cache_section(f: Frame, server_metrics: dict | None = None) -> dict | None:
    """cache.cache_section over columns: counts["cached_input_tokens"] (the simulator's cache), pools by pool,
    instances by the prefill instance (else the instance)."""
    c = f.c
    cached = c.counts.get("cached_input_tokens")
    cached = np.full(len(c), -1, np.int64) if cached is None else cached
    pre = np.where(c.placement["prefill_instance"] >= 0, c.placement["prefill_instance"], c.placement["instance"])
    groups = {}
    for key, codes in (("pools", c.placement["pool"]), ("instances", pre)):
        groups[key] = {c.names[k]: codes == k for k in np.unique(codes).tolist() if k >= 0}
    return cache_from(f.v.ok, f.v.n_in, cached, f.v.ttft, groups, server_metrics)
