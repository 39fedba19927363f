"""Workload transforms (time window, rate scale, max requests, context clipping; in that order) and the
statistics behind `splitbench traces show` (its plot: render/plots.py). Pure functions: each returns a new Workload.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np

from splitbench.errors import InputError
from splitbench.workload.types import Workload


def check_transform_args(*, start_s: float = 0.0, duration_s: float | None = None, rate_scale: float = 1.0,
                         max_requests: int | None = None, max_context_tokens: int | None = None) -> None:
    """Reject impossible transform arguments up front (InputError naming the flag)."""
    if not (math.isfinite(start_s) and start_s >= 0):
        raise InputError(f"--start must be >= 0 seconds, got {start_s}")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise InputError(f"--duration must be > 0 seconds, got {duration_s}")
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise InputError(f"--rate-scale must be > 0, got {rate_scale}")
    if max_requests is not None and max_requests < 1:
        raise InputError(f"--max-requests must be >= 1, got {max_requests}")
    if max_context_tokens is not None and max_context_tokens < 2:
        raise InputError(f"--max-context-tokens must be >= 2, got {max_context_tokens}")


def _take(w: Workload, sel) -> Workload:
    """The requests at `sel` (a slice), their per-request session and prefix-hash fields with them."""
    return replace(w, arrival_s=w.arrival_s[sel], input_tokens=w.input_tokens[sel],
                   output_tokens=w.output_tokens[sel], trace_index=w.trace_index[sel],
                   source=dict(w.source), transforms=dict(w.transforms),
                   prefix_hashes=w.prefix_hashes[sel] if w.prefix_hashes is not None else None,
                   session_id=w.session_id[sel] if w.session_id is not None else None,
                   turn=w.turn[sel] if w.turn is not None else None)


def window(w: Workload, start_s: float = 0.0, duration_s: float | None = None) -> Workload:
    """Keep arrivals in [start_s, start_s + duration_s) of the original timeline (0 = the trace's first row)."""
    end_s = start_s + duration_s if duration_s is not None else math.inf
    a, b = np.searchsorted(w.arrival_s, [start_s, end_s], side="left")
    out = _take(w, slice(int(a), int(b)))
    out.transforms["window"] = {"start_s": start_s, "duration_s": duration_s}
    if len(out) == 0:
        span = w.source.get("trace_span_s")
        tail = f" (the trace spans {span:.1f} s)" if span is not None else ""
        raise InputError(f"{w.name}: no requests in the window start_s={start_s} duration_s={duration_s}{tail}")
    return out


def scale_rate(w: Workload, rate_scale: float) -> Workload:
    """Multiply the arrival rate: every inter-arrival gap is divided by rate_scale (burst shape kept)."""
    out = _take(w, slice(None))
    if len(w):
        out.arrival_s = w.arrival_s[0] + (w.arrival_s - w.arrival_s[0]) / rate_scale
    out.transforms["rate_scale"] = rate_scale
    return out


def limit(w: Workload, max_requests: int) -> Workload:
    """Keep the first max_requests requests."""
    out = _take(w, slice(0, max_requests))
    out.transforms["max_requests"] = max_requests
    return out


def clip_context(w: Workload, max_context_tokens: int) -> Workload:
    """Fit input+output into a context window: output is capped at max_context-1 (it alone must leave room
    for one input token), then input is cut to max_context - output."""
    out = _take(w, slice(None))
    new_out = np.minimum(w.output_tokens, max_context_tokens - 1)
    new_in = np.minimum(w.input_tokens, max_context_tokens - new_out)
    changed = (new_out != w.output_tokens) | (new_in != w.input_tokens)
    out.input_tokens, out.output_tokens = new_in, new_out
    out.transforms["clip"] = {
        "max_context_tokens": max_context_tokens,
        "clipped_requests": int(changed.sum()),
        "output_clipped_requests": int((new_out != w.output_tokens).sum()),
        "input_tokens_removed": int((w.input_tokens - new_in).sum()),
        "output_tokens_removed": int((w.output_tokens - new_out).sum()),
        "first_clipped_trace_index": [int(i) for i in w.trace_index[changed][:10]],
    }
    return out


def rebase(w: Workload) -> Workload:
    """Shift arrivals so the first one is at 0."""
    out = _take(w, slice(None))
    if len(w):
        out.arrival_s = w.arrival_s - w.arrival_s[0]
    return out


def apply_transforms(w: Workload, *, start_s: float = 0.0, duration_s: float | None = None,
                     rate_scale: float = 1.0, max_requests: int | None = None,
                     max_context_tokens: int | None = None) -> Workload:
    """window -> rate_scale -> max_requests -> clip, then rebase to 0; each applied one is recorded."""
    check_transform_args(start_s=start_s, duration_s=duration_s, rate_scale=rate_scale,
                         max_requests=max_requests, max_context_tokens=max_context_tokens)
    if start_s or duration_s is not None:
        w = window(w, start_s, duration_s)
    elif len(w) == 0:
        raise InputError(f"{w.name}: no requests")
    if rate_scale != 1.0:
        w = scale_rate(w, rate_scale)
    if max_requests is not None:
        w = limit(w, max_requests)
    if max_context_tokens is not None:
        w = clip_context(w, max_context_tokens)
    return rebase(w)


def workload_digest(w: Workload) -> str:
    """sha256 over (arrival in whole microseconds, input, output) rows: equal digest <=> same requests."""
    h = hashlib.sha256()
    for a in (np.round(w.arrival_s * 1e6).astype("<i8"), w.input_tokens.astype("<i8"),
              w.output_tokens.astype("<i8")):
        h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- statistics

def _dist(x: np.ndarray) -> dict:
    p50, p90, p99 = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "min": int(x.min()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": int(x.max())}


def arrivals_per_s(w: Workload) -> np.ndarray:
    """Requests arriving in each whole second after the first arrival (bin k = [k, k+1) s); [0] when empty."""
    if len(w) == 0:
        return np.zeros(1, dtype=np.int64)
    return np.bincount(np.floor(w.arrival_s - w.arrival_s[0]).astype(np.int64))


def workload_stats(w: Workload) -> dict:
    """Rows, span, mean rate, token distributions, inter-arrival CV, busiest one-second bin (from arrival 0)."""
    n = len(w)
    if n == 0:
        return {"rows": 0}
    t = w.arrival_s - w.arrival_s[0]
    span = float(t[-1])
    gaps = np.diff(t)
    cv = float(gaps.std() / gaps.mean()) if n > 2 and gaps.mean() > 0 else None
    per_s = arrivals_per_s(w)
    k = int(per_s.argmax())
    return {
        "rows": n,
        "span_s": span,
        "mean_rate_rps": (n - 1) / span if span > 0 else None,
        "input_tokens": _dist(w.input_tokens),
        "output_tokens": _dist(w.output_tokens),
        "interarrival_cv": cv,
        "max_gap_s": float(gaps.max()) if n > 1 else 0.0,
        "busiest_second": {"requests": int(per_s[k]), "at_s": float(k)},
    }
