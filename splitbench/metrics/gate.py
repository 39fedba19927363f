"""Regression gates (pure): preconditions (fidelity, errors, same workload) and a bootstrap confidence interval of
each metric's candidate-vs-baseline difference; a regression only when the interval excludes the tolerance.
Rules and their TOML: gate_rules.py; rendering (console, Markdown, JUnit XML, JSON): render/gate.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from splitbench.errors import InputError
from splitbench.metrics.gate_rules import EFF, RATES, Rule, Rules
from splitbench.metrics.latency import PER_REQUEST, input_tokens, output_tokens, tbt_gaps_s, window_s
from splitbench.metrics.slo import request_is_good
from splitbench.schema.records import RequestRecord

PASS, REGRESSION, INVALID = "pass", "regression", "invalid"
EXIT = {PASS: 0, REGRESSION: 1, INVALID: 2}

# ----------------------------------------------------------------------------- per-request samples

@dataclass
class Samples:
    """Per-request arrays of one run (index = record), the run's window and per-pool denominators."""
    n: int
    ok: np.ndarray
    attempted: np.ndarray
    good: np.ndarray
    values: dict[str, np.ndarray]          # ttft/mean_tbt/e2e/norm (nan when undefined)
    gaps: list[np.ndarray]                 # TBT gaps per request
    tokens: dict[str, np.ndarray]          # "in", "out" and "<pool>.in" / "<pool>.out"
    window_s: float
    denominators: dict[str, float]         # "<pool>.cost_usd", "<pool>.energy_j"
    keys: np.ndarray | None = None         # trace_index of each record (pairs the two sides of a comparison)


def samples(records: Sequence[RequestRecord], summary: dict, hardware: dict | None = None, slos=()) -> Samples:
    """Arrays for the bootstrap; `hardware` = run.json "hardware" (which pool each instance is)."""
    n = len(records)
    ok = np.array([r.ok for r in records], dtype=bool)
    attempted = np.array([r.actual_send_s is not None for r in records], dtype=bool)
    good = np.array([bool(slos) and request_is_good(r, slos) for r in records], dtype=bool)
    vals = {m: np.array([(PER_REQUEST[m](r) if r.ok else None) or np.nan for r in records], dtype=np.float64)
            for m in ("ttft", "mean_tbt", "e2e", "norm")}
    gaps = [np.asarray(tbt_gaps_s(r), dtype=np.float64) if r.ok else np.empty(0) for r in records]
    toks = {"in": np.array([input_tokens(r) if r.ok else 0 for r in records], dtype=np.float64),
            "out": np.array([output_tokens(r) if r.ok else 0 for r in records], dtype=np.float64)}
    eff = summary.get("efficiency") or {}
    pools_by_instance = {a["instance"]: a["pool"] for a in (hardware or {}).get("allocations", [])}
    only = next(iter(set(pools_by_instance.values()))) if len(set(pools_by_instance.values())) == 1 else None
    for pool in eff.get("pools", {}):
        if pool == "total":
            continue
        pin, pout = np.zeros(n), np.zeros(n)
        for k, r in enumerate(records):
            if not r.ok:
                continue
            pre, dec = r.prefill_instance or r.instance, r.decode_instance or r.prefill_instance or r.instance
            p_pre = pools_by_instance.get(pre, only) if pre else only
            p_dec = pools_by_instance.get(dec, only) if dec else only
            pin[k] = input_tokens(r) if p_pre == pool else 0
            pout[k] = output_tokens(r) if p_dec == pool else 0
        toks[f"{pool}.in"], toks[f"{pool}.out"] = pin, pout
    start, end = window_s(records)
    den = {f"{p}.{k}": d.get(k) for p, d in eff.get("pools", {}).items() for k in ("cost_usd", "energy_j")}
    return Samples(n, ok, attempted, good, vals, gaps, toks, (end - start) if start is not None else 0.0, den,
                   np.array([r.trace_index for r in records], dtype=np.int64))


def _stat(x: np.ndarray, stat: str, axis: int = -1) -> np.ndarray:
    if stat == "mean":
        return np.nanmean(x, axis=axis)
    if stat == "max":
        return np.nanmax(x, axis=axis)
    return np.nanpercentile(x, float(stat[1:]), axis=axis)


def metric_value(s: Samples, metric: str, idx: np.ndarray | None = None) -> np.ndarray:
    """The metric over the requests `idx` (rows of a (B, n) resample matrix; None = every request once)."""
    idx = np.arange(s.n)[None, :] if idx is None else idx
    pool, dot, key = metric.partition(".")
    if dot:
        side, den = EFF[key]
        d = s.denominators.get(f"{pool}.{den}")
        if not d:
            return np.full(idx.shape[0], np.nan)
        if side == "good":
            num = s.good[idx].sum(axis=1)
        elif side == "tok":
            num = (s.tokens.get(f"{pool}.in", s.tokens["in"] if pool == "total" else None)[idx].sum(axis=1)
                   + s.tokens.get(f"{pool}.out", s.tokens["out"] if pool == "total" else None)[idx].sum(axis=1))
        else:
            arr = s.tokens.get(f"{pool}.{side}") if pool != "total" else s.tokens[side]
            num = arr[idx].sum(axis=1) if arr is not None else np.zeros(idx.shape[0])
        return num / d
    if metric in RATES:
        w = s.window_s or np.nan
        kind = RATES[metric]
        arr = s.ok if kind == "ok" else s.good if kind == "good" else s.tokens[kind]
        return arr[idx].sum(axis=1) / w
    if metric == "error_rate":
        att = s.attempted[idx].sum(axis=1)
        return np.where(att > 0, (s.attempted & ~s.ok)[idx].sum(axis=1) / np.maximum(att, 1), np.nan)
    base, _, stat = metric.rpartition("_")
    if base == "tbt":
        out = []
        for row in idx:   # requests resampled as clusters: all gaps of a drawn request
            g = [s.gaps[i] for i in row if s.gaps[i].size]
            out.append(_stat(np.concatenate(g), stat) if g else np.nan)
        return np.asarray(out, dtype=np.float64)
    x = s.values[base][idx]
    with np.errstate(all="ignore"):
        return _stat(x, stat, axis=1)


def _boot(s: Samples, metric: str, B: int, rng: np.random.Generator, pair: Samples | None = None,
          order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """B bootstrap values of the metric on `s`; with `pair` (same requests, `order` maps s's rows to pair's rows)
    the SAME resampled requests are used on both sides (a paired bootstrap)."""
    if s.n == 0:
        return np.full(B, np.nan), None
    if metric.startswith("tbt_"):
        B = min(B, 200)   # cluster bootstrap of pooled gaps is costly; 200 resamples
    a, b = [], []
    for k in range(0, B, 100):
        idx = rng.integers(0, s.n, size=(min(100, B - k), s.n))
        a.append(metric_value(s, metric, idx))
        if pair is not None:
            b.append(metric_value(pair, metric, order[idx]))
    return np.concatenate(a), (np.concatenate(b) if pair is not None else None)


def pairing(base: Samples, cand: Samples) -> np.ndarray | None:
    """Row of cand for each row of base when both hold the same requests (trace indices), else None."""
    if base.n != cand.n or base.keys is None or cand.keys is None:
        return None
    pos = {k: i for i, k in enumerate(cand.keys.tolist())}
    if len(pos) != cand.n:
        return None
    try:
        return np.array([pos[k] for k in base.keys.tolist()], dtype=np.int64)
    except KeyError:
        return None


# ----------------------------------------------------------------------------- preconditions and decisions

def lag_limit_ms(pre: dict, limits: dict) -> tuple[float, str]:
    """The send-lag p99 limit of one run: max_lag_p99_ms, raised to max_lag_p99_host_multiple x the lag p99 this
    host's client showed in its calibration (median of its points; the run's fidelity limit host_lag_p99_s)."""
    limit, k = float(pre["max_lag_p99_ms"]), pre.get("max_lag_p99_host_multiple")
    if not k:
        return limit, ""
    host = limits.get("host_lag_p99_s")
    if host is None:
        return limit, "no client calibration recorded for this host: the absolute limit applies"
    rel = k * host * 1e3
    return max(limit, rel), f"{k:g} x this host's calibrated lag p99 {host * 1e3:.2f} ms = {rel:.1f} ms"


def preconditions(runs: list[dict], pre: dict) -> list[dict]:
    """runs: [{"label", "side", "summary"}]; each check {"run", "check", "value", "limit", "ok", "why"}."""
    out = []
    for r in runs:
        s, lab = r["summary"], f"{r['side']}:{r['label']}"
        f = s["fidelity"]
        lag = f["lag_s"]["p99"]
        limit, why = lag_limit_ms(pre, f.get("limits") or {})
        out.append({"run": lab, "check": "send lag p99 (ms)", "value": None if lag is None else lag * 1e3,
                    "limit": limit, "ok": lag is None or lag * 1e3 <= limit, "why": why})
        ratio = (f["achieved_rate_rps"] / f["trace_rate_rps"]) if f["achieved_rate_rps"] and f["trace_rate_rps"] \
            else None
        out.append({"run": lab, "check": "achieved / trace rate", "value": ratio, "limit": pre["min_rate_ratio"],
                    "ok": ratio is None or ratio >= pre["min_rate_ratio"]})
        mism = f["tokens"]["input_mismatch"] + f["tokens"]["output_mismatch"]
        out.append({"run": lab, "check": "token mismatches", "value": mism, "limit": pre["max_token_mismatches"],
                    "ok": mism <= pre["max_token_mismatches"]})
        err = s["counts"]["error_rate"]
        out.append({"run": lab, "check": "error rate", "value": err, "limit": pre["max_error_rate"],
                    "ok": err is not None and err <= pre["max_error_rate"]})
    if pre.get("same_workload", True):
        shas = {r["label"]: r["summary"]["run"].get("workload_sha256") for r in runs}
        distinct = set(shas.values())
        out.append({"run": "all", "check": "same workload (sha256)", "value": len(distinct), "limit": 1,
                    "ok": len(distinct) == 1 and None not in distinct,
                    "why": "" if len(distinct) == 1 else "; ".join(f"{k}: {str(v)[:12]}" for k, v in shas.items())})
    return out


def decide(rule: Rule, base: list[Samples], cand: list[Samples], *, confidence: float, B: int,
           rng: np.random.Generator) -> dict:
    """Point values, the bootstrap CI of the difference (relative or absolute), and the decision. One run per side:
    requests are resampled within each run; several runs per side: the runs' values are resampled."""
    def point(side):
        return float(np.nanmean([metric_value(s, rule.metric)[0] for s in side]))
    b, c = point(base), point(cand)
    if len(base) > 1 or len(cand) > 1:
        bv = np.array([metric_value(s, rule.metric)[0] for s in base])
        cv = np.array([metric_value(s, rule.metric)[0] for s in cand])
        bd = np.nanmean(bv[rng.integers(0, len(bv), size=(B, len(bv)))], axis=1)
        cd = np.nanmean(cv[rng.integers(0, len(cv), size=(B, len(cv)))], axis=1)
        method = f"bootstrap over runs ({len(base)} baseline, {len(cand)} candidate)"
    else:
        order = pairing(base[0], cand[0])
        if order is not None:   # same requests on both sides: resample them together
            bd, cd = _boot(base[0], rule.metric, B, rng, pair=cand[0], order=order)
            method = f"paired bootstrap over requests ({len(bd)} resamples)"
        else:
            bd, cd = _boot(base[0], rule.metric, B, rng)[0], _boot(cand[0], rule.metric, B, rng)[0]
            m = min(len(bd), len(cd))
            bd, cd = bd[:m], cd[:m]
            method = f"bootstrap over requests, unpaired ({len(bd)} resamples)"
    with np.errstate(all="ignore"):
        diffs = (cd - bd) / np.abs(bd) if rule.relative else cd - bd
        diff = (c - b) / abs(b) if rule.relative and b else (c - b if not rule.relative else math.nan)
    diffs = diffs[np.isfinite(diffs)]
    alpha = 1 - confidence
    lo, hi = (np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)]) if diffs.size >= 20
              else (math.nan, math.nan))
    sign = 1.0 if rule.better == "lower" else -1.0      # worse = positive difference for "lower is better"
    worse_lo, worse_hi = sorted((sign * lo, sign * hi))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        decision = "no-data"
    elif worse_lo > rule.tolerance:
        decision = REGRESSION
    elif worse_hi < -rule.tolerance:
        decision = "improvement"
    else:
        decision = PASS
    return {"name": rule.name, "metric": rule.metric, "better": rule.better, "tolerance": rule.tolerance,
            "relative": rule.relative, "baseline": b, "candidate": c, "diff": diff, "ci_low": float(lo),
            "ci_high": float(hi), "confidence": confidence, "decision": decision, "method": method}


def evaluate(rules: Rules, base_runs: list[dict], cand_runs: list[dict]) -> dict:
    """runs: [{"label", "records", "summary", "hardware"}]. Verdict: invalid (a precondition failed or no data),
    regression (some rule's interval lies beyond its tolerance on the worse side), else pass."""
    if not base_runs or not cand_runs:
        raise InputError("gate needs at least one baseline and one candidate run")
    runs = [{**r, "side": "baseline"} for r in base_runs] + [{**r, "side": "candidate"} for r in cand_runs]
    pre = preconditions(runs, rules.pre)
    rng = np.random.default_rng(rules.seed)
    bs = [samples(r["records"], r["summary"], r.get("hardware"), rules.slos) for r in base_runs]
    cs = [samples(r["records"], r["summary"], r.get("hardware"), rules.slos) for r in cand_runs]
    results = [decide(rule, bs, cs, confidence=rules.confidence, B=rules.bootstrap, rng=rng) for rule in rules.rules]
    invalid = [p for p in pre if not p["ok"]] + [r for r in results if r["decision"] == "no-data"]
    verdict = INVALID if invalid else REGRESSION if any(r["decision"] == REGRESSION for r in results) else PASS
    return {"kind": "splitbench.gate", "version": 1, "verdict": verdict, "exit_code": EXIT[verdict],
            "rules_file": rules.source, "confidence": rules.confidence, "bootstrap": rules.bootstrap,
            "baseline": [r["label"] for r in base_runs], "candidate": [r["label"] for r in cand_runs],
            "preconditions": pre, "rules": results}
