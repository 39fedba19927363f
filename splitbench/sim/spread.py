"""Step spread: how one iteration's time varies on a measured host, as quantiles (decode gaps over their request's
mean, lone prefills and whole requests over the profile's fit), plus the cold-prefill factor and the idle-wake table;
`splitbench profile` writes it beside the profile CSV, `simulate --step-spread` and its options draw from it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from splitbench.errors import InputError
from splitbench.metrics.latency import input_tokens, tbt_gaps_s

SUFFIX = ".spread.json"   # tiny.csv -> tiny.spread.json
QUANTILES = 400           # the table: the ratio at probabilities 0, 1/400, ..., 1
MIN_GAPS = 100            # fewer measured gaps than this: no spread is written
MIN_PREFILLS = 8          # fewer batch-1 prefills than this: no prefill spread
MIN_COLD = 3              # fewer (new length, same length again) prefill pairs than this: no cold factor
MIN_REQUESTS = 8          # fewer batch-1 requests of 2+ gaps than this: no request spread
MIN_WAKES = 2             # fewer (after an idle gap, again at once) pairs per gap than this: that gap is left out


def spread_path(profile_csv: str | os.PathLike) -> Path:
    """The spread file that `splitbench profile --out X.csv` writes beside it: X.spread.json."""
    return Path(profile_csv).with_suffix(SUFFIX)


def unit_mean(quantiles) -> list[float]:
    """The quantile table scaled so that a draw (linear interpolation between neighbours at a uniform probability)
    has mean exactly 1: a simulated decode run keeps the profile's mean iteration time."""
    q = [float(x) for x in quantiles]
    mean = sum(a + b for a, b in zip(q, q[1:])) / (2 * (len(q) - 1))
    return [x / mean for x in q]


def measure_spread(records, *, source: str | None = None) -> dict | None:
    """The spread of ok requests' per-token gaps (tokens 2..n), each over its own request's mean gap; None with fewer
    than MIN_GAPS gaps. A chunk of k tokens counts as k equal gaps (metrics.latency.tbt_gaps_s)."""
    ratios: list[float] = []
    used = 0
    for r in records:
        gaps = tbt_gaps_s(r)
        mean = sum(gaps) / len(gaps) if len(gaps) >= 2 else 0.0
        if mean > 0:
            ratios.extend(g / mean for g in gaps)
            used += 1
    if len(ratios) < MIN_GAPS:
        return None
    x = np.asarray(ratios)
    table = unit_mean(np.quantile(x, np.linspace(0.0, 1.0, QUANTILES + 1)))
    return {"what": "decode step time / its mean: quantiles of per-token gap over the request's mean gap, at "
                    "probabilities 0, 1/N, ..., 1 (scaled to mean 1)",
            "source": source, "requests": used, "gaps": len(ratios),
            "p50": float(np.percentile(x, 50)), "p90": float(np.percentile(x, 90)),
            "p99": float(np.percentile(x, 99)), "quantiles": [round(v, 6) for v in table]}


def measure_prefill_spread(prefills: list[tuple[int, float]], lone_prompt_s) -> dict | None:
    """Quantiles of each lone prefill's time (prompt tokens, seconds) over the fitted lone_prompt_s(tokens), scaled
    to mean 1: how a prefill varies around the profile's curve (a shared host's speed changes for seconds at a
    time, so a request's prefill is fast or slow as a whole). None with fewer than MIN_PREFILLS."""
    x = np.asarray([t / lone_prompt_s(p) for p, t in prefills if lone_prompt_s(p) > 0])
    if len(x) < MIN_PREFILLS:
        return None
    table = unit_mean(np.quantile(x, np.linspace(0.0, 1.0, QUANTILES + 1)))
    return {"prefills": len(x), "prefill_p50": float(np.percentile(x, 50)), "prefill_p90": float(np.percentile(x, 90)),
            "prefill_quantiles": [round(v, 6) for v in table]}


def measure_request_spread(records, predicted_gap_s) -> dict | None:
    """Each batch-1 request's mean decode gap over predicted_gap_s(prompt tokens, output tokens), the profile fit's
    mean gap for it: how a request as a whole runs slower or faster than the fit of medians says (a shared host's
    speed changes for a second or more at a time). Quantiles NOT scaled to mean 1: their mean is the host's average
    over the fit. request_spread_s: the requests' median decode time, how long one draw holds in the simulator."""
    x, spans = [], []
    for r in records:
        gaps = tbt_gaps_s(r)
        pred = predicted_gap_s(input_tokens(r), len(gaps) + 1) if len(gaps) >= 2 else 0
        if pred > 0:
            x.append(sum(gaps) / len(gaps) / pred)
            spans.append(sum(gaps))
    if len(x) < MIN_REQUESTS:
        return None
    a = np.asarray(x)
    return {"requests_timed": len(x), "request_mean": float(a.mean()), "request_p50": float(np.percentile(a, 50)),
            "request_p90": float(np.percentile(a, 90)), "request_spread_s": float(np.median(spans)),
            "request_quantiles": [round(float(v), 6) for v in np.quantile(a, np.linspace(0.0, 1.0, QUANTILES + 1))]}


def load_request_spread(path: str | os.PathLike) -> tuple[tuple[float, ...], float]:
    """The request quantile table (as measured, not scaled) and request_spread_s of a spread file; one-line
    InputError where it has none (a profile measured before splitbench wrote them: measure it again)."""
    p, doc = _read(path)
    if "request_quantiles" not in doc:
        raise InputError("has no request_quantiles (written by `splitbench profile` since the request spread was "
                         "added: profile again)", file=p, column="request_quantiles")
    span = doc.get("request_spread_s")
    return _checked(doc["request_quantiles"], p, "request_quantiles"), _positive(span, p, "request_spread_s")


def _read(path: str | os.PathLike) -> tuple[str, dict]:
    """The spread file's path and JSON object; one-line InputError otherwise."""
    p = str(path)
    try:
        doc = json.loads(Path(p).read_text())
    except OSError as e:
        raise InputError(f"cannot read the step spread: {e.strerror or e}", file=p) from None
    except ValueError as e:
        raise InputError(f"not JSON: {e}", file=p) from None
    if not isinstance(doc, dict):
        raise InputError("must be a JSON object whose quantiles is a list of at least 2 numbers", file=p,
                         column="quantiles")
    return p, doc


def load_spread(path: str | os.PathLike) -> tuple[float, ...]:
    """The decode quantile table of a spread file (scaled to mean 1); one-line InputError naming the file and field."""
    p, doc = _read(path)
    return _table(doc.get("quantiles"), p, "quantiles")


def measure_cold_prefill(pairs: list[tuple[int, float, float]]) -> dict | None:
    """A prefill of a prompt length new to the instance over the same length's prefill right after: the median over
    pairs (tokens, first s, again s). None with fewer than MIN_COLD pairs."""
    ratios = [a / b for _, a, b in pairs if a > 0 and b > 0]
    if len(ratios) < MIN_COLD:
        return None
    return {"cold_prefill_factor": float(np.median(ratios)),
            "cold_prefill_pairs": [[p, round(a * 1e3, 3), round(b * 1e3, 3)] for p, a, b in pairs]}


def load_cold_prefill(path: str | os.PathLike) -> float:
    """The cold-prefill factor of a spread file; 1.0 where it has none."""
    p, doc = _read(path)
    x = doc.get("cold_prefill_factor", 1.0)
    return _positive(x, p, "cold_prefill_factor")


def measure_idle_wake(samples: list[tuple[float, float, float]]) -> dict | None:
    """What a lone prefill after its instance idled for g seconds costs on top of the same request sent again at once:
    per gap, the median of (first s - again s) over samples (g, first s, again s), clipped at 0. None without a gap
    of MIN_WAKES samples."""
    by_gap: dict[float, list[float]] = {}
    for g, first, again in samples:
        if g > 0 and first > 0 and again > 0:
            by_gap.setdefault(float(g), []).append(first - again)
    table = [[g, max(0.0, float(np.median(v)))] for g, v in sorted(by_gap.items()) if len(v) >= MIN_WAKES]
    if not table:
        return None
    return {"idle_wake": [[g, round(x, 6)] for g, x in table],
            "idle_wake_samples": [[g, round(a * 1e3, 3), round(b * 1e3, 3)] for g, a, b in samples]}


def load_idle_wake(path: str | os.PathLike) -> tuple[tuple[float, float], ...] | None:
    """The idle-wake table of a spread file, ((idle s, extra s), ...) by increasing idle time; None where it has
    none; one-line InputError naming the file and field for a malformed one."""
    p, doc = _read(path)
    t = doc.get("idle_wake")
    if t is None:
        return None
    if not isinstance(t, list) or not t:
        raise InputError("idle_wake must be a list of [idle s, extra s] pairs", file=p, column="idle_wake")
    out: list[tuple[float, float]] = []
    for i, pair in enumerate(t):
        if not isinstance(pair, list) or len(pair) != 2:
            raise InputError(f"idle_wake[{i}] must be [idle s, extra s], got {pair!r}", file=p, column="idle_wake")
        g = _positive(pair[0], p, f"idle_wake[{i}][0]")
        x = pair[1]
        if not _non_negative(x):
            raise InputError(f"idle_wake[{i}][1] must be a finite number >= 0, got {x!r}", file=p,
                             column="idle_wake")
        if out and g <= out[-1][0]:
            raise InputError(f"idle_wake[{i}]: idle times must increase", file=p, column="idle_wake")
        out.append((g, float(x)))
    return tuple(out)


def load_prefill_spread(path: str | os.PathLike) -> tuple[float, ...] | None:
    """The prefill quantile table of a spread file (scaled to mean 1), None where it has none (written before it
    was measured, or too few prefills)."""
    p, doc = _read(path)
    q = doc.get("prefill_quantiles")
    return None if q is None else _table(q, p, "prefill_quantiles")


def _positive(x, p: str, column: str) -> float:
    """A spread file's finite number > 0 as a float; one-line InputError naming the file and field otherwise."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise InputError(f"{column} must be a finite number > 0, got {x!r}", file=p, column=column)
    return float(x)


def _non_negative(x) -> bool:
    """x is a finite JSON number >= 0 (not a bool)."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _table(q, p: str, column: str) -> tuple[float, ...]:
    """A validated quantile table, scaled to mean 1."""
    return tuple(unit_mean(_checked(q, p, column)))


def _checked(q, p: str, column: str) -> tuple[float, ...]:
    """A quantile table of non-decreasing finite numbers >= 0, not all 0; one-line InputError otherwise."""
    if not isinstance(q, list) or len(q) < 2:
        raise InputError(f"must be a JSON object whose {column} is a list of at least 2 numbers", file=p,
                         column=column)
    for i, v in enumerate(q):
        if not _non_negative(v):
            raise InputError(f"{column}[{i}] must be a finite number >= 0, got {v!r}", file=p, column=column)
        if i and v < q[i - 1]:
            raise InputError(f"{column}[{i}] = {v} is below {column}[{i - 1}] = {q[i - 1]}: they must not "
                             "decrease", file=p, column=column)
    if q[-1] <= 0:
        raise InputError(f"{column} are all 0", file=p, column=column)
    return tuple(float(v) for v in q)
