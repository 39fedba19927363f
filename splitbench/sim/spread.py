"""Decode step spread: how much one decode iteration's time varies around its mean on a measured host (OS noise, the
server's frontend, neighbours), as quantiles of per-token gap / the request's mean gap. `splitbench profile` measures
it at batch 1 and writes it beside the profile CSV; `simulate --step-spread` draws every decode iteration from it.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from splitbench.errors import InputError
from splitbench.metrics.latency import tbt_gaps_s

SUFFIX = ".spread.json"   # tiny.csv -> tiny.spread.json
QUANTILES = 400           # the table: the ratio at probabilities 0, 1/400, ..., 1
MIN_GAPS = 100            # fewer measured gaps than this: no spread is written


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


def load_spread(path: str | os.PathLike) -> tuple[float, ...]:
    """The quantile table of a spread file (scaled to mean 1); one-line InputError naming the file and field."""
    p = str(path)
    try:
        doc = json.loads(Path(p).read_text())
    except OSError as e:
        raise InputError(f"cannot read the step spread: {e.strerror or e}", file=p) from None
    except ValueError as e:
        raise InputError(f"not JSON: {e}", file=p) from None
    q = doc.get("quantiles") if isinstance(doc, dict) else None
    if not isinstance(q, list) or len(q) < 2:
        raise InputError("must be a JSON object whose quantiles is a list of at least 2 numbers", file=p,
                         column="quantiles")
    for i, v in enumerate(q):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(f"quantiles[{i}] must be a finite number >= 0, got {v!r}", file=p, column="quantiles")
        if i and v < q[i - 1]:
            raise InputError(f"quantiles[{i}] = {v} is below quantiles[{i - 1}] = {q[i - 1]}: they must not "
                             "decrease", file=p, column="quantiles")
    if q[-1] <= 0:
        raise InputError("quantiles are all 0", file=p, column="quantiles")
    return tuple(unit_mean(q))
