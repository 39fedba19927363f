"""Capacity search, pure: isotonic fits of probe scores (log SLO ratio, > 0 fails) and pass fractions vs arrival rate,
the boundary rate, its bootstrap CI (RNG injected), the next probe, the stop rule, and a Pareto helper. No I/O."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SCORE_CAP = 5.0   # |log ratio| beyond this carries no more information (a collapsed or idle probe)


@dataclass(frozen=True)
class Point:
    """One finished probe: its rate, score = max over criteria of log(value / limit) (<= 0 meets every one), the
    score's standard error (block bootstrap over its requests) and its verdict."""
    rate: float
    score: float
    score_se: float = 0.0
    passed: bool | None = None   # None: score <= 0

    @property
    def ok(self) -> bool:
        return self.score <= 0 if self.passed is None else bool(self.passed)


@dataclass(frozen=True)
class SearchConfig:
    """How the search moves: first rate, growth while unbracketed, relative CI width to stop at, probe budget."""
    start_rate: float = 1.0
    growth: float = 2.0
    tolerance: float = 0.05        # stop when (ci_hi - ci_lo) / estimate <= tolerance
    max_probes: int = 12
    min_rate: float = 1e-3         # below this, no rate meets the SLOs
    max_rate: float = 1e6
    confidence: float = 0.9
    bootstrap: int = 400
    min_repeats: int = 2           # probes at each end of the final bracket before it counts (one outlier can't)


@dataclass
class Fit:
    rates: list[float]             # distinct probed rates, ascending
    score: list[float]             # isotonic (non-decreasing) fit of the scores
    pass_fraction: list[float]     # isotonic (non-increasing) fit of the verdicts
    counts: list[int]


@dataclass
class Boundary:
    """The rate where the fitted score crosses 0 (linear between the bracketing rates); censored "above" when every
    probe passed (the capacity is beyond the highest rate), "below" when every probe failed."""
    estimate: float | None
    lo: float | None               # highest fitted-passing rate below the crossing
    hi: float | None               # lowest fitted-failing rate
    censored: str | None = None
    pass_fraction_estimate: float | None = None   # where the fitted pass fraction crosses 1/2


@dataclass
class Interval:
    lo: float | None
    hi: float | None
    confidence: float
    draws: int
    censored_fraction: float = 0.0
    sigma_resid: float = 0.0
    extra: dict = field(default_factory=dict)

    def width(self) -> float:
        return math.inf if self.lo is None or self.hi is None else self.hi - self.lo


def isotonic(y, w=None, increasing: bool = True) -> np.ndarray:
    """Weighted least-squares monotone fit of y (in the given order): pool adjacent violators."""
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    sign = 1.0 if increasing else -1.0
    vals, wts, sizes = [], [], []
    for yi, wi in zip(sign * y, w):
        vals.append(yi), wts.append(wi), sizes.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            wsum = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / wsum
            n = sizes[-2] + sizes[-1]
            del vals[-1], wts[-1], sizes[-1]
            vals[-1], wts[-1], sizes[-1] = v, wsum, n
    return sign * np.repeat(vals, sizes)


def _grouped(rates, values, weights):
    """Per distinct rate (ascending): weighted mean of values, summed weight, count."""
    order = np.argsort(rates, kind="stable")
    r, v, w = np.asarray(rates)[order], np.asarray(values)[order], np.asarray(weights)[order]
    uniq, idx, counts = np.unique(r, return_index=True, return_counts=True)
    wsum = np.add.reduceat(w, idx)
    mean = np.add.reduceat(v * w, idx) / wsum
    return uniq, mean, wsum, counts


def fit_points(points: list[Point], scores=None) -> Fit:
    """Isotonic fits over the points (scores weighted by 1 / se^2, floored); `scores` replaces the points' scores
    (bootstrap draws)."""
    rates = np.array([p.rate for p in points], dtype=np.float64)
    s = np.clip(np.array([p.score for p in points] if scores is None else scores, dtype=np.float64),
                -SCORE_CAP, SCORE_CAP)
    se = np.array([p.score_se for p in points], dtype=np.float64)
    w = 1.0 / np.maximum(se, 0.02) ** 2
    uniq, mean, wsum, counts = _grouped(rates, s, w)
    ok = np.array([1.0 if (p.ok if scores is None else scores[i] <= 0) else 0.0 for i, p in enumerate(points)])
    _, pmean, pw, _ = _grouped(rates, ok, np.ones_like(ok))
    return Fit(rates=uniq.tolist(), score=isotonic(mean, wsum).tolist(),
               pass_fraction=isotonic(pmean, pw, increasing=False).tolist(), counts=counts.tolist())


def _crossing(x: list[float], y: list[float], level: float, rising: bool) -> tuple[float | None, int]:
    """(rate where the monotone y passes `level`, index of the first point past it); (None, 0 or len) when not."""
    past = [(v > level) if rising else (v < level) for v in y]
    if not any(past):
        return None, len(y)
    i = past.index(True)
    if i == 0:
        return None, 0
    y0, y1 = y[i - 1], y[i]
    frac = 0.5 if y1 == y0 else (level - y0) / (y1 - y0)
    return x[i - 1] + min(max(frac, 0.0), 1.0) * (x[i] - x[i - 1]), i


def boundary(fit: Fit) -> Boundary:
    """The boundary of one fit (see Boundary)."""
    est, i = _crossing(fit.rates, fit.score, 0.0, rising=True)
    pf, _ = _crossing(fit.rates, fit.pass_fraction, 0.5, rising=False)
    if i == len(fit.rates):
        return Boundary(None, fit.rates[-1], None, "above", pf)
    if i == 0:
        return Boundary(None, None, fit.rates[0], "below", pf)
    return Boundary(est, fit.rates[i - 1], fit.rates[i], None, pf)


def residual_sigma(points: list[Point], fit: Fit) -> float:
    """Spread of the scores around their fit beyond what their own standard errors say (between-repeat noise,
    lack of fit), pooled; 0 without enough points."""
    level = dict(zip(fit.rates, fit.score))
    res = np.array([min(max(p.score, -SCORE_CAP), SCORE_CAP) - level[p.rate] for p in points])
    se2 = np.array([p.score_se ** 2 for p in points])
    dof = len(points) - len(fit.rates)
    if dof <= 0:
        return 0.0
    return float(math.sqrt(max(0.0, (float((res ** 2).sum()) - float(se2.sum())) / dof)))


def bootstrap_ci(points: list[Point], rng: np.random.Generator, *, draws: int = 400,
                 confidence: float = 0.9) -> Interval:
    """Parametric bootstrap on the boundary: every point's score redrawn with its se (and the pooled residual
    sigma), the fit and boundary redone. The interval runs from the lower quantile of the draws' passing bracket
    end to the upper quantile of their failing end, so it always holds the bracket the data cannot split."""
    fit = fit_points(points)
    sigma = residual_sigma(points, fit)
    s = np.array([p.score for p in points])
    sd = np.sqrt(np.array([p.score_se for p in points]) ** 2 + sigma ** 2)
    top = max(p.rate for p in points)
    los, his, censored = [], [], 0
    for _ in range(draws):
        b = boundary(fit_points(points, s + sd * rng.standard_normal(len(points))))
        if b.censored:
            censored += 1
        los.append(b.lo if b.lo is not None else 0.0)
        his.append(b.hi if b.hi is not None else math.inf if b.censored == "above" else top)
    a = (1.0 - confidence) / 2
    lo, hi = float(np.quantile(los, a)), float(np.quantile(his, 1 - a))
    return Interval(lo=lo if lo > 0 else None, hi=hi if math.isfinite(hi) else None, confidence=confidence,
                    draws=draws, censored_fraction=censored / max(1, draws), sigma_resid=sigma)


def next_rate(points: list[Point], est: Boundary, ci: Interval | None, cfg: SearchConfig) -> float | None:
    """The next rate to probe: grow until a probe fails and shrink until one passes; then a safeguarded secant
    step (inside the middle half of the bracket) while the bracket is wider than tolerance/2 of the estimate;
    then (CI narrow or bracket tight) repeats at the bracket end probed least, until each end has
    min_repeats probes (more repeats near the boundary). None: nothing left to try."""
    if not points:
        return cfg.start_rate
    if est.censored == "above":
        r = max(p.rate for p in points) * cfg.growth
        return r if r <= cfg.max_rate else None
    if est.censored == "below":
        r = min(p.rate for p in points) / cfg.growth
        return r if r >= cfg.min_rate else None
    lo, hi, b = est.lo, est.hi, est.estimate
    width = hi - lo
    n_lo, n_hi = _repeats(points, lo), _repeats(points, hi)
    narrow = ci is not None and ci.lo is not None and ci.hi is not None and ci.hi - ci.lo <= cfg.tolerance * b
    if width > cfg.tolerance * b / 2 and not narrow:
        return min(max(b, lo + width / 4), hi - width / 4)
    return lo if n_lo <= n_hi else hi


def _repeats(points: list[Point], rate: float | None) -> int:
    return sum(1 for p in points if p.rate == rate)


def stop_reason(points: list[Point], est: Boundary, ci: Interval | None, cfg: SearchConfig) -> str | None:
    """Why the search stops now ("converged", "max_probes", "no_capacity", "beyond_max_rate"), or None."""
    if est.estimate is not None and ci is not None and ci.lo is not None and ci.hi is not None \
            and (ci.hi - ci.lo) <= cfg.tolerance * est.estimate \
            and min(_repeats(points, est.lo), _repeats(points, est.hi)) >= cfg.min_repeats:
        return "converged"
    if len(points) >= cfg.max_probes:
        return "max_probes"
    if est.censored == "below" and min(p.rate for p in points) / cfg.growth < cfg.min_rate:
        return "no_capacity"
    if est.censored == "above" and max(p.rate for p in points) * cfg.growth > cfg.max_rate:
        return "beyond_max_rate"
    return None


def analyse(points: list[Point], cfg: SearchConfig, rng: np.random.Generator) -> dict:
    """Fit, boundary, CI, stop reason and next rate of a point set, as one JSON-able dict."""
    if not points:
        return {"fit": None, "boundary": None, "ci": None, "stop": None, "next_rate": cfg.start_rate}
    fit = fit_points(points)
    est = boundary(fit)
    ci = bootstrap_ci(points, rng, draws=cfg.bootstrap, confidence=cfg.confidence) if est.censored is None else None
    stop = stop_reason(points, est, ci, cfg)
    nxt = None if stop else next_rate(points, est, ci, cfg)
    return {"fit": fit.__dict__, "boundary": est.__dict__, "ci": None if ci is None else ci.__dict__,
            "stop": stop if stop or nxt is not None else "exhausted", "next_rate": nxt}


def pareto_front(xs: list[float | None], ys: list[float | None]) -> list[int]:
    """Indices of the points not dominated when both coordinates are better higher (None: left out), by x."""
    pts = sorted(((x, y, i) for i, (x, y) in enumerate(zip(xs, ys)) if x is not None and y is not None),
                 key=lambda t: (-t[0], -t[1]))
    out, best_y = [], -math.inf
    for x, y, i in pts:
        if y > best_y:
            out.append(i)
            best_y = y
    return sorted(out, key=lambda i: xs[i])
