"""The replayer on a FakeClock with a MockTransport: schedule, lag accounting, the in-flight cap, stop and Ctrl-C,
shards and the --workers start barrier, all exact and deterministic (no real time passes, no sockets)."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading

import numpy as np
import pytest

from splitbench.client.mock import MockResponse, MockTransport
from splitbench.client.replay import replay_workload
from splitbench.client.replayer import ReplayConfig, Replayer
from splitbench.client.shards import shard, shard_positions
from splitbench.client.workers import (
    PINGS,
    START_MIN_MARGIN_S,
    START_RTT_FACTOR,
    StartBarrier,
    WorkerGate,
    merge_stats,
    start_margin_s,
)
from splitbench.schema import records as R
from splitbench.timing import FakeClock
from splitbench.workload.synth import synthesize
from splitbench.workload.types import Workload

EPS = 1e-9
T0 = 100.0   # FakeClock's start: with start_delay_s=0 run-clock zero is this clock time


def _w(arrival_s, out: int = 4) -> Workload:
    a = np.asarray(arrival_s, dtype=np.float64)
    n = len(a)
    return Workload("t", arrival_s=a, input_tokens=np.full(n, 8), output_tokens=np.full(n, out),
                    trace_index=np.arange(n) + 1000)


def _payload(i: int, n: int) -> dict:
    return {"prompt": [7] * n}


def _replayer(w: Workload, handler, clock: FakeClock, out: list, *, timeout_s: float = 600.0,
              idle_timeout_s: float = 120.0, **cfg) -> tuple[Replayer, MockTransport]:
    mock = MockTransport(handler, clock, timeout_s=timeout_s, idle_timeout_s=idle_timeout_s)
    cfg = ReplayConfig(base_url="http://mock", model="m", start_delay_s=0.0, timeout_s=timeout_s,
                       idle_timeout_s=idle_timeout_s, **cfg)
    return Replayer(w, _payload, cfg, out.append, transport=mock, clock=clock), mock


def _replay(w: Workload, handler, *, during=None, **kw):
    """Replay on a fresh FakeClock; `during(clock, loop, replayer)` may schedule things first. Records by index."""
    clock, out = FakeClock(start_s=T0), []
    rep, mock = _replayer(w, handler, clock, out, **kw)

    async def main():
        if during is not None:
            during(clock, asyncio.get_running_loop(), rep)
        return await rep.run()
    clock.run(main())
    return sorted(out, key=lambda r: r.trace_index), rep, mock


def _lag(recs) -> np.ndarray:
    return np.array([r.actual_send_s - r.intended_send_s for r in recs])


# ------------------------------------------------------------------ the schedule

@pytest.mark.parametrize("arrivals,cv", [("poisson", 1.0), ("gamma", 4.0)])
def test_every_request_is_sent_at_its_intended_time(arrivals, cv):
    w = synthesize(rate_rps=200, arrivals=arrivals, cv=cv, count=2000, input_tokens=8, output_tokens=5, seed=2)
    if arrivals == "gamma":   # bursty: many requests due within a millisecond of each other
        assert np.mean(np.diff(w.arrival_s) < 1e-3) > 0.3
    recs, rep, mock = _replay(w, lambda req: MockResponse.stream(5, ttft_s=0.040, tbt_s=0.010))
    assert [r.trace_index for r in recs] == list(range(2000))
    assert np.abs(_lag(recs)).max() < EPS                       # every send exactly on time
    assert [r.intended_send_s for r in recs] == w.arrival_s.tolist()
    for r in recs:
        assert r.status == R.OK and r.chunk_tokens == [1] * 5 and r.actual_output_tokens == 5
        assert r.actual_input_tokens == 8
        assert r.chunk_offsets_s == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.08], abs=EPS)
        assert r.end_s - r.actual_send_s == pytest.approx(0.08, abs=EPS)
    assert (rep.stats.sent, rep.stats.finished, rep.stats.failed) == (2000, 2000, 0)
    assert [q.send_s - T0 for q in mock.requests] == pytest.approx(w.arrival_s.tolist(), abs=EPS)  # send order
    # the in-flight peak is what the schedule implies: requests overlap for their 80 ms
    ends = w.arrival_s + 0.08
    implied = max(int(np.sum((w.arrival_s <= a + EPS) & (ends > a + EPS))) for a in w.arrival_s)
    assert rep.stats.inflight_peak == implied > 1
    assert rep.stats.duration_s == pytest.approx(w.arrival_s[-1] + 0.08, abs=EPS)


def test_open_loop_sends_do_not_wait_for_answers():
    w = _w(np.arange(50) * 0.01)
    recs, rep, _ = _replay(w, lambda req: MockResponse.stream(2, ttft_s=30.0, tbt_s=1.0))
    assert np.abs(_lag(recs)).max() < EPS
    assert rep.stats.inflight_peak == 50 and all(r.ok for r in recs)


# ------------------------------------------------------------------ lag accounting

def test_a_handler_that_blocks_the_loop_makes_the_next_sends_late_by_exactly_that():
    w = _w(np.arange(60) * 0.01)
    clock_box = {}

    def handler(req):
        if req.index == 10:   # this send holds the loop for 205 ms (a blocking client)
            clock_box["clock"].advance(0.205)
        return MockResponse.stream(3, ttft_s=0.050, tbt_s=0.010)

    def during(clock, loop, rep):
        clock_box["clock"] = clock
    recs, rep, _ = _replay(w, handler, during=during)
    stall_end = 0.10 + 0.205
    expected = [a if i <= 10 else max(a, stall_end) for i, a in enumerate(w.arrival_s.tolist())]
    assert [r.actual_send_s for r in recs] == pytest.approx(expected, abs=EPS)
    late = [r.trace_index - 1000 for r in recs if r.actual_send_s - r.intended_send_s > EPS]
    assert late == list(range(11, 31))   # those due during the stall, each late by stall_end - intended
    # the stalled request's own answer arrived while the loop was held: stamped on arrival, its TTFT stays 50 ms
    assert recs[10].first_token_s - recs[10].actual_send_s == pytest.approx(0.050, abs=EPS)
    assert all(r.ok for r in recs)


def test_a_clock_jump_shows_as_lag_on_the_sends_it_skipped():
    w = _w(np.arange(100) * 0.02)

    def during(clock, loop, rep):
        loop.call_at(T0 + 0.505, clock.advance, 0.5)   # at 0.505 s time jumps to 1.005 s
    recs, _, _ = _replay(w, lambda req: MockResponse.stream(2, ttft_s=0.01, tbt_s=0.01), during=during)
    expected = [max(a, 1.005) if a > 0.505 else a for a in w.arrival_s.tolist()]
    assert [r.actual_send_s for r in recs] == pytest.approx(expected, abs=EPS)
    assert sum(_lag(recs) > EPS) == 25   # 0.52 ... 1.00: skipped, sent at once after the jump


def test_a_start_received_late_is_recorded_as_lag():
    w = _w(np.arange(40) * 0.01)
    clock, out = FakeClock(start_s=T0), []

    class LateGate:
        async def prepared(self):
            return True

        async def warmed(self):   # the shared start was 0.125 s ago when this worker got it
            return clock.unix() - 0.125
    mock = MockTransport(lambda req: MockResponse.stream(1, 0.01, 0.0), clock)
    rep = Replayer(w, _payload, ReplayConfig(base_url="http://mock", model="m"), out.append, transport=mock,
                   clock=clock, gate=LateGate())
    stats = clock.run(rep.run())
    assert stats.start_late_s == pytest.approx(0.125, abs=EPS)
    assert stats.t0_unix_s == pytest.approx(1_700_000_000.0 - 0.125, abs=1e-6)   # FakeClock's unix time at T0
    recs = sorted(out, key=lambda r: r.trace_index)
    assert _lag(recs) == pytest.approx([max(0.0, 0.125 - a) for a in w.arrival_s.tolist()], abs=EPS)


def test_a_gate_that_says_leave_sends_nothing():
    class Leave:
        async def prepared(self):
            return False

        async def warmed(self):  # pragma: no cover - never reached
            raise AssertionError
    clock, out = FakeClock(), []
    mock = MockTransport(lambda req: MockResponse.stream(1, 0.01, 0.0), clock)
    rep = Replayer(_w([0.0, 0.1]), _payload, ReplayConfig(base_url="http://mock", model="m"), out.append,
                   transport=mock, clock=clock, gate=Leave())
    stats = clock.run(rep.run())
    assert out == [] and mock.requests == [] and mock.warmed is None and mock.closed
    assert stats.stopped_early and stats.sent == 0


# ------------------------------------------------------------------ the in-flight cap

def test_max_inflight_cap_waits_for_a_free_slot_and_the_lag_shows_it():
    w = _w(np.arange(20) * 0.001, out=1)
    recs, rep, _ = _replay(w, lambda req: MockResponse.stream(1, ttft_s=0.1, tbt_s=0.0), max_inflight=2)
    expected = [a if i < 2 else (i % 2) * 0.001 + (i // 2) * 0.1 for i, a in enumerate(w.arrival_s.tolist())]
    assert [r.actual_send_s for r in recs] == pytest.approx(expected, abs=EPS)
    assert rep.stats.inflight_peak == 2 and rep.stats.inflight_cap_waits == 18
    assert all(r.ok for r in recs)


def test_stop_while_waiting_for_a_slot_sends_nothing_more():
    w = _w(np.arange(10) * 0.001)
    recs, rep, _ = _replay(w, lambda req: MockResponse(chunks=[(0.0, 1)], end="hang"), max_inflight=2,
                           grace_s=0.3, idle_timeout_s=50.0,
                           during=lambda clock, loop, rep: loop.call_at(T0 + 0.5, rep.request_stop))
    assert len(recs) == 2 and rep.stats.sent == 2 and rep.stats.stopped_early
    assert [r.status for r in recs] == [R.CANCELLED] * 2
    assert [r.end_s for r in recs] == pytest.approx([0.8, 0.8], abs=EPS)   # stop + grace, not the 50 s timeout


# ------------------------------------------------------------------ stop and Ctrl-C

def _stop_case():
    """Requests every 0.1 s; each answer takes 0.34 s (30 tokens). A stop at 1.05 s with 0.205 s grace: requests
    0-10 were sent; 0-9 finish by 1.24 s; request 10 (sent at 1.0) is cancelled at 1.255 s with 21 tokens."""
    return _w(np.arange(100) * 0.1, out=30), (lambda req: MockResponse.stream(30, ttft_s=0.05, tbt_s=0.01))


def _check_stopped(recs, stop_s: float, grace_s: float) -> None:
    assert [r.trace_index - 1000 for r in recs] == list(range(11))   # unsent requests leave no record
    assert [r.status for r in recs] == [R.OK] * 10 + [R.CANCELLED]
    last = recs[-1]
    assert last.end_s == pytest.approx(stop_s + grace_s, abs=EPS) and last.error
    assert last.actual_output_tokens == sum(last.chunk_tokens) == 21   # what arrived before the cut counts


def test_request_stop_gives_in_flight_requests_grace_then_cancels_them():
    w, handler = _stop_case()
    recs, rep, mock = _replay(w, handler, grace_s=0.205,
                              during=lambda clock, loop, rep: loop.call_at(T0 + 1.05, rep.request_stop))
    _check_stopped(recs, 1.05, 0.205)
    assert rep.stats.stopped_early and rep.stats.sent == 11 and len(mock.requests) == 11
    assert rep.stats.duration_s == pytest.approx(1.255, abs=EPS)


def test_a_stop_during_a_long_gap_does_not_wait_for_the_next_arrival():
    w = _w([0.0, 3600.0])
    recs, rep, _ = _replay(w, lambda req: MockResponse.stream(1, 0.01, 0.0),
                           during=lambda clock, loop, rep: loop.call_at(T0 + 2.0, rep.request_stop))
    assert len(recs) == 1 and rep.stats.duration_s == pytest.approx(2.0, abs=EPS)


def test_a_stop_after_the_last_send_still_applies_the_grace():
    w = _w([0.0], out=1)
    recs, rep, _ = _replay(w, lambda req: MockResponse(chunks=[(0.0, 1)], end="hang"), grace_s=1.0,
                           idle_timeout_s=60.0, during=lambda clock, loop, rep: loop.call_at(T0 + 5.0, rep.request_stop))
    assert [r.status for r in recs] == [R.CANCELLED] and recs[0].end_s == pytest.approx(6.0, abs=EPS)
    assert not rep.stats.stopped_early   # every request had been sent


def test_sigint_through_replay_workload(tmp_path):
    """A real SIGINT (signal handlers, journal, records.parquet) on the fake clock: the same records as a stop."""
    w, handler = _stop_case()
    clock = FakeClock(start_s=T0)
    mock = MockTransport(handler, clock)
    cfg = ReplayConfig(base_url="http://mock", model="m", start_delay_s=0.0, grace_s=0.205)
    armed = []

    def on_record(rec):
        if not armed:   # the first record: schedule Ctrl-C at 1.05 s on the run clock
            armed.append(asyncio.get_running_loop().call_at(T0 + 1.05, os.kill, os.getpid(), signal.SIGINT))
    rep, interrupted = replay_workload(w, _payload, cfg, tmp_path, "sig", on_record=on_record, transport=mock,
                                       clock=clock)
    assert interrupted and rep.stats.stopped_early
    _check_stopped(R.read_records(tmp_path), 1.05, 0.205)


def test_a_second_sigint_cancels_in_flight_requests_at_once(tmp_path):
    w, handler = _stop_case()
    clock = FakeClock(start_s=T0)
    cfg = ReplayConfig(base_url="http://mock", model="m", start_delay_s=0.0, grace_s=5.0)
    armed = []

    def on_record(rec):
        if not armed:
            loop = asyncio.get_running_loop()
            armed.extend(loop.call_at(T0 + t, os.kill, os.getpid(), signal.SIGINT) for t in (1.05, 1.15))
    _, interrupted = replay_workload(w, _payload, cfg, tmp_path, "sig2", on_record=on_record,
                                     transport=MockTransport(handler, clock), clock=clock)
    recs = R.read_records(tmp_path)
    assert interrupted and len(recs) == 11
    cancelled = [r for r in recs if r.status == R.CANCELLED]
    assert [r.trace_index - 1000 for r in cancelled] == [9, 10]   # 9 would end at 1.24, 10 at 1.34
    assert all(r.end_s == pytest.approx(1.15, abs=EPS) for r in cancelled)


# ------------------------------------------------------------------ shards and the start barrier

@pytest.mark.parametrize("n_requests,shards", [(0, 3), (1, 4), (10, 3), (997, 7), (1000, 1)])
def test_shard_positions_cover_every_request_exactly_once(n_requests, shards):
    parts = [shard_positions(n_requests, k, shards) for k in range(shards)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n_requests))
    with pytest.raises(ValueError):
        shard_positions(n_requests, shards, shards)


def test_each_shard_follows_the_trace_shape():
    w = synthesize(rate_rps=100, arrivals="gamma", cv=3.0, count=3000, seed=5)
    n = 4
    bins = np.linspace(0, w.arrival_s[-1] + 1e-6, 40)
    whole = np.histogram(w.arrival_s, bins)[0]
    for k in range(n):
        s = shard(w, k, n)
        assert s.trace_index.tolist() == list(range(k, 3000, n))
        assert s.arrival_s.tolist() == w.arrival_s[k::n].tolist()   # absolute trace times, not re-based
        counts = np.histogram(s.arrival_s, bins)[0]
        assert np.abs(counts - whole / n).max() < 1.0   # each burst dealt out evenly


def test_shards_replayed_on_one_shared_start_send_every_request_once_on_time():
    w = synthesize(rate_rps=300, arrivals="gamma", cv=2.0, count=1200, seed=9)
    clock, out = FakeClock(start_s=T0), []
    start = clock.unix() + 0.5
    reps = []
    for k in range(3):
        mock = MockTransport(lambda req: MockResponse.stream(2, 0.02, 0.01), clock)
        cfg = ReplayConfig(base_url="http://mock", model="m", start_at_unix_s=start)
        reps.append(Replayer(shard(w, k, 3), _payload, cfg, out.append, transport=mock, clock=clock))

    async def main():
        return await asyncio.gather(*(r.run() for r in reps))
    stats = merge_stats([s.__dict__ for s in clock.run(main())])
    assert sorted(r.trace_index for r in out) == list(range(1200))
    assert np.abs(_lag(out)).max() < EPS and stats.t0_unix_s == start and stats.sent == 1200


def test_merge_stats_adds_counts_and_refuses_two_clocks():
    a = {"planned": 5, "sent": 5, "finished": 5, "failed": 1, "inflight_peak": 3, "inflight_cap_waits": 0,
         "stopped_early": False, "t0_unix_s": 7.0, "duration_s": 2.0, "start_late_s": 0.0}
    s = merge_stats([a, {**a, "failed": 0, "duration_s": 2.5, "stopped_early": True, "start_late_s": 0.2}])
    assert (s.sent, s.failed, s.inflight_peak, s.duration_s, s.stopped_early, s.t0_unix_s, s.start_late_s) == \
        (10, 1, 6, 2.5, True, 7.0, 0.2)
    with pytest.raises(RuntimeError, match="different clocks"):
        merge_stats([a, {**a, "t0_unix_s": 7.5}])


class _FakeWorkers:
    """Workers answering the barrier at once over links that take latency_s[k] each way, on a fake wall clock."""

    def __init__(self, latency_s, replies=None):
        self.t, self.latency_s = 1000.0, latency_s
        self.got = {k: [] for k in range(len(latency_s))}
        self.queue = {k: list(replies[k]) if replies else [("prepared", k)] for k in range(len(latency_s))}

    def clock(self):
        return self.t

    def send(self, k, msg):
        self.t += self.latency_s[k]
        self.got[k].append(msg)
        if msg == ("warm",):
            self.queue[k].append(("ready", k))
        elif msg == ("ping",):
            self.queue[k].append(("pong",))

    def recv(self, k, timeout_s):
        self.t += self.latency_s[k]
        return self.queue[k].pop(0) if self.queue[k] else None


def test_barrier_start_is_ahead_of_the_slowest_measured_round_trip():
    fw = _FakeWorkers([0.001, 0.030, 0.004])
    b = StartBarrier(3, fw.send, fw.recv, clock=fw.clock)
    start = b.run()
    assert b.rtt_s == pytest.approx([0.002, 0.060, 0.008])
    assert b.margin_s == pytest.approx(START_RTT_FACTOR * 0.060) and b.margin_s > START_MIN_MARGIN_S
    for k in range(3):
        assert fw.got[k] == [("warm",)] + [("ping",)] * PINGS + [("start", start)]
    assert fw.t < start and b.errors == []   # the last start message arrived ahead of the start


def test_barrier_margin_has_a_floor_and_grows_with_the_host():
    assert start_margin_s([]) == START_MIN_MARGIN_S
    assert start_margin_s([0.001, 0.002]) == START_MIN_MARGIN_S
    assert start_margin_s([0.1, 0.4]) == pytest.approx(START_RTT_FACTOR * 0.4)


@pytest.mark.parametrize("replies,why", [
    ([[("prepared", 0)], [("error", "MemoryError: bodies")]], "worker 1: MemoryError: bodies"),
    ([[("prepared", 0)], []], "worker 1: exited before it was prepared"),
])
def test_barrier_tells_every_worker_to_leave_when_one_fails(replies, why):
    fw = _FakeWorkers([0.001, 0.001], replies)
    b = StartBarrier(2, fw.send, fw.recv, clock=fw.clock)
    assert b.run() is None and b.errors == [why]
    assert fw.got == {0: [("abort",)], 1: [("abort",)]}


def test_worker_gates_and_the_barrier_speak_the_same_protocol_over_real_pipes():
    pipes = [mp.Pipe() for _ in range(2)]
    got = {}

    def worker(k, conn):
        gate = WorkerGate(k, conn)

        async def both():
            return await gate.prepared(), await gate.warmed()
        got[k] = asyncio.run(both())
    threads = [threading.Thread(target=worker, args=(k, child)) for k, (_, child) in enumerate(pipes)]
    for t in threads:
        t.start()

    def recv(k, timeout_s):
        conn = pipes[k][0]
        return conn.recv() if conn.poll(timeout_s) else None
    b = StartBarrier(2, lambda k, m: pipes[k][0].send(m), recv)
    start = b.run()
    for t in threads:
        t.join(10)
    assert start is not None and got == {0: (True, start), 1: (True, start)}
    assert all(r > 0 for r in b.rtt_s) and b.margin_s >= START_MIN_MARGIN_S
