"""Discrete-event cluster simulator: hand-checked micro-scenarios on a linear fake performance model, a slow
one-iteration-at-a-time reference for the fast-forward, determinism, and policy objects shared with the router."""
from __future__ import annotations

import random
from collections import deque

import numpy as np
import pytest
from policy_watch import Watched

from splitbench import policies
from splitbench.errors import InputError
from splitbench.metrics.latency import e2e_s, tbt_gaps_s, ttft_s
from splitbench.servers import router
from splitbench.sim import cluster as sim_cluster
from splitbench.sim.cluster import simulate
from splitbench.sim.config import SimConfig, SimPool
from splitbench.sim.engine import Simulator
from splitbench.sim.perfmodel import PerfModel
from splitbench.workload.types import Workload

EPS = 1e-12


class LinearPerf(PerfModel):
    """prompt = p0 + p1 * tokens; decode iteration = c0 + c1 * batch + c2 * context (what PerfModel promises)."""

    def __init__(self, p0=0.01, p1=1e-4, c0=0.02, c1=1e-3, c2=1e-5):
        self.p0, self.p1, self.c0, self.c1, self.c2 = p0, p1, c0, c1, c2

    def prompt_time_s(self, n):
        return self.p0 + self.p1 * n

    def kv_at(self, b):
        return self.c2

    def attention_s(self, self_tokens2, cross_tokens2):
        return 0.0

    def token_time_s(self, b, ctx):
        return self.c0 + self.c1 * b + self.c2 * ctx

    def token_iterations_s(self, b, ctx, k):
        return k * self.token_time_s(b, ctx) + self.c2 * b * k * (k - 1) / 2

    def iterations_within(self, b, ctx, d):
        k = 0
        while self.token_iterations_s(b, ctx, k + 1) <= d:
            k += 1
        return k


PERF = LinearPerf()


def wl(arrivals, ins, outs):
    n = len(arrivals)
    return Workload("test", np.asarray(arrivals, dtype=np.float64), np.asarray(ins, dtype=np.int64),
                    np.asarray(outs, dtype=np.int64), np.arange(n, dtype=np.int64))


def split_cfg(prompts=1, tokens=1, **kw):
    return SimConfig(pools=[SimPool("prompt", "m", prompts), SimPool("token", "m", tokens)], **kw)


def run(w, cfg, kv_cap=10**6, kv_bytes=1000, perf=PERF):
    return simulate(w, cfg, {"m": perf}, {"m": kv_cap}, kv_bytes)


def decode_s(b, ctx, k, perf=PERF):
    """k decode iterations summed one by one (the hand computation)."""
    return sum(perf.token_time_s(b, ctx + b * j) for j in range(k))


# ---------------------------------------------------------------- event loop

def test_event_loop_orders_by_time_then_fifo_and_handlers_may_return_events():
    sim, seen = Simulator(), []

    def note(tag):
        seen.append((sim.now_s, tag))
        if tag == "a":
            return [(2.0, note, "from-a"), (1.5, note, "c")]

    sim.schedule(1.0, note, "a")
    sim.schedule(1.0, note, "b")   # same time: after "a" (scheduled later)
    sim.schedule(0.5, note, "first")
    assert sim.run() == 2.0
    assert seen == [(0.5, "first"), (1.0, "a"), (1.0, "b"), (1.5, "c"), (2.0, "from-a")]
    assert sim.events == 5


# ---------------------------------------------------------------- micro-scenarios

def test_one_split_request_every_time_by_hand():
    bw, layers = 1e6, 4
    res = run(wl([0.5], [100], [4]), split_cfg(link_bytes_per_s=bw, layers=layers))
    (r,) = res.records
    p = 0.01 + 1e-4 * 100                     # prefill: 20 ms
    x = 100 * 1000 / bw                        # 100 KB over 1 MB/s: 100 ms, longer than the prefill
    kv_at = 0.5 + max(p / layers + x, p + x / layers)   # layer-wise, link-bound
    last = kv_at + decode_s(1, 101, 3)         # tokens 2..4: contexts 101, 102, 103
    assert r.status == "ok" and (r.prefill_instance, r.decode_instance, r.pool) == ("prompt-0", "token-0", "split")
    assert r.first_token_s == pytest.approx(0.5 + p, abs=EPS)
    assert ttft_s(r) == pytest.approx(p, abs=EPS)
    assert r.last_token_s == pytest.approx(last, abs=EPS) and r.end_s == r.last_token_s
    assert e2e_s(r) == pytest.approx(last - 0.5, abs=EPS)
    assert r.chunk_tokens == [1, 3]
    assert r.chunk_offsets_s == pytest.approx([p, last - 0.5], abs=EPS)
    assert tbt_gaps_s(r) == pytest.approx([(last - 0.5 - p) / 3] * 3, abs=EPS)
    assert list(r.phases_s) == ["router_recv", "prefill_sent", "prefill_done", "decode_sent", "first_token", "done"]
    assert r.phases_s["prefill_done"] == r.phases_s["first_token"] == r.first_token_s
    assert r.phases_s["decode_sent"] == pytest.approx(kv_at, abs=EPS)
    assert r.actual_output_tokens == 4 and r.intended_send_s == r.actual_send_s == 0.5
    assert res.instances == [{"id": "prompt-0", "pool": "prompt", "machine": "m"},
                             {"id": "token-0", "pool": "token", "machine": "m"}]


def test_first_token_from_the_decode_machine_as_in_vllm_pd():
    """first_token="decode": the token machine makes all 4 tokens, the first after its first iteration (context 100)."""
    bw = 1e6
    res = run(wl([0.5], [100], [4]), split_cfg(link_bytes_per_s=bw, kv_transfer="serialized", first_token="decode"))
    (r,) = res.records
    p, x = 0.01 + 1e-4 * 100, 100 * 1000 / bw
    kv_at = 0.5 + p + x
    first = kv_at + decode_s(1, 100, 1)
    last = kv_at + decode_s(1, 100, 4)          # tokens 1..4: contexts 100..103
    assert r.first_token_s == pytest.approx(first, abs=EPS) and r.last_token_s == pytest.approx(last, abs=EPS)
    assert r.phases_s["prefill_done"] == pytest.approx(0.5 + p, abs=EPS)
    assert r.phases_s["first_token"] == r.first_token_s and sum(r.chunk_tokens) == 4
    assert r.chunk_tokens[0] == 1 and r.chunk_offsets_s[0] == pytest.approx(first - 0.5, abs=EPS)
    # a second request joining mid-run still gets its own exact first-token time
    res = run(wl([0.0, 0.05], [100, 100], [40, 4]), split_cfg(link_bytes_per_s=1e12, first_token="decode"))
    a, b = res.records
    assert b.first_token_s > b.phases_s["decode_sent"] and sum(b.chunk_tokens) == 4 and b.chunk_tokens[0] == 1
    assert sum(a.chunk_tokens) == 40 and a.last_token_s > b.last_token_s


def test_layerwise_and_serialized_transfer_times_and_link_queueing():
    p, bw, layers = 0.01 + 1e-4 * 1000, 1e9, 10
    x = 1000 * 1000 / bw                       # 1 ms: the link is faster than the prefill
    w = wl([0.0, 0.0], [1000, 1000], [2, 2])   # both from different prompt machines to the one token machine
    lw = run(w, split_cfg(prompts=2, tokens=1, policy="round-robin", link_bytes_per_s=bw, layers=layers))
    se = run(w, split_cfg(prompts=2, tokens=1, policy="round-robin", link_bytes_per_s=bw, layers=layers,
                          kv_transfer="serialized"))
    # layer-wise: the first transfer overlaps the prefill, only the last layer's share is left after it; the
    # second waits for the token machine's link (busy for x from p/layers on) but still overlaps the prefill
    assert lw.records[0].phases_s["decode_sent"] == pytest.approx(p + x / layers, abs=EPS)
    assert lw.records[1].phases_s["decode_sent"] == pytest.approx(p + x / layers, abs=EPS)
    # serialized: after the prefill, one after the other over the token machine's link
    assert se.records[0].phases_s["decode_sent"] == pytest.approx(p + x, abs=EPS)
    assert se.records[1].phases_s["decode_sent"] == pytest.approx(p + 2 * x, abs=EPS)
    assert [(r.prefill_instance, r.decode_instance) for r in se.records] == [("prompt-0", "token-0"), ("prompt-1", "token-0")]


def test_two_requests_batched_under_the_prompt_cap():
    # r0 starts alone on the idle machine; r1 and r2 queue behind it and share the next iteration (1000 <= 2048)
    w = wl([0.0, 0.001, 0.002], [1000, 500, 500], [1, 1, 1])
    res = run(w, split_cfg())
    p0 = 0.01 + 1e-4 * 1000
    p12 = 0.01 + 1e-4 * 1000
    assert res.records[0].first_token_s == pytest.approx(p0, abs=EPS)
    assert res.records[1].first_token_s == pytest.approx(p0 + p12, abs=EPS)
    assert res.records[2].first_token_s == pytest.approx(p0 + p12, abs=EPS)
    assert res.stats["prompt_iterations"] == 2
    # one output token: the prefill made it, nothing to transfer or decode
    assert all(r.last_token_s == r.first_token_s and r.chunk_tokens == [1] for r in res.records)


def test_two_requests_over_the_prompt_cap_run_fcfs():
    w = wl([0.0, 0.0], [1500, 1000], [1, 1])   # same instant: one wake-up, but 2500 > 2048 tokens
    res = run(w, split_cfg())
    a, b = 0.01 + 1e-4 * 1500, 0.01 + 1e-4 * 1000
    assert res.records[0].first_token_s == pytest.approx(a, abs=EPS)
    assert res.records[1].first_token_s == pytest.approx(a + b, abs=EPS)
    same = run(w, split_cfg(max_prompt_batch_tokens=2500))   # under a larger cap they share one iteration
    assert [r.first_token_s for r in same.records] == pytest.approx([0.01 + 0.25] * 2, abs=EPS)


def test_single_prompt_longer_than_the_cap_runs_alone():
    res = run(wl([0.0], [5000], [1]), split_cfg())
    assert res.records[0].first_token_s == pytest.approx(0.01 + 0.5, abs=EPS)


def test_kv_full_token_machine_queues_until_the_first_request_finishes():
    bw = 1e12
    w = wl([0.0, 0.0], [100, 100], [50, 50])   # each needs 150 KV tokens; the token machine holds 250
    res = run(w, split_cfg(link_bytes_per_s=bw, kv_transfer="serialized"), kv_cap=250)
    r0, r1 = res.records
    p = 0.01 + 1e-4 * 200                      # both prefilled in one iteration
    x = 100 * 1000 / bw
    assert r0.phases_s["decode_sent"] == pytest.approx(p + x, abs=EPS)
    assert r1.phases_s["decode_sent"] == pytest.approx(p + 2 * x, abs=EPS)
    end0 = p + x + decode_s(1, 101, 49)
    assert r0.last_token_s == pytest.approx(end0, abs=1e-12)
    # admitted exactly when r0 finished and released its memory, then decodes alone
    assert r1.last_token_s == pytest.approx(end0 + decode_s(1, 101, 49), abs=1e-12)
    assert r1.chunk_offsets_s[1] == pytest.approx(r1.last_token_s, abs=1e-12)
    # with room for both they share the batch instead
    both = run(w, split_cfg(link_bytes_per_s=bw, kv_transfer="serialized"), kv_cap=300)
    assert both.records[1].last_token_s < end0 + 0.5


def test_decode_batch_cap_queues_like_kv_memory_does():
    """max_decode_batch=1 (vLLM's max_num_seqs): the second request waits for the first although KV would fit."""
    bw = 1e12
    w = wl([0.0, 0.0], [100, 100], [50, 50])
    res = run(w, split_cfg(link_bytes_per_s=bw, kv_transfer="serialized", max_decode_batch=1), kv_cap=10**6)
    r0, r1 = res.records
    p, x = 0.01 + 1e-4 * 200, 100 * 1000 / bw
    end0 = p + x + decode_s(1, 101, 49)
    assert r0.last_token_s == pytest.approx(end0, abs=1e-12)
    assert r1.last_token_s == pytest.approx(end0 + decode_s(1, 101, 49), abs=1e-12)
    free = run(w, split_cfg(link_bytes_per_s=bw, kv_transfer="serialized"), kv_cap=10**6)
    assert free.records[1].last_token_s < end0 + 0.5


def test_summary_chunks_keep_the_times_and_collapse_the_decode_chunks():
    w = _random_workload(4, n=20, rate=10.0, max_in=300, max_out=60)
    full = run(w, split_cfg(seed=4))
    short = run(w, split_cfg(seed=4, record_token_chunks=False))
    assert max(len(r.chunk_tokens) for r in full.records) > 2    # batch changes split the decode into runs
    for a, b in zip(full.records, short.records):
        assert (a.first_token_s, a.last_token_s, a.phases_s) == (b.first_token_s, b.last_token_s, b.phases_s)
        n = a.actual_output_tokens
        assert b.chunk_tokens == ([1, n - 1] if n > 1 else [1])
        assert b.chunk_offsets_s[-1] == a.chunk_offsets_s[-1] and sum(a.chunk_tokens) == n


def test_request_larger_than_kv_capacity_is_an_error_record_and_the_rest_runs():
    res = run(wl([0.0, 0.1], [200, 10], [101, 5]), split_cfg(), kv_cap=300)
    bad, good = res.records
    assert bad.status == "error" and "301 KV tokens" in bad.error and "token-0" in bad.error
    assert bad.first_token_s is None and bad.end_s == 0.0 and bad.prefill_instance == "prompt-0"
    assert good.status == "ok" and good.first_token_s == pytest.approx(0.1 + 0.01 + 1e-3, abs=EPS)
    assert res.stats["errors"] == 1


def test_mixed_pool_borrows_a_token_machine_and_returns_it_when_drained():
    cfg = split_cfg(prompts=2, tokens=2, policy="mixed-pool",
                    policy_params={"prompt_threshold_tokens": 100, "decode_threshold_tokens": 10**6})
    # r0, r1 fill both prompt machines past the threshold; r2 then borrows a token machine and runs co-located
    # there; r3 comes long after everything drained: the machine has been returned, r3 is split again
    # (r0 and r1 make one token each: no KV reaches the token machines, the borrowed one runs r2 alone)
    w = wl([0.0, 0.0, 0.0, 100.0], [150, 150, 150, 150], [1, 1, 3, 3])
    res = run(w, cfg)
    r0, r1, r2, r3 = res.records
    assert r0.pool == r1.pool == "split" and (r0.prefill_pool, r0.decode_pool) == ("prompt", "token")
    assert r0.prefill_instance != r1.prefill_instance
    assert r2.pool == r2.decode_pool == "mixed" and r2.instance.startswith("token-") and r2.decode_instance == r2.instance
    assert list(r2.phases_s) == ["router_recv", "sent", "first_token", "done"]
    p = 0.01 + 1e-4 * 150
    assert r2.first_token_s == pytest.approx(p, abs=EPS)            # prefilled on the (idle) borrowed machine
    assert r2.last_token_s == pytest.approx(p + decode_s(1, 151, 2), abs=EPS)
    assert r3.pool == "split" and r3.instance is None
    assert res.stats["borrow_count"] == 1 and res.stats["return_count"] == 1


def test_mixed_machine_runs_prompts_first_up_to_the_preemption_cap():
    # r0 decodes a long output; five prompts arrive at once while it runs; cap 2: two prompt iterations,
    # then one decode iteration, then the rest
    w = wl([0.0, 0.05, 0.05, 0.05, 0.05, 0.05], [100, 2000, 2000, 2000, 2000, 2000], [200, 1, 1, 1, 1, 1])
    cfg = SimConfig(pools=[SimPool("mixed", "m", 1)], mixed_max_consecutive_prompt_iterations=2,
                    batching="prompt-first")
    res = run(w, cfg)
    p0, pb = 0.01 + 1e-4 * 100, 0.01 + 1e-4 * 2000
    t = p0
    k = PERF.iterations_within(1, 101, 0.05 - t)          # iterations done when the prompts arrive
    t += decode_s(1, 101, k + 1)                           # the iteration in progress finishes first
    firsts = [r.first_token_s for r in res.records[1:]]
    assert firsts[0] == pytest.approx(t + pb, abs=EPS)
    assert firsts[1] == pytest.approx(t + 2 * pb, abs=EPS)
    t += 2 * pb + PERF.token_time_s(1, 101 + k + 1)        # cap hit: one decode iteration
    assert firsts[2] == pytest.approx(t + pb, abs=EPS)
    assert firsts[3] == pytest.approx(t + 2 * pb, abs=EPS)
    t += 2 * pb + PERF.token_time_s(1, 101 + k + 2)
    assert firsts[4] == pytest.approx(t + pb, abs=EPS)
    assert res.records[0].pool == "mixed" and res.records[0].instance == "mixed-0"


# ---------------------------------------------------------------- determinism and shared policies

def _random_workload(seed, n=60, rate=20.0, max_in=1500, max_out=80):
    rng = random.Random(seed)
    t, arr = 0.0, []
    for _ in range(n):
        arr.append(t)
        t += rng.expovariate(rate)
    return wl(arr, [rng.randint(10, max_in) for _ in range(n)], [rng.randint(1, max_out) for _ in range(n)])


def test_same_seed_same_records_and_other_seeds_break_jsq_ties_differently():
    w = wl(np.arange(40) * 10.0, [100] * 40, [2] * 40)   # all idle at each arrival: every pick is a tie
    cfg = lambda s: split_cfg(prompts=4, tokens=4, seed=s)
    a, b = run(w, cfg(7)), run(w, cfg(7))
    assert a.records == b.records and a.stats == b.stats
    labels = lambda res: [(r.prefill_instance, r.decode_instance) for r in res.records]
    assert len(set(labels(a))) > 4
    assert any(labels(run(w, cfg(s))) != labels(a) for s in (1, 2, 3))
    busy = _random_workload(3)
    assert run(busy, cfg(5)).records == run(busy, cfg(5)).records


def test_policy_objects_are_the_routers():
    assert sim_cluster.make_policy is policies.make_policy is router.make_policy
    assert sim_cluster.Ledger is policies.Ledger is router.Ledger
    assert sim_cluster.Request is policies.Request is router.Request
    c = sim_cluster.SimCluster(wl([0.0], [1], [1]), split_cfg(policy="mixed-pool"), {"m": PERF}, {"m": 100}, 1)
    assert type(c.policy) is policies.MixedPool and isinstance(c.ledger, policies.Ledger)


def _sim_decisions(w, cfg):
    """The simulator's own policy decisions, in arrival order (its choose() watched, nothing changed)."""
    c = sim_cluster.SimCluster(w, cfg, {"m": PERF}, {"m": 10**6}, 1000)
    seen: list = []
    c.policy = Watched(c.policy, seen.append)
    res = c.run()
    return seen, res.stats


def _direct_decisions(instances, n_in, n_out, seed, params):
    """The same requests given straight to a policy object with its own ledger (nothing finishes: a burst)."""
    pol, ledger, out = policies.make_policy("mixed-pool", seed=seed, **params), policies.Ledger(instances), []
    for i, (a, b) in enumerate(zip(n_in, n_out)):
        req = policies.Request(f"r{i}", int(a), int(b))
        out.append(pol.choose(req, ledger.views()))
        ledger.dispatch(out[-1], req)
    return out, pol


def test_policy_params_change_the_simulator_as_they_change_the_policy_object():
    """A burst at t = 0 (no prefill ends before every request is placed): the simulator and a directly driven
    MixedPool make the same decisions, with the default thresholds (all split) and with a low prompt threshold
    given as --policy-param text (part of the burst in the mixed pool, borrowed token machines)."""
    n = 12
    w = wl([0.0] * n, [1000] * n, [100] * n)
    instances = [("prompt-0", "prompt"), ("prompt-1", "prompt"), ("token-0", "token"), ("token-1", "token"),
                 ("token-2", "token")]
    low = policies.parse_policy_params(["prompt-threshold-tokens=2500"], "mixed-pool")
    results = {}
    for label, params in (("default", {}), ("low", low)):
        cfg = split_cfg(2, 3, policy="mixed-pool", seed=4, policy_params=params)
        sim, stats = _sim_decisions(w, cfg)
        direct, pol = _direct_decisions(instances, w.input_tokens, w.output_tokens, 4, params)
        assert sim == direct and len(sim) == n
        assert stats["borrow_count"] == pol.borrow_count
        results[label] = sim
    assert all(d.split for d in results["default"])
    assert any(d.pool == "mixed" for d in results["low"]) and results["low"] != results["default"]
    # text and typed values are one setting
    typed = split_cfg(2, 3, policy="mixed-pool", seed=4, policy_params={"prompt_threshold_tokens": 2500})
    assert _sim_decisions(w, typed)[0] == results["low"]


def test_bad_config_is_an_input_error():
    with pytest.raises(InputError, match="pool must be one of"):
        run(wl([0.0], [1], [1]), SimConfig(pools=[SimPool("gpu", "m", 1)]))
    with pytest.raises(InputError, match="no performance model"):
        run(wl([0.0], [1], [1]), SimConfig(pools=[SimPool("baseline", "other", 1)]))
    with pytest.raises(InputError, match="cannot route"):
        run(wl([0.0], [1], [1]), SimConfig(pools=[SimPool("prompt", "m", 2)]))
    with pytest.raises(InputError, match="unknown policy"):
        run(wl([0.0], [1], [1]), split_cfg(policy="nope"))
    with pytest.raises(InputError, match="'prompt_threshold_tokens': must be a whole number >= 1, got 0"):
        run(wl([0.0], [1], [1]), split_cfg(policy="mixed-pool", policy_params={"prompt_threshold_tokens": 0}))
    with pytest.raises(InputError, match="'jsq' has no parameter 'decode_threshold_tokens'"):
        run(wl([0.0], [1], [1]), split_cfg(policy_params={"decode_threshold_tokens": 9}))
    with pytest.raises(InputError, match="kv_transfer"):
        run(wl([0.0], [1], [1]), split_cfg(kv_transfer="teleport"))


# ---------------------------------------------------------------- fast-forward vs one iteration at a time

def ref_colocated(arr, ins, outs, perf, cap_tokens, kv_cap, cap_iters):
    """One co-located machine, stepped one prompt or decode iteration at a time."""
    n = len(arr)
    first, last = [None] * n, [None] * n
    t, nxt, q, batch, gen, free, consec = 0.0, 0, deque(), [], {}, kv_cap, 0
    while nxt < n or q or batch:
        while nxt < n and arr[nxt] <= t:
            q.append(nxt)
            nxt += 1
        head_fits = bool(q) and ins[q[0]] + outs[q[0]] <= free
        if head_fits and (not batch or consec < cap_iters):
            take, tok = [], 0
            while q and (not take or tok + ins[q[0]] <= cap_tokens) and ins[q[0]] + outs[q[0]] <= free:
                r = q.popleft()
                take.append(r)
                tok += ins[r]
                free -= ins[r] + outs[r]
            t += perf.prompt_time_s(tok)
            consec += 1
            for r in take:
                first[r] = t
                if outs[r] == 1:
                    last[r] = t
                    free += ins[r] + outs[r]
                else:
                    batch.append(r)
                    gen[r] = 1
        elif batch:
            ctx = sum(ins[r] + gen[r] for r in batch)
            t += perf.token_time_s(len(batch), ctx)
            consec = 0
            for r in list(batch):
                gen[r] += 1
                if gen[r] == outs[r]:
                    last[r] = t
                    batch.remove(r)
                    free += ins[r] + outs[r]
        else:
            t = max(t, arr[nxt])
    return first, last


def ref_split(arr, ins, outs, perf, cap_tokens, kv_cap, x_per_token):
    """One prompt and one token machine, serialized transfers, each stepped one iteration at a time."""
    n = len(arr)
    first, last, kv_at = [None] * n, [None] * n, [None] * n
    t, j, link = 0.0, 0, 0.0
    while j < n:                                   # the prompt machine, FCFS batches under the token cap
        t = max(t, arr[j])
        take, tok = [j], ins[j]
        j += 1
        while j < n and arr[j] <= t and tok + ins[j] <= cap_tokens:
            take.append(j)
            tok += ins[j]
            j += 1
        t += perf.prompt_time_s(tok)
        for r in take:
            first[r] = t
            if outs[r] == 1:
                last[r] = t
            else:
                link = max(link, t) + ins[r] * x_per_token
                kv_at[r] = link
    pending = deque(sorted((r for r in range(n) if kv_at[r] is not None), key=lambda r: (kv_at[r], r)))
    t, waiting, batch, gen, free = 0.0, deque(), [], {}, kv_cap
    while pending or waiting or batch:             # the token machine, one decode iteration per step
        while pending and kv_at[pending[0]] <= t:
            waiting.append(pending.popleft())
        while waiting and ins[waiting[0]] + outs[waiting[0]] <= free:
            r = waiting.popleft()
            free -= ins[r] + outs[r]
            batch.append(r)
            gen[r] = 1
        if not batch:
            t = kv_at[pending[0]]
            continue
        t += perf.token_time_s(len(batch), sum(ins[r] + gen[r] for r in batch))
        for r in list(batch):
            gen[r] += 1
            if gen[r] == outs[r]:
                last[r] = t
                batch.remove(r)
                free += ins[r] + outs[r]
    return first, last


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fast_forward_matches_one_iteration_at_a_time(seed):
    # short prompts, long outputs and a few thousand KV tokens: batches grow, shrink and get cut mid-run
    w = _random_workload(seed, rate=5.0, max_in=400, max_out=120)
    arr, ins, outs = w.arrival_s.tolist(), w.input_tokens.tolist(), w.output_tokens.tolist()
    kv_cap, cap_iters = 3000, 2
    res = run(w, SimConfig(pools=[SimPool("baseline", "m", 1)], mixed_max_consecutive_prompt_iterations=cap_iters,
                           seed=seed, batching="prompt-first"), kv_cap=kv_cap)
    first, last = ref_colocated(arr, ins, outs, PERF, 2048, kv_cap, cap_iters)
    assert [r.first_token_s for r in res.records] == pytest.approx(first, abs=1e-9)
    assert [r.last_token_s for r in res.records] == pytest.approx(last, abs=1e-9)
    assert res.stats["interrupts"] > 0 and res.stats["runs"] < sum(outs)   # runs really were fast-forwarded
    for r in res.records:   # chunks add up to the output and end at the last token
        assert sum(r.chunk_tokens) == r.actual_output_tokens
        assert r.chunk_offsets_s[-1] == pytest.approx(r.last_token_s - r.actual_send_s, abs=1e-9)

    w = _random_workload(seed + 10, rate=10.0, max_in=400, max_out=120)
    arr, ins, outs = w.arrival_s.tolist(), w.input_tokens.tolist(), w.output_tokens.tolist()
    bw = 2e6
    res = run(w, split_cfg(link_bytes_per_s=bw, kv_transfer="serialized", seed=seed), kv_cap=kv_cap)
    first, last = ref_split(arr, ins, outs, PERF, 2048, kv_cap, 1000 / bw)
    assert [r.first_token_s for r in res.records] == pytest.approx(first, abs=1e-9)
    assert [r.last_token_s for r in res.records] == pytest.approx(last, abs=1e-9)
    assert res.stats["interrupts"] > 0 and res.stats["runs"] < sum(outs)
