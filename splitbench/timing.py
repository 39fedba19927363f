"""Event loops with precise timers, shared by the replayer (client) and the stub (server).

epoll_wait rounds timeouts up to whole ms and uvloop rounds timers to ms (firing up to ~1 ms early);
the 'precise' loop waits with µs resolution, so open-loop sends and stub chunks are neither early nor late.
"""
from __future__ import annotations

import asyncio
import contextlib
import select
import selectors
from typing import Any, Coroutine

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
        import uvloop
        return uvloop.new_event_loop()
    if kind == "precise" and hasattr(selectors, "EpollSelector"):
        return asyncio.SelectorEventLoop(PreciseEpollSelector())
    return asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, Any], kind: str = "precise") -> Any:
    """asyncio.run() on a loop of the given kind."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(kind)) as runner:
        return runner.run(coro)
