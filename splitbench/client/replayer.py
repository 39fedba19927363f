"""Open-loop async replayer: fires each request at its absolute intended time on an injected clock and hands it to
a transport (transport.py) that feeds a RecordSink; failures become records with a status, never exceptions.
"""
from __future__ import annotations

import asyncio
import functools
import gc
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from splitbench.client.outcome import classify
from splitbench.client.sink import RecordSink
from splitbench.client.stats import ReplayStats
from splitbench.client.transport import Transport, make_transport
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.timing import Clock, RealClock
from splitbench.workload.types import Workload

try:
    import orjson as _json

    def _dumps(obj) -> bytes:
        return _json.dumps(obj)
except ImportError:  # pragma: no cover
    import json as _json

    def _dumps(obj) -> bytes:
        return _json.dumps(obj).encode()

__all__ = ["PATHS", "ReplayConfig", "ReplayStats", "Replayer", "StartGate"]

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
PREBUILD_MAX = 250_000   # request bodies built before the start (~1 kB each); longer replays build as they go
GC_EVERY_S = 1.0         # automatic GC is off during a replay; young generations are collected this often...
GC_GAP_S = 0.003         # ...when the next send is at least this far away
PRECONNECT_WINDOW_S, PRECONNECT_MAX = 0.25, 256   # connections opened before t0: the first window's requests


@dataclass
class ReplayConfig:
    base_url: str
    model: str
    api: str = "completions"            # "completions" (token-id prompts) or "chat"
    headers: dict[str, str] = field(default_factory=dict)
    max_inflight: int | None = None     # explicit cap; reported when it binds. None = no cap.
    timeout_s: float = 600.0            # whole request
    idle_timeout_s: float = 120.0       # no bytes for this long = timeout
    force_output_length: bool = True    # min_tokens = max_tokens and ignore_eos (vLLM extensions)
    extra_body: dict[str, Any] = field(default_factory=dict)
    start_delay_s: float = 0.25         # run clock 0 is this far after replay() is called
    loop: str = "precise"               # event loop kind (splitbench.timing): precise timers by default
    spin_s: float = 0.0                 # optionally wake this early and yield-spin the rest (costs CPU)
    grace_s: float = 10.0               # on stop: wait this long for in-flight requests
    http: str = "lean"                  # "lean" (http_lean: chunks handled in data_received) or "aiohttp"
    start_at_unix_s: float | None = None  # run clock 0 at this wall time (shared by several replayers) instead
                                          # of start_delay_s from now; a time already past starts at once, late
    multi_turn: bool = False            # sessions: open loop across them, closed within one (client/sessions.py)
    think_time: str = "trace"           # multi_turn: when a session's next turn is due (workload/sessions.py)
    think_seed: int = 0                 # multi_turn: seeds exp think times

    def describe(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "headers"}
        d["header_names"] = sorted(self.headers)  # values may hold secrets
        return d


class StartGate(Protocol):
    """Several replayers that start together (workers.py): the replayer calls prepared() once its request bodies
    are built, warmed() once its connections are open; warmed() returns the shared start (unix s). False or None:
    leave without sending."""

    async def prepared(self) -> bool: ...

    async def warmed(self) -> float | None: ...


class Replayer:
    """Replays a Workload against an OpenAI-compatible endpoint. `sink` receives each finished record. The
    transport (default: cfg.http's) and the clock (default: RealClock) may be injected, e.g. MockTransport and
    FakeClock for tests."""

    def __init__(self, workload: Workload, payload: Callable[[int, int], dict], cfg: ReplayConfig,
                 sink: Callable[[RequestRecord], None], *, transport: Transport | None = None,
                 clock: Clock | None = None, gate: StartGate | None = None):
        self.w = workload
        self.payload = payload          # (trace_index, input_tokens) -> {"prompt": ...} or {"messages": ...}
        self.cfg = cfg
        self.sink = sink
        self.url = cfg.base_url.rstrip("/") + PATHS[cfg.api]
        self.stats = ReplayStats(planned=len(workload))
        self.clock = clock or RealClock()
        self.transport = transport
        self.gate = gate
        self._now = self.clock.now
        self._stopping = False
        self._waiter: asyncio.Future | None = None   # what the dispatcher waits on; request_stop ends the wait
        self._wake_on_done = ""   # "slot": a finished request wakes the waiter (a free slot); "drain": the last one
        self._inflight: set[asyncio.Future] = set()
        self._active = 0   # requests sent and not yet finished
        self._t0 = 0.0
        self._bodies: list[bytes] | None = None
        self._arrivals: list[float] = []
        self._next = 0          # index of the next request to send
        self._data = b""        # its body, built ahead
        self._body: Callable[[int], bytes] | None = None

    # ------------------------------------------------------------------ public
    def request_stop(self) -> None:
        """Send nothing more; in-flight requests get cfg.grace_s, then they are cancelled."""
        self._stopping = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def inflight(self) -> int:
        return self._active

    async def run(self) -> ReplayStats:
        cfg = self.cfg
        if self.transport is None:
            self.transport = make_transport(cfg.http, self.url, {"Content-Type": "application/json", **cfg.headers},
                                            clock=self._now, timeout_s=cfg.timeout_s,
                                            idle_timeout_s=cfg.idle_timeout_s)
        try:
            return await self._run()
        finally:
            await self.transport.aclose()

    def prepare(self) -> None:
        """Build every request body before the clock starts (up to PREBUILD_MAX requests; beyond that, each body
        is built just after the previous send). Idempotent; run() calls it."""
        if self._bodies is not None:
            return
        w, cfg = self.w, self.cfg
        idx, ins, outs = w.trace_index.tolist(), w.input_tokens.tolist(), w.output_tokens.tolist()
        base = {"model": cfg.model, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **cfg.extra_body}

        def body(i: int) -> bytes:
            b = dict(base)
            b.update(self.payload(idx[i], ins[i]))
            b["max_tokens"] = outs[i]
            if cfg.force_output_length:
                b["min_tokens"] = outs[i]
                b["ignore_eos"] = True
            return _dumps(b)
        self._body = body
        self._bodies = [body(i) for i in range(len(w))] if len(w) <= PREBUILD_MAX else []

    # ------------------------------------------------------------------ the run
    async def _run(self) -> ReplayStats:
        self.prepare()
        if self.gate is not None and not await self.gate.prepared():
            return self._left()
        first = int(np.searchsorted(self.w.arrival_s, PRECONNECT_WINDOW_S)) if len(self.w) else 0
        await self.transport.open(min(max(first, 1), PRECONNECT_MAX) if len(self.w) else 0)
        gc.collect()
        gc.freeze()  # long-lived setup objects out of the GC's way
        gc_was_enabled = gc.isenabled()
        gc.disable()  # no collector pauses while sending; the dispatcher collects in idle gaps instead
        started = False
        try:
            start_unix = await self.gate.warmed() if self.gate is not None else self.cfg.start_at_unix_s
            if start_unix is None and self.gate is not None:
                return self._left()
            self._start_clock(start_unix)
            started = True
            await self._dispatch()
            await self._drain()
        except asyncio.CancelledError:
            self.stats.stopped_early = True
            await self._cancel(set(self._inflight))
            raise
        finally:
            if started:
                self.stats.duration_s = self._now() - self._t0
            if gc_was_enabled:
                gc.enable()
            gc.unfreeze()
        return self.stats

    def _left(self) -> ReplayStats:
        """The start gate said leave: nothing was sent."""
        self.stats.stopped_early = True
        return self.stats

    def _start_clock(self, start_unix: float | None) -> None:
        """Run-clock zero: at start_unix (shared with other processes: a time already past starts at once, and the
        lateness shows in every record's lag), else start_delay_s from now."""
        now, clock, stats = self._now(), self.clock, self.stats
        if start_unix is not None:
            self._t0 = now + (start_unix - clock.unix())
            stats.t0_unix_s = start_unix
        else:
            self._t0 = now + self.cfg.start_delay_s
            stats.t0_unix_s = clock.unix() + self.cfg.start_delay_s
        stats.start_late_s = max(0.0, now - self._t0)

    async def _wait(self, fut: asyncio.Future, wake_on_done: str = "") -> None:
        self._waiter, self._wake_on_done = fut, wake_on_done
        try:
            await fut
        finally:
            self._waiter, self._wake_on_done = None, ""

    async def _dispatch(self) -> None:
        """Wake at each due time and send everything due. A transport with a read path (lean) also sends a request
        that falls due while a burst of reads is being handled (due / on_due), so send lag is bounded by one read's
        work, not by the whole burst; not under an in-flight cap, whose waits belong to this loop."""
        cfg, now, t0, transport, stats = self.cfg, self._now, self._t0, self.transport, self.stats
        self._arrivals = arrivals = self.w.arrival_s.tolist()
        self._next = 0
        self._data = self._next_body()
        n, spin_s, cap = len(arrivals), cfg.spin_s, cfg.max_inflight
        loop = asyncio.get_running_loop()
        read_path = not cap
        next_gc = now() + GC_EVERY_S
        if read_path:
            transport.on_due = self._send_due
        try:
            while self._next < n and not self._stopping:
                target = t0 + arrivals[self._next]
                if read_path:
                    transport.due = target
                t = now()
                if target - t > GC_GAP_S and t > next_gc:  # an idle gap: collect young garbage now
                    gc.collect(1)
                    next_gc = t + GC_EVERY_S
                    t = now()
                if target - t > spin_s:
                    await self._wait(self.clock.wake_at(target - spin_s))
                if self._stopping or self._next >= n or t0 + arrivals[self._next] != target:
                    continue  # stopped, or sent meanwhile by the read path
                while now() < target:  # yield-spin the last stretch; other tasks keep running
                    await asyncio.sleep(0)
                if not read_path:
                    if self._active >= cap:
                        stats.inflight_cap_waits += 1
                        await self._wait(loop.create_future(), "slot")
                        continue   # a slot is free (or a stop came): look again
                    self._send(self._next)
                    self._next += 1
                    self._data = self._next_body()
                else:
                    self._send_due()
            stats.stopped_early = stats.stopped_early or self._next < n
        finally:
            if read_path:
                transport.due, transport.on_due = float("inf"), None

    def _next_body(self) -> bytes:
        i = self._next
        if i >= len(self._arrivals):
            return b""
        return self._bodies[i] if self._bodies else self._body(i)

    def _send_due(self) -> None:
        """Send every request whose time has come (also called from the transport's read path)."""
        arrivals, t0, now, n = self._arrivals, self._t0, self._now, len(self._arrivals)
        while self._next < n and t0 + arrivals[self._next] <= now():
            if self._stopping:
                break
            self._send(self._next)
            self._next += 1
            self._data = self._next_body()
        self.transport.due = t0 + arrivals[self._next] if self._next < n else float("inf")

    def _send(self, i: int) -> None:
        rec = self.record(i, self._arrivals[i])
        send = self._now()
        rec.actual_send_s = send - self._t0
        self._launch(rec, RecordSink(rec, self._t0, send), self._data)

    def record(self, i: int, intended_send_s: float) -> RequestRecord:
        """The record of request i (its session and turn too, where the workload has them)."""
        w = self.w
        ti = int(w.trace_index[i])
        rec = RequestRecord(request_id=f"r{ti}", trace_index=ti, intended_send_s=intended_send_s,
                            planned_input_tokens=int(w.input_tokens[i]), planned_output_tokens=int(w.output_tokens[i]))
        if w.session_id is not None and w.session_id[i] >= 0:
            rec.session_id = int(w.session_id[i])
            rec.turn = int(w.turn[i]) if w.turn is not None else None
        return rec

    def _launch(self, rec: RequestRecord, sink: RecordSink, body: bytes, headers: dict[str, str] | None = None
                ) -> None:
        """Hand the request to the transport now and count it in flight."""
        stats = self.stats
        fut = (self.transport.start(body, sink, rec.request_id, headers) if headers
               else self.transport.start(body, sink, rec.request_id))
        self._inflight.add(fut)
        fut.add_done_callback(functools.partial(self._done, rec, sink))
        stats.sent += 1
        self._active += 1
        if self._active > stats.inflight_peak:
            stats.inflight_peak = self._active

    def _done(self, rec: RequestRecord, sink: RecordSink, fut: asyncio.Future) -> None:
        """A request ended (its future's done callback): the outcome goes into its record, the record to the sink."""
        self._inflight.discard(fut)
        exc = asyncio.CancelledError() if fut.cancelled() else fut.exception()
        if exc is not None:
            rec.status, rec.error = classify(exc, self.cfg.timeout_s, self.cfg.idle_timeout_s)
            sink.partial()
        rec.end_s = (sink.end if sink.end is not None else self._now()) - self._t0
        self._active -= 1
        stats = self.stats
        stats.finished += 1
        if rec.status != R.OK:
            stats.failed += 1
        if self._wake_on_done and (self._wake_on_done == "slot" or not self._inflight) and not self._waiter.done():
            self._waiter.set_result(None)
        self.sink(rec)

    async def _drain(self) -> None:
        """Wait for the in-flight requests; after a stop, at most grace_s more, then cancel the rest."""
        if self._inflight and not self._stopping:
            await self._wait(asyncio.get_running_loop().create_future(), "drain")  # the last one, or a stop
        if self._inflight:
            pending = set(self._inflight)
            _, pending = await asyncio.wait(pending, timeout=self.cfg.grace_s)
            await self._cancel(pending)

    async def _cancel(self, pending: set[asyncio.Future]) -> None:
        if pending:
            self.transport.cancel(pending)
            await asyncio.gather(*pending, return_exceptions=True)
