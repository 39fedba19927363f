"""Decode step spread: measured from per-token gaps, loaded with one-line errors, and drawn by the simulator for every
decode iteration (same seed, same records; the mean iteration time kept; the gaps spread as measured)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from test_simulator import PERF, decode_s, run, split_cfg, wl

from splitbench.app.profile import ColdPrefills, iteration_sizes, write_spread
from splitbench.errors import InputError
from splitbench.metrics.latency import tbt_gaps_s
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.sim.config import SimConfig, SimPool
from splitbench.sim.spread import (
    MIN_GAPS,
    MIN_PREFILLS,
    MIN_REQUESTS,
    load_cold_prefill,
    load_prefill_spread,
    load_request_spread,
    load_spread,
    measure_cold_prefill,
    measure_prefill_spread,
    measure_request_spread,
    measure_spread,
    spread_path,
    unit_mean,
)


def rec(gaps_s: list[float], i: int = 0) -> RequestRecord:
    offs = list(np.cumsum([0.05, *gaps_s]))
    n = len(offs)
    return RequestRecord(request_id=f"r{i}", trace_index=i, intended_send_s=0.0, planned_input_tokens=32,
                         planned_output_tokens=n, actual_send_s=0.0, first_token_s=offs[0], last_token_s=offs[-1],
                         end_s=offs[-1], chunk_offsets_s=offs, chunk_tokens=[1] * n, actual_input_tokens=32,
                         actual_output_tokens=n, status=R.OK)


def test_spread_is_gaps_over_each_requests_own_mean_gap():
    rng = random.Random(1)
    slow = [rec([0.020 * rng.choice((1.0, 1.0, 1.0, 2.0)) for _ in range(100)], 0)]   # 25% of steps take 2x
    fast = [rec([0.005 * rng.choice((1.0, 1.0, 1.0, 2.0)) for _ in range(100)], 1)]   # the same shape, 4x faster
    s = measure_spread(slow + fast)
    assert s["requests"] == 2 and s["gaps"] == 200
    mean = 1.25   # of the factors 1, 1, 1, 2: each gap over its request's mean is 1 / ~1.25 or 2 / ~1.25
    assert s["p50"] == pytest.approx(1 / mean, rel=0.1) and s["p99"] == pytest.approx(2 / mean, rel=0.1)
    q = s["quantiles"]
    assert q == sorted(q) and sum(a + b for a, b in zip(q, q[1:])) / (2 * (len(q) - 1)) == pytest.approx(1.0)
    assert measure_spread([rec([0.01] * (MIN_GAPS - 2))]) is None   # too few timed tokens


def test_load_spread_scales_to_mean_one_and_names_the_bad_field(tmp_path):
    good = tmp_path / "x.spread.json"
    good.write_text(json.dumps({"quantiles": [0.5, 1.0, 2.5]}))
    q = load_spread(good)
    assert q == pytest.approx(unit_mean([0.5, 1.0, 2.5])) and (q[0] + 2 * q[1] + q[2]) / 4 == pytest.approx(1.0)
    for body, match in ((json.dumps({"quantiles": [1.0, 0.5]}), "must not decrease"),
                        (json.dumps({"quantiles": [0.5, "x"]}), r"quantiles\[1\] must be a finite number"),
                        (json.dumps({"q": []}), "at least 2 numbers"), ("{", "not JSON")):
        good.write_text(body)
        with pytest.raises(InputError, match=match) as e:
            load_spread(good)
        assert str(good) in str(e.value)
    assert spread_path("prof/tiny.csv").as_posix() == "prof/tiny.spread.json"


def test_write_spread_replaces_or_removes_the_file_beside_the_profile(tmp_path):
    out = tmp_path / "tiny.csv"
    got = write_spread(out, [rec([0.01] * 150)], [], "p1")
    assert got["path"] == str(tmp_path / "tiny.spread.json") and json.loads(spread_path(out).read_text())["gaps"] == 150
    assert "prefill_quantiles" not in got   # no batch-1 rows given: no prefill spread
    assert write_spread(out, [rec([0.01] * 5)], [], "p2") is None and not spread_path(out).exists()   # no stale one


def spread_cfg(q, **kw):
    return SimConfig(pools=[SimPool("baseline", "m", 1)], step_spread=tuple(unit_mean(q)), **kw)


def test_one_request_draws_each_decode_iteration_from_the_spread_with_the_seed():
    w = wl([0.0], [100], [400])
    cfg = spread_cfg([0.5, 1.0, 1.5], seed=3)
    a, b = run(w, cfg).records[0], run(w, cfg).records[0]
    assert a.chunk_offsets_s == b.chunk_offsets_s                 # same seed, same draws
    assert run(w, spread_cfg([0.5, 1.0, 1.5], seed=4)).records[0].chunk_offsets_s != a.chunk_offsets_s
    gaps = np.array(tbt_gaps_s(a))
    exact = run(w, SimConfig(pools=[SimPool("baseline", "m", 1)])).records[0]
    assert len(gaps) == 399 and len(a.chunk_tokens) == 400       # one chunk per iteration: every gap its own
    assert exact.end_s - exact.first_token_s == pytest.approx(decode_s(1, 101, 399))
    # each iteration is its profile time x a factor uniform on [0.5, 1.5]: the total stays near the exact one
    factors = gaps / np.array([PERF.token_time_s(1, 101 + j) for j in range(399)])
    assert factors.min() >= 0.5 - 1e-9 and factors.max() <= 1.5 + 1e-9
    assert factors.mean() == pytest.approx(1.0, abs=0.05) and np.percentile(factors, 90) == pytest.approx(1.4, abs=0.05)


def test_split_token_machine_draws_too_and_a_constant_spread_changes_nothing():
    w = wl([0.0, 0.01, 0.5], [200, 300, 50], [30, 40, 20])
    exact = run(w, split_cfg())
    flat = run(w, split_cfg(step_spread=(1.0, 1.0)))
    for x, y in zip(exact.records, flat.records):
        assert y.first_token_s == pytest.approx(x.first_token_s) and y.end_s == pytest.approx(x.end_s)
    spread = run(w, split_cfg(step_spread=tuple(unit_mean([0.2, 1.0, 3.0]))))
    assert [r.end_s for r in spread.records] != pytest.approx([r.end_s for r in exact.records])
    assert [r.first_token_s for r in spread.records] == pytest.approx([r.first_token_s for r in exact.records])


def test_bad_spread_in_a_config_is_an_input_error():
    with pytest.raises(InputError, match="step_spread"):
        run(wl([0.0], [10], [5]), spread_cfg([2.0, 1.0]))


# ----------------------------------------------------------------------------- prefill spread

def test_prefill_spread_is_each_lone_prefill_over_the_fit():
    fit = lambda p: 0.010 + 2e-5 * p   # noqa: E731
    factors = [0.8, 1.0, 1.0, 1.0, 1.6] * 4
    s = measure_prefill_spread([(32 * (i + 1), fit(32 * (i + 1)) * f) for i, f in enumerate(factors)], fit)
    assert s["prefills"] == 20 and s["prefill_p50"] == pytest.approx(1.0) and s["prefill_p90"] == pytest.approx(1.6)
    q = s["prefill_quantiles"]
    assert q == sorted(q) and sum(a + b for a, b in zip(q, q[1:])) / (2 * (len(q) - 1)) == pytest.approx(1.0, abs=1e-5)
    assert q[-1] / q[0] == pytest.approx(1.6 / 0.8, rel=1e-4)   # the measured shape, only scaled
    assert measure_prefill_spread([(32, fit(32))] * (MIN_PREFILLS - 1), fit) is None


def test_write_spread_adds_the_prefills_over_the_profiles_own_fit(tmp_path):
    out = tmp_path / "tiny.csv"
    rows = [{"model": "m", "hardware": "cpu-core", "tensor_parallel": 1, "prompt_size": p, "batch_size": 1,
             "token_size": 64, "prompt_time": (10.0 + p / 100) * f, "token_time": 5.0,
             "e2e_time": (10.0 + p / 100) * f + 63 * 5.0}
            for p in (32, 128, 512, 1024, 2048) for f in (0.9, 1.1)]
    got = write_spread(out, [rec([0.01] * 150)], rows, "p1")
    assert got["prefills"] == 10 and 0.85 < got["prefill_p50"] < 1.15
    q = load_prefill_spread(spread_path(out))
    assert q is not None and q[0] < 0.95 and q[-1] > 1.05
    assert q == pytest.approx(tuple(unit_mean(json.loads(spread_path(out).read_text())["prefill_quantiles"])))


def test_a_spread_file_without_prefills_has_none_and_a_bad_table_is_named(tmp_path):
    f = tmp_path / "x.spread.json"
    f.write_text(json.dumps({"quantiles": [0.5, 1.5]}))
    assert load_prefill_spread(f) is None
    f.write_text(json.dumps({"quantiles": [0.5, 1.5], "prefill_quantiles": [1.5, 0.5]}))
    with pytest.raises(InputError, match=r"prefill_quantiles\[1\] = 0.5 is below") as e:
        load_prefill_spread(f)
    assert str(f) in str(e.value)
    with pytest.raises(InputError, match="prefill_spread"):
        run(wl([0.0], [10], [5]), SimConfig(pools=[SimPool("baseline", "m", 1)], prefill_spread=(2.0, 1.0)))


def lone_ttfts_s(cfg) -> list[float]:
    """60 requests 10 s apart (each alone on its machine): their TTFTs."""
    w = wl([10.0 * i for i in range(60)], [500] * 60, [4] * 60)
    return [r.first_token_s - r.actual_send_s for r in run(w, cfg).records]


@pytest.mark.parametrize("pools", [[SimPool("baseline", "m", 1)],
                                   [SimPool("prompt", "m", 1), SimPool("token", "m", 1)]])
def test_every_prompt_iteration_draws_from_the_prefill_spread_with_the_seed(pools):
    """Baseline machines (chunked, sim/batching.py) and prompt machines (whole prompts, cluster._plan) alike: each
    lone prefill takes the model's time x a factor uniform on [0.5, 1.5] (mean 1), the same for the same seed."""
    exact = lone_ttfts_s(SimConfig(pools=pools))
    assert max(exact) == pytest.approx(min(exact))
    cfg = SimConfig(pools=pools, prefill_spread=tuple(unit_mean([0.5, 1.5])), seed=5)
    drawn = lone_ttfts_s(cfg)
    other_seed = SimConfig(pools=pools, prefill_spread=cfg.prefill_spread, seed=6)
    assert drawn == lone_ttfts_s(cfg) and drawn != lone_ttfts_s(other_seed)
    factors = np.array(drawn) / exact[0]
    assert factors.min() >= 0.5 - 1e-9 and factors.max() <= 1.5 + 1e-9 and factors.std() > 0.2
    assert factors.mean() == pytest.approx(1.0, abs=0.1)


# ----------------------------------------------------------------------------- prompt lengths new to the machine

@pytest.mark.parametrize("pools", [[SimPool("baseline", "m", 1)],
                                   [SimPool("prompt", "m", 1), SimPool("token", "m", 1)]])
def test_a_prefill_of_a_token_count_new_to_the_machine_takes_the_cold_factor(pools):
    """Chunked baseline machines (sim/batching.py) and prompt machines (cluster._plan): lone prompts of 500, 500,
    600, 500, 600 and 700 tokens: the first of each length x1.5, the repeats at the model's time."""
    w = wl([10.0 * i for i in range(6)], [500, 500, 600, 500, 600, 700], [4] * 6)
    ttft = lambda cfg: [r.first_token_s - r.actual_send_s for r in run(w, cfg).records]   # noqa: E731
    plain, cold = ttft(SimConfig(pools=pools)), ttft(SimConfig(pools=pools, cold_prefill_factor=1.5))
    ratio = [c / p for c, p in zip(cold, plain)]
    first_token = ratio[1] * plain[1]   # what a repeat's TTFT is: no factor
    assert cold[1] == pytest.approx(first_token) and ratio[3] == pytest.approx(1.0) and ratio[4] == pytest.approx(1.0)
    for i in (0, 2, 5):   # the prefill itself x1.5; the TTFT also holds a first decode step on split token machines
        assert 1.3 < ratio[i] <= 1.5 + 1e-9
    with pytest.raises(InputError, match="cold_prefill_factor"):
        run(w, SimConfig(pools=pools, cold_prefill_factor=0.0))


def test_prefill_spread_samples_are_repeated_lengths_and_fresh_lengths_are_new():
    assert iteration_sizes(512, 1) == {512} and iteration_sizes(4096, 1) == {2048}
    assert iteration_sizes(3072, 1) == {2048, 1024} and iteration_sizes(512, 2) == {1024}
    c = ColdPrefills()
    plan = [("warmup", 4096, 1, 0.2), ("warmup", 512, 16, 1.0),       # 2048-token iterations seen
            (0, 32, 1, 0.030), (0, 512, 1, 0.040), (0, 512, 1, 0.020), (0, 2048, 1, 0.090), (0, 1024, 1, 0.050),
            (1, 32, 1, 0.010), (1, 512, 1, 0.019), (1, 2048, 1, 0.080), (1, 1024, 1, 0.030), (2, 32, 1, 0.012)]
    for k, p, b, t in plan:
        c.add(k, p, b, t)
    assert c.warm_s == {32: [0.010, 0.012], 512: [0.020, 0.019], 2048: [0.090, 0.080], 1024: [0.030]}
    fresh = c.fresh(32, 2048)
    assert len(set(fresh)) == 12 and not set(fresh) & c.seen and fresh == sorted(fresh)
    assert 32 <= fresh[0] < 40 and 2040 <= fresh[-1] <= 2060
    pairs = [(p, 0.02 * f, 0.02) for p, f in zip(fresh, [1.1, 1.3, 1.5, 2.0, 1.2])]
    got = measure_cold_prefill(pairs)
    assert got["cold_prefill_factor"] == pytest.approx(1.3) and got["cold_prefill_pairs"][0] == [fresh[0], 22.0, 20.0]
    assert measure_cold_prefill(pairs[:2]) is None


def test_write_spread_writes_the_cold_factor_and_times_only_repeats_for_the_prefill_spread(tmp_path):
    out = tmp_path / "tiny.csv"
    sizes = (32, 128, 512, 1024, 2048)
    rows = [{"model": "m", "hardware": "cpu-core", "tensor_parallel": 1, "prompt_size": p, "batch_size": 1,
             "token_size": 64, "prompt_time": (10.0 + p / 100) * (2.0 if k == 0 else 1.0), "token_time": 5.0,
             "e2e_time": 10.0 + p / 100 + 63 * 5.0} for k in range(4) for p in sizes]
    c = ColdPrefills()
    for k in range(4):
        for r in rows[k * len(sizes):(k + 1) * len(sizes)]:
            c.add(k, r["prompt_size"], 1, r["prompt_time"] / 1e3)
    pairs = [(p, 0.04, 0.02) for p in c.fresh(32, 2048)]
    got = write_spread(out, [rec([0.01] * 150)], rows, "p1", c, pairs)
    assert got["cold_prefill_factor"] == pytest.approx(2.0) and load_cold_prefill(spread_path(out)) == pytest.approx(2.0)
    q = load_prefill_spread(spread_path(out))
    assert q is not None and q[-1] / q[0] == pytest.approx(1.0, abs=0.05)   # repeats only: no cold tail
    f = tmp_path / "bad.spread.json"
    f.write_text(json.dumps({"quantiles": [0.5, 1.5], "cold_prefill_factor": -1}))
    with pytest.raises(InputError, match="cold_prefill_factor") as e:
        load_cold_prefill(f)
    assert str(f) in str(e.value)
    f.write_text(json.dumps({"quantiles": [0.5, 1.5]}))
    assert load_cold_prefill(f) == 1.0


# ----------------------------------------------------------------------------- request spread

def test_request_spread_is_each_requests_mean_gap_over_the_fits_and_keeps_its_mean():
    # the fit says 5 ms a token at 32 prompt tokens; one request in eight ran at 2x for its whole decode
    factors = [1.0] * 7 + [2.0]
    recs = [rec([0.005 * f] * 50, i) for i, f in enumerate(factors)]
    asked = []

    def pred(p, n):
        asked.append((p, n))
        return 0.005
    s = measure_request_spread(recs, pred)
    assert asked[0] == (32, 51)   # prompt tokens, output tokens of each request
    assert s["requests_timed"] == 8 and s["request_mean"] == pytest.approx(1.125)
    assert s["request_p50"] == pytest.approx(1.0) and s["request_spread_s"] == pytest.approx(0.25)
    q = s["request_quantiles"]
    assert q[0] == pytest.approx(1.0) and q[-1] == pytest.approx(2.0) and q == sorted(q)   # not scaled to mean 1
    assert measure_request_spread(recs[:MIN_REQUESTS - 1], pred) is None


def test_write_spread_adds_the_request_spread_over_the_profiles_own_fit(tmp_path):
    out = tmp_path / "tiny.csv"
    rows = [{"model": "m", "hardware": "cpu-core", "tensor_parallel": 1, "prompt_size": 32, "batch_size": 1,
             "token_size": 51, "prompt_time": 10.0, "token_time": 5.0, "e2e_time": 10.0 + 50 * 5.0}] * 4
    recs = [rec([0.005 * (1.5 if i % 4 == 0 else 1.0)] * 50, i) for i in range(12)]
    got = write_spread(out, recs, rows, "p1")
    assert got["requests_timed"] == 12 and got["request_mean"] == pytest.approx(1 + 0.5 / 4, rel=0.02)
    q, span_s = load_request_spread(spread_path(out))
    assert q[-1] == pytest.approx(1.5, rel=0.02) and span_s == pytest.approx(0.25)


def test_load_request_spread_names_the_missing_or_bad_field(tmp_path):
    f = tmp_path / "x.spread.json"
    f.write_text(json.dumps({"quantiles": [0.5, 1.5]}))   # a profile from before the request spread
    with pytest.raises(InputError, match="request_quantiles") as e:
        load_request_spread(f)
    assert str(f) in str(e.value)
    f.write_text(json.dumps({"quantiles": [0.5, 1.5], "request_quantiles": [1.0, 2.0], "request_spread_s": 0}))
    with pytest.raises(InputError, match="request_spread_s must be a finite number > 0"):
        load_request_spread(f)
    f.write_text(json.dumps({"quantiles": [0.5, 1.5], "request_quantiles": [2.0, 1.0], "request_spread_s": 1}))
    with pytest.raises(InputError, match="must not decrease"):
        load_request_spread(f)


def request_cfg(q, span_s, **kw):
    return SimConfig(pools=[SimPool("baseline", "m", 1)], request_spread=tuple(q), request_spread_s=span_s, **kw)


def test_a_machine_holds_its_request_factor_for_the_span_then_draws_again():
    w = wl([0.0], [100], [400])
    exact = run(w, SimConfig(pools=[SimPool("baseline", "m", 1)])).records[0]
    double = run(w, request_cfg([2.0, 2.0], 0.05)).records[0]
    assert double.first_token_s == pytest.approx(exact.first_token_s)   # prefills keep their own spread
    assert double.end_s - double.first_token_s == pytest.approx(2 * (exact.end_s - exact.first_token_s))
    r = run(w, request_cfg([1.0, 3.0], 0.2, seed=5)).records[0]
    offs = np.asarray(r.chunk_offsets_s)
    factors = np.diff(offs) / np.array([PERF.token_time_s(1, 101 + j) for j in range(399)])
    changes = np.flatnonzero(np.abs(np.diff(factors)) > 1e-9) + 1   # gaps where a new draw starts
    assert 3 <= len(changes) and factors.min() >= 1.0 - 1e-9 and factors.max() <= 3.0 + 1e-9
    held_s = np.diff(offs[np.concatenate(([0], changes))])
    assert held_s.min() >= 0.2 - 1e-9   # each draw held for the span (its last iteration may end past it)
    assert run(w, request_cfg([1.0, 3.0], 0.2, seed=5)).records[0].chunk_offsets_s == r.chunk_offsets_s


def test_bad_request_spread_in_a_config_is_an_input_error():
    with pytest.raises(InputError, match="request_spread_s"):
        run(wl([0.0], [10], [5]), request_cfg([1.0, 2.0], 0.0))
    with pytest.raises(InputError, match="request_spread"):
        run(wl([0.0], [10], [5]), request_cfg([2.0, 1.0], 1.0))
