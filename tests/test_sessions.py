"""Multi-turn replay (--multi-turn): the closed loop within a session and think times on a FakeClock with a
MockTransport (exact, no real time); prompt threading, affinity headers, failed turns, session shards; and the
issue's acceptance test against the real stub over real sockets (turn k+1's prompt holds turn k's output ids)."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import numpy as np
import pytest
from typer.testing import CliRunner

from splitbench.app.options import RunOptions
from splitbench.app.session import RunSession
from splitbench.cli import app
from splitbench.client.mock import MockResponse, MockTransport
from splitbench.client.replayer import ReplayConfig
from splitbench.client.sessions import LLMD_COOKIE, SESSION_HEADER, SessionReplayer
from splitbench.client.shards import session_shard_positions, shard
from splitbench.client.transport import make_transport
from splitbench.client.workers import replay_workers
from splitbench.errors import InputError
from splitbench.schema import records as R
from splitbench.servers.stub import stub_token_ids
from splitbench.servers.stub_main import run_stub_in_thread
from splitbench.timing import FakeClock
from splitbench.workload.prompts import TokenIdPrompts
from splitbench.workload.sessions import ThinkTime, plan_turns
from splitbench.workload.transforms import window
from splitbench.workload.types import Workload

T0 = 100.0
PROMPTS = TokenIdPrompts(vocab_size=5000, special_ids=set(range(10)), seed=3)


def _w(rows) -> Workload:
    """rows: (arrival_s, input, output, session, turn)."""
    a = np.array(rows, dtype=np.float64)
    return Workload("s", arrival_s=a[:, 0], input_tokens=a[:, 1].astype(np.int64),
                    output_tokens=a[:, 2].astype(np.int64), trace_index=np.arange(len(rows), dtype=np.int64) + 50,
                    session_id=a[:, 3].astype(np.int64), turn=a[:, 4].astype(np.int64))


def _ids(req) -> list[int]:
    """The mock server's output ids for a request: a function of its prompt (like the stub's)."""
    p = req.json()["prompt"]
    return [1000 + (len(p) * 7 + k) % 3000 for k in range(req.json()["max_tokens"])]


def _answer(req, ttft_s=0.5, tbt_s=0.1, **kw) -> MockResponse:
    n = req.json()["max_tokens"]
    return MockResponse.stream(n, ttft_s=ttft_s, tbt_s=tbt_s, token_ids=_ids(req), **kw)


def _replay(w: Workload, handler=_answer, **cfg):
    clock, out = FakeClock(start_s=T0), []
    mock = MockTransport(handler, clock)
    rep = SessionReplayer(w, PROMPTS.payload, ReplayConfig(base_url="http://mock", model="m", start_delay_s=0.0,
                                                           multi_turn=True, **cfg), out.append,
                          transport=mock, clock=clock)
    clock.run(rep.run())
    recs = {r.trace_index: r for r in out}
    return [recs[int(t)] for t in w.trace_index], rep, mock


# ------------------------------------------------------------------ the schedule

def test_a_turn_waits_for_the_previous_answer_and_sessions_stay_open_loop():
    # session 7: three turns 0.1 s apart in the trace, each answer takes 0.5 + 3 * 0.1 = 0.8 s;
    # session 9 starts at 0.05 while session 7's first turn is in flight: it does not wait for it
    w = _w([(0.0, 20, 4, 7, 0), (0.05, 10, 4, 9, 0), (0.1, 30, 4, 7, 1), (0.2, 40, 4, 7, 2)])
    recs, rep, mock = _replay(w)
    a, b, c, d = recs
    assert all(r.ok for r in recs)
    assert b.actual_send_s == pytest.approx(0.05) and b.intended_send_s == pytest.approx(0.05)
    assert a.end_s > 0.1   # the trace time of turn 1 passed while turn 0 was answered
    assert c.actual_send_s == pytest.approx(a.end_s) and c.intended_send_s == pytest.approx(a.end_s)
    assert d.actual_send_s == pytest.approx(c.end_s)
    assert [(r.session_id, r.turn) for r in recs] == [(7, 0), (9, 0), (7, 1), (7, 2)]
    assert rep.stats.sent == 4 and not rep.stats.stopped_early


def test_the_trace_time_binds_when_the_answer_is_early():
    w = _w([(0.0, 20, 4, 1, 0), (5.0, 30, 4, 1, 1)])
    a, b = _replay(w)[0]
    assert a.end_s < 5.0
    assert b.actual_send_s == pytest.approx(5.0) and b.intended_send_s == pytest.approx(5.0)


@pytest.mark.parametrize("spec,delay", [("fixed:2", 2.0), ("gap", 0.3), ("trace", 0.0)])
def test_think_time_counts_from_the_answer(spec, delay):
    w = _w([(0.0, 20, 4, 1, 0), (0.3, 30, 4, 1, 1)])
    a, b = _replay(w, think_time=spec)[0]
    assert b.actual_send_s == pytest.approx(max(0.3, a.end_s + delay))


def test_exponential_think_time_is_seeded_per_turn():
    w = _w([(0.0, 20, 4, 1, 0), (0.1, 30, 4, 1, 1), (0.2, 40, 4, 1, 2)])
    think = ThinkTime.parse("exp:mean=5", seed=11)
    recs = _replay(w, think_time="exp:mean=5", think_seed=11)[0]
    for prev, cur in zip(recs, recs[1:]):
        assert cur.actual_send_s == pytest.approx(prev.end_s + think.delay_s(cur.trace_index, 0.1))
    assert think.delay_s(51, 0) != think.delay_s(52, 0)
    assert recs[1].actual_send_s == _replay(w, think_time="exp:mean=5", think_seed=11)[0][1].actual_send_s


def test_an_earlier_turn_that_becomes_due_wakes_the_dispatcher():
    # session 2's first turn is due at 10 s; session 1's turn 1 becomes due (at its answer) long before
    w = _w([(0.0, 20, 4, 1, 0), (0.1, 30, 4, 1, 1), (10.0, 10, 4, 2, 0)])
    a, b, c = _replay(w)[0]
    assert b.actual_send_s == pytest.approx(a.end_s) and b.actual_send_s < 2.0
    assert c.actual_send_s == pytest.approx(10.0)


# ------------------------------------------------------------------ prompts and headers

def test_turn_prompt_is_previous_prompt_plus_output_ids_plus_new_tokens():
    # trace: turn 1 = 20 + 4 + 6 new; turn 2 says 25 (< 30 + 4): the rule sends 1 new token
    w = _w([(0.0, 20, 4, 3, 0), (0.1, 30, 4, 3, 1), (0.2, 25, 2, 3, 2)])
    recs, rep, mock = _replay(w)
    bodies = [r.json() for r in mock.requests]
    p0, p1, p2 = (b["prompt"] for b in bodies)
    assert p0 == PROMPTS.token_ids(50, 20)
    assert p1 == p0 + _ids(mock.requests[0]) + PROMPTS.token_ids(51, 30)[-6:]
    assert p2 == p1 + _ids(mock.requests[1]) + PROMPTS.token_ids(52, 25)[-1:]
    assert len(p2) == 30 + 4 + 1 and recs[2].planned_input_tokens == 25
    assert all(b["return_token_ids"] is True and b["min_tokens"] == b["max_tokens"] for b in bodies)
    assert plan_turns(w).adjusted_turns == 1 and rep.stats.stand_in_outputs == 0


def test_answers_without_token_ids_thread_seeded_stand_ins():
    w = _w([(0.0, 20, 4, 3, 0), (0.1, 30, 4, 3, 1)])
    recs, rep, mock = _replay(w, handler=lambda req: MockResponse.stream(4, ttft_s=0.5, tbt_s=0.1))
    p0, p1 = (r.json()["prompt"] for r in mock.requests)
    assert p1[:20] == p0 and p1[20:24] == PROMPTS.token_ids(50, 24)[20:] and len(p1) == 30
    assert rep.stats.stand_in_outputs == 1


def test_every_turn_carries_the_session_header_and_llmd_cookie_comes_back():
    w = _w([(0.0, 20, 4, 5, 0), (0.1, 30, 4, 5, 1), (0.2, 10, 4, -1, 0)])
    recs, rep, mock = _replay(w, handler=lambda req: _answer(req, headers={
        "set-cookie": f"{LLMD_COOKIE}=cG9kLWE=; Path=/; HttpOnly"}))
    by_id = {r.request_id: r.headers for r in mock.requests}
    h0, h1, h2 = (by_id[r.request_id] for r in recs)
    assert h0 == {SESSION_HEADER: "5"}
    assert h1 == {SESSION_HEADER: "5", "Cookie": f"{LLMD_COOKIE}=cG9kLWE="}
    assert h2 == {} and recs[2].session_id is None


# ------------------------------------------------------------------ failures

def test_a_failed_turn_ends_its_session_with_not_sent_records():
    w = _w([(0.0, 20, 4, 1, 0), (0.1, 30, 4, 1, 1), (0.2, 40, 4, 1, 2), (0.3, 10, 4, 2, 0), (0.4, 20, 4, 2, 1)])

    def handler(req):
        return MockResponse(status=500, delay_s=0.2) if req.index == 0 else _answer(req)
    recs, rep, mock = _replay(w, handler=handler)
    assert [r.status for r in recs] == [R.HTTP_ERROR, R.NOT_SENT, R.NOT_SENT, R.OK, R.OK]
    assert "turn 0 of session 1 ended http_error" in recs[1].error and recs[2].actual_send_s is None
    assert len(mock.requests) == 3 and rep.stats.turns_not_sent == 2 and rep.stats.finished == 5


def test_a_trace_without_sessions_or_token_prompts_is_refused():
    w = _w([(0.0, 20, 4, -1, 0)])
    with pytest.raises(InputError, match="needs a trace with sessions"):
        plan_turns(w)
    with pytest.raises(InputError, match="token-id prompts"):
        rep = SessionReplayer(_w([(0.0, 20, 4, 1, 0)]), lambda i, n: {"messages": []},
                              ReplayConfig(base_url="http://x", model="m", multi_turn=True), print)
        rep.prepare()
    for bad in ("exp", "fixed:-1", "poisson", "exp:mean=x", "gap:3"):
        with pytest.raises(InputError, match="--think-time"):
            ThinkTime.parse(bad)


# ------------------------------------------------------------------ shards and transforms

def test_session_shards_keep_sessions_whole_and_carry_their_fields():
    sid = np.array([4, 8, 4, -1, 8, 6, 4, -1])
    parts = [session_shard_positions(sid, k, 2).tolist() for k in range(2)]
    assert parts == [[0, 2, 3, 6, 7], [1, 4, 5]]   # groups by first arrival: 4, 8, (3), 6, (7), dealt in turn
    w = _w([(i * 0.1, 10, 2, s, 0) for i, s in enumerate(sid)])
    w.turn = np.arange(8)
    part = shard(w, 1, 2, by_session=True)
    assert part.session_id.tolist() == [8, 8, 6] and part.turn.tolist() == [1, 4, 5]
    assert shard(w, 0, 2).session_id.tolist() == [4, 4, 8, 4]   # round robin, fields still carried


def test_transforms_slice_session_fields():
    w = _w([(0.0, 10, 2, 1, 0), (1.0, 10, 2, 1, 1), (2.0, 10, 2, 2, 0)])
    out = window(w, 0.5, 2.0)
    assert out.session_id.tolist() == [1, 2] and out.turn.tolist() == [1, 0]


# ------------------------------------------------------------------ the real stub, real sockets

class _Tee:
    """A real HTTP transport that also keeps what it sent."""

    def __init__(self, inner):
        self.inner, self.sent = inner, []
        self.due, self.on_due = float("inf"), None

    async def open(self, warm):
        await self.inner.open(warm)

    def start(self, body, sink, request_id, headers=None):
        self.sent.append((json.loads(body), dict(headers or {})))
        return self.inner.start(body, sink, request_id, headers)

    def cancel(self, futs):
        self.inner.cancel(futs)

    async def aclose(self):
        await self.inner.aclose()


def _conversations() -> Workload:
    rows = []
    for s in range(3):
        for k in range(3):
            rows.append((0.02 * s + 0.01 * k, 16 + k * (5 + 3), 5, s, k))   # exact: in[k+1] = in[k] + 5 + 3
    rows.append((0.015, 12, 3, -1, 0))
    rows.sort()
    return _w(rows)


@pytest.mark.parametrize("server,http", [("lean", "lean"), ("aiohttp", "aiohttp")])
def test_stub_turn_prompt_contains_the_previous_turns_output_ids(server, http):
    url, stop = run_stub_in_thread(ttft_s=0.01, tpot_s=0.002, server=server)
    try:
        w, out = _conversations(), []
        cfg = ReplayConfig(base_url=url, model="m", multi_turn=True, http=http)
        tee = _Tee(make_transport(http, url + "/v1/completions", {"Content-Type": "application/json"},
                                  clock=time.perf_counter, timeout_s=30, idle_timeout_s=30))
        rep = SessionReplayer(w, PROMPTS.payload, cfg, out.append, transport=tee)
        asyncio.run(rep.run())
    finally:
        stop()
    assert len(out) == len(w) and all(r.ok for r in out)
    sent = {}
    for body, headers in tee.sent:
        if SESSION_HEADER in headers:
            sent.setdefault(int(headers[SESSION_HEADER]), []).append(body["prompt"])
    assert sorted(sent) == [0, 1, 2] and sum(SESSION_HEADER not in h for _, h in tee.sent) == 1
    for prompts in sent.values():
        assert len(prompts) == 3
        for k in range(2):
            answer = stub_token_ids(prompts[k], 5)   # what the stub streamed for turn k, by its own rule
            assert prompts[k + 1][:len(prompts[k]) + 5] == prompts[k] + answer
            assert len(prompts[k + 1]) == len(prompts[k]) + 5 + 3
    recs = sorted((r for r in out if r.session_id is not None), key=lambda r: (r.session_id, r.turn))
    for prev, cur in zip(recs, recs[1:]):
        if cur.session_id == prev.session_id:
            assert cur.actual_send_s >= prev.end_s and cur.turn == prev.turn + 1
        assert cur.actual_input_tokens == cur.planned_input_tokens   # the server counted the threaded prompt


def test_workers_keep_each_session_in_one_sender(tmp_path):
    url, stop = run_stub_in_thread(ttft_s=0.01, tpot_s=0.002)
    try:
        w = _conversations()
        cfg = ReplayConfig(base_url=url, model="m", multi_turn=True)
        stats, interrupted = replay_workers(w, PROMPTS.payload, cfg, tmp_path, "mt", 2)
        with urllib.request.urlopen(url + "/metrics") as resp:
            metrics = resp.read().decode()
    finally:
        stop()
    recs = R.read_records(tmp_path)
    assert not interrupted and stats.sent == len(w) and all(r.ok for r in recs)
    prompt_total = next(float(line.split()[-1]) for line in metrics.splitlines()
                        if line.startswith("vllm:prompt_tokens_total"))
    assert prompt_total == w.input_tokens.sum()   # every threaded prompt as long as the trace says
    for s in range(3):
        turns = sorted((r for r in recs if r.session_id == s), key=lambda r: r.turn)
        assert [r.turn for r in turns] == [0, 1, 2]
        assert all(b.actual_send_s >= a.end_s for a, b in zip(turns, turns[1:]))


# ------------------------------------------------------------------ the run session and the CLI

def test_run_session_records_the_mode_and_records_carry_session_and_turn(tmp_path):
    opts = RunOptions(backend="stub", backend_options={"ttft_s": 0.005, "tpot_s": 0.001}, results_dir=str(tmp_path),
                      run_id="mt", multi_turn=True, think_time="fixed:0.01", rate_scale=1.0, power="off")
    with RunSession(opts, workload=_conversations()) as session:
        session.start()
        stats, interrupted = session.replay()
    summary = session.finish(stats, interrupted)
    meta = json.loads((tmp_path / "mt" / R.RUN_FILE).read_text())
    assert meta["replay"]["multi_turn"] is True and meta["replay"]["think_time"] == "fixed:0.01"
    assert meta["sessions"] == {"sessions": 3, "later_turns": 6, "turns_with_new_tokens_raised_to_1": 0}
    recs = R.read_records(tmp_path / "mt")
    assert sorted((r.session_id, r.turn) for r in recs if r.session_id is not None) == \
        [(s, k) for s in range(3) for k in range(3)]
    assert summary["counts"]["ok"] == len(recs) == 10


def test_cli_multi_turn_refuses_a_trace_without_sessions(tmp_path):
    res = CliRunner().invoke(app, ["run", "--trace", "synth:arrivals=poisson,rate=5,duration=1,lengths=fixed,input=8,"
                                   "output=2,seed=1", "--results", str(tmp_path), "--multi-turn"])
    assert res.exit_code == 2 and "needs a trace with sessions" in res.output
    bad = CliRunner().invoke(app, ["run", "--results", str(tmp_path), "--think-time", "poisson"])
    assert bad.exit_code == 2 and "--think-time" in bad.output
    assert not list(tmp_path.iterdir())   # nothing half-written


@pytest.mark.vllm
def test_vllm_threads_its_streamed_token_ids(vllm_server, tiny_model_dir):
    """Real vLLM: return_token_ids streams the output ids, the next turn's prompt carries them, the session
    header is accepted, and the server counts the threaded prompt exactly."""
    prompts = TokenIdPrompts.from_tokenizer(tiny_model_dir, seed=4)
    w = _w([(0.0, 40, 6, 0, 0), (0.01, 30, 4, 1, 0), (0.02, 40 + 6 + 5, 6, 0, 1), (0.03, 30 + 4 + 2, 3, 1, 1)])
    url, out = vllm_server.url, []
    tee = _Tee(make_transport("lean", url + "/v1/completions", {"Content-Type": "application/json"},
                              clock=time.perf_counter, timeout_s=120, idle_timeout_s=120))
    rep = SessionReplayer(w, prompts.payload, ReplayConfig(base_url=url, model=vllm_server.model_name,
                                                           multi_turn=True), out.append, transport=tee)
    asyncio.run(rep.run())
    assert all(r.ok for r in out), [r.error for r in out]
    assert rep.stats.stand_in_outputs == 0   # every answer carried its token ids
    first = {int(h[SESSION_HEADER]): b["prompt"] for b, h in tee.sent[:2]}
    for body, headers in tee.sent[2:]:
        s, p = int(headers[SESSION_HEADER]), body["prompt"]
        n_out = int(w.output_tokens[s])
        assert p[:len(first[s])] == first[s] and len(p) == int(w.input_tokens[2 + s])
        assert all(isinstance(t, int) for t in p[len(first[s]):len(first[s]) + n_out])
    by_turn = {(r.session_id, r.turn): r for r in out}
    assert all(r.actual_input_tokens == r.planned_input_tokens for r in out)
    assert by_turn[(0, 1)].actual_send_s >= by_turn[(0, 0)].end_s
