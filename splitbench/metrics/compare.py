"""Side-by-side comparison of runs (pure): rows of latency, SLO, throughput, cost/energy efficiency and iso-cost /
iso-power views with ratios against the first run. Rendering of those rows: render/compare.py and render/html.py.
"""
from __future__ import annotations

import time

COMPARE_KIND = "splitbench.compare"
COMPARE_VERSION = 1
SECTIONS = (("latency", "Latency"), ("slo", "SLO verdicts"), ("throughput", "Throughput"),
            ("efficiency", "Efficiency"), ("iso", "Iso-cost and iso-power views"), ("cache", "Prefix cache"),
            ("fidelity", "Replay fidelity"))

LATENCY = (("ttft_s", "TTFT"), ("tbt_s", "TBT"), ("mean_tbt_s", "mean TBT"), ("e2e_s", "E2E"))
LAT_STATS = ("p50", "p90", "p99")
THROUGHPUT = (("requests_per_s", "requests/s", "req/s"), ("input_tokens_per_s", "input tokens/s", "tok/s"),
              ("output_tokens_per_s", "output tokens/s", "tok/s"))
# (key in efficiency pool dict, label, unit, better, energy-based?)
EFFICIENCY = (("usd_per_hour", "cost rate", "$/h", None, False),
              ("cost_usd", "cost of window", "$", None, False),
              ("provisioned_power_w", "provisioned power", "W", None, False),
              ("energy_j", "energy", "J", None, True),
              ("avg_power_w", "average power", "W", None, True),
              ("input_tokens_per_usd", "input tokens per $", "tok/$", "higher", False),
              ("output_tokens_per_usd", "output tokens per $", "tok/$", "higher", False),
              ("usd_per_million_tokens", "$ per million tokens", "$/Mtok", "lower", False),
              ("good_requests_per_usd", "goodput per $", "req/$", "higher", False),
              ("tokens_per_j", "tokens per joule", "tok/J", "higher", True),
              ("output_tokens_per_s_per_kw", "output tok/s per kW (avg)", "tok/s/kW", "higher", True))
POOL_EFFICIENCY = (("usd_per_hour", "cost rate", "$/h", None, False),
                   ("cost_usd", "cost of window", "$", None, False),
                   ("energy_j", "energy", "J", None, True),
                   ("input_tokens_per_usd", "input tokens per $", "tok/$", "higher", False),
                   ("output_tokens_per_usd", "output tokens per $", "tok/$", "higher", False),
                   ("tokens_per_j", "tokens per joule", "tok/J", "higher", True))


def _ratio(v, ref):
    if isinstance(v, bool) or isinstance(ref, bool) or not isinstance(v, (int, float)) \
            or not isinstance(ref, (int, float)) or ref == 0:
        return None
    return v / ref


def _row(section: str, metric: str, label: str, unit: str, better: str | None, values: list,
         estimated: list[bool] | None = None) -> dict:
    ref = values[0] if values else None
    return {"section": section, "metric": metric, "label": label, "unit": unit, "better": better,
            "values": values, "ratios": [_ratio(v, ref) for v in values],
            "estimated": estimated or [False] * len(values)}


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def iso_views(summaries: list[dict]) -> list[dict]:
    """Output tokens/s scaled to the first run's cost rate (iso-cost) and provisioned power (iso-power), as the
    Splitwise paper compares designs: iso_cost = tok/s x ($/h of run 1 / $/h of run i), likewise with watts."""
    effs = [s.get("efficiency") for s in summaries]
    tput = [_get(s, "throughput", "output_tokens_per_s") for s in summaries]
    ref = effs[0] if effs else None  # iso views scale to the FIRST run's cost and power
    rows = []
    for key, label, flag in (("usd_per_hour", "iso-cost output tok/s", "cost_estimated"),
                             ("provisioned_power_w", "iso-power output tok/s (provisioned)", "cost_estimated"),
                             ("avg_power_w", "iso-power output tok/s (average power)", "estimated")):
        base = _get(ref, "pools", "total", key) if ref else None
        vals, est = [], []
        for t, e in zip(tput, effs):
            own = _get(e, "pools", "total", key)
            vals.append(t * base / own if t is not None and base and own else None)
            est.append(bool(e and (e.get(flag) or (key == "avg_power_w" and e.get("estimated")))))
        rows.append(_row("iso", f"iso_{key}", label, "tok/s", "higher", vals, est))
    return rows


def cache_rows(summaries: list[dict]) -> list[dict]:
    """Cached prompt token fraction, the TTFT fit and the servers' hit rate (sum of hits / sum of queries over
    instances), when every run has a cache section with cached counts (else no rows: nothing to compare)."""
    caches = [s.get("cache") or {} for s in summaries]
    if not caches or any(c.get("cached_fraction") is None for c in caches):
        return []
    fits = [_get(c, "ttft_vs_uncached", "fit") or {} for c in caches]
    rows = [_row("cache", "cached_fraction", "cached prompt token fraction", "", "higher",
                 [c["cached_fraction"] for c in caches]),
            _row("cache", "cached_requests", "requests with cached counts", "", None, [c["requests"] for c in caches]),
            _row("cache", "ttft_intercept_s", "TTFT fit at 0 uncached tokens", "s", "lower",
                 [f.get("intercept_s") for f in fits]),
            _row("cache", "ttft_per_1k_uncached_s", "TTFT fit per 1k uncached tokens", "s", "lower",
                 [None if f.get("per_token_s") is None else f["per_token_s"] * 1e3 for f in fits])]
    rates = []
    for c in caches:
        q = sum(d["queries_tokens"] or 0 for d in (c.get("server") or {}).values())
        h = sum(d["hits_tokens"] or 0 for d in (c.get("server") or {}).values())
        rates.append(h / q if q else None)
    if any(r is not None for r in rates):
        rows.append(_row("cache", "server_hit_rate", "server prefix-cache hit rate", "", "higher", rates))
    return rows


def comparison_rows(summaries: list[dict]) -> list[dict]:
    """Every comparison row; values are per run in order, ratios against the first run."""
    rows: list[dict] = []
    for key, label in LATENCY:
        for st in LAT_STATS:
            rows.append(_row("latency", f"{key[:-2]}_{st}_s", f"{label} {st}", "s", "lower",
                             [_get(s, "latency", key, st) for s in summaries]))
    names: list[str] = []
    for s in summaries:
        names += [i["name"] for i in _get(s, "slos", "items") or [] if i["name"] not in names]
    for n in names:
        items = [{i["name"]: i for i in _get(s, "slos", "items") or []}.get(n) for s in summaries]
        rows.append(_row("slo", f"slo_{n}", f"SLO {n}", "s", "lower", [i and i["value_s"] for i in items]))
        rows.append(_row("slo", f"slo_{n}_met", f"SLO {n} met", "", None,
                         [None if i is None else ("met" if i["met"] else "MISSED") for i in items]))
    if names:
        rows.append(_row("slo", "goodput_rps", "goodput", "req/s", "higher",
                         [_get(s, "slos", "goodput_rps") for s in summaries]))
        rows.append(_row("slo", "attainment", "SLO attainment", "", "higher",
                         [_get(s, "slos", "attainment") for s in summaries]))
    if any(s.get("splitwise") for s in summaries):
        rows.append(_row("slo", "splitwise_verdict", "Splitwise SLOs", "", None,
                         [None if not s.get("splitwise") else ("PASS" if s["splitwise"]["passed"] else "FAIL")
                          for s in summaries]))
    for key, label, unit in THROUGHPUT:
        rows.append(_row("throughput", key, label, unit, "higher", [_get(s, "throughput", key) for s in summaries]))
    effs = [s.get("efficiency") for s in summaries]
    if any(effs):
        for key, label, unit, better, energy in EFFICIENCY:
            vals = [_get(e, "pools", "total", key) for e in effs]
            if all(v is None for v in vals):   # e.g. goodput per $ without SLOs
                continue
            rows.append(_row("efficiency", f"total_{key}", f"total {label}", unit, better, vals,
                             [bool(e and (e["estimated"] if energy else e.get("cost_estimated"))) for e in effs]))
        pools = []
        for e in effs:
            pools += [p for p in (e or {}).get("pools", {}) if p not in ("total", "unallocated") and p not in pools]
        for p in pools:
            for key, label, unit, better, energy in POOL_EFFICIENCY:
                vals = [_get(e, "pools", p, key) for e in effs]
                if all(not v for v in vals):   # nothing to compare (a prompt pool makes no output tokens)
                    continue
                rows.append(_row("efficiency", f"{p}_{key}", f"{p} {label}", unit, better, vals,
                                 [bool(e and (e["estimated"] if energy else e.get("cost_estimated"))) for e in effs]))
        rows += iso_views(summaries)
    rows += cache_rows(summaries)
    rows.append(_row("fidelity", "fidelity_verdict", "fidelity verdict", "", None,
                     [_get(s, "fidelity", "verdict") for s in summaries]))
    rows.append(_row("fidelity", "lag_p99_s", "send lag p99", "s", "lower",
                     [_get(s, "fidelity", "lag_s", "p99") for s in summaries]))
    return rows


def build_comparison(runs: list[dict]) -> dict:
    """runs: [{"label", "run_dir", "summary", "series"?}] (first = reference) -> the comparison dict."""
    summaries = [r["summary"] for r in runs]
    notes = []
    shas = {_get(s, "run", "workload_sha256") for s in summaries}
    if len(shas) > 1:
        notes.append("the runs replayed different workloads (workload sha256 differs): compare with care")
    for r in runs:
        e = r["summary"].get("efficiency")
        if e is None:
            notes.append(f"{r['label']}: no hardware information, so no cost or energy figures "
                         "(give --machine/--machines for a remote URL)")
        elif e["estimated"]:
            notes.append(f"{r['label']}: energy ESTIMATED from provisioned power (no power measurement)")
        if e and e.get("cost_estimated"):
            notes.append(f"{r['label']}: cost uses catalog figures marked as estimates ("
                         + ", ".join(n for n, t in e.get("machine_types", {}).items() if t.get("estimated")) + ")")
    return {"kind": COMPARE_KIND, "version": COMPARE_VERSION, "created_unix_s": time.time(),
            "runs": [{"label": r["label"], "run_dir": str(r.get("run_dir", "")),
                      "simulated": bool(_get(r["summary"], "run", "simulated")),
                      "backend": _get(r["summary"], "run", "backend"), "summary": r["summary"],
                      "series": r.get("series")} for r in runs],
            "rows": comparison_rows(summaries), "notes": notes}
