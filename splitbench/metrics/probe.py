"""One capacity probe's verdict, pure: warm-up dropped, every criterion (user SLOs, Splitwise's nine slowdown checks,
the error rate) as per-request values, the score (max log value/limit), its block-bootstrap standard error, and the
early stop that sees a probe's verdict is lost before its replay ends."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from splitbench.metrics.capacity import SCORE_CAP
from splitbench.metrics.latency import PER_REQUEST, input_tokens, output_tokens, stat_of, tbt_gaps_s
from splitbench.metrics.slo import SLO, SPLITWISE_CHECKS, Reference
from splitbench.schema.records import NOT_SENT, RequestRecord

QUANTILE = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
DEFAULT_MAX_ERROR_RATE = 0.01
VALUES_PER_SE = 20_000_000   # values resampled per score se at most (a big simulated probe's TBT gaps: fewer draws)


@dataclass
class Criterion:
    """One pass/fail criterion over a probe's requests: `values` flat, `owner[k]` the request position of value k
    (several per request for TBT gaps), `stat` of the values against `limit`."""
    name: str
    stat: str
    limit: float
    values: np.ndarray
    owner: np.ndarray
    unit: str = "s"


def drop_warmup(records: Sequence[RequestRecord], warmup_s: float = 0.0, warmup_requests: int = 0
                ) -> list[RequestRecord]:
    """The records after the warm-up: the first `warmup_requests` by intended send time and those sent within
    `warmup_s` of the first one are dropped."""
    order = sorted(records, key=lambda r: (r.intended_send_s, r.trace_index))
    if not order:
        return []
    t0 = order[0].intended_send_s
    return [r for k, r in enumerate(order) if k >= warmup_requests and r.intended_send_s >= t0 + warmup_s]


def _request_slowdowns(r: RequestRecord, ref: Reference) -> dict[str, float | None]:
    """metrics.slo.slowdowns of one ok record."""
    p, n = input_tokens(r), output_tokens(r)
    t, m, e = PER_REQUEST["ttft"](r), PER_REQUEST["mean_tbt"](r), PER_REQUEST["e2e"](r)
    rt, re_ = ref.ttft_s(p), ref.e2e_s(p, n)
    return {"ttft": t / rt if t is not None and rt > 0 else None,
            "tbt": m / ref.tbt_s if m is not None and ref.tbt_s > 0 else None,
            "e2e": e / re_ if e is not None and re_ > 0 else None}


def criteria(records: Sequence[RequestRecord], slos: Sequence[SLO], reference: Reference | None,
             max_error_rate: float = DEFAULT_MAX_ERROR_RATE) -> list[Criterion]:
    """Every criterion of a probe over its (post-warm-up) records, with the values metrics.slo judges: user SLOs
    (tbt: per-token gaps), the Splitwise checks against `reference`, and the error rate of attempted requests."""
    recs = [r for r in records if r.status != NOT_SENT]
    out: list[Criterion] = []
    for s in slos:
        vals, own = [], []
        for k, r in enumerate(recs):
            vs = tbt_gaps_s(r) if s.metric == "tbt" else [PER_REQUEST[s.metric](r)] if r.ok else []
            for v in vs:
                if v is not None:
                    vals.append(v), own.append(k)
        out.append(Criterion(s.name, s.stat, s.threshold_s, np.asarray(vals, float), np.asarray(own, np.int64)))
    if reference is not None:
        per = [(k, _request_slowdowns(r, reference)) for k, r in enumerate(recs) if r.ok]
        for metric, stat, limit in SPLITWISE_CHECKS:
            pairs = [(k, d[metric]) for k, d in per if d[metric] is not None]
            out.append(Criterion(f"splitwise_{metric}_{stat}", stat, limit, np.asarray([v for _, v in pairs], float),
                                 np.asarray([k for k, _ in pairs], np.int64), unit="x"))
    failed = np.asarray([0.0 if r.ok else 1.0 for r in recs])
    out.append(Criterion("error_rate", "mean", max_error_rate, failed, np.arange(len(recs)), unit="fraction"))
    return out


def _log_ratio(value: float | None, limit: float) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return SCORE_CAP
    if value <= 0:
        return -SCORE_CAP
    if limit <= 0:
        return SCORE_CAP
    return min(max(math.log(value / limit), -SCORE_CAP), SCORE_CAP)


def judge(crits: Sequence[Criterion]) -> dict:
    """passed (every criterion's stat <= its limit), score (max log(value / limit), capped) and the items."""
    items = []
    for c in crits:
        value = stat_of(c.values.tolist(), c.stat) if c.values.size else (0.0 if c.name == "error_rate" else None)
        met = value is not None and value <= c.limit
        items.append({"name": c.name, "stat": c.stat, "value": value, "limit": c.limit, "unit": c.unit, "met": met,
                      "log_ratio": _log_ratio(value, c.limit)})
    score = max((i["log_ratio"] for i in items), default=-SCORE_CAP)
    return {"passed": all(i["met"] for i in items), "score": score, "items": items,
            "failed": [i["name"] for i in items if not i["met"]]}


def _stat(values: np.ndarray, stat: str) -> float | None:
    if values.size == 0:
        return None
    if stat == "mean":
        return float(values.mean())
    if stat == "max":
        return float(values.max())
    return float(np.percentile(values, QUANTILE[stat] * 100))


def score_se(crits: Sequence[Criterion], rng: np.random.Generator, draws: int = 100) -> float:
    """Standard error of the score by a moving-block bootstrap over the requests in send order (blocks of
    sqrt(n) requests keep the queueing's correlation): every criterion recomputed on the same resampled requests."""
    n = max((int(c.owner.max()) + 1 for c in crits if c.owner.size), default=0)
    if n < 2 or draws < 2:
        return 0.0
    block = max(1, int(math.sqrt(n)))
    draws = max(10, min(draws, int(VALUES_PER_SE / max(1, sum(c.values.size for c in crits)))))
    prepared = []
    for c in crits:
        order = np.argsort(c.owner, kind="stable")
        counts = np.bincount(c.owner, minlength=n)
        prepared.append((c, c.values[order], np.concatenate([[0], np.cumsum(counts)[:-1]]), counts))
    scores = np.empty(draws)
    for d in range(draws):
        starts = rng.integers(0, n - block + 1, -(-n // block))
        idx = (starts[:, None] + np.arange(block)[None, :]).ravel()[:n]
        best = -SCORE_CAP
        for c, vals, offs, counts in prepared:
            lens = counts[idx]
            total = int(lens.sum())
            if total:
                base = np.repeat(offs[idx] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
                sample = vals[base + np.arange(total)]
            else:
                sample = vals[:0]
            value = _stat(sample, c.stat) if total else (0.0 if c.name == "error_rate" else None)
            best = max(best, _log_ratio(value, c.limit))
        scores[d] = best
    return float(scores.std(ddof=1))


class EarlyStop:
    """Fed each finished record (warm-up ones are ignored): True once the probe cannot pass whatever the rest of
    its requests do — more values over a percentile's limit than the planned count leaves room for, a max over
    its limit, a mean whose sum already exceeds limit x planned count, or too many failed requests."""

    def __init__(self, slos: Sequence[SLO], reference: Reference | None, planned_requests: int,
                 planned_output_tokens: int, max_error_rate: float = DEFAULT_MAX_ERROR_RATE,
                 ignore: set | frozenset = frozenset()):
        self.slos, self.reference, self.ignore = list(slos), reference, ignore
        self.n_req = max(1, planned_requests)
        self.n_gaps = max(1, planned_output_tokens - planned_requests)
        self.max_failed = max_error_rate * self.n_req
        self.over: dict[str, int] = {}
        self.sums: dict[str, float] = {}
        self.failed = 0
        self.hopeless: str | None = None

    def _allowed(self, stat: str, n: int) -> int:
        """Values over the limit that a stat over n values survives: more than this and it is over."""
        if stat == "max":
            return 0
        return n - math.floor(QUANTILE[stat] * (n - 1)) - 1

    def _count(self, name: str, stat: str, limit: float, values, n: int) -> None:
        if stat == "mean":
            self.sums[name] = self.sums.get(name, 0.0) + sum(values)
            if self.sums[name] > limit * n:
                self.hopeless = name
            return
        self.over[name] = self.over.get(name, 0) + sum(1 for v in values if v > limit)
        if self.over[name] > self._allowed(stat, n):
            self.hopeless = name

    def observe(self, r: RequestRecord) -> bool:
        if self.hopeless or r.trace_index in self.ignore or r.status == NOT_SENT:
            return bool(self.hopeless)
        if not r.ok:
            self.failed += 1
            if self.failed > self.max_failed:
                self.hopeless = "error_rate"
            return bool(self.hopeless)
        for s in self.slos:
            if s.metric == "tbt":
                self._count(s.name, s.stat, s.threshold_s, tbt_gaps_s(r), self.n_gaps)
            else:
                v = PER_REQUEST[s.metric](r)
                self._count(s.name, s.stat, s.threshold_s, [] if v is None else [v], self.n_req)
        if self.reference is not None:
            sd = _request_slowdowns(r, self.reference)
            for metric, stat, limit in SPLITWISE_CHECKS:
                v = sd[metric]
                self._count(f"splitwise_{metric}_{stat}", stat, limit, [] if v is None else [v], self.n_req)
        return bool(self.hopeless)
