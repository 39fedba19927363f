"""Event loops with precise timers and the run clocks: RealClock (perf_counter) and FakeClock (virtual time).

epoll_wait rounds timeouts up to whole ms and uvloop rounds timers to ms (firing up to ~1 ms early); the 'precise'
loop waits with µs resolution. FakeClock runs a loop whose time only moves when nothing is ready, so tests need none.
"""
from __future__ import annotations

import asyncio
import contextlib
import select
import selectors
import time
from typing import Any, Coroutine, Protocol

LOOP_KINDS = ("precise", "uvloop", "asyncio")


class PreciseEpollSelector(selectors.EpollSelector):
    """select() on the epoll fd waits with µs resolution; then a zero-timeout epoll collects the events."""

    def select(self, timeout=None):
        if timeout is not None and timeout > 0:
            with contextlib.suppress(InterruptedError):
                select.select([self.fileno()], [], [], timeout)
            timeout = 0
        return super().select(timeout)


def new_event_loop(kind: str = "precise") -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop  # lazy: not installed on Windows (pyproject marker), and only this loop kind needs it
        return uvloop.new_event_loop()
    if kind == "precise" and hasattr(selectors, "EpollSelector"):
        return asyncio.SelectorEventLoop(PreciseEpollSelector())
    return asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, Any], kind: str = "precise") -> Any:
    """asyncio.run() on a loop of the given kind."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(kind)) as runner:
        return runner.run(coro)


# ============================================================== run clocks
class Clock(Protocol):
    """What the replayer needs of time: now() (the run clock, seconds), unix() (wall-clock seconds), wake_at(t) (a
    future that completes at run-clock time t, never before; its holder may complete it early) and run(coro)."""

    def now(self) -> float: ...

    def unix(self) -> float: ...

    def wake_at(self, t: float) -> asyncio.Future: ...

    def run(self, coro: Coroutine[Any, Any, Any], kind: str = "precise") -> Any: ...


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class RealClock:
    """Live replays: perf_counter (monotonic, µs resolution) on a loop of the asked kind."""
    now = staticmethod(time.perf_counter)
    unix = staticmethod(time.time)

    def wake_at(self, t: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_later(t - time.perf_counter(), _wake, fut)
        return fut

    def run(self, coro: Coroutine[Any, Any, Any], kind: str = "precise") -> Any:
        return run(coro, kind)


class FakeClock:
    """Virtual time for deterministic tests. run(coro) runs on a loop whose time is this clock: when nothing is
    ready the loop jumps to its next timer instead of waiting, so no real time passes (real I/O is not timed).
    advance(dt) moves time on while the caller holds the loop (a handler that blocks it, a clock that jumps)."""

    def __init__(self, start_s: float = 100.0, unix_s: float = 1_700_000_000.0):
        self.t = float(start_s)
        self._unix_minus_now = unix_s - start_s

    def now(self) -> float:
        return self.t

    def unix(self) -> float:
        return self._unix_minus_now + self.t

    def advance(self, dt_s: float) -> None:
        if dt_s < 0:
            raise ValueError(f"time runs forward only, got {dt_s}")
        self.t += dt_s

    def wake_at(self, t: float) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if getattr(loop, "clock", None) is not self:
            raise RuntimeError("FakeClock.wake_at needs the loop of this clock's run()")
        fut = loop.create_future()
        loop.call_at(t, self._wake_at, fut, t)
        return fut

    def _wake_at(self, fut: asyncio.Future, t: float) -> None:
        if self.t < t:   # the loop fires timers within its clock resolution: never report an early wake-up
            self.t = t
        _wake(fut)

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _VirtualLoop(self)

    def run(self, coro: Coroutine[Any, Any, Any], kind: str = "precise") -> Any:
        """Run coro to completion on virtual time (`kind` is ignored: there is one virtual loop)."""
        with asyncio.Runner(loop_factory=self.new_event_loop) as runner:
            return runner.run(coro)


class _VirtualSelector(selectors.DefaultSelector):
    """Never waits while a timer is pending: polls the real descriptors (signals, other threads), then moves the
    clock to the timer. With nothing scheduled it waits for real I/O as usual."""

    def __init__(self, clock: FakeClock):
        super().__init__()
        self.clock = clock

    def select(self, timeout=None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            return super().select(None)
        self.clock.t += timeout
        return []


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: FakeClock):
        self.clock = clock
        super().__init__(_VirtualSelector(clock))

    def time(self) -> float:
        return self.clock.t
