"""The capacity search's pure core (metrics/capacity.py, metrics/probe.py) on synthetic data: isotonic fits, the
boundary, its bootstrap CI, the next probe, the stop rule, Pareto fronts, probe verdicts and early stops."""
from __future__ import annotations

import math

import numpy as np
import pytest

from splitbench.metrics import capacity as C
from splitbench.metrics import probe as P
from splitbench.metrics.slo import Reference, parse_slos
from splitbench.schema.records import OK, TIMEOUT, RequestRecord


def test_isotonic_pools_adjacent_violators():
    assert C.isotonic([1, 3, 2, 4]).tolist() == [1, 2.5, 2.5, 4]
    assert C.isotonic([3, 1, 2], increasing=False).tolist() == [3, 1.5, 1.5]
    assert C.isotonic([1, 3, 2], w=[1, 1, 3]).tolist() == pytest.approx([1, 2.25, 2.25])
    y = np.random.default_rng(0).normal(size=50)
    fit = C.isotonic(y)
    assert np.all(np.diff(fit) >= -1e-12) and fit.mean() == pytest.approx(y.mean())


def test_boundary_interpolates_between_the_bracketing_rates_and_censors():
    pts = [C.Point(10, -1.0), C.Point(20, -0.5), C.Point(30, 0.5), C.Point(40, 1.0)]
    b = C.boundary(C.fit_points(pts))
    assert (b.lo, b.hi, b.censored) == (20, 30, None) and b.estimate == pytest.approx(25.0)
    assert b.pass_fraction_estimate == pytest.approx(25.0)
    # a noisy non-monotone pair is pooled: 20 (+0.2) and 30 (-0.2) become one level 0 -> no crossing there
    noisy = [C.Point(10, -1.0), C.Point(20, 0.2), C.Point(30, -0.2), C.Point(40, 1.0)]
    f = C.fit_points(noisy)
    assert f.score[1] == f.score[2] == pytest.approx(0.0)
    assert C.boundary(f).hi == 40
    assert C.boundary(C.fit_points([C.Point(5, -1), C.Point(10, -0.1)])).censored == "above"
    assert C.boundary(C.fit_points([C.Point(5, 0.3)])).censored == "below"


def test_bootstrap_ci_holds_the_bracket_and_widens_with_noise():
    pts = [C.Point(10, -1.0, 0.01), C.Point(20, -0.5, 0.01), C.Point(30, 0.5, 0.01), C.Point(40, 1.0, 0.01)]
    ci = C.bootstrap_ci(pts, np.random.default_rng(1), draws=200)
    assert (ci.lo, ci.hi) == (20, 30)
    noisy = [C.Point(p.rate, p.score, 0.6) for p in pts]
    wide = C.bootstrap_ci(noisy, np.random.default_rng(1), draws=200)
    assert wide.lo <= 10 and wide.hi >= 40 or wide.hi is None
    # the same RNG seed gives the same interval
    again = C.bootstrap_ci(noisy, np.random.default_rng(1), draws=200)
    assert (again.lo, again.hi) == (wide.lo, wide.hi)


def true_score(rate: float, cap: float = 37.0) -> float:
    """A knee: flat well below capacity, steep above (queueing)."""
    return -1.5 + 1.4 * max(0.0, rate - 0.8 * cap) / (0.2 * cap) if rate < cap else 1.5 + (rate - cap) / cap * 10


def run_search(cfg: C.SearchConfig, noise: float, seed: int = 0, cap: float = 37.0):
    rng, pts = np.random.default_rng(seed), []
    while True:
        a = C.analyse(pts, cfg, np.random.default_rng(seed + len(pts)))
        if a["stop"]:
            return pts, a
        r = a["next_rate"]
        pts.append(C.Point(r, true_score(r, cap) + noise * rng.standard_normal(), noise))


def test_search_converges_on_a_known_knee_and_its_ci_covers_it():
    cfg = C.SearchConfig(start_rate=5, tolerance=0.05, max_probes=30, bootstrap=200)
    pts, a = run_search(cfg, noise=0.0)
    b, ci = a["boundary"], a["ci"]
    truth = 37.0   # the score crosses 0 at the capacity (the knee's -> +1.5 jump)
    assert a["stop"] == "converged" and abs(b["estimate"] - truth) / truth < 0.05
    assert ci["lo"] <= truth <= ci["hi"] and (ci["hi"] - ci["lo"]) / b["estimate"] <= 0.05
    assert len(pts) <= 14


def test_noisy_search_repeats_near_the_boundary_and_covers_the_truth():
    cfg = C.SearchConfig(start_rate=5, tolerance=0.08, max_probes=30, bootstrap=200)
    covered = repeated = 0
    for seed in range(5):
        pts, a = run_search(cfg, noise=0.3, seed=seed)
        rates = [p.rate for p in pts]
        repeated += len(rates) > len(set(rates))   # a rate near the boundary probed again
        assert a["stop"] == "converged" and abs(a["boundary"]["estimate"] - 37.0) / 37.0 < 0.05
        ci = a["ci"]
        covered += ci is not None and ci["lo"] <= 37.0 <= (ci["hi"] or math.inf)
    assert covered >= 4 and repeated >= 1


def test_next_rate_grows_shrinks_and_stops():
    cfg = C.SearchConfig(start_rate=4, growth=2, max_probes=5, min_rate=1)
    assert C.analyse([], cfg, np.random.default_rng(0))["next_rate"] == 4
    assert C.analyse([C.Point(4, -1)], cfg, np.random.default_rng(0))["next_rate"] == 8
    assert C.analyse([C.Point(4, 1)], cfg, np.random.default_rng(0))["next_rate"] == 2
    assert C.analyse([C.Point(4, 1), C.Point(2, 1), C.Point(1, 1)], cfg,
                     np.random.default_rng(0))["stop"] == "no_capacity"
    five = [C.Point(r, -1) for r in (1, 2, 3, 4, 5)]
    assert C.analyse(five, cfg, np.random.default_rng(0))["stop"] == "max_probes"
    # bracketed: the secant step stays inside the middle half of the bracket
    a = C.analyse([C.Point(10, -0.01), C.Point(20, 3.0)], cfg, np.random.default_rng(0))
    assert 12.5 <= a["next_rate"] <= 17.5


def test_pareto_front():
    xs, ys = [1, 2, 3, 2.5, None], [5, 4, 1, 1, 9]
    assert C.pareto_front(xs, ys) == [0, 1, 3, 2] or C.pareto_front(xs, ys) == [0, 1, 2]
    assert C.pareto_front([1, 2, 3], [3, 2, 1]) == [0, 1, 2]
    assert C.pareto_front([1, 2], [1, 2]) == [1]


# ----------------------------------------------------------------------------- probe verdicts

def rec(i: int, send: float, ttft: float, n_out: int = 5, tpot: float = 0.01, status: str = OK) -> RequestRecord:
    offs = [ttft + k * tpot for k in range(n_out)] if status == OK else []
    return RequestRecord(request_id=str(i), trace_index=i, intended_send_s=send, planned_input_tokens=16,
                         planned_output_tokens=n_out, actual_send_s=send, first_token_s=send + ttft if offs else None,
                         last_token_s=send + offs[-1] if offs else None, end_s=send + (offs[-1] if offs else 1.0),
                         chunk_offsets_s=offs, chunk_tokens=[1] * len(offs), status=status)


def test_warmup_drop_and_verdict_scores():
    recs = [rec(i, i * 0.1, 0.05 if i < 50 else 0.2) for i in range(100)]
    kept = P.drop_warmup(recs, warmup_s=1.0, warmup_requests=0)
    assert len(kept) == 90 and min(r.intended_send_s for r in kept) >= 1.0
    assert len(P.drop_warmup(recs, warmup_s=0, warmup_requests=30)) == 70
    crit = P.criteria(kept, parse_slos("ttft_p50=100ms,tbt_p99=20ms"), None)
    v = P.judge(crit)
    assert v["passed"] is False and v["score"] == pytest.approx(math.log(2.0))
    assert [i["name"] for i in v["items"]] == ["ttft_p50", "tbt_p99", "error_rate"]
    se = P.score_se(crit, np.random.default_rng(0), draws=50)
    assert se >= 0
    # the Splitwise verdict's slowdowns count too
    ref = Reference(ttft_intercept_s=0.05, ttft_per_token_s=0.0, tbt_s=0.01)
    sv = P.judge(P.criteria(kept, [], ref))
    assert not sv["passed"] and any(i["name"] == "splitwise_ttft_p50" for i in sv["items"])


def test_failed_requests_fail_a_probe():
    recs = [rec(i, i * 0.1, 0.01, status=OK if i % 10 else TIMEOUT) for i in range(100)]
    v = P.judge(P.criteria(recs, parse_slos("ttft_p99=1s"), None, max_error_rate=0.05))
    assert not v["passed"] and v["items"][-1]["name"] == "error_rate"


def test_early_stop_only_when_the_verdict_cannot_recover():
    slos = parse_slos("ttft_p90=100ms")
    stop = P.EarlyStop(slos, None, planned_requests=100, planned_output_tokens=500)
    for i in range(10):
        assert not stop.observe(rec(i, i * 0.1, 0.5))      # 10 of 100 over: p90 can still hold
    assert stop.observe(rec(10, 1.0, 0.5))                 # 11: the p90 is over whatever comes next
    # the same records in a run that passes never trigger it
    fine = P.EarlyStop(slos, None, planned_requests=100, planned_output_tokens=500)
    assert not any(fine.observe(rec(i, i * 0.1, 0.05)) for i in range(100))
    # check the rule against the verdict itself: 11 bad of 100 fails p90 whatever the rest is
    recs = [rec(i, i * 0.1, 0.5 if i < 11 else 0.0) for i in range(100)]
    assert not P.judge(P.criteria(recs, slos, None))["passed"]
    recs = [rec(i, i * 0.1, 0.5 if i < 10 else 0.0) for i in range(100)]
    assert P.judge(P.criteria(recs, slos, None))["passed"]
