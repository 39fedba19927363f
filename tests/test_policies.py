"""Pure scheduling policies: JSQ choices, health, Splitwise mixed-pool borrowing/return, seeded determinism,
and the pending-token ledger."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from splitbench.errors import InputError
from splitbench.policies import (
    JSQ,
    Decision,
    InstanceView,
    Ledger,
    MixedPool,
    NoHealthyInstance,
    Request,
    RoundRobin,
    live_ledger,
    make_policy,
    parse_policy_params,
    policy_params,
    routable,
)

R = Request("r", 100, 10)


def test_jsq_split_picks_prompt_by_prompt_tokens_and_token_by_decode_tokens():
    views = [InstanceView("p0", "prompt", pending_prompt_tokens=500, pending_decode_tokens=0),
             InstanceView("p1", "prompt", pending_prompt_tokens=100, pending_decode_tokens=9000),
             InstanceView("t0", "token", pending_prompt_tokens=0, pending_decode_tokens=300),
             InstanceView("t1", "token", pending_prompt_tokens=9000, pending_decode_tokens=200)]
    d = JSQ(random.Random(0)).choose(R, views)
    assert d == Decision("p1", "t1", "prompt")
    assert d.split and d.label == "p1>t1"


def test_jsq_colocated_uses_all_pending_tokens():
    views = [InstanceView("b0", "baseline", 100, 100), InstanceView("b1", "baseline", 150, 0),
             InstanceView("b2", "baseline", 0, 250)]
    d = JSQ(random.Random(0)).choose(R, views)
    assert d == Decision("b1", None, "baseline")
    assert not d.split and d.label == "b1"


def test_unhealthy_instances_are_skipped_and_no_route_raises():
    views = [InstanceView("p0", "prompt", 0, healthy=False), InstanceView("p1", "prompt", 900),
             InstanceView("t0", "token", pending_decode_tokens=0, healthy=False), InstanceView("t1", "token", 0, 50)]
    for policy in (JSQ(random.Random(1)), RoundRobin(), MixedPool(random.Random(1))):
        for _ in range(3):
            assert policy.choose(R, views) == Decision("p1", "t1", "prompt")
    dead_tokens = [v if v.pool == "prompt" else InstanceView(v.id, v.pool, healthy=False) for v in views]
    assert not routable(dead_tokens)
    for policy in (JSQ(), RoundRobin(), MixedPool()):
        with pytest.raises(NoHealthyInstance, match="t0"):
            policy.choose(R, dead_tokens)
    with pytest.raises(NoHealthyInstance):
        JSQ().choose(R, [])


def test_round_robin_cycles_each_pool_in_order():
    views = [InstanceView("p0", "prompt"), InstanceView("p1", "prompt"), InstanceView("t0", "token"),
             InstanceView("t1", "token"), InstanceView("t2", "token")]
    rr = RoundRobin()
    labels = [rr.choose(R, views).label for _ in range(6)]
    assert labels == ["p0>t0", "p1>t1", "p0>t2", "p1>t0", "p0>t1", "p1>t2"]


def _drive(policy, ledger: Ledger, n: int, rid: str = "r") -> list[tuple[Decision, Request]]:
    """Dispatch n identical requests without finishing any (a burst)."""
    out = []
    for k in range(n):
        req = Request(f"{rid}{k}", 1000, 100)
        d = policy.choose(req, ledger.views())
        ledger.dispatch(d, req)
        out.append((d, req))
    return out


def test_mixed_pool_borrows_under_a_burst_and_returns_when_drained():
    ledger = Ledger([("p0", "prompt"), ("p1", "prompt"), ("t0", "token"), ("t1", "token"), ("t2", "token")])
    pol = MixedPool(random.Random(3), prompt_threshold_tokens=3000, decode_threshold_tokens=10**6)
    calm = _drive(pol, ledger, 6, "a")  # the 6th brings both prompt instances to the threshold
    assert all(d.split for d, _ in calm) and not pol.borrowed
    burst = _drive(pol, ledger, 4, "b")
    mixed = [d for d, _ in burst if d.pool == "mixed"]
    assert mixed and all(d.token_instance is None for d in mixed)
    borrowed = set(pol.borrowed)
    assert borrowed and borrowed <= {"t0", "t1", "t2"} and pol.borrow_count == len(borrowed)
    assert {d.prompt_instance for d in mixed} == borrowed
    assert len(borrowed) < 3  # the token pool always keeps an instance
    # While borrowed (still running), an instance is never a split request's token instance, even when it
    # has the fewest pending decode tokens and the prompt pool is calm again.
    calm_views = [replace(v, pending_prompt_tokens=0, pending_decode_tokens=0 if v.id in borrowed else 50)
                  for v in ledger.views()]
    for _ in range(5):
        d = pol.choose(Request("x", 1, 1), calm_views)
        assert d.split and d.token_instance not in borrowed
    assert set(pol.borrowed) == borrowed
    # Drain everything: the next decision returns the borrowed instances to the token pool.
    for d, req in calm + burst:
        ledger.prefill_done(d, req)
        ledger.finish(d, req)
    assert all(v.pending_tokens == 0 and v.running == 0 for v in ledger.views())
    d = pol.choose(Request("y", 10, 10), ledger.views())
    assert d.split and not pol.borrowed and pol.return_count == len(borrowed)


def test_mixed_pool_never_empties_a_pool_and_reuses_room_in_the_mixed_pool():
    ledger = Ledger([("p0", "prompt"), ("t0", "token")])
    pol = MixedPool(random.Random(0), prompt_threshold_tokens=1500, decode_threshold_tokens=10**6)
    assert all(d.split for d, _ in _drive(pol, ledger, 10)) and pol.borrow_count == 0
    ledger = Ledger([("p0", "prompt"), ("t0", "token"), ("t1", "token")])
    pol = MixedPool(random.Random(0), prompt_threshold_tokens=1500, decode_threshold_tokens=10**6)
    ds = [d for d, _ in _drive(pol, ledger, 3)]
    # 2nd request: p0 has 1000 < 1500 -> split; 3rd: p0 at 2000 -> borrow a token instance.
    assert [d.pool for d in ds] == ["prompt", "prompt", "mixed"]
    assert pol.borrow_count == 1


def test_mixed_pool_borrows_prompt_instance_when_token_pool_overloaded():
    ledger = Ledger([("p0", "prompt"), ("p1", "prompt"), ("t0", "token")])
    pol = MixedPool(random.Random(0), prompt_threshold_tokens=10**6, decode_threshold_tokens=250)
    ds = [d for d, _ in _drive(pol, ledger, 4)]
    assert [d.pool for d in ds[:3]] == ["prompt"] * 3
    assert ds[3].pool == "mixed" and ds[3].prompt_instance in {"p0", "p1"}


def _tie_heavy_decisions(policy_name: str, seed: int) -> list[str]:
    pol = make_policy(policy_name, seed=seed)
    ledger = Ledger([(f"p{i}", "prompt") for i in range(4)] + [(f"t{i}", "token") for i in range(4)])
    work, out = random.Random(99), []
    live: list[tuple[Decision, Request]] = []
    for k in range(300):
        req = Request(str(k), work.choice([100, 200]), work.choice([10, 20]))
        d = pol.choose(req, ledger.views())
        ledger.dispatch(d, req)
        live.append((d, req))
        out.append(d.label)
        if work.random() < 0.6:  # finish a random earlier request (keeps many ties)
            d2, r2 = live.pop(work.randrange(len(live)))
            ledger.prefill_done(d2, r2)
            ledger.finish(d2, r2)
    return out


@pytest.mark.parametrize("name", ["jsq", "mixed-pool", "round-robin"])
def test_same_seed_same_decisions(name):
    assert _tie_heavy_decisions(name, 7) == _tie_heavy_decisions(name, 7)


def test_jsq_tie_breaks_depend_on_the_seed():
    assert _tie_heavy_decisions("jsq", 1) != _tie_heavy_decisions("jsq", 2)


def test_make_policy_and_ledger_validation():
    with pytest.raises(InputError, match="unknown policy 'fastest'"):
        make_policy("fastest")
    with pytest.raises(InputError, match="no parameter 'bogus'.*known: prompt_threshold_tokens"):
        make_policy("mixed-pool", bogus=1)
    with pytest.raises(InputError, match=r"'jsq' has no parameter 'prompt_threshold_tokens' \(known: none\)"):
        make_policy("jsq", prompt_threshold_tokens=10)
    with pytest.raises(ValueError, match="pool must be"):
        Ledger([("x", "decode")])
    with pytest.raises(ValueError, match="duplicate"):
        Ledger([("x", "prompt"), ("x", "token")])


def test_policy_params_are_typed_and_bad_ones_name_the_key():
    pol = make_policy("mixed", seed=0, prompt_threshold_tokens="100", decode_threshold_tokens=7.0)
    assert (pol.prompt_threshold_tokens, pol.decode_threshold_tokens) == (100, 7)
    assert type(pol.decode_threshold_tokens) is int
    assert policy_params("mixed-pool", {"decode_threshold_tokens": "2_048"}) == {"decode_threshold_tokens": 2048}
    assert policy_params("mixed-pool", {}, defaults=True) == {"prompt_threshold_tokens": 8192,
                                                              "decode_threshold_tokens": 65536,
                                                              "max_borrow_fraction": 0.25}
    assert policy_params("jsq", None, defaults=True) == {}
    for bad in ("abc", "0", "-3", "1.5", "inf", "nan", True, None, [4]):
        with pytest.raises(InputError) as e:
            make_policy("mixed-pool", prompt_threshold_tokens=bad)
        msg = str(e.value)
        assert "\n" not in msg and "'prompt_threshold_tokens'" in msg and "whole number >= 1" in msg, msg


def test_parse_policy_params_from_command_line_items():
    items = ["prompt-threshold-tokens=1e3", " decode_threshold_tokens = 64 "]
    assert parse_policy_params(items) == {"prompt_threshold_tokens": "1e3", "decode_threshold_tokens": "64"}
    typed = parse_policy_params(items, "mixed-pool")
    assert typed == {"prompt_threshold_tokens": 1000, "decode_threshold_tokens": 64}
    assert parse_policy_params([], "jsq") == {}
    for bad, words in ((["prompt_threshold_tokens"], "expected KEY=VALUE"), (["=5"], "expected KEY=VALUE"),
                       (["a="], "expected KEY=VALUE"), (["a=1", "a=2"], "'a' is given twice")):
        with pytest.raises(InputError, match=words):
            parse_policy_params(bad)
    with pytest.raises(InputError, match="no parameter 'thresh'"):
        parse_policy_params(["thresh=5"], "mixed-pool")
    with pytest.raises(InputError, match="'decode_threshold_tokens': must be a whole number >= 1, got 'lots'"):
        parse_policy_params(["decode-threshold-tokens=lots"], "mixed-pool")


def test_parameters_change_mixed_pool_decisions():
    """The same burst: default thresholds keep every request split; a low prompt threshold (given as text, as
    from --policy-param) sends part of it to the mixed pool."""
    def pools(**params):
        ledger = Ledger([("p0", "prompt"), ("t0", "token"), ("t1", "token")])
        return [d.pool for d, _ in _drive(make_policy("mixed-pool", seed=0, **params), ledger, 6)]
    assert pools() == ["prompt"] * 6
    low = pools(**parse_policy_params(["prompt_threshold_tokens=1500"], "mixed-pool"))
    assert low[:2] == ["prompt", "prompt"] and "mixed" in low[2:]


def test_ledger_moves_prompt_tokens_out_at_prefill_and_decode_tokens_at_finish():
    ledger = Ledger([("p0", "prompt"), ("t0", "token"), ("b0", "baseline")])
    split, colo = Decision("p0", "t0", "prompt"), Decision("b0", None, "baseline")
    req = Request("r", 300, 40)
    ledger.dispatch(split, req)
    ledger.dispatch(colo, req)
    v = {x.id: x for x in ledger.views()}
    assert (v["p0"].pending_prompt_tokens, v["p0"].running, v["t0"].pending_decode_tokens, v["t0"].running) == \
        (300, 1, 40, 1)
    assert (v["b0"].pending_prompt_tokens, v["b0"].pending_decode_tokens, v["b0"].running) == (300, 40, 1)
    ledger.prefill_done(split, req)
    ledger.prefill_done(colo, req)
    v = {x.id: x for x in ledger.views()}
    assert (v["p0"].pending_tokens, v["p0"].running, v["t0"].pending_decode_tokens) == (0, 0, 40)
    assert (v["b0"].pending_prompt_tokens, v["b0"].pending_decode_tokens, v["b0"].running) == (0, 40, 1)
    ledger.finish(split, req)
    ledger.finish(colo, req)
    assert all(x.pending_tokens == 0 and x.running == 0 for x in ledger.views())


def _ranked_vs_scanned(name: str, pools: list[str], seed: int, steps: int = 1500, **params) -> list[str]:
    """Two policies with one seed, one reading the ledger's ranks (its views), one scanning a plain tuple of the
    same views, on one ledger with many ties, finishes and health flips: their decisions must be identical."""
    ledger = Ledger([(f"{p[0]}{k}", p) for k, p in enumerate(pools)])
    ranked, scanned = make_policy(name, seed=seed, **params), make_policy(name, seed=seed, **params)
    work, live, out = random.Random(seed), [], []
    for k in range(steps):
        req = Request(str(k), work.choice([100, 200, 400]), work.choice([10, 20]))
        views = ledger.views()
        assert ranked.choose(req, views) == (d := scanned.choose(req, tuple(ledger.views())))
        ledger.dispatch(d, req)
        live.append([d, req, False])
        out.append(d.label)
        for _ in range(work.choice([0, 1, 1, 2])):
            if live:
                item = live[work.randrange(len(live))]
                if not item[2]:
                    ledger.prefill_done(item[0], item[1])
                    item[2] = True
                else:
                    live.remove(item)
                    ledger.finish(item[0], item[1])
        if work.random() < 0.02:
            iid = work.choice(ledger.order)
            ledger.set_healthy(iid, not ledger.healthy[iid] or not routable(
                [v for v in ledger.views() if v.id != iid]))
    return out


@pytest.mark.parametrize("pools", [["prompt"] * 4 + ["token"] * 5, ["baseline"] * 7,
                                   ["prompt", "mixed", "token", "baseline", "prompt", "token", "mixed"]])
def test_ranked_jsq_decides_exactly_as_the_scan(pools):
    labels = _ranked_vs_scanned("jsq", pools, seed=11)
    assert len(set(labels)) > 3


@pytest.mark.parametrize("params", [{"prompt_threshold_tokens": 600, "decode_threshold_tokens": 10**6},
                                    {"prompt_threshold_tokens": 10**6, "decode_threshold_tokens": 60},
                                    {"prompt_threshold_tokens": 500, "decode_threshold_tokens": 50,
                                     "max_borrow_fraction": 1.0}])
def test_ranked_mixed_pool_decides_exactly_as_the_scan(params):
    labels = _ranked_vs_scanned("mixed-pool", ["prompt"] * 5 + ["token"] * 6 + ["mixed"], seed=5, **params)
    assert any(">" not in x for x in labels) and any(">" in x for x in labels)


def test_views_are_a_snapshot_of_the_moment_they_were_taken():
    ledger = Ledger([("p0", "prompt"), ("t0", "token")])
    before = ledger.views()
    d = Decision("p0", "t0", "prompt")
    ledger.dispatch(d, Request("r", 300, 40))
    assert [v.pending_tokens for v in before] == [0, 0] and before.ranks() is None   # frozen before the change
    now = ledger.views()
    assert now.ranks() is not None and [(v.pending_prompt_tokens, v.pending_decode_tokens) for v in now] == \
        [(300, 0), (0, 40)]
    assert now == tuple(now) and len(now) == 2


def test_live_ledger_is_the_ledger_behind_current_views_only():
    ledger = Ledger([("p0", "prompt"), ("t0", "token"), ("b0", "baseline")])
    views = ledger.views()
    assert live_ledger(views) is ledger
    assert live_ledger(tuple(views)) is None and live_ledger(list(views)) is None   # plain views: policies scan
    ledger.dispatch(Decision("p0", "t0", "prompt"), Request("r", 300, 40))
    assert live_ledger(views) is None                                             # the ledger changed since
    assert JSQ(random.Random(0)).choose(R, views) == JSQ(random.Random(0)).choose(R, tuple(views))
    assert live_ledger(ledger.views()) is ledger
