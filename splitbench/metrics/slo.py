"""User SLOs (parse, evaluate, goodput, attainment) and the Splitwise unloaded-reference verdict.

Formulas: see METRIC_DEFINITIONS in splitbench.metrics.latency.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from splitbench.errors import InputError
from splitbench.metrics.latency import (
    PER_REQUEST,
    e2e_s,
    input_tokens,
    mean_tbt_s,
    metric_values,
    output_tokens,
    stat_of,
    throughput_section,
    ttft_s,
)
from splitbench.schema.files import atomic_write_json
from splitbench.schema.records import RequestRecord

SLO_METRICS = ("ttft", "tbt", "mean_tbt", "e2e", "norm")
SLO_STATS = ("mean", "p50", "p90", "p99", "max")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "": 1.0}
_ITEM = re.compile(r"^(?P<metric>[a-z0-9_]+)_(?P<stat>mean|p50|p90|p99|max)$")
_VALUE = re.compile(r"^(?P<num>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>[a-z]*)$")


@dataclass(frozen=True)
class SLO:
    metric: str         # ttft / tbt / mean_tbt / e2e / norm
    stat: str           # mean / p50 / p90 / p99 / max
    threshold_s: float

    @property
    def name(self) -> str:
        return f"{self.metric}_{self.stat}"


def parse_slos(text: str | None, *, source: str = "--slo") -> list[SLO]:
    """Parse "ttft_p99=2s,tbt_p99=100ms" (units s/ms/us; bare number = seconds); bad item -> InputError."""
    if text is None or not text.strip():
        return []
    out: list[SLO] = []
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        bad = f"{source}: bad SLO item {item!r}: "
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip().lower()
        if not sep:
            raise InputError(bad + "expected METRIC_STAT=VALUE, e.g. ttft_p99=2s")
        m = _ITEM.match(key)
        if not m or m["metric"] not in SLO_METRICS:
            raise InputError(bad + f"name must be METRIC_STAT with METRIC in {'/'.join(SLO_METRICS)} "
                             f"and STAT in {'/'.join(SLO_STATS)}")
        v = _VALUE.match(value)
        if not v:
            raise InputError(bad + "value must be a positive number with optional unit s, ms or us")
        if v["unit"] not in _UNITS:
            raise InputError(bad + f"unknown unit {v['unit']!r} (use s, ms or us)")
        threshold = float(v["num"]) * _UNITS[v["unit"]]
        if not (threshold > 0 and math.isfinite(threshold)):
            raise InputError(bad + "threshold must be > 0")
        if key in seen:
            raise InputError(bad + f"{key} given twice")
        seen.add(key)
        out.append(SLO(m["metric"], m["stat"], threshold))
    return out


def request_is_good(r: RequestRecord, slos: Sequence[SLO]) -> bool:
    """An ok request meeting every SLO threshold with its own value (tbt SLOs use its mean TBT)."""
    if not r.ok:
        return False
    for s in slos:
        if s.metric in ("tbt", "mean_tbt"):
            v = mean_tbt_s(r)
            if v is None and output_tokens(r) <= 1 and e2e_s(r) is not None:
                continue  # a one-token answer has no gaps to violate
        else:
            v = PER_REQUEST[s.metric](r)
        if v is None or v > s.threshold_s:
            return False
    return True


def evaluate_slos(records: Sequence[RequestRecord], slos: Sequence[SLO]) -> dict:
    """Run-level SLO values and met flags, plus goodput (good ok requests/s) and attainment."""
    items = []
    for s in slos:
        value = stat_of(metric_values(records, s.metric), s.stat)
        items.append({"name": s.name, "metric": s.metric, "stat": s.stat, "value_s": value,
                      "threshold_s": s.threshold_s, "met": value is not None and value <= s.threshold_s})
    if not slos:
        return {"items": [], "all_met": None, "good_requests": None, "goodput_rps": None,
                "attainment": None}
    good = sum(1 for r in records if request_is_good(r, slos))
    attempted = sum(1 for r in records if r.status != "not_sent")
    span = throughput_section(records)["window_s"]
    return {"items": items, "all_met": all(i["met"] for i in items), "good_requests": good,
            "goodput_rps": good / span if span and span > 0 else None,
            "attainment": good / attempted if attempted else None}


# ---------------------------------------------------------------- Splitwise reference and verdict

# (metric, stat, max slowdown): Splitwise's nine SLO checks against the unloaded reference.
SPLITWISE_CHECKS = (("ttft", "p50", 2.0), ("ttft", "p90", 3.0), ("ttft", "p99", 6.0),
                    ("tbt", "p50", 1.25), ("tbt", "p90", 1.5), ("tbt", "p99", 5.0),
                    ("e2e", "p50", 1.25), ("e2e", "p90", 1.5), ("e2e", "p99", 5.0))


@dataclass
class Reference:
    """Unloaded latency model: TTFT = intercept + per_token * prompt_tokens (>= floor), mean TBT = tbt_s."""
    ttft_intercept_s: float
    ttft_per_token_s: float
    tbt_s: float
    ttft_floor_s: float = 0.0
    n_requests: int = 0
    prompt_tokens_min: int | None = None
    prompt_tokens_max: int | None = None
    ttft_rmse_s: float | None = None
    meta: dict = field(default_factory=dict)

    def ttft_s(self, prompt_tokens: int) -> float:
        return max(self.ttft_intercept_s + self.ttft_per_token_s * prompt_tokens, self.ttft_floor_s)

    def e2e_s(self, prompt_tokens: int, out_tokens: int) -> float:
        return self.ttft_s(prompt_tokens) + max(out_tokens - 1, 0) * self.tbt_s


def fit_reference(records: Sequence[RequestRecord], *, meta: dict | None = None) -> Reference:
    """Least-squares TTFT line over ok one-at-a-time requests and their mean of per-request mean TBT."""
    pts = [(input_tokens(r), ttft_s(r)) for r in records if r.ok and ttft_s(r) is not None]
    if not pts:
        raise InputError("reference: no ok requests with a first token to fit")
    x = np.array([p for p, _ in pts], dtype=np.float64)
    y = np.array([t for _, t in pts], dtype=np.float64)
    if np.ptp(x) > 0:
        b, a = np.polyfit(x, y, 1)
    else:
        a, b = float(y.mean()), 0.0
    tbts = [v for v in (mean_tbt_s(r) for r in records if r.ok) if v is not None]
    if not tbts:
        raise InputError("reference: no ok requests with >= 2 output tokens to measure TBT")
    rmse = float(np.sqrt(np.mean((a + b * x - y) ** 2)))
    return Reference(ttft_intercept_s=float(a), ttft_per_token_s=float(b), tbt_s=float(np.mean(tbts)),
                     ttft_floor_s=float(y.min()), n_requests=len(pts), prompt_tokens_min=int(x.min()),
                     prompt_tokens_max=int(x.max()), ttft_rmse_s=rmse, meta=dict(meta or {}))


def save_reference(ref: Reference, path: str | Path) -> None:
    atomic_write_json(path, {"kind": "splitbench.reference", "version": 1, **asdict(ref)})


def load_reference(path: str | Path) -> Reference:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("reference file not found", file=str(path)) from None
    except (OSError, ValueError) as e:
        raise InputError(f"not a JSON reference file ({e})", file=str(path)) from None
    if not isinstance(data, dict) or data.get("kind") != "splitbench.reference":
        raise InputError("not a splitbench reference file (missing kind)", file=str(path))
    kw = {k: data[k] for k in Reference.__dataclass_fields__ if k in data}
    for k in ("ttft_intercept_s", "ttft_per_token_s", "tbt_s"):
        if not isinstance(kw.get(k), (int, float)):
            raise InputError(f"field {k!r} missing or not a number", file=str(path))
    if kw["tbt_s"] <= 0:
        raise InputError("field 'tbt_s' must be > 0", file=str(path))
    return Reference(**kw)


def slowdowns(records: Sequence[RequestRecord], ref: Reference) -> dict[str, list[float]]:
    """Per-request slowdowns against the unloaded reference, for ok records."""
    out: dict[str, list[float]] = {"ttft": [], "tbt": [], "e2e": []}
    for r in records:
        if not r.ok:
            continue
        p, n = input_tokens(r), output_tokens(r)
        t, m, e = ttft_s(r), mean_tbt_s(r), e2e_s(r)
        rt, re_ = ref.ttft_s(p), ref.e2e_s(p, n)
        if t is not None and rt > 0:
            out["ttft"].append(t / rt)
        if m is not None and ref.tbt_s > 0:
            out["tbt"].append(m / ref.tbt_s)
        if e is not None and re_ > 0:
            out["e2e"].append(e / re_)
    return out


def splitwise_verdict(records: Sequence[RequestRecord], ref: Reference) -> dict:
    """Nine slowdown checks (P50/P90/P99 of TTFT, TBT, E2E); passes when all nine hold."""
    sd = slowdowns(records, ref)
    checks = []
    for metric, stat, limit in SPLITWISE_CHECKS:
        value = stat_of(sd[metric], stat)
        checks.append({"name": f"{metric}_{stat}", "metric": metric, "stat": stat, "slowdown": value,
                       "limit": limit, "met": value is not None and value <= limit})
    failed = [c["name"] for c in checks if not c["met"]]
    return {"checks": checks, "passed": not failed, "failed": failed,
            "reference": asdict(ref)}
