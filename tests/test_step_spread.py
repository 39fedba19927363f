"""Decode step spread: measured from per-token gaps, loaded with one-line errors, and drawn by the simulator for every
decode iteration (same seed, same records; the mean iteration time kept; the gaps spread as measured)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from test_simulator import PERF, decode_s, run, split_cfg, wl

from splitbench.app.profile import write_spread
from splitbench.errors import InputError
from splitbench.metrics.latency import tbt_gaps_s
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.sim.config import SimConfig, SimPool
from splitbench.sim.spread import MIN_GAPS, load_spread, measure_spread, spread_path, unit_mean


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
    got = write_spread(out, [rec([0.01] * 150)], "p1")
    assert got["path"] == str(tmp_path / "tiny.spread.json") and json.loads(spread_path(out).read_text())["gaps"] == 150
    assert write_spread(out, [rec([0.01] * 5)], "p2") is None and not spread_path(out).exists()   # no stale one


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
