"""Replay fidelity: did the server serve the requests, the client send on schedule, the server return the planned
token counts?

"server-failures" means the server failed more than max_error_rate of the attempted requests (latencies describe
only what it served); "client-behind" means latency numbers include client lag, not only server latency;
"over-ceiling" means the run offered more than the client's calibrated ceiling (`splitbench calibrate`) in some 1 s
window. The verdict is the first of these that holds; flags list all that hold.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

import numpy as np

from splitbench.schema.records import CANCELLED, HTTP_ERROR, NOT_SENT, RequestRecord

DEFAULT_LIMITS = {"lag_p99_limit_s": 0.010, "min_rate_ratio": 0.95, "ceiling_rps": None, "max_error_rate": 0.05}
VERDICTS = ("server-failures", "client-behind", "over-ceiling")   # in precedence order; else "ok"
_EXCEPTION = re.compile(r"\b([A-Z][A-Za-z]*(?:Error|Exception|Timeout|Reset|Refused))\b")


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


def error_kind(r: RequestRecord) -> str:
    """What kind of failure a record is: "http_error 503", "timeout", "error (ConnectionRefusedError)", ..."""
    if r.status == HTTP_ERROR:
        return f"http_error {r.http_status}" if r.http_status else HTTP_ERROR
    m = _EXCEPTION.search(r.error or "")
    return f"{r.status} ({m.group(1)})" if m else r.status


def server_failures(records: Sequence[RequestRecord]) -> dict:
    """Attempted requests that failed on the server's side (every failure but cancelled-at-shutdown), by kind; the
    onset (intended send time of the first failed request) and the failed share of attempted requests from it on."""
    attempted = [r for r in records if r.status != NOT_SENT]
    failed = [r for r in attempted if not r.ok and r.status != CANCELLED]
    onset = min((r.intended_send_s for r in failed), default=None)
    after = [r for r in attempted if onset is not None and r.intended_send_s >= onset and r.status != CANCELLED]
    return failures_summary(len(attempted), failed, onset,
                            (sum(1 for r in after if not r.ok) / len(after)) if after else None)


def failures_summary(attempted: int, failed: Sequence, onset: float | None, rate_after: float | None) -> dict:
    """server_failures' dict from its counts and the failed records (anything with status, http_status, error)."""
    kinds = Counter(error_kind(r) for r in failed)
    dominant = kinds.most_common(1)[0][0] if kinds else None
    example = next((r.error for r in failed if error_kind(r) == dominant and r.error), None)
    return {"attempted": attempted, "failed": len(failed),
            "error_rate": len(failed) / attempted if attempted else None,
            "by_kind": dict(kinds.most_common()), "dominant_kind": dominant,
            "example": example[:200] if example else None, "onset_s": onset, "error_rate_after_onset": rate_after}


def _server_reason(e: dict, limit: float) -> str:
    return (f"{e['failed']} of {e['attempted']} attempted requests failed ({e['error_rate']:.1%} > {limit:.0%}), "
            f"mostly {e['dominant_kind']} ({e['by_kind'][e['dominant_kind']]}); from the first failure at "
            f"{e['onset_s']:.2f} s on, {e['error_rate_after_onset']:.0%} failed: the server failed, so latencies "
            "describe only the requests it served" + (f" (e.g. {e['example'][:80]!r})" if e["example"] else ""))


def _client_reasons(lag: dict, achieved: float | None, trace_rate: float | None, ratio: float | None,
                    lim: dict) -> list[str]:
    """Why the client fell behind the schedule (send lag, achieved rate); [] when it kept up."""
    out = []
    if lag["p99"] is not None and lag["p99"] > lim["lag_p99_limit_s"]:
        out.append(f"send lag p99 {lag['p99'] * 1e3:.1f} ms > {lim['lag_p99_limit_s'] * 1e3:.1f} ms: "
                   "the client fell behind the schedule, so latencies include client lag, not only server time")
    if ratio is not None and ratio < lim["min_rate_ratio"]:
        out.append(f"achieved send rate {achieved:.3f} rps is {ratio:.1%} of the trace rate {trace_rate:.3f} rps "
                   f"(< {lim['min_rate_ratio']:.0%}): the offered load was lower than the trace")
    return out


def fidelity_section(records: Sequence[RequestRecord], limits: dict | None = None) -> dict:
    """Schedule lag, achieved vs trace send rate, token mismatches, and the verdict with its reasons."""
    sent = [r for r in records if r.actual_send_s is not None]
    lags = np.array([r.actual_send_s - r.intended_send_s for r in sent], dtype=np.float64)
    intended = [r.intended_send_s for r in records]
    return fidelity_from(lags, _rate(intended), _rate([r.actual_send_s for r in sent]), token_mismatches(records),
                         peak_rate_rps(intended), server_failures(records), limits)


def fidelity_from(lags: np.ndarray, trace_rate: float | None, achieved: float | None, tokens: dict,
                  peak: float | None, errors: dict, limits: dict | None = None) -> dict:
    """fidelity_section's dict from its measured parts (send lags of the sent records in order, rates, ...)."""
    lim = {**DEFAULT_LIMITS, **(limits or {})}
    lag = ({"p50": float(np.percentile(lags, 50)), "p99": float(np.percentile(lags, 99)),
            "max": float(lags.max())} if lags.size else {"p50": None, "p99": None, "max": None})
    ratio = achieved / trace_rate if achieved is not None and trace_rate else None
    ceiling = lim.get("ceiling_rps")
    reasons, flags = [], []
    if errors["error_rate"] is not None and errors["error_rate"] > lim["max_error_rate"]:
        flags.append("server-failures")
        reasons.append(_server_reason(errors, lim["max_error_rate"]))
    behind = _client_reasons(lag, achieved, trace_rate, ratio, lim)
    if behind:
        flags.append("client-behind")
        reasons += behind
    if ceiling and peak is not None and peak > ceiling:
        flags.append("over-ceiling")
        reasons.append(f"peak offered rate {peak:.0f} req/s (busiest 1 s) exceeds this client's calibrated ceiling "
                       f"{ceiling:.0f} req/s: past it the client no longer keeps TTFT and send times exact, "
                       "even where lag looks fine; use --workers or a lower rate")
    if tokens["input_mismatch"] or tokens["output_mismatch"]:
        flags.append("token-mismatch")
        reasons.append(f"{tokens['input_mismatch']} input / {tokens['output_mismatch']} output token "
                       "counts differ from the plan")
    verdict = next((v for v in VERDICTS if v in flags), "ok")
    return {"lag_s": lag, "sent": int(lags.size), "errors": errors, "trace_rate_rps": trace_rate,
            "achieved_rate_rps": achieved, "peak_offered_rps": peak, "ceiling_rps": ceiling, "rate_ratio": ratio,
            "tokens": tokens, "limits": lim, "verdict": verdict, "flags": flags, "reasons": reasons}
