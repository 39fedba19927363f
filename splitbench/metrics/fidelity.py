"""Replay fidelity: did the client send on schedule and the server return the planned token counts?

A "client-behind" verdict means latency numbers include client lag, not only server latency; "over-ceiling" means
the run offered more than the client's calibrated ceiling (`splitbench calibrate`) in some 1 s window.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from splitbench.schema.records import RequestRecord

DEFAULT_LIMITS = {"lag_p99_limit_s": 0.010, "min_rate_ratio": 0.95, "ceiling_rps": None}


def peak_rate_rps(times: Sequence[float], window_s: float = 1.0) -> float | None:
    """Most times in any window_s-long sliding window, per second; None without times."""
    a = np.sort(np.asarray(times, dtype=np.float64))
    if a.size == 0:
        return None
    return float((np.searchsorted(a, a + window_s, side="left") - np.arange(a.size)).max()) / window_s


def _rate(times: Sequence[float]) -> float | None:
    """(n - 1) / span; None with fewer than two times or a zero span."""
    if len(times) < 2:
        return None
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else None


def token_mismatches(records: Sequence[RequestRecord]) -> dict:
    """Ok records whose server-reported token counts differ from planned; unknown actuals = unverified."""
    out = {"input_mismatch": 0, "output_mismatch": 0, "input_unverified": 0, "output_unverified": 0,
           "examples": []}
    for r in records:
        if not r.ok:
            continue
        bad = False
        for side, actual, planned in (("input", r.actual_input_tokens, r.planned_input_tokens),
                                      ("output", r.actual_output_tokens, r.planned_output_tokens)):
            if actual is None:
                out[f"{side}_unverified"] += 1
            elif int(actual) != int(planned):
                out[f"{side}_mismatch"] += 1
                bad = True
        if bad and len(out["examples"]) < 5:
            out["examples"].append({"request_id": r.request_id,
                                    "planned": [r.planned_input_tokens, r.planned_output_tokens],
                                    "actual": [r.actual_input_tokens, r.actual_output_tokens]})
    return out


def fidelity_section(records: Sequence[RequestRecord], limits: dict | None = None) -> dict:
    """Schedule lag, achieved vs trace send rate, token mismatches, and the verdict with its reasons."""
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    sent = [r for r in records if r.actual_send_s is not None]
    lags = np.array([r.actual_send_s - r.intended_send_s for r in sent], dtype=np.float64)
    lag = ({"p50": float(np.percentile(lags, 50)), "p99": float(np.percentile(lags, 99)),
            "max": float(lags.max())} if lags.size else {"p50": None, "p99": None, "max": None})
    trace_rate = _rate([r.intended_send_s for r in records])
    achieved = _rate([r.actual_send_s for r in sent])
    ratio = achieved / trace_rate if achieved is not None and trace_rate else None
    tokens = token_mismatches(records)
    peak = peak_rate_rps([r.intended_send_s for r in records])
    ceiling = lim.get("ceiling_rps")

    reasons, flags = [], []
    if lag["p99"] is not None and lag["p99"] > lim["lag_p99_limit_s"]:
        reasons.append(f"send lag p99 {lag['p99'] * 1e3:.1f} ms > {lim['lag_p99_limit_s'] * 1e3:.1f} ms: "
                       "the client fell behind the schedule, so latencies include client lag, "
                       "not only server time")
    if ratio is not None and ratio < lim["min_rate_ratio"]:
        reasons.append(f"achieved send rate {achieved:.3f} rps is {ratio:.1%} of the trace rate "
                       f"{trace_rate:.3f} rps (< {lim['min_rate_ratio']:.0%}): the offered load was "
                       "lower than the trace")
    verdict = "client-behind" if reasons else "ok"
    if reasons:
        flags.append("client-behind")
    if ceiling and peak is not None and peak > ceiling:
        flags.append("over-ceiling")
        reasons.append(f"peak offered rate {peak:.0f} req/s (busiest 1 s) exceeds this client's calibrated ceiling "
                       f"{ceiling:.0f} req/s: past it the client no longer keeps TTFT and send times exact, "
                       "even where lag looks fine; use --workers or a lower rate")
        if verdict == "ok":
            verdict = "over-ceiling"
    if tokens["input_mismatch"] or tokens["output_mismatch"]:
        flags.append("token-mismatch")
        reasons.append(f"{tokens['input_mismatch']} input / {tokens['output_mismatch']} output token "
                       "counts differ from the plan")
    return {"lag_s": lag, "sent": len(sent), "trace_rate_rps": trace_rate, "achieved_rate_rps": achieved,
            "peak_offered_rps": peak, "ceiling_rps": ceiling,
            "rate_ratio": ratio, "tokens": tokens, "limits": lim, "verdict": verdict, "flags": flags,
            "reasons": reasons}
