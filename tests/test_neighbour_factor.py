"""Machines sharing a host: a decode-only iteration takes neighbour_busy_factor x its time when another machine is
not idle as it starts (cfg.neighbour_busy_factor), and only then; 1.0 leaves the simulation as it was."""
from __future__ import annotations

import pytest
from test_simulator import PERF, run, split_cfg, wl

from splitbench.errors import InputError
from splitbench.sim.config import SimConfig, SimPool


def starts_and_gaps(rec):
    """(absolute start time, length) of each decode iteration that made one of rec's tokens 2..n."""
    ts = [rec.actual_send_s + o for o in rec.chunk_offsets_s]
    return [(a, b - a) for a, b in zip(ts, ts[1:])]


def test_token_machine_decodes_slower_exactly_while_the_prompt_machine_prefills():
    # A: decodes 300 tokens on the token machine from ~0.03 s; B: one output token, its 20,000-token prefill keeps
    # the prompt machine busy over [1.0, 3.01) s and nothing else is ever in flight there
    w = wl([0.0, 1.0], [10, 20000], [300, 1])
    f = 1.5
    slow, base = run(w, split_cfg(neighbour_busy_factor=f)), run(w, split_cfg())
    b = slow.records[1]
    busy_from, busy_to = 1.0, b.first_token_s   # B's prefill: arrival to its only token
    assert busy_to == pytest.approx(1.0 + PERF.prompt_time_s(20000))
    a = slow.records[0]
    ctx, seen = 10 + 1, {True: 0, False: 0}   # the iteration making token j+1 reads input + j tokens
    for start, gap in starts_and_gaps(a):
        busy = busy_from <= start < busy_to
        assert gap == pytest.approx(PERF.token_time_s(1, ctx) * (f if busy else 1.0), rel=1e-6)
        seen[busy] += 1
        ctx += 1
    assert seen[True] > 50 and seen[False] > 50
    assert a.end_s > base.records[0].end_s and b.first_token_s == base.records[1].first_token_s   # prefill as before


def test_factor_without_a_busy_neighbour_or_of_one_changes_nothing():
    w = wl([0.0], [100], [200])
    two = [SimPool("baseline", "m", 2)]
    exact = run(w, SimConfig(pools=two)).records[0]
    alone = run(w, SimConfig(pools=two, neighbour_busy_factor=2.0)).records[0]   # the other machine stays idle
    assert alone.first_token_s == pytest.approx(exact.first_token_s)
    assert alone.end_s == pytest.approx(exact.end_s, rel=1e-9)
    assert len(alone.chunk_tokens) == 200   # one iteration per chunk once the factor is on
    one = run(wl([0.0, 0.5], [10, 20000], [300, 1]), split_cfg(neighbour_busy_factor=1.0))
    plain = run(wl([0.0, 0.5], [10, 20000], [300, 1]), split_cfg())
    assert [r.end_s for r in one.records] == [r.end_s for r in plain.records]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_factor_is_an_input_error_naming_it(bad):
    with pytest.raises(InputError, match="neighbour_busy_factor"):
        run(wl([0.0], [10], [5]), split_cfg(neighbour_busy_factor=bad))
