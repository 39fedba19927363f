"""A small discrete-event loop: a heap of (time, seq, handler, args); handlers schedule (or return) new events.

`seq` is a monotone counter, so events at the same time run in the order they were scheduled (deterministic FIFO).
"""
from __future__ import annotations

import gc
import heapq
from collections.abc import Callable, Iterable
from typing import Any

Event = tuple  # (time_s, handler, *args) as returned by a handler
_push = heapq.heappush


class Simulator:
    """Runs timed events in order. Cancellation is by version counters kept by the caller: a handler whose
    payload carries a stale version just returns (cheaper than removing it from the heap)."""

    __slots__ = ("_heap", "_seq", "events", "now_s")
    now_s: float
    events: int
    _heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]]
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
        _push(self._heap, (t_s, self._seq, fn, args))

    def pending(self) -> int:
        return len(self._heap)

    def nothing_else_now(self) -> bool:
        """True when no other event is queued for the present instant (one scheduled now would run next)."""
        heap = self._heap
        return not heap or heap[0][0] > self.now_s

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
                if until_s is not None and heap[0][0] > until_s:
                    break
                t, _, fn, args = pop(heap)
                self.now_s = t
                n += 1
                out = fn(*args)
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
