"""Idle wake: a prefill on a machine that idled for g seconds takes the measured extra for g (linear between the
measured gaps, the last one's beyond), measured by `splitbench profile` as (after idling, again at once) pairs and
loaded from the spread file with one-line errors."""
from __future__ import annotations

import json

import pytest
from test_simulator import run, wl

from splitbench.errors import InputError
from splitbench.sim.config import SimConfig, SimPool
from splitbench.sim.spread import load_idle_wake, measure_idle_wake

WAKE = ((1.0, 0.010), (4.0, 0.040))   # 10 ms after 1 s idle, 40 ms after 4 s


@pytest.mark.parametrize("pools,last_busy", [([SimPool("baseline", "m", 1)], "end_s"),
                                             ([SimPool("prompt", "m", 1), SimPool("token", "m", 1)], "first_token_s")])
def test_a_prefill_after_the_machine_idled_takes_the_extra_for_its_idle_time(pools, last_busy):
    """Lone prompts of one length: the first after 0.5 s of idle, then 1-4 s, 10 s, and one sent while the machine
    is still busy with the one before (no idle, no extra). The machine that prefills was last busy at the request
    before's end (baseline) or its prefill's end (the prompt machine: its first token)."""
    w = wl([0.5, 30.0, 33.5, 44.0, 44.001], [500] * 5, [40] * 5)
    plain_recs = run(w, SimConfig(pools=pools)).records
    ttft = lambda recs: [r.first_token_s - r.actual_send_s for r in recs]   # noqa: E731
    plain, woken = ttft(plain_recs), ttft(run(w, SimConfig(pools=pools, idle_wake=WAKE)).records)
    extra = [b - a for a, b in zip(plain, woken)]
    assert extra[0] == pytest.approx(0.005)          # 0.5 s idle since the start: half of the 1-s extra
    assert extra[1] == pytest.approx(0.040)          # ~29 s idle: the last gap's extra
    idle_s = 33.5 - getattr(plain_recs[1], last_busy)   # the prefilling machine's idle before request 2 (+ 40 ms)
    assert 1.0 < idle_s - 0.040 < 4.0
    assert extra[2] == pytest.approx(0.010 + 0.010 * (idle_s - 0.040 - 1.0))   # linear from 10 ms at 1 s to 40 at 4
    assert extra[3] == pytest.approx(0.040)          # 10 s idle
    assert extra[4] == pytest.approx(0.040)          # queued behind request 3's woken prefill, not woken again
    with pytest.raises(InputError, match="idle_wake"):
        run(w, SimConfig(pools=pools, idle_wake=((2.0, 0.01), (1.0, 0.02))))


def test_a_busy_machine_pays_no_wake():
    """Back-to-back arrivals on one machine: only the first (after 1 s of idle since the start) pays."""
    w = wl([1.0 + 0.001 * i for i in range(4)], [300] * 4, [20] * 4)
    plain = run(w, SimConfig(pools=[SimPool("baseline", "m", 1)])).records
    woken = run(w, SimConfig(pools=[SimPool("baseline", "m", 1)], idle_wake=WAKE)).records
    shifts = [b.first_token_s - a.first_token_s for a, b in zip(plain, woken)]
    assert shifts[0] == pytest.approx(0.010) and all(s == pytest.approx(0.010) for s in shifts)   # all wait behind it


def test_measure_idle_wake_takes_each_gaps_median_extra_and_load_names_the_bad_field(tmp_path):
    samples = [(0.5, 0.030, 0.020), (0.5, 0.025, 0.020), (0.5, 0.050, 0.020),   # +10, +5, +30 ms: median 10
               (2.0, 0.060, 0.020), (2.0, 0.080, 0.030),                        # +40, +50: median 45
               (4.0, 0.020, 0.030), (4.0, 0.019, 0.020),                        # faster after idling: clipped to 0
               (8.0, 0.100, 0.020)]                                             # one sample: left out
    got = measure_idle_wake(samples)
    assert got["idle_wake"] == [[0.5, pytest.approx(0.010)], [2.0, pytest.approx(0.045)], [4.0, 0.0]]
    assert got["idle_wake_samples"][0] == [0.5, 30.0, 20.0] and measure_idle_wake(samples[-1:]) is None
    f = tmp_path / "x.spread.json"
    f.write_text(json.dumps({"quantiles": [0.5, 1.5], **got}))
    assert load_idle_wake(f) == ((0.5, pytest.approx(0.010)), (2.0, pytest.approx(0.045)), (4.0, 0.0))
    for bad, field in (([[1.0, 0.01], [0.5, 0.02]], "idle_wake"), ([[1.0, -0.01]], "idle_wake"),
                       ([[0.0, 0.01]], r"idle_wake\[0\]\[0\]"), ("x", "idle_wake")):
        f.write_text(json.dumps({"quantiles": [0.5, 1.5], "idle_wake": bad}))
        with pytest.raises(InputError, match=field) as e:
            load_idle_wake(f)
        assert str(f) in str(e.value) and "\n" not in str(e.value)
    f.write_text(json.dumps({"quantiles": [0.5, 1.5]}))
    assert load_idle_wake(f) is None
