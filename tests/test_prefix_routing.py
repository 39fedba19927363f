"""Prefix-aware routing (issue 15): the pure PrefixAware policy, the live router's prompt block hashes (real router,
real stub servers, real sockets) and the simulator's per-machine prefix cache; one policy class serves both."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from splitbench import policies
from splitbench.backends.stub import StubBackend
from splitbench.client.replayer import ReplayConfig, Replayer
from splitbench.prefix_policy import BlockIndex, PrefixAware, prompt_block_hashes
from splitbench.servers.phaselog import load_phase_log, merge_phases
from splitbench.servers.router import Router
from splitbench.sim.cluster import simulate
from splitbench.sim.config import SimConfig, SimPool
from splitbench.sim.perfmodel import PerfModel
from splitbench.timing import run as run_loop
from splitbench.workload.types import Workload

BASE = (("b0", "baseline"), ("b1", "baseline"))


def views(pending=(0, 0), pools=BASE):
    return [policies.InstanceView(i, pool, pending_prompt_tokens=n) for (i, pool), n in zip(pools, pending)]


def test_block_index_matches_leading_blocks_only_and_evicts_least_recently_used():
    idx = BlockIndex(3)
    idx.add((1, 2, 3))
    assert idx.matched((1, 2, 9)) == 2 and idx.matched((9, 2, 3)) == 0   # chained: the first miss ends the match
    idx.add((1, 4))                                                      # 1 touched, 4 new: 2 is evicted
    assert list(idx.blocks) == [3, 1, 4] and idx.matched((1, 2)) == 1


def test_policy_follows_the_cached_prefix_until_the_queue_costs_more_than_it_saves():
    p = policies.make_policy("prefix", seed=0)
    assert isinstance(p, PrefixAware) and p.name == "prefix"
    first = p.choose(policies.Request("r0", 1000, 10, (1, 2, 3, 4)), views())
    # same prefix, the other instance idle and this one holding 500 pending tokens: 750 cached of 1000 still wins
    d = p.choose(policies.Request("r1", 1000, 10, (1, 2, 3, 5)), views((500, 0) if first.prompt_instance == "b0"
                                                                       else (0, 500)))
    assert d.prompt_instance == first.prompt_instance and d.token_instance is None and d.pool == "baseline"
    # 900 pending there: the queue costs more than the 750 cached tokens save -> the other instance
    busy = (900, 0) if first.prompt_instance == "b0" else (0, 900)
    d2 = p.choose(policies.Request("r2", 1000, 10, (1, 2, 3, 6)), views(busy))
    assert d2.prompt_instance != first.prompt_instance


def test_split_decisions_pick_the_prompt_instance_by_prefix_and_the_token_instance_by_load():
    pools = (("p0", "prompt"), ("p1", "prompt"), ("t0", "token"), ("t1", "token"))
    p = PrefixAware(random.Random(1))
    a = p.choose(policies.Request("a", 512, 8, (10, 11)), views((0, 0, 0, 0), pools))
    inst = [policies.InstanceView(i, pool, pending_decode_tokens=n) for (i, pool), n in zip(pools, (0, 0, 50, 0))]
    b = p.choose(policies.Request("b", 512, 8, (10, 11)), inst)
    assert b.prompt_instance == a.prompt_instance and b.token_instance == "t1" and b.split


def test_router_block_hashes_are_chained_over_whole_blocks():
    h = prompt_block_hashes({"prompt": list(range(40))}, 16)
    assert len(h) == 2                                               # 40 tokens: 2 whole blocks of 16
    same = prompt_block_hashes({"prompt": list(range(32)) + [99] * 20}, 16)
    other = prompt_block_hashes({"prompt": [5] + list(range(1, 40))}, 16)
    assert same[:2] == h and other[0] != h[0] and other[1] != h[1]    # a changed first block changes every hash
    assert prompt_block_hashes({"prompt": "x" * 130}, 16) != () and prompt_block_hashes({"prompt": 3}, 16) == ()


def _hash_workload(groups, arrival_gap_s=0.2, block=16, output=4):
    """Requests cycling over `groups` shared prefixes (3 whole blocks each) plus one unique block."""
    hashes, n = [], len(groups)
    for k, g in enumerate(groups):
        hashes.append(np.array([1000 * g + j for j in range(3)] + [10 ** 6 + k], np.int64))
    m = len(hashes)
    return Workload("prefix", np.arange(m) * arrival_gap_s, np.full(m, 4 * block, np.int64),
                    np.full(m, output, np.int64), np.arange(m, dtype=np.int64), prefix_hashes=hashes,
                    block_tokens=block)


async def _live_instances(policy: str, w: Workload, urls, log_path) -> list[str]:
    """Where the live router (policy, block_tokens 16) sent each request; prompts are the hash blocks' token ids."""
    router = Router([{"id": i, "url": u, "pool": pool} for (i, pool), u in zip(BASE, urls)], policy,
                    phase_log=log_path, seed=0, policy_params={"block_tokens": 16} if policy == "prefix" else {})
    await router.start()
    records: list = []
    try:
        body = lambda ti, n_in: {"prompt": [int(h) % 50000 + 1 for h in w.prefix_hashes[ti] for _ in range(16)]}  # noqa: E731
        stats = await Replayer(w, body, ReplayConfig(router.url, "stub-model", timeout_s=30.0), records.append).run()
    finally:
        await router.stop()
    records.sort(key=lambda r: r.trace_index)
    return [r.instance for r in merge_phases(records, load_phase_log(log_path), stats.t0_unix_s)]


@pytest.fixture(scope="module")
def stub_urls():
    stubs = [StubBackend(ttft_s=0.01, tpot_s=0.005, cpu=-1) for _ in BASE]
    try:
        for s in stubs:
            s.start()
        yield [s.endpoint() for s in stubs]
    finally:
        for s in stubs:
            s.stop()


def test_live_router_keeps_each_prefix_on_one_instance_where_jsq_spreads_it(stub_urls, tmp_path):
    # 1 s apart, each request done in ~30 ms: every decision sees idle instances (no pending tokens), so the prefix
    # alone decides (and JSQ breaks its ties with the rng) even on a busy host
    w = _hash_workload([0, 1, 0, 1, 0, 1, 0, 1], arrival_gap_s=1.0)
    prefix = run_loop(_live_instances("prefix", w, stub_urls, tmp_path / "p.jsonl"))
    jsq = run_loop(_live_instances("jsq", w, stub_urls, tmp_path / "j.jsonl"))
    assert len({prefix[k] for k in (0, 2, 4, 6)}) == 1 and len({prefix[k] for k in (1, 3, 5, 7)}) == 1
    assert len({jsq[k] for k in (0, 2, 4, 6)}) == 2   # JSQ (ties broken by the rng) splits a prefix's requests


class _Times(PerfModel):
    """A performance model: prefill 1 ms per token, decode 10 ms per iteration, no KV term."""

    def __init__(self) -> None:   # PerfModel's profile fit is not wanted: the times are closed forms
        pass

    kv_s_per_token = 0.0

    def kv_at(self, b):
        return 0.0

    def attention_s(self, self_tokens2, cross_tokens2):
        return 0.0

    def prompt_time_s(self, n):
        return 0.001 * n if n > 0 else 0.0

    def token_time_s(self, b, c):
        return 0.01 if b > 0 else 0.0

    def token_iterations_s(self, b, c, k):
        return 0.01 * k if b > 0 and k > 0 else 0.0

    def iterations_within(self, b, c, d):
        return int(d / 0.01 + 1e-9)


@pytest.mark.parametrize("cache", [True, False])
def test_the_simulator_prefills_only_uncached_tokens_and_records_the_hits(cache):
    w = _hash_workload([0, 0, 1, 0])
    cfg = SimConfig([SimPool("baseline", "m", 1)], policy="prefix", batching="prompt-first", prefix_cache=cache)
    res = simulate(w, cfg, {"m": _Times()}, {"m": 10 ** 6}, 1.0)
    recs = res.records
    cached = [r.cached_input_tokens for r in recs]
    assert cached == ([0, 48, 0, 48] if cache else [None] * 4)   # 3 shared whole blocks of 16; the 4th is unique
    ttft = [r.first_token_s - r.actual_send_s for r in recs]
    # 64-token prompts: 64 ms to prefill, 16 ms for a hit on 48 of them
    assert ttft[1] == pytest.approx((0.016 if cache else 0.064), abs=2e-3) and ttft[0] == pytest.approx(0.064, abs=2e-3)


@pytest.mark.parametrize("details, cached", [({"cached_tokens": 96}, 96), (None, None), ({"cached_tokens": True}, None)])
def test_the_record_carries_the_servers_cached_prompt_tokens(details, cached):
    # vLLM --enable-prompt-tokens-details puts usage.prompt_tokens_details.cached_tokens on the final usage chunk
    from splitbench.client.sink import RecordSink
    from splitbench.schema import records as R
    import orjson
    rec = R.RequestRecord("r0", 0, 0.0, 128, 2)
    sink = RecordSink(rec, t0=0.0, send=0.0)
    sink.on_head(200, "OK", {"content-type": "text/event-stream"})
    usage = {"prompt_tokens": 128, "completion_tokens": 2, **({"prompt_tokens_details": details} if details else {})}
    sink.on_body(b'data: {"choices":[{"text":"a"}],"usage":{"prompt_tokens":128,"completion_tokens":1}}\n\n', 0.1)
    sink.on_body(b'data: {"choices":[{"text":"b"}],"usage":{"prompt_tokens":128,"completion_tokens":2}}\n\n'
                 b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n", 0.2)
    sink.on_end(0.2)
    assert rec.status == R.OK and rec.actual_input_tokens == 128 and rec.cached_input_tokens == cached


def test_the_router_process_takes_any_policys_parameters(stub_urls, tmp_path):
    # the launched clusters' router is a separate process: --policy prefix with block_tokens must reach its policy
    from splitbench.client.probe import http_get
    from splitbench.servers.router_process import RouterProcess
    rp = RouterProcess([{"id": i, "url": u, "pool": pool} for (i, pool), u in zip(BASE, stub_urls)], "prefix",
                       policy_params={"block_tokens": 32, "cache_weight": 0.5}, log_path=tmp_path / "router.log")
    try:
        rp.start(timeout_s=30)
        assert http_get(rp.url + "/health", timeout_s=5)[0] == 200
        assert "policy prefix" in (tmp_path / "router.log").read_text()
    finally:
        rp.stop()
    assert rp.describe()["policy_params"] == {"block_tokens": 32, "cache_weight": 0.5}

def test_the_simulated_cache_holds_the_machines_kv_memory_in_blocks_and_evicts_least_recently_used():
    """A machine of 100 KV tokens caches 6 blocks of 16: prefix 0's 4 blocks, then prefix 1's 4 evict prefix 0's first
    two, so prefix 0 misses from its first block (chained); with room for everything the third request hits 48."""
    w = _hash_workload([0, 1, 0])
    cfg = SimConfig([SimPool("baseline", "m", 1)], policy="prefix", batching="prompt-first")
    small = simulate(w, cfg, {"m": _Times()}, {"m": 100}, 1.0).records
    large = simulate(w, cfg, {"m": _Times()}, {"m": 10 ** 6}, 1.0).records
    assert [r.cached_input_tokens for r in small] == [0, 0, 0]
    assert [r.cached_input_tokens for r in large] == [0, 0, 48]
    assert small[2].first_token_s - small[2].actual_send_s > large[2].first_token_s - large[2].actual_send_s


@pytest.mark.parametrize("value, cached", [("on", True), ("off", False), ("sometimes", None)])
def test_simulate_spells_prefix_caching_as_run_does(tmp_path, value, cached):
    from typer.testing import CliRunner
    from splitbench.cli import app
    from splitbench.schema import records as R
    trace = ("synth:arrivals=poisson,rate=2,count=30,lengths=uniform,input=600-2000,output=5-20,seed=1,"
             "system_prompts=2,system_share=0.5")
    res = CliRunner().invoke(app, ["simulate", "--cluster", "baseline-h100:2", "--model", "llama2-70b", "--trace",
                                   trace, "--prefix-caching", value, "--results", str(tmp_path), "--run-id", "s"])
    if cached is None:
        assert res.exit_code == 2 and "--prefix-caching must be on or off" in res.output
        assert not (tmp_path / "s").exists()
        return
    assert res.exit_code == 0, res.output
    hits = [r.cached_input_tokens for r in R.read_records(tmp_path / "s")]
    assert (sum(h or 0 for h in hits) > 0) if cached else all(h is None for h in hits)
