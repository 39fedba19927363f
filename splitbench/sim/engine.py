"""A small discrete-event loop: a heap of events (time, seq, handler, args); handlers schedule (or return) new ones.

`seq` is a monotone counter, so events at the same time run in the order they were scheduled (deterministic FIFO).
"""
from __future__ import annotations

import gc
import heapq
from collections.abc import Callable, Iterable
from typing import Any

Event = tuple  # (time_s, handler, *args) as returned by a handler
_push = heapq.heappush


class _Event:
    """One scheduled call, ordered by (t_s, seq). A class rather than a tuple: compiled, its __lt__ is one native
    call, where a tuple compares element by element through the generic protocol (heap pushes and pops took 40-55%
    less time in a microbenchmark)."""

    __slots__ = ("args", "fn", "seq", "t_s")
    t_s: float
    seq: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]

    def __init__(self, t_s: float, seq: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.t_s, self.seq, self.fn, self.args = t_s, seq, fn, args

    def __lt__(self, other: _Event) -> bool:
        return self.t_s < other.t_s or (self.t_s == other.t_s and self.seq < other.seq)


class Simulator:
    """Runs timed events in order. Cancellation is by version counters kept by the caller: a handler whose
    payload carries a stale version just returns (cheaper than removing it from the heap)."""

    __slots__ = ("_heap", "_seq", "events", "now_s")
    now_s: float
    events: int
    _heap: list[_Event]
    _seq: int

    def __init__(self) -> None:
        self.now_s = 0.0
        self.events = 0          # handlers run so far
        self._heap = []
        self._seq = 0

    def schedule(self, t_s: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn(*args) at time t_s (not before now: the past is clamped to now)."""
        if t_s < self.now_s:
            t_s = self.now_s
        self._seq += 1
        _push(self._heap, _Event(t_s, self._seq, fn, args))

    def pending(self) -> int:
        return len(self._heap)

    def nothing_else_now(self) -> bool:
        """True when no other event is queued for the present instant (one scheduled now would run next)."""
        heap = self._heap
        return not heap or heap[0].t_s > self.now_s

    def run(self, until_s: float | None = None) -> float:
        """Process events until the heap is empty (or the next event is after until_s); returns the final time.
        A handler may schedule events itself or return an iterable of (time_s, handler, *args) tuples.
        The cyclic garbage collector is paused meanwhile: events make no reference cycles, and its passes over
        the heap's live objects cost 20-30% of a simulation (measured on the 19k-request replay)."""
        heap, pop, schedule = self._heap, heapq.heappop, self.schedule
        n: int = 0
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            while heap:
                if until_s is not None and heap[0].t_s > until_s:
                    break
                e = pop(heap)
                self.now_s = e.t_s
                n += 1
                out = e.fn(*e.args)
                if out:
                    _schedule_all(schedule, out)
        finally:
            self.events += n
            if gc_was_on:
                gc.enable()
        return self.now_s


def _schedule_all(schedule: Callable[..., Any], out: Iterable[Event]) -> None:
    for ev in out:
        schedule(ev[0], ev[1], *ev[2:])
