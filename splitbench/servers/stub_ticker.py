"""The lean stub server's shared ticker: a heap of (deadline, stream) and ONE wakeup (a timerfd, µs-precise on any
event loop) that emits every chunk due by now across all streams, in deadline order, recording each chunk's
lateness (emit time - schedule) in the server's histogram."""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import heapq
import os
import time
from typing import Any, Callable

from splitbench.servers.stub import DIGITS, TOKEN, Frames

MAX_BATCH_S = 0.002   # one ticker wakeup runs at most this long before letting the loop do I/O


class Stream:
    """One streamed response in the ticker's heap: chunk k is due at first + k * gap. `fast`: the next chunk may
    take the ticker's hot path (chunked encoding, not the chat role chunk, no fault at it, client still there, no
    token ids asked: return_token_ids chunks are built by Frames.chunk);
    tpl/base/cont/n_in: that path's chunk template (Frames.mid_chunked, inlined)."""
    __slots__ = (
        "base",
        "conn",
        "cont",
        "fast",
        "fault_at",
        "first",
        "frames",
        "k",
        "kind",
        "n_in",
        "n_out",
        "sent",
        "tpl",
        "write",
    )

    def __init__(self, conn, frames: Frames, n_out, first, kind, fault_at):
        self.conn, self.write, self.frames, self.n_out, self.first = conn, conn.transport.write, frames, n_out, first
        self.k, self.sent, self.kind, self.fault_at = 0, 0, kind, fault_at
        self.fast = conn.chunked and not frames.chat and fault_at < 0 and frames.ids is None
        self.tpl, self.base, self.cont, self.n_in = frames._ctpl, frames._cbase, frames.continuous, frames.n_in

    def __lt__(self, other: Stream) -> bool:   # heap entries are (deadline, stream): ties need an order
        return False


class Call:
    """A one-off callback in the ticker's heap (non-streamed answers): as precise as the chunks, on any loop."""
    __slots__ = ("args", "fn")
    fast = False

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __lt__(self, other) -> bool:
        return False


class _TimerFd:
    """A Linux timerfd armed at absolute CLOCK_MONOTONIC times (= time.monotonic()): µs-precise wakeups on any
    event loop, uvloop included (its own timers round to ms). None where timerfd is missing."""

    def __init__(self):
        class _Ts(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

        class _Its(ctypes.Structure):
            _fields_ = [("it_interval", _Ts), ("it_value", _Ts)]
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._spec = _Its()
        self._ref = ctypes.byref(self._spec)
        self._settime = self._libc.timerfd_settime

    def arm(self, when: float) -> None:
        sec = int(when)
        v = self._spec.it_value
        v.tv_sec, v.tv_nsec = sec, int((when - sec) * 1e9)
        self._settime(self.fd, 1, self._ref, None)  # TFD_TIMER_ABSTIME

    def clear(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


class Ticker:
    """One wakeup serves every chunk due by now, across all streams, in deadline order. Wakeups are at the next
    deadline but at least tick_s apart (a floor on cost under load, a ceiling of tick_s on added lateness).
    Armed through a timerfd where possible (µs precision on every loop), else loop.call_later.
    srv: the server state it serves (stub_lean.LeanStub: cfg, gap_s, full_text, n, lateness, end_fault).
    clock: time.monotonic (what timerfd and the servers' t_recv use); another clock (a test's fake one) arms
    through loop.call_later instead of the timerfd."""

    def __init__(self, srv: Any, loop: asyncio.AbstractEventLoop, tick_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.srv, self.loop, self.tick_s, self.clock = srv, loop, tick_s, clock
        self.heap: list[tuple[float, Stream]] = []
        self.handle: asyncio.TimerHandle | None = None
        self.armed_at = float("inf")
        self.last_tick = 0.0
        self.tfd: _TimerFd | None = None
        if clock is time.monotonic:
            try:
                self.tfd = _TimerFd()
                loop.add_reader(self.tfd.fd, self._on_timerfd)
            except (OSError, AttributeError, NotImplementedError):
                self.tfd = None

    def add(self, deadline: float, s: Stream) -> None:
        heapq.heappush(self.heap, (deadline, s))
        when = max(deadline, self.last_tick + self.tick_s)
        if when < self.armed_at:
            self._arm(when)

    def _arm(self, when: float) -> None:
        self.armed_at = when
        if self.tfd is not None:
            return self.tfd.arm(when)
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.loop.call_later(when - self.clock(), self._tick)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        if self.tfd is not None:
            self.loop.remove_reader(self.tfd.fd)
            self.tfd.close()
            self.tfd = None
        self.heap.clear()

    def _on_timerfd(self) -> None:
        self.tfd.clear()
        self._tick()

    def _tick(self) -> None:
        self.handle, self.armed_at = None, float("inf")
        heap, clock, srv = self.heap, self.clock, self.srv
        lat, digits = srv.lateness, DIGITS
        hist, lmax = lat.hist, lat.max_s
        tpc, gap = srv.cfg.tokens_per_chunk, srv.gap_s
        replace = heapq.heapreplace
        now = start = clock()
        stop_at = start + MAX_BATCH_S   # overloaded: let the loop read requests, then carry on at once
        self.last_tick = now
        n_fast = slow_tokens = 0
        while heap:
            deadline, s = heap[0]
            if deadline > now or now > stop_at:
                break
            late = now - deadline
            try:
                hist[int(late * 1e5)] += 1
            except IndexError:
                hist[-1] += 1
            lmax = max(lmax, late)
            if s.fast and s.sent + tpc < s.n_out:   # the hot path: a full middle chunk, one %-format, one write
                sent = s.sent + tpc
                if s.cont:
                    total = s.n_in + sent
                    try:
                        s.write(s.tpl % (s.base + digits[total] + digits[sent], total, sent))
                    except IndexError:
                        s.write(s.tpl % (s.base + len(str(total)) + len(str(sent)), total, sent))
                else:
                    s.write(s.tpl)
                s.sent = sent
                k = s.k = s.k + 1
                n_fast += 1
                replace(heap, (s.first + k * gap, s))
            else:
                lat.max_s = lmax
                slow_tokens += self._slow(s)
            now = clock()
        lat.max_s = lmax
        srv.n["generation"] += n_fast * tpc + slow_tokens
        if heap:
            self._arm(max(heap[0][0], now + self.tick_s) if now <= stop_at else now)

    def _slow(self, s: Stream | Call) -> int:
        """Any chunk but a middle one (first chat chunk, last, faults, HTTP/1.0, gone client), or a one-off
        callback -> tokens sent."""
        if type(s) is Call:
            heapq.heappop(self.heap)
            s.fn(*s.args)
            return 0
        heap, srv, conn, k = self.heap, self.srv, s.conn, s.k
        if conn.transport is None:   # the client went away: drop the stream
            heapq.heappop(heap)
            srv.n["running"] -= 1
            return 0
        if k == s.fault_at:
            heapq.heappop(heap)
            srv.end_fault(s)
            return 0
        tpc = srv.cfg.tokens_per_chunk
        n = min(tpc, s.n_out - s.sent)
        s.sent += n
        final = s.sent == s.n_out
        data = s.frames.chunk(k, srv.full_text if n == tpc else TOKEN * n, s.sent, final)
        if final:
            heapq.heappop(heap)
            srv.n["success"] += 1
            srv.n["running"] -= 1
            conn.end_stream(data)
        else:
            conn.write_chunk(data)
            s.k = k + 1
            s.fast = conn.chunked and s.fault_at < 0 and s.frames.ids is None
            heapq.heapreplace(heap, (s.first + s.k * srv.gap_s, s))
        return n
