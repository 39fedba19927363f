"""Chunked-prefill batching of baseline/mixed machines (vLLM V1's scheduler): hand-computed iterations on a linear
fake performance model, a one-iteration-at-a-time reference for the fast-forward, KV admission, and split designs
unchanged by the batching option."""
from __future__ import annotations

import json
import random
from collections import deque

import numpy as np
import pytest

from splitbench.app.design import DesignSpec, probe, search
from splitbench.app.simrun import SimOptions, simulate_run
from splitbench.errors import InputError
from splitbench.metrics.latency import tbt_gaps_s
from splitbench.schema import records as R
from splitbench.sim.batching import mixed_iteration_s
from splitbench.sim.cluster import simulate
from splitbench.sim.config import SimConfig, SimPool
from splitbench.sim.perfmodel import PerfModel
from splitbench.workload.types import Workload

EPS = 1e-12


class Perf(PerfModel):
    """prompt = p0 + p1 * tokens; decode = c0 + c1 * batch + kv * context; kv_s_per_token = kv (PerfModel's API)."""

    def __init__(self, p0=0.01, p1=1e-4, c0=0.02, c1=1e-3, kv=1e-5, attn=0.0):
        self.p0, self.p1, self.c0, self.c1, self.kv_s_per_token = p0, p1, c0, c1, kv
        self.attn_s_per_token2 = attn
        self.prompt_calls: list[int] = []

    def kv_at(self, b):
        return self.kv_s_per_token

    def attention_s(self, self_tokens2, cross_tokens2):
        return self.attn_s_per_token2 * (self_tokens2 + 2 * cross_tokens2)

    def prompt_time_s(self, n):
        self.prompt_calls.append(n)
        return self.p0 + self.p1 * n if n > 0 else 0.0

    def token_time_s(self, b, ctx):
        return self.c0 + self.c1 * b + self.kv_s_per_token * ctx if b > 0 else 0.0

    def token_iterations_s(self, b, ctx, k):
        return k * self.token_time_s(b, ctx) + self.kv_s_per_token * b * k * (k - 1) / 2

    def iterations_within(self, b, ctx, d):
        k = 0
        while self.token_iterations_s(b, ctx, k + 1) <= d:
            k += 1
        return k


P0, P1, C0, C1, KV = 0.01, 1e-4, 0.02, 1e-3, 1e-5


def prompt(n):
    return P0 + P1 * n


def mixed(b, ctx, n, cached):
    """The hand formula: one pass over n + b tokens plus the cached-KV reads, at least the decode-only step."""
    return max(P0 + P1 * (n + b) + KV * (ctx + cached), C0 + C1 * b + KV * ctx if b else 0.0)


def wl(arrivals, ins, outs):
    n = len(arrivals)
    return Workload("test", np.asarray(arrivals, dtype=np.float64), np.asarray(ins, dtype=np.int64),
                    np.asarray(outs, dtype=np.int64), np.arange(n, dtype=np.int64))


def run(w, kv_cap=10**6, perf=None, pool="baseline", **kw):
    cfg = SimConfig(pools=[SimPool(pool, "m", 1)], **kw)
    return simulate(w, cfg, {"m": perf or Perf()}, {"m": kv_cap}, 1000)


# ---------------------------------------------------------------- hand-computed iterations

def test_a_long_prompt_is_split_over_budget_iterations_and_its_first_token_ends_the_last_chunk():
    res = run(wl([0.0], [5000], [3]))
    (r,) = res.records
    # chunks 2048 + 2048 + 904; each later chunk also reads the KV of the earlier ones
    t = mixed(0, 0, 2048, 0) + mixed(0, 0, 2048, 2048) + mixed(0, 0, 904, 4096)
    assert r.first_token_s == pytest.approx(t, abs=EPS)
    assert r.phases_s["first_token"] == r.first_token_s and list(r.phases_s) == ["router_recv", "sent",
                                                                                   "first_token", "done"]
    # tokens 2 and 3: one fast-forwarded decode run at contexts 5001, 5002
    assert r.last_token_s == pytest.approx(t + 2 * (C0 + C1) + KV * (5001 + 5002), abs=EPS)
    assert res.stats["chunked_iterations"] == 3 and res.stats["prompt_iterations"] == 0
    # a budget over the prompt: one iteration; prompt-first: one prompt iteration over all 5000 tokens
    assert run(wl([0.0], [5000], [1]), max_num_batched_tokens=8192).records[0].first_token_s == \
        pytest.approx(prompt(5000), abs=EPS)
    assert run(wl([0.0], [5000], [1]), batching="prompt-first").records[0].first_token_s == \
        pytest.approx(prompt(5000), abs=EPS)


def test_a_later_chunk_pays_attention_over_the_earlier_chunks_kv():
    """With the prompt curve's p^2 term c, a chunk of n tokens after P prefilled adds c (n^2 + 2 P n) to the dense
    part; prompt-first prefills the lone prompt in one iteration: dense part + c p^2, as the profile measured it."""
    c = 3e-9
    r = run(wl([0.0], [5000], [1]), perf=Perf(attn=c)).records[0]
    t = mixed(0, 0, 2048, 0) + mixed(0, 0, 2048, 2048) + mixed(0, 0, 904, 4096)
    attention = c * (2048 ** 2 + 2048 ** 2 + 904 ** 2) + 2 * c * (2048 * 2048 + 4096 * 904)
    assert r.first_token_s == pytest.approx(t + attention, abs=EPS)
    assert run(wl([0.0], [5000], [1]), perf=Perf(attn=c), batching="prompt-first").records[0].first_token_s == \
        pytest.approx(prompt(5000) + c * 5000 ** 2, abs=EPS)


def test_three_prompts_share_the_budget_fcfs_with_the_decodes_first():
    """Budget 2048, three 1500-token prompts at t=0: it1 = r0 1500 + r1 548; it2 = r0's decode + r1 952 + r2 1095;
    it3 = decodes of r0, r1 + r2's last 405. Each first token at the end of its last chunk."""
    res = run(wl([0.0, 0.0, 0.0], [1500, 1500, 1500], [10, 10, 1]))
    r0, r1, r2 = res.records
    t1 = mixed(0, 0, 2048, 0)
    t2 = t1 + mixed(1, 1501, 952 + 1095, 548)
    t3 = t2 + mixed(2, 1502 + 1501, 405, 1095)
    assert [r0.first_token_s, r1.first_token_s, r2.first_token_s] == pytest.approx([t1, t2, t3], abs=EPS)
    assert r2.last_token_s == r2.first_token_s   # one output token: the prefill made it
    assert r0.chunk_tokens[:3] == [1, 1, 1] and r0.chunk_offsets_s[:3] == pytest.approx([t1, t2, t3], abs=EPS)
    assert r1.chunk_offsets_s[:2] == pytest.approx([t2, t3], abs=EPS)
    assert res.stats["chunked_iterations"] == 3


def test_decodes_make_a_token_every_iteration_while_a_long_prompt_is_chunked():
    """r0 decodes; r1's 6000-token prompt arrives: chunked, r0 gets one token per mixed iteration (every gap one
    iteration of <= 2048 tokens); prompt-first, r0 makes no token during r1's whole prefill."""
    w = wl([0.0, 0.1], [100, 6000], [60, 1])
    res = run(w)
    r0, r1 = res.records
    offs = [r0.actual_send_s + o for o in r0.chunk_offsets_s]
    during = [(a, b) for a, b in zip(offs, offs[1:]) if a > 0.1 and b <= r1.first_token_s + EPS]
    assert len(during) == 3 and r1.first_token_s == pytest.approx(during[-1][1], abs=EPS)   # 2047 + 2047 + 1906
    bound = mixed(1, 100 + 60, 2047, 4094)                    # the largest of these iterations
    assert max(b - a for a, b in during) <= bound + EPS
    assert sum(r0.chunk_tokens) == 60 and max(tbt_gaps_s(r0)) <= bound + EPS
    pf = run(w, batching="prompt-first")
    q0, q1 = pf.records
    start = q1.first_token_s - prompt(6000)                   # r1's prefill ran alone as one iteration
    offs = [q0.actual_send_s + o for o in q0.chunk_offsets_s]
    assert not any(start + EPS < t < q1.first_token_s - EPS for t in offs)
    assert q1.first_token_s < r1.first_token_s                # one long pass beats three chunks (fixed cost x3)


def test_the_token_budget_holds_every_iteration():
    perf = Perf()
    w = _random_workload(5, n=80, rate=30.0, max_in=3000, max_out=40)
    run(w, perf=perf, max_num_batched_tokens=512)
    # every prefill pass (the mixed formula's prompt_time call: chunk tokens + decodes) stays within the budget
    assert perf.prompt_calls and max(perf.prompt_calls) <= 512
    assert sum(1 for n in perf.prompt_calls if n == 512) > 10    # and long prompts fill it


def test_kv_is_reserved_at_admission_and_the_next_request_waits_for_memory():
    w = wl([0.0, 0.0], [100, 100], [50, 50])                  # 150 KV tokens each
    res = run(w, kv_cap=250)
    r0, r1 = res.records
    assert r0.first_token_s == pytest.approx(prompt(100), abs=EPS)   # r1 not admitted: 150 + 150 > 250
    end0 = prompt(100) + sum(C0 + C1 + KV * (101 + j) for j in range(49))
    assert r0.last_token_s == pytest.approx(end0, abs=1e-12)
    assert r1.first_token_s == pytest.approx(end0 + prompt(100), abs=1e-12)
    both = run(w, kv_cap=300).records                        # room for both: one iteration of 200 tokens
    assert [r.first_token_s for r in both] == pytest.approx([prompt(200)] * 2, abs=EPS)
    seqs = run(w, max_decode_batch=1).records                 # max_num_seqs 1: KV would fit, the seat does not
    assert seqs[1].first_token_s == pytest.approx(end0 + prompt(100), abs=1e-12)


def test_a_mixed_iteration_is_one_pass_and_never_faster_than_its_decodes_alone():
    p = Perf(p0=0.01, p1=1e-4, c0=0.05, c1=1e-3, kv=1e-5)
    assert mixed_iteration_s(p, 4, 1000, 500, 200) == pytest.approx(0.01 + 1e-4 * 504 + 1e-5 * 1200)
    assert mixed_iteration_s(p, 4, 1000, 1, 0) == pytest.approx(p.token_time_s(4, 1000))   # decode-bound
    assert mixed_iteration_s(p, 0, 0, 300, 0) == pytest.approx(p.prompt_time_s(300))


def test_bad_batching_options_are_input_errors():
    with pytest.raises(InputError, match="batching must be one of chunked, prompt-first"):
        run(wl([0.0], [1], [1]), batching="sarathi")
    with pytest.raises(InputError, match="max_num_batched_tokens must be >= 1"):
        run(wl([0.0], [1], [1]), max_num_batched_tokens=0)
    with pytest.raises(InputError, match=r"max_num_batched_tokens \(256\) must be >= max_decode_batch \(512\)"):
        run(wl([0.0], [1], [1]), max_num_batched_tokens=256, max_decode_batch=512)


# ---------------------------------------------------------------- fast-forward vs one iteration at a time

def _random_workload(seed, n=60, rate=20.0, max_in=1500, max_out=80):
    rng = random.Random(seed)
    t, arr = 0.0, []
    for _ in range(n):
        arr.append(t)
        t += rng.expovariate(rate)
    return wl(arr, [rng.randint(10, max_in) for _ in range(n)], [rng.randint(1, max_out) for _ in range(n)])


def ref_chunked(arr, ins, outs, budget, kv_cap, max_seqs):
    """One chunked machine stepped one iteration at a time, written from the rules (not from the simulator)."""
    n = len(arr)
    first, last = [None] * n, [None] * n
    t, nxt, q, dec, gen, pre, free = 0.0, 0, deque(), [], {}, [], kv_cap
    while nxt < n or q or dec or pre:
        while nxt < n and arr[nxt] <= t:
            q.append(nxt)
            nxt += 1
        room, chunks = budget - len(dec), []
        for e in pre:
            k = min(ins[e[0]] - e[1], room)
            if k > 0:
                chunks.append((e, k))
                room -= k
        while q and room > 0 and len(dec) + len(pre) < max_seqs and ins[q[0]] + outs[q[0]] <= free:
            r = q.popleft()
            free -= ins[r] + outs[r]
            pre.append([r, 0])
            chunks.append((pre[-1], min(ins[r], room)))
            room -= chunks[-1][1]
        if not chunks and not dec:
            t = arr[nxt]
            continue
        ctx = sum(ins[r] + gen[r] for r in dec)
        t += (mixed(len(dec), ctx, sum(k for _, k in chunks), sum(e[1] for e, _ in chunks)) if chunks
              else C0 + C1 * len(dec) + KV * ctx)
        for r in list(dec):
            gen[r] += 1
            if gen[r] == outs[r]:
                last[r] = t
                dec.remove(r)
                free += ins[r] + outs[r]
        for e, k in chunks:
            e[1] += k
            if e[1] == ins[e[0]]:
                r = e[0]
                pre.remove(e)
                first[r] = t
                if outs[r] == 1:
                    last[r], free = t, free + ins[r] + outs[r]
                else:
                    dec.append(r)
                    gen[r] = 1
    return first, last


@pytest.mark.parametrize("seed,rate,budget,kv_cap,max_seqs", [(1, 6.0, 2048, 4000, None), (2, 6.0, 512, 3000, None),
                                                               (3, 2.0, 1024, 10**6, 4)])
def test_chunked_fast_forward_matches_one_iteration_at_a_time(seed, rate, budget, kv_cap, max_seqs):
    """KV-bound, budget-bound and max_num_seqs-bound machines: batches grow, shrink and runs get cut."""
    w = _random_workload(seed, rate=rate, max_in=1500, max_out=120)
    arr, ins, outs = w.arrival_s.tolist(), w.input_tokens.tolist(), w.output_tokens.tolist()
    res = run(w, kv_cap=kv_cap, pool="mixed", max_num_batched_tokens=budget, max_decode_batch=max_seqs)
    first, last = ref_chunked(arr, ins, outs, budget, kv_cap, max_seqs or budget)
    assert [r.first_token_s for r in res.records] == pytest.approx(first, abs=1e-9)
    assert [r.last_token_s for r in res.records] == pytest.approx(last, abs=1e-9)
    assert res.stats["interrupts"] > 0 and res.stats["runs"] < sum(outs)   # pure-decode runs were fast-forwarded
    if budget < max(ins):
        assert res.stats["chunked_iterations"] > len(arr)                    # some prompts took several chunks
    for r in res.records:
        assert sum(r.chunk_tokens) == r.actual_output_tokens
        assert r.chunk_offsets_s[-1] == pytest.approx(r.last_token_s - r.actual_send_s, abs=1e-9)


# ---------------------------------------------------------------- split designs are unchanged

@pytest.mark.parametrize("policy,params", [("jsq", {}), ("mixed-pool", {"prompt_threshold_tokens": 600})])
def test_split_designs_give_the_same_records_under_either_batching(policy, params):
    """Prompt/token machines never chunk: same records and stats with batching chunked and prompt-first, also when
    the mixed-pool policy runs requests co-located on borrowed prompt/token machines."""
    w = _random_workload(7, n=120, rate=40.0, max_in=1500, max_out=60)
    out = {}
    for b in ("chunked", "prompt-first"):
        cfg = SimConfig(pools=[SimPool("prompt", "m", 2), SimPool("token", "m", 3)], policy=policy,
                        policy_params=dict(params), seed=3, batching=b, max_num_batched_tokens=256)
        out[b] = simulate(w, cfg, {"m": Perf()}, {"m": 20000}, 1000)
    assert out["chunked"].records == out["prompt-first"].records
    assert out["chunked"].stats == out["prompt-first"].stats and "chunked_iterations" not in out["chunked"].stats
    if policy == "mixed-pool":
        assert out["chunked"].stats["borrow_count"] > 0
        assert any(r.pool == "mixed" for r in out["chunked"].records)


# ---------------------------------------------------------------- prompt machines chunk as vLLM instances (opt-in)

def split_run(w, perf=None, **kw):
    cfg = SimConfig(pools=[SimPool("prompt", "m", 1), SimPool("token", "m", 1)], kv_transfer="serialized",
                    link_bytes_per_s=1e15, prompt_chunked_prefill=True, **kw)
    return simulate(w, cfg, {"m": perf or Perf()}, {"m": 10**6}, 1000)


def test_prompt_machine_chunks_a_long_prompt_and_the_next_prompt_fills_the_last_chunk():
    """Budget 2048: r0 (3000 tokens) takes 2048, then its last 952 + r1's first 1096 in one iteration; r1's last
    404 alone. Each first token ends its last chunk; the later chunks read the KV of the earlier ones (the prompt
    machine has no decodes)."""
    c = 3e-9
    res = split_run(wl([0.0, 0.0], [3000, 1500], [1, 1]), perf=Perf(attn=c))
    r0, r1 = res.records
    t1 = mixed(0, 0, 2048, 0) + c * 2048 ** 2
    t2 = t1 + mixed(0, 0, 952 + 1096, 2048) + c * (952 ** 2 + 1096 ** 2) + 2 * c * 2048 * 952
    t3 = t2 + mixed(0, 0, 404, 1096) + c * 404 ** 2 + 2 * c * 1096 * 404
    assert [r0.first_token_s, r1.first_token_s] == pytest.approx([t2, t3], abs=EPS)
    assert res.stats["chunked_iterations"] == 3 and res.stats["transfers"] == 0   # one-token requests: no decode
    whole = simulate(wl([0.0, 0.0], [3000, 1500], [1, 1]),
                     SimConfig(pools=[SimPool("prompt", "m", 1), SimPool("token", "m", 1)]),
                     {"m": Perf(attn=c)}, {"m": 10**6}, 1000)
    alone = [prompt(3000) + c * 3000 ** 2, prompt(1500) + c * 1500 ** 2]   # each prompt's own attention
    assert [r.first_token_s for r in whole.records] == pytest.approx([alone[0], alone[0] + alone[1]])


def test_chunked_prompt_machine_hands_the_kv_to_the_token_machine_after_the_last_chunk():
    res = split_run(wl([0.0], [5000], [3]))
    (r,) = res.records
    t = mixed(0, 0, 2048, 0) + mixed(0, 0, 2048, 2048) + mixed(0, 0, 904, 4096)
    assert r.first_token_s == pytest.approx(t, abs=EPS) and r.phases_s["prefill_done"] == pytest.approx(t)
    x = 5000 * 1000 / 1e15   # the KV transfer: 5000 tokens x 1000 bytes over the link
    assert r.last_token_s == pytest.approx(t + x + 2 * (C0 + C1) + KV * (5001 + 5002), abs=EPS)
    assert res.stats["transfers"] == 1 and r.prefill_instance != r.decode_instance
    dec = split_run(wl([0.0], [5000], [3]), first_token="decode").records[0]   # vLLM P/D: the token machine's
    assert dec.first_token_s == pytest.approx(t + x + C0 + C1 + KV * 5000, abs=EPS)


def test_prompt_chunking_keeps_every_record_sane_under_load_and_the_mixed_pool():
    w = _random_workload(11, n=150, rate=40.0, max_in=5000, max_out=40)
    for policy, params in (("jsq", {}), ("mixed-pool", {"prompt_threshold_tokens": 600})):
        cfg = SimConfig(pools=[SimPool("prompt", "m", 2), SimPool("token", "m", 2)], policy=policy,
                        policy_params=dict(params), seed=3, prompt_chunked_prefill=True)
        res = simulate(w, cfg, {"m": Perf()}, {"m": 30000}, 1000)
        assert res.stats["chunked_iterations"] > 0 and all(r.ok for r in res.records)
        for r in res.records:
            assert sum(r.chunk_tokens) == r.actual_output_tokens and r.first_token_s >= r.actual_send_s


# ---------------------------------------------------------------- the option end to end

def test_batching_is_recorded_in_run_json_and_reaches_the_design_search(tmp_path):
    window = dict(trace="azure-conv-2023", duration_s=30.0, cluster="baseline-a100:2", results_dir=str(tmp_path))
    metas = {}
    for b in ("chunked", "prompt-first"):
        run_dir, _ = simulate_run(SimOptions(run_id=b, batching=b, max_num_batched_tokens=1024, **window))
        metas[b] = (json.loads((run_dir / "run.json").read_text()), R.read_records(run_dir))
    (mc, rc), (mp, rp) = metas["chunked"], metas["prompt-first"]
    assert mc["backend"]["sim_config"]["batching"] == "chunked" and mc["options"]["batching"] == "chunked"
    assert mc["backend"]["sim_config"]["max_num_batched_tokens"] == 1024
    assert mc["backend"]["stats"]["chunked_iterations"] > 0 and mp["backend"]["stats"]["prompt_iterations"] > 0
    assert mp["backend"]["sim_config"]["batching"] == "prompt-first" and "chunked_iterations" not in mp["backend"]["stats"]
    assert [r.first_token_s for r in rc] != [r.first_token_s for r in rp]
    assert mc["reference"] == mp["reference"]   # one SLO reference for both models
    pools = [("baseline", "dgx-a100", 2)]
    probes = {b: probe(DesignSpec(batching=b, duration_s=30.0), pools, 1.0)[1]["verdict"] for b in metas}
    assert probes["chunked"]["checks"] != probes["prompt-first"]["checks"]
    with pytest.raises(InputError, match="--batching must be one of"):
        search(DesignSpec(batching="nope"))
