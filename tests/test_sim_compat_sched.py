"""The compat mode's machine and cluster scheduling (SplitwiseSim semantics) on hand-computable cases: batch-token
cap, prompt priority and mixed batches, the preemption limit, pausing a decode run, KV memory, transfer time, first
token at the end of the prefill, and its two cluster schedulers."""
from __future__ import annotations

import numpy as np
import pytest

from splitbench.metrics.latency import e2e_s, tbt_splitwisesim_s, ttft_s
from splitbench.policies import Decision
from splitbench.sim.compat import Instance, Task
from splitbench.sim.compat_cluster import CompatConfig, simulate_compat
from splitbench.sim.compat_perf import GIB, SplitwiseSimPerf, compat_model
from splitbench.sim.config import SimPool
from splitbench.sim.engine import Simulator
from splitbench.splitwisesim_policies import KVRequest, MixedPool, SchedView, TokenJSQ
from splitbench.workload.types import Workload


class Perf:
    """Prompt batches 1 s, decode-only 0.1 s, mixed 2 s; records every batch."""

    def __init__(self):
        self.calls = []

    def iteration_s(self, batch_tokens, prompts, decodes):
        self.calls.append((batch_tokens, prompts, decodes))
        return 2.0 if prompts and decodes else (1.0 if prompts else 0.1)


class Host:
    def __init__(self, sim):
        self.sim, self.done, self.idles = sim, [], []

    def task_done(self, m, t):
        self.done.append((t.req.i, "prompt" if t.prompt else "decode", self.sim.now_s))
        if not t.prompt:
            m.memory -= t.mem

    def queue_changed(self, m):
        pass

    def idle(self, m, has_work):
        self.idles.append((self.sim.now_s, has_work))


class R:
    def __init__(self, i, arrival):
        self.i, self.arrival = i, arrival


def _machine(max_tokens=2048, max_pre=4, max_mem=10 ** 9, max_n=512):
    sim = Simulator()
    host, perf = Host(sim), Perf()
    m = Instance("i0", "baseline", perf, 0, max_mem, sim, host, max_batch_size=max_n, max_batch_tokens=max_tokens,
                 max_preemptions=max_pre)
    return sim, host, perf, m


def _arrive_at(sim, m, t_s, tasks):
    def arrive():
        for t in tasks:
            m.arrive(t)
    sim.schedule(t_s, arrive)


def test_prompts_batch_fcfs_under_the_token_cap_and_a_long_prompt_runs_alone():
    sim, host, perf, m = _machine()
    _arrive_at(sim, m, 0.0, [Task(R(0, 0.0), True, 1, 3000, 0)])   # > cap: runs alone
    _arrive_at(sim, m, 0.5, [Task(R(k, 0.5 + k / 10), True, 1, n, 0) for k, n in ((1, 1200), (2, 800), (3, 100))])
    sim.run()
    assert perf.calls == [(3000, 1, 0), (2000, 2, 0), (100, 1, 0)]   # 1200 + 800 fit, + 100 would not
    assert [d[2] for d in host.done] == [1.0, 2.0, 2.0, 3.0]


def test_prompts_go_first_and_join_running_decodes_as_a_mixed_batch():
    sim, host, perf, m = _machine()
    r0 = R(0, 0.0)
    _arrive_at(sim, m, 0.0, [Task(r0, True, 1, 100, 0), Task(r0, False, 30, 1, 0)])
    _arrive_at(sim, m, 1.55, [Task(R(1, 1.55), True, 1, 500, 0)])
    sim.run()
    # prompt 0 [0, 1); decodes from 1 at 0.1 s; the prompt arriving at 1.55 cuts the run at 1.6: 6 tokens made;
    # then prompt 1 + decode 0 in one mixed batch (2 s), then the decode-only run of the remaining 23
    assert perf.calls[:4] == [(100, 1, 0), (1, 0, 1), (501, 1, 1), (1, 0, 1)]
    assert host.done[0] == (0, "prompt", 1.0)
    assert host.done[1] == (1, "prompt", pytest.approx(3.6))
    assert host.done[2] == (0, "decode", pytest.approx(3.6 + 23 * 0.1))


def test_a_decode_passed_over_max_preemptions_times_goes_first():
    def run(max_pre):
        sim, host, perf, m = _machine(max_tokens=4, max_pre=max_pre)
        r0 = R(0, 0.0)
        _arrive_at(sim, m, 0.0, [Task(r0, True, 1, 2, 0), Task(r0, False, 1, 1, 0)])
        _arrive_at(sim, m, 0.5, [Task(R(k, 0.5), True, 1, 4, 0) for k in range(1, 6)])
        sim.run()
        return next(t for i, kind, t in host.done if (i, kind) == (0, "decode"))
    # prompts of 4 tokens fill the cap; the decode (1 token) is passed over at 1 and 2, so at 3 it goes first
    assert run(2) == pytest.approx(3.1)
    assert run(100) == pytest.approx(6.1)   # without the limit it waits for all five prompts


def test_memory_holds_a_task_back_until_kv_is_freed():
    sim, host, perf, m = _machine(max_mem=100)
    r0, r1 = R(0, 0.0), R(1, 0.1)
    _arrive_at(sim, m, 0.0, [Task(r0, False, 5, 1, 80)])
    _arrive_at(sim, m, 0.1, [Task(r1, False, 2, 1, 30)])   # 80 + 30 > 100: waits for the first to finish
    sim.run()
    assert host.done == [(0, "decode", pytest.approx(0.5)), (1, "decode", pytest.approx(0.7))]
    assert m.memory == 0


def _table_perf():
    rows = [{"prompt_size": p, "batch_size": 1, "token_size": 8, "prompt_time": ms, "token_time": tok,
             "e2e_time": 1.0} for p, ms, tok in ((100, 100.0, 20.0), (1000, 1000.0, 20.0))]
    return SplitwiseSimPerf("bloom-176b", "hw", 8, rows)


def _workload(rows):
    a = np.array(rows, dtype=float)
    return Workload("w", a[:, 0], a[:, 1].astype(np.int64), a[:, 2].astype(np.int64), np.arange(len(rows)))


def test_split_request_first_token_at_prefill_end_then_transfer_then_decodes():
    perf = _table_perf()   # prompt n tokens: n ms; decode iteration: 20 ms
    cfg = CompatConfig([SimPool("prompt", "dgx-h100", 1), SimPool("token", "dgx-a100", 1)], policy="mixed-pool")
    res = simulate_compat(_workload([(0.0, 500, 11)]), cfg, {"dgx-h100": perf, "dgx-a100": perf})
    (rec,) = res.records
    xfer = compat_model("bloom-176b").kv_bytes(500) / (200 * GIB)
    assert ttft_s(rec) == pytest.approx(0.5)
    assert rec.phases_s["decode_sent"] == pytest.approx(0.5 + xfer)
    assert e2e_s(rec) == pytest.approx(0.5 + xfer + 10 * 0.020)   # the other 10 tokens on the token machine
    assert tbt_splitwisesim_s(rec) == pytest.approx((xfer + 0.2) / 11)
    assert rec.prefill_instance == "prompt-0" and rec.decode_instance == "token-0" and rec.pool == "split"
    assert sum(rec.chunk_tokens) == 11 and res.stats["transfers"] == 1


def test_colocated_baseline_request_makes_every_token_on_one_machine():
    perf = _table_perf()
    cfg = CompatConfig([SimPool("baseline", "dgx-a100", 2)])
    res = simulate_compat(_workload([(0.0, 100, 5), (0.01, 1000, 3)]), cfg, {"dgx-a100": perf})
    a, b = res.records
    assert (a.instance, b.instance) == ("baseline-0", "baseline-1")   # fewest pending tokens, first of equals
    assert ttft_s(a) == pytest.approx(0.1) and e2e_s(a) == pytest.approx(0.1 + 4 * 0.02)
    assert ttft_s(b) == pytest.approx(1.0) and e2e_s(b) == pytest.approx(1.0 + 2 * 0.02)


def _views(**kw):
    base = dict(pending_tokens=0, memory_bytes=0, max_memory_bytes=1000, queued_tasks=0)
    return tuple(SchedView(i, pool, **{**base, **kw.get(i, {})}) for i, pool in
                 (("p0", "prompt"), ("p1", "prompt"), ("t0", "token"), ("t1", "token")))


def test_token_jsq_takes_the_first_instance_with_fewest_pending_tokens():
    v = _views(p0={"pending_tokens": 5}, t0={"pending_tokens": 2}, t1={"pending_tokens": 2})
    assert TokenJSQ().choose(KVRequest("r", 10, 5, 1, 1), v) == Decision("p1", None, "prompt")


def test_mixed_pool_splits_then_borrows_when_a_queue_is_long_or_memory_full_and_returns():
    pol, req = MixedPool(prompt_max_pending_batch_tokens=100), KVRequest("r", 50, 5, 10, 10)
    v = _views(p0={"pending_tokens": 20}, t0={"memory_bytes": 500}, t1={"memory_bytes": 100})
    assert pol.choose(req, v) == Decision("p1", "t1", "prompt")   # fewest pending tokens / least memory
    long_q = {"pending_tokens": 60, "queued_tasks": 1}
    v = _views(p0=long_q, p1=long_q, t0={"pending_tokens": 3}, t1={"pending_tokens": 1, "memory_bytes": 990})
    d = pol.choose(req, v)          # both prompt queues long: t1 (fewest pending) moves to the mixed pool
    assert d.prompt_instance == "t1" and pol.effective_pool("t1") == "mixed" and pol.borrow_count == 1
    assert d.token_instance == "t0"   # t1's memory (990 + 20 >= 1000) is full, t0 takes the decode
    pol.notify_free("t1")
    assert pol.effective_pool("t1") == "token" and pol.lists["token"] == ["t0", "t1"] and pol.return_count == 1
    full = {"memory_bytes": 990}
    d = pol.choose(req, _views(t0=full, t1=full))   # no token memory: the least-memory prompt instance takes it
    assert d == Decision("p0", None, "mixed") and pol.lists["prompt"] == ["p1"]


def test_sched_ledger_counts_what_splitwisesim_schedulers_read():
    from splitbench.splitwisesim_policies import SchedLedger
    led = SchedLedger([("p0", "prompt", 100, 1000), ("t0", "token", 100, 1000)])
    d, r = Decision("p0", "t0", "prompt"), KVRequest("r", 50, 7, 30, 20)
    led.dispatch(d, r)
    led.set_queued("p0", 1)
    p, t = led.views()
    assert (p.pending_tokens, p.memory_bytes, p.queued_tasks) == (50, 130, 1)   # prompt KV reserved at the source
    assert (t.pending_tokens, t.memory_bytes) == (1, 150)                       # and the whole request at the sink
    led.prompt_done(d, r)
    led.transfer_done(d, r)
    led.set_queued("p0", 0)
    assert led.views()[0][2:4] + (led.views()[0].queued_tasks,) == (0, 100, 0)
    led.finish(d, r)
    assert led.views()[1][2:4] == (0, 100)


def test_compat_policies_are_named_in_splitbench_and_splitwisesim_vocabulary():
    from splitbench.errors import InputError
    from splitbench.splitwisesim_policies import make_compat_policy
    assert isinstance(make_compat_policy("token_jsq"), TokenJSQ) and isinstance(make_compat_policy("jsq"), TokenJSQ)
    p = make_compat_policy("mixed_pool", prompt_max_pending_batch_tokens="4096")
    assert isinstance(p, MixedPool) and p.threshold == 4096
    with pytest.raises(InputError, match="unknown policy 'round-robin'"):
        make_compat_policy("round-robin")
    with pytest.raises(InputError, match="no parameter 'decode_threshold_tokens'"):
        make_compat_policy("mixed-pool", decode_threshold_tokens=5)
    with pytest.raises(InputError, match="mixed-pool needs prompt and token pools"):
        simulate_compat(_workload([(0.0, 10, 2)]), CompatConfig([SimPool("baseline", "dgx-a100", 1)],
                                                                  policy="mixed-pool"), {"dgx-a100": _table_perf()})
