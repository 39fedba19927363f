"""One request sequence through the live router (real sockets, in front of splitbench's stub server processes) and
through the simulator with the same policy, seed and a performance model of the stubs' timings: both make the same
placement decisions request by request (round robin, JSQ, mixed pool, prefix-aware: its sequence shares prompt
prefixes, as token-id prompts on the live side and the same blocks as hash ids in the simulator). The sequences are
built so that the policies' choices depend on the ledger's pending tokens (they differ from round robin and from what
a ledger that released prompt or decode tokens at another moment would choose) and every ledger update lands 0.2-0.3 s
clear of every later arrival, so host jitter of a hundred ms or more cannot reorder them."""
from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from splitbench import policies
from splitbench.backends.stub import StubBackend
from splitbench.client.replayer import ReplayConfig, Replayer
from splitbench.schema.records import OK
from splitbench.servers.phaselog import load_phase_log, merge_phases
from splitbench.servers.router import Router
from splitbench.sim.cluster import simulate
from splitbench.sim.config import SimConfig, SimPool
from splitbench.sim.perfmodel import PerfModel
from splitbench.timing import run as run_loop
from splitbench.workload.types import Workload

PREFILL_S = 0.6    # the stubs' ttft_s: a prefill takes this long on the live side and in the simulator
TPOT_S = 0.05      # the stubs' tpot_s: one decode iteration (any batch) in the simulator
# Every prefill end and finish of a request lies at least BEFORE_S before or AFTER_S after each later arrival.
# Live ledger updates only come later than nominal (each hop adds delay), simulated ones by at most one TPOT_S.
BEFORE_S, AFTER_S = 0.3, 0.2
SEED = 3
# (arrival_s, input_tokens, output_tokens); request k is "r<k>" on both sides. Nominal times: prefill end = arrival +
# PREFILL_S, finish = prefill end + (output - 1) x TPOT_S. JSQ (seed 3) over it, pending tokens in brackets:
# r1 prompt-1 (prompt-0 prefills r0 [300]) and token-1 (token-0 holds r0 [25]); r2: both prefills over, the rng
# breaks the prompt tie (prompt-1; round robin: prompt-0), token-0 [25] < token-1 [27]; r3 prompt-0 (prompt-1
# prefills r2 [900]), token-1 [27] < [29]; r4 token-0 (r0-r2 finished: [0] vs [40]); r6 token-1 [40] < token-0
# [41] by one token; r7 prompt-1 (prompt-0 prefills r6), token-0 [41] < [70].
JSQ_SEQUENCE = ((0.0, 300, 25), (0.15, 1200, 27), (1.05, 900, 4), (1.35, 1200, 40), (2.4, 300, 27), (2.6, 300, 14),
                (3.5, 1200, 30), (3.65, 300, 6))
MIXED_SEQUENCE = ((0.0, 600, 40), (0.9, 1200, 30), (2.0, 300, 18), (2.15, 1200, 25), (2.25, 600, 20),
                  (3.25, 1200, 37), (4.25, 1200, 30), (4.4, 900, 7))
# Found by a seeded search (random arrivals, sizes, outputs) for the pure checks below under MixedPool as of 88f0fa5
# (average thresholds; an instance borrowed from an overloaded pool takes nothing new). The mixed pool (thresholds
# MIXED_PARAMS) over it: r0-r2 split (r2: prompt tie broken by the rng, token-1 [30] < [40]); r3 to mixed-0 (the
# token pool holds 40 + 48 >= 2 x 40 pending decode tokens); r4: still so and mixed-0 prefills r3 [1200 >= 500], so
# prompt-0 is borrowed (prompt-1 alone holds 300 < 500) and runs r4 whole (to 3.8 s); r5: no pool overloaded,
# prompt-1 alone (prompt-0 still borrowed), token-0 [0] < [18]; r6: prompt-0 drained, back in its pool and picked
# (rng tie), token-1 [0] < [37]; r7 to mixed-0: the prompt pool holds 1200 >= 2 x 500 (prompt-0 prefills r6).
BLOCK_TOKENS = 16             # the prefix policy's hash block (router: tokens of a token-id prompt per hash)
GROUP_HASH, UNIQUE_HASH = 1000, 10 ** 6   # block j of group g hashes to g x GROUP_HASH + j; request k's own block
# (arrival_s, input_tokens, output_tokens, prefix group), found by a seeded search for the pure checks below. The
# prefix policy over it: r1 joins r0's group-1 blocks on prompt-0 (both prompt instances idle: JSQ's rng tie); r2
# (group 1, 960 tokens) would find 19 of its 60 blocks there (304 tokens) but r1 prefills 320 there: the load guard
# sends it to prompt-1; r5 (group 1) takes prompt-1, the longer match (39 blocks vs 19); r7 (group 1, 1280 tokens)
# matches 59 of 80 blocks (944 tokens) on prompt-1, which prefills r6 [960]: 960 + 1280 - 944 > 1280 - 304 on
# prompt-0, so prompt-0. Token instances by pending decode tokens, as JSQ.
PREFIX_SEQUENCE = ((0.0, 320, 17, 1), (0.9, 320, 24, 1), (1.05, 960, 14, 1), (2.1, 320, 26, 0), (3.15, 320, 17, 2),
                   (4.25, 640, 38, 1), (5.15, 960, 38, 0), (5.4, 1280, 26, 1))
SEQUENCES = {"round-robin": JSQ_SEQUENCE, "jsq": JSQ_SEQUENCE, "mixed-pool": MIXED_SEQUENCE,
             "prefix": PREFIX_SEQUENCE}
INSTANCES = (("prompt-0", "prompt"), ("prompt-1", "prompt"), ("token-0", "token"), ("token-1", "token"),
             ("mixed-0", "mixed"))
MIXED_PARAMS = {"prompt_threshold_tokens": 500, "decode_threshold_tokens": 40}
POLICY_PARAMS = {"round-robin": {}, "jsq": {}, "mixed-pool": MIXED_PARAMS, "prefix": {"block_tokens": BLOCK_TOKENS}}
PLACEMENT = ("instance", "pool", "prefill_instance", "decode_instance", "prefill_pool", "decode_pool")


class StubTimes(PerfModel):
    """The simulator's performance model of a stub: a prefill of any size takes PREFILL_S, every decode iteration
    TPOT_S whatever the batch (each stub stream is paced on its own)."""

    def __init__(self) -> None:   # PerfModel's profile fit is not wanted: the times are closed forms
        pass

    def prompt_time_s(self, tokens: int) -> float:
        return PREFILL_S if tokens > 0 else 0.0

    def kv_at(self, batch: int) -> float:
        return 0.0

    def attention_s(self, self_tokens2: int, cross_tokens2: int) -> float:
        return 0.0

    def token_time_s(self, batch: int, context_tokens: int) -> float:
        return TPOT_S if batch > 0 else 0.0

    def token_iterations_s(self, batch: int, context_tokens: int, iterations: int) -> float:
        return TPOT_S * iterations if batch > 0 and iterations > 0 else 0.0

    def iterations_within(self, batch: int, context_tokens: int, duration_s: float) -> int:
        """Largest k with k x TPOT_S <= duration_s (the float quotient's rounding fixed either way)."""
        k = max(0, math.floor(duration_s / TPOT_S))
        while TPOT_S * (k + 1) <= duration_s:
            k += 1
        while k > 0 and TPOT_S * k > duration_s:
            k -= 1
        return k


def prefix_hashes(seq) -> list[tuple[int, ...]] | None:
    """Chained block hashes of a prefix sequence's requests ((arrival, input, output, group) rows: every whole block
    of BLOCK_TOKENS but the last is the group's, the last is the request's own), None for a 3-column sequence."""
    if len(seq[0]) < 4:
        return None
    return [tuple(GROUP_HASH * g + j for j in range(n_in // BLOCK_TOKENS - 1)) + (UNIQUE_HASH + k,)
            for k, (_, n_in, _, g) in enumerate(seq)]


def prompt_tokens(hashes: tuple[int, ...]) -> list[int]:
    """A token-id prompt whose BLOCK_TOKENS blocks stand for `hashes` one to one (distinct hash, distinct block),
    so the router's chained hashes of it repeat exactly where the sequence's hashes do."""
    return [1 + (h if h < UNIQUE_HASH else 40000 + h - UNIQUE_HASH) for h in hashes for _ in range(BLOCK_TOKENS)]


def workload(seq) -> Workload:
    a, i, o = (np.array(col) for col in list(zip(*seq))[:3])
    hashes = prefix_hashes(seq)
    return Workload("decisions", a.astype(np.float64), i.astype(np.int64), o.astype(np.int64),
                    np.arange(len(seq), dtype=np.int64), block_tokens=BLOCK_TOKENS if hashes else 0,
                    prefix_hashes=None if hashes is None else [np.array(h, np.int64) for h in hashes])


def nominal_times(arrival_s: float, output_tokens: int) -> tuple[float, float]:
    """(prefill end, finish) of a request on an idle stub: the prefill, then output-1 tokens TPOT_S apart."""
    return arrival_s + PREFILL_S, arrival_s + PREFILL_S + (output_tokens - 1) * TPOT_S


RELEASES = ("documented", "prefill-at-finish", "finish-at-prefill", "never")


def nominal_decisions(policy: str, seq, release: str = "documented") -> list[policies.Decision]:
    """The policy driven by hand over `seq` with its own Ledger, updated at the nominal times. `release`: when
    tokens leave the ledger: "documented" (prompt tokens at the prefill end, decode tokens at the finish),
    "prefill-at-finish", "finish-at-prefill" (both at the prefill end) or "never" (a ledger that only adds)."""
    pol = policies.make_policy(policy, seed=SEED, **POLICY_PARAMS[policy])
    hashes = prefix_hashes(seq) or [()] * len(seq)
    reqs = [policies.Request(f"r{k}", row[1], row[2], hashes[k]) for k, row in enumerate(seq)]
    ledger, due, out = policies.Ledger(INSTANCES), [], []
    for k, (a, _, n_out, *_) in enumerate(seq):
        for ev in sorted(e for e in due if e[0] < a):   # (time, prefill_done before finish, request, update)
            due.remove(ev)
            getattr(ledger, ev[3])(out[ev[2]], reqs[ev[2]])
        out.append(pol.choose(reqs[k], ledger.views()))
        ledger.dispatch(out[k], reqs[k])
        pd, fin = nominal_times(a, n_out)
        at = {"documented": (pd, fin), "prefill-at-finish": (fin, fin), "finish-at-prefill": (pd, pd)}.get(release)
        if at is not None:
            due += [(at[0], 0, k, "prefill_done"), (at[1], 1, k, "finish")]
    return out


def group_moves(seq, decisions) -> list[bool]:
    """Per request of a prefix sequence after its group's first: True when it goes to another prompt instance than
    the group's previous request (the load guard or a longer match elsewhere), False when it stays."""
    last, out = {}, []
    for row, d in zip(seq, decisions):
        if row[3] in last:
            out.append(last[row[3]] != d.prompt_instance)
        last[row[3]] = d.prompt_instance
    return out


def margin_violations(seq) -> list[str]:
    """Ledger updates (prefill ends, finishes) of earlier requests closer to a later arrival than the margins."""
    bad, eps = [], 1e-9
    for j, (aj, _, oj, *_) in enumerate(seq):
        for what, t in zip(("prefill end", "finish"), nominal_times(aj, oj)):
            bad += [f"r{j} {what} {t:.2f} s vs r{k} arrival {a:.2f} s" for k, (a, *_) in enumerate(seq)
                    if k > j and a - BEFORE_S + eps < t < a + AFTER_S - eps]
    return bad


def sim_only_waits(decisions, seq) -> list[str]:
    """Placements where the simulated machine would make a request wait while a stub would not: a prefill on an
    instance that is already prefilling or decoding another request (a stub serves each request on its own)."""
    busy, bad = {}, []
    for k, ((a, _, o, *_), d) in enumerate(zip(seq, decisions)):
        pd, fin = nominal_times(a, o)
        busy.setdefault(d.prompt_instance, []).append((a, pd, k, "prefill"))
        busy.setdefault(d.token_instance or d.prompt_instance, []).append((pd, fin, k, "decode"))
    for iid, spans in busy.items():
        bad += [f"{iid}: r{p[2]} prefill {p[0]:.2f}-{p[1]:.2f} s meets r{s[2]} {s[3]} {s[0]:.2f}-{s[1]:.2f} s"
                for p in spans if p[3] == "prefill" for s in spans
                if s[2] != p[2] and (s[3] == "decode" or s[2] < p[2]) and p[0] < s[1] + TPOT_S and s[0] < p[1]]
    return bad


def sim_config(policy: str) -> SimConfig:
    """The live cluster's shape; instance ids (pool-k, in this order) are the router's. The mixed machine runs
    prompt-first batching: a stub prefills a request in PREFILL_S whatever else it serves, which the fixed-time
    prefill iteration models; chunked batching would price a prefill by its tokens (a stub does not)."""
    return SimConfig(pools=[SimPool("prompt", "stub", 2), SimPool("token", "stub", 2), SimPool("mixed", "stub", 1)],
                     policy=policy, policy_params=POLICY_PARAMS[policy], seed=SEED, batching="prompt-first")


def simulated_records(policy: str) -> list:
    # KV of 0 bytes a token: the transfer takes no time, as with the stubs' kv_transfer_s = 0
    return simulate(workload(SEQUENCES[policy]), sim_config(policy), {"stub": StubTimes()}, {"stub": 10**6},
                    0).records


def placement(rec) -> tuple:
    return tuple(getattr(rec, f) for f in PLACEMENT)


def decision_placement(d: policies.Decision) -> tuple:
    pools = dict(INSTANCES)
    if d.split:
        return (None, "split", d.prompt_instance, d.token_instance, d.pool, pools[d.token_instance])
    return (d.prompt_instance, d.pool, d.prompt_instance, d.prompt_instance, d.pool, d.pool)


# ---------------------------------------------------------------- the sequences are ones that can tell

@pytest.mark.parametrize("policy", ["jsq", "mixed-pool", "prefix"])
def test_the_sequences_are_clear_of_jitter_and_decide_by_the_ledger(policy):
    """Pure checks (no servers): every ledger update is clear of every later arrival; no placement makes a
    simulated machine queue where a stub would not; JSQ and the mixed pool decide differently from round robin and
    from ledgers that release tokens at another moment (so a router or simulator whose ledger updates came at the
    wrong moment decides differently); the mixed pool places a request on its mixed instance and borrows one."""
    seq = SEQUENCES[policy]   # round robin runs on JSQ's: its decisions depend on neither ledger nor timing
    assert not margin_violations(seq)
    ds = nominal_decisions(policy, seq)
    assert not sim_only_waits(ds, seq)
    assert ds != nominal_decisions("round-robin", seq)
    for release in RELEASES[1:]:
        assert nominal_decisions(policy, seq, release) != ds, release
    if policy == "prefix":   # decides by its cache index: not as JSQ; a group stays on an instance, and moves
        assert ds != nominal_decisions("jsq", seq)
        moves = group_moves(seq, ds)
        assert moves.count(True) >= 1 and moves.count(False) >= 2, moves
    if policy == "mixed-pool":
        assert ds != nominal_decisions("jsq", seq)
        assert any(d.prompt_instance == "mixed-0" for d in ds)
        assert any(d.pool == policies.MIXED and d.prompt_instance != "mixed-0" for d in ds)   # a borrowed one


@pytest.mark.parametrize("policy", list(SEQUENCES))
def test_the_simulator_decides_as_the_documented_ledger(policy):
    """The simulator on the stubs' performance model: the hand-driven policy's decisions, request by request."""
    sim, seq = simulated_records(policy), SEQUENCES[policy]
    assert [r.status for r in sim] == [OK] * len(seq)
    assert [placement(r) for r in sim] == [decision_placement(d) for d in nominal_decisions(policy, seq)]


# ---------------------------------------------------------------- live router vs simulator

@pytest.fixture(scope="module")
def stub_urls():
    """One stub server process per instance (`python -m splitbench.servers.stub_main`, what `splitbench serve-stub`
    runs; unpinned; kv_transfer_s 0), shared by the routers: a stub paces every request on its own."""
    stubs = [StubBackend(ttft_s=PREFILL_S, tpot_s=TPOT_S, cpu=-1) for _ in INSTANCES]
    try:
        for stub in stubs:
            stub.start()
        yield [stub.endpoint() for stub in stubs]
    finally:
        for stub in stubs:
            stub.stop()


async def _live(policy: str, urls: list[str], log_path) -> list:
    """The policy's sequence replayed (splitbench's open-loop replayer) through a router running `policy` -> the
    records with the router's phase log merged in (placement fields, phases on the run clock), as a run has them."""
    router = Router([{"id": iid, "url": u, "pool": pool} for (iid, pool), u in zip(INSTANCES, urls)], policy,
                    phase_log=log_path, seed=SEED, policy_params=POLICY_PARAMS[policy])
    await router.start()
    records: list = []
    try:
        hashes = prefix_hashes(SEQUENCES[policy])
        body = (lambda _ti, n_in: {"prompt": [7] * n_in}) if hashes is None else \
            (lambda ti, n_in: {"prompt": prompt_tokens(hashes[ti])})
        replayer = Replayer(workload(SEQUENCES[policy]), body, ReplayConfig(router.url, "stub-model", timeout_s=60.0),
                            records.append)
        stats = await replayer.run()
    finally:
        await router.stop()
    records.sort(key=lambda r: r.trace_index)
    return merge_phases(records, load_phase_log(log_path), stats.t0_unix_s)


def _table(seq, live, sim, nominal) -> str:
    """Per request: live, simulated and hand-driven placement, and the live ledger moments vs the nominal ones."""
    rows = []
    for (a, _, o, *_), lr, sr, d in zip(seq, live, sim, nominal):
        ph = lr.phases_s or {}
        pd = ph.get("prefill_done", ph.get("first_token", math.nan))
        npd, nfin = nominal_times(a, o)
        rows.append(f"{lr.request_id}: live {placement(lr)[2:4]} sim {placement(sr)[2:4]} nominal "
                    f"{decision_placement(d)[2:4]}; recv {ph.get('router_recv', math.nan) - a:+.3f} s, prefill end "
                    f"{pd - npd:+.3f} s, finish {ph.get('done', math.nan) - nfin:+.3f} s off nominal")
    return "\n".join(rows)


def live_slack(seq, live) -> tuple[float, str]:
    """How close the live run came to reordering a ledger update and a later arrival: the smallest live gap (s)
    between an earlier request's prefill end or finish and a later request's receipt at the router, on the side the
    nominal times put it (negative: reordered), and which pair."""
    worst = (math.inf, "")
    for j, (aj, _, oj, *_) in enumerate(seq):
        ph = live[j].phases_s or {}
        for what, t_nom in zip(("prefill_done", "done"), nominal_times(aj, oj)):
            t = ph.get(what, ph.get("first_token")) if what == "prefill_done" else ph.get("done")
            for k in range(j + 1, len(seq)):
                recv = (live[k].phases_s or {}).get("router_recv", math.nan)
                gap = (recv - t) if t_nom < seq[k][0] else (t - recv)
                worst = min(worst, (gap, f"r{j} {what} vs r{k} arrival"))
    return worst


def test_live_router_and_simulator_make_the_same_decisions(stub_urls, tmp_path):
    """The three policies at once (one router each, the stubs shared: a stub paces every request on its own)."""
    async def all_policies():
        return await asyncio.gather(*(_live(p, stub_urls, tmp_path / f"{p}.jsonl") for p in POLICY_PARAMS))
    lives = run_loop(all_policies())
    wrong = []
    for policy, live in zip(POLICY_PARAMS, lives):
        seq = SEQUENCES[policy]
        assert [r.status for r in live] == [OK] * len(seq), [(r.request_id, r.error) for r in live]
        sim, nominal = simulated_records(policy), nominal_decisions(policy, seq)
        assert [r.request_id for r in live] == [r.request_id for r in sim]
        if [placement(r) for r in live] != [placement(r) for r in sim]:
            gap, pair = live_slack(seq, live)
            wrong.append(f"{policy}: live and simulated decisions differ (live order of ledger updates and arrivals "
                         f"{'kept' if gap > 0 else 'NOT kept: host too slow'}, closest {gap:+.3f} s: {pair})\n"
                         + _table(seq, live, sim, nominal))
    assert not wrong, "\n".join(wrong)
