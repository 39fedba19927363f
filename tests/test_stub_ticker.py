"""The lean stub's shared ticker on a fake clock: chunk k of a stream leaves at its absolute deadline
first + k * gap (never before it, in deadline order across streams, no drift after a late wakeup), every chunk's
lateness is recorded exactly, wakeups keep tick_s apart, and one wakeup yields after MAX_BATCH_S of work."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from splitbench.servers.stub import TOKEN, Frames, Lateness, StubConfig, new_counters
from splitbench.servers.stub_ticker import MAX_BATCH_S, Stream, Ticker


class FakeClock:
    """Time stands still unless the test moves it (or `step_s` per reading: work that costs time)."""

    def __init__(self):
        self.t, self.step_s = 0.0, 0.0

    def __call__(self) -> float:
        self.t += self.step_s
        return self.t


class FakeLoop:
    """Only what the ticker uses without a timerfd: call_later, recorded as absolute due times."""

    def __init__(self, clock: FakeClock):
        self.clock, self.timers = clock, []

    def call_later(self, delay_s, fn):
        timer = SimpleNamespace(due=self.clock.t + delay_s, fn=fn, cancelled=False)
        timer.cancel = lambda: setattr(timer, "cancelled", True)
        self.timers.append(timer)
        return timer

    def pending(self):
        live = [t for t in self.timers if not t.cancelled]
        assert len(live) <= 1, "the ticker keeps one wakeup armed"
        return live[0] if live else None

    def fire(self, at_s: float) -> None:
        """The wakeup runs at at_s (on time or late, as the test says; never before it is due)."""
        timer = self.pending()
        assert timer is not None and at_s >= timer.due - 1e-12
        self.timers.remove(timer)
        self.clock.t = at_s
        timer.fn()


class FakeConn:
    """A client connection: records (clock time, stream name, tokens in the bytes, final) per write."""

    def __init__(self, name: str, clock: FakeClock, log: list):
        self.name, self.clock, self.log = name, clock, log
        self.chunked, self.stream = True, None
        self.transport = SimpleNamespace(write=lambda data: self._record(data, False))

    def _record(self, data: bytes, final: bool) -> None:
        self.log.append((self.clock.t, self.name, data.count(TOKEN), final))

    def write_chunk(self, data: bytes) -> None:
        self._record(data, False)

    def end_stream(self, data: bytes = b"") -> None:
        self._record(data, True)


def make(tick_s=0.0002, tpot_s=0.01, tpc=1):
    clock = FakeClock()
    loop = FakeLoop(clock)
    cfg = StubConfig(ttft_s=0.05, tpot_s=tpot_s, tokens_per_chunk=tpc, tick_s=tick_s)
    srv = SimpleNamespace(cfg=cfg, gap_s=tpc * tpot_s, lateness=Lateness(), n=new_counters(),
                          full_text=TOKEN * tpc, end_fault=lambda s: None)
    return clock, loop, srv, Ticker(srv, loop, tick_s, clock=clock)


def stream(name, clock, log, first_s, n_out, srv):
    conn = FakeConn(name, clock, log)
    frames = Frames(False, "m", 3, False, False, srv.full_text, rid=name)
    srv.n["running"] += 1
    return Stream(conn, frames, n_out, first_s, "", -1)


def test_chunks_leave_at_absolute_deadlines_in_order_and_lateness_is_exact():
    clock, loop, srv, ticker = make()
    log: list = []
    a = stream("a", clock, log, 0.050, 4, srv)   # deadlines .050 .060 .070 .080
    b = stream("b", clock, log, 0.053, 4, srv)   # deadlines .053 .063 .073 .083
    ticker.add(a.first, a)
    ticker.add(b.first, b)
    assert loop.pending().due == pytest.approx(0.050)
    loop.fire(0.050)                             # on time: only a's first chunk is due
    assert [(t, n) for t, n, _, _ in log] == [(0.050, "a")]
    assert loop.pending().due == pytest.approx(0.053)
    loop.fire(0.0745)                            # a wakeup 21.5 ms late: everything due by now, in deadline order
    assert [n for _, n, _, _ in log[1:]] == ["b", "a", "b", "a", "b"]
    assert loop.pending().due == pytest.approx(0.080)   # no drift: the next deadline is still a's 4th
    loop.fire(0.080)
    loop.fire(loop.pending().due)
    assert loop.pending() is None
    deadlines = {n: [s.first + k * srv.gap_s for k in range(4)] for n, s in (("a", a), ("b", b))}
    for name in "ab":
        times = [t for t, n, _, _ in log if n == name]
        assert len(times) == 4 and all(t >= d - 1e-12 for t, d in zip(times, deadlines[name]))   # never early
        assert [f for _, n, _, f in log if n == name] == [False, False, False, True]
    assert sum(k for _, _, k, _ in log) == 8 == srv.n["generation"]
    assert srv.n["success"] == 2 and srv.n["running"] == 0
    late = [t - d for name in "ab" for t, d in zip([t for t, n, _, _ in log if n == name], deadlines[name])]
    s = srv.lateness.summary()
    assert s["count"] == 8 and s["max_s"] == pytest.approx(max(late)) == pytest.approx(0.0745 - 0.053)
    assert sorted(i for i, c in enumerate(srv.lateness.hist) for _ in range(c)) == \
        sorted(int(x * 1e5) for x in late)   # every chunk in its 10 µs bin


def test_wakeups_keep_tick_s_apart_and_a_long_batch_yields():
    clock, loop, srv, ticker = make(tick_s=0.001)
    log: list = []
    a = stream("a", clock, log, 0.050, 2, srv)
    ticker.add(a.first, a)
    loop.fire(0.050)
    b = stream("b", clock, log, 0.0502, 2, srv)   # due 0.2 ms after the last wakeup: waits for tick_s
    ticker.add(b.first, b)
    assert loop.pending().due == pytest.approx(0.051)
    loop.fire(0.051)
    assert [n for _, n, _, _ in log] == ["a", "b"]

    clock, loop, srv, ticker = make()
    log = []
    many = [stream(f"s{i}", clock, log, 0.050, 3, srv) for i in range(50)]
    for s in many:
        ticker.add(s.first, s)
    clock.step_s = 0.0005                     # each clock reading costs 0.5 ms: a batch runs out of time
    loop.fire(0.050)
    n_first = len(log)
    assert 0 < n_first < 50 and n_first <= MAX_BATCH_S / 0.0005 + 1
    assert loop.pending().due <= clock.t   # re-armed to run again at once, after the loop has done its I/O
    while loop.pending() is not None:
        loop.fire(max(loop.pending().due, clock.t))
    assert srv.n["generation"] == 150 and srv.n["success"] == 50
