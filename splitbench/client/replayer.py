"""Open-loop async replayer: fires each request at its absolute intended time, timestamps every SSE chunk.

One uncapped keep-alive pool (the lean transport, or aiohttp); failures become records with a status, never exceptions.
"""
from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import numpy as np

from splitbench.client.http_lean import ERROR_BODY_BYTES, ERROR_CHARS, LeanClient, StreamError
from splitbench.client.sink import RecordSink
from splitbench.errors import InputError
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.workload.types import Workload

try:
    import orjson as _json

    def _dumps(obj) -> bytes:
        return _json.dumps(obj)
except ImportError:  # pragma: no cover
    import json as _json

    def _dumps(obj) -> bytes:
        return _json.dumps(obj).encode()

__all__ = ["HTTP_TRANSPORTS", "PATHS", "RecordSink", "ReplayConfig", "ReplayStats", "Replayer"]

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
HTTP_TRANSPORTS = ("lean", "aiohttp")
PREBUILD_MAX = 250_000   # request bodies built before the start (~1 kB each); longer replays build as they go
GC_EVERY_S = 1.0         # automatic GC is off during a replay; young generations are collected this often...
PRECONNECT_WINDOW_S, PRECONNECT_MAX = 0.25, 256   # connections opened before t0: the first window's requests
SPARE_CONNECTIONS = 32   # then this many idle connections are kept ready in the background
GC_GAP_S = 0.003         # ...when the next send is at least this far away


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

    def describe(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "headers"}
        d["header_names"] = sorted(self.headers)  # values may hold secrets
        return d


@dataclass
class ReplayStats:
    planned: int = 0
    sent: int = 0
    finished: int = 0
    failed: int = 0
    inflight_peak: int = 0
    inflight_cap_waits: int = 0   # times --max-inflight delayed a send
    stopped_early: bool = False
    t0_unix_s: float = 0.0        # wall time of run-clock zero
    duration_s: float = 0.0


class Replayer:
    """Replays a Workload against an OpenAI-compatible endpoint. `sink` receives each finished record."""

    def __init__(self, workload: Workload, payload: Callable[[int, int], dict], cfg: ReplayConfig,
                 sink: Callable[[RequestRecord], None]):
        self.w = workload
        self.payload = payload          # (trace_index, input_tokens) -> {"prompt": ...} or {"messages": ...}
        self.cfg = cfg
        self.sink = sink
        self.url = cfg.base_url.rstrip("/") + PATHS[cfg.api]
        self.stats = ReplayStats(planned=len(workload))
        self.stop_event: asyncio.Event | None = None
        self._inflight: set[asyncio.Task] = set()
        self._active = 0   # requests sent and not yet finished
        self._clock = time.perf_counter
        self._t0 = 0.0
        self._client: LeanClient | None = None
        self._session: aiohttp.ClientSession | None = None
        self._bodies: list[bytes] | None = None
        self._conn_of: dict[asyncio.Future, Any] = {}   # lean requests sent without a task -> their connection
        self._arrivals: list[float] = []
        self._next = 0          # index of the next request to send
        self._data = b""        # its body, built ahead
        self._body: Callable[[int], bytes] | None = None

    # ------------------------------------------------------------------ public
    def request_stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()

    @property
    def inflight(self) -> int:
        return self._active

    async def run(self) -> ReplayStats:
        if self.cfg.http not in HTTP_TRANSPORTS:
            raise InputError(f"http transport must be one of {', '.join(HTTP_TRANSPORTS)}, got {self.cfg.http!r}")
        self.stop_event = asyncio.Event()
        headers = {"Content-Type": "application/json", **self.cfg.headers}
        if self.cfg.http == "lean":
            self._client = LeanClient(self.url, headers, clock=self._clock)
            try:
                return await self._run()
            finally:
                await self._client.close()
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s, sock_read=self.cfg.idle_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers,
                                         auto_decompress=False) as session:
            self._session = session
            return await self._run()

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

    async def _run(self) -> ReplayStats:
        self.prepare()
        if self._client is not None and len(self.w):  # connections ready before the clock starts
            first = int(np.searchsorted(self.w.arrival_s, PRECONNECT_WINDOW_S))
            await self._client.warm(min(max(first, 1), PRECONNECT_MAX))
            self._client.spare = SPARE_CONNECTIONS
        gc.collect()
        gc.freeze()  # long-lived setup objects out of the GC's way
        gc_was_enabled = gc.isenabled()
        gc.disable()  # no collector pauses while sending; the dispatcher collects in idle gaps instead
        sem = asyncio.Semaphore(self.cfg.max_inflight) if self.cfg.max_inflight else None
        if self.cfg.start_at_unix_s is not None:  # one start time shared with other processes (wall clock)
            self._t0 = self._clock() + (self.cfg.start_at_unix_s - time.time())
            self.stats.t0_unix_s = self.cfg.start_at_unix_s
        else:
            self._t0 = self._clock() + self.cfg.start_delay_s
            self.stats.t0_unix_s = time.time() + self.cfg.start_delay_s
        try:
            await self._dispatch(sem)
            await self._drain(None if not self.stop_event.is_set() else self.cfg.grace_s)
        except asyncio.CancelledError:
            self.stats.stopped_early = True
            await self._drain(0.0)
            raise
        finally:
            self.stats.duration_s = self._clock() - self._t0
            if gc_was_enabled:
                gc.enable()
            gc.unfreeze()
        return self.stats

    # ------------------------------------------------------------------ internals
    async def _dispatch(self, sem: asyncio.Semaphore | None) -> None:
        """Wake at each due time and send everything due. With the lean transport the read path also sends a
        request that falls due while a burst of reads is being handled (client.due / client.on_due), so send lag
        is bounded by one read's work, not by the whole burst."""
        w, cfg, clock, t0 = self.w, self.cfg, self._clock, self._t0
        self._arrivals = arrivals = w.arrival_s.tolist()
        self._next = 0
        self._data = (self._bodies[0] if self._bodies else self._body(0)) if arrivals else b""
        n, stop, spin_s = len(arrivals), self.stop_event, cfg.spin_s
        client = self._client if sem is None else None
        next_gc = clock() + GC_EVERY_S
        if client is not None:
            client.on_due = self._send_due
        try:
            while self._next < n:
                if stop.is_set():
                    self.stats.stopped_early = True
                    return
                target = t0 + arrivals[self._next]
                if client is not None:
                    client.due = target
                now = clock()
                if target - now > GC_GAP_S and now > next_gc:  # an idle gap: collect young garbage now
                    gc.collect(1)
                    next_gc = now + GC_EVERY_S
                    now = clock()
                delay = target - now
                if delay > spin_s:
                    await asyncio.sleep(delay - spin_s)
                if self._next < n and t0 + arrivals[self._next] == target:  # not sent meanwhile by the read path
                    while clock() < target:  # yield-spin the last stretch; other tasks keep running
                        await asyncio.sleep(0)
                    if sem is not None:
                        if sem.locked():
                            self.stats.inflight_cap_waits += 1
                        await sem.acquire()
                        self._send(self._next, sem)
                        self._next += 1
                        self._data = self._next_body()
                    else:
                        self._send_due()
        finally:
            if client is not None:
                client.due, client.on_due = float("inf"), None

    def _next_body(self) -> bytes:
        i = self._next
        if i >= len(self._arrivals):
            return b""
        return self._bodies[i] if self._bodies else self._body(i)

    def _send_due(self) -> None:
        """Send every request whose time has come (also called from the lean client's read path)."""
        arrivals, t0, clock, n = self._arrivals, self._t0, self._clock, len(self._arrivals)
        client = self._client
        while self._next < n and t0 + arrivals[self._next] <= clock():
            if self.stop_event.is_set():
                break
            self._send(self._next, None)
            self._next += 1
            self._data = self._next_body()
        if client is not None:
            client.due = t0 + arrivals[self._next] if self._next < n else float("inf")

    def _send(self, i: int, sem: asyncio.Semaphore | None) -> None:
        w, stats = self.w, self.stats
        ti = int(w.trace_index[i])
        rec = RequestRecord(request_id=f"r{ti}", trace_index=ti, intended_send_s=self._arrivals[i],
                            planned_input_tokens=int(w.input_tokens[i]), planned_output_tokens=int(w.output_tokens[i]))
        data = self._data
        started = self._send_now(rec, data) if self._client is not None and sem is None else None
        if started is None:   # aiohttp, an in-flight cap, or no idle connection: a task sends it
            task = asyncio.get_running_loop().create_task(self._one(rec, data, sem))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
        stats.sent += 1
        self._active += 1
        if self._active > stats.inflight_peak:
            stats.inflight_peak = self._active

    def _send_now(self, rec: RequestRecord, data: bytes) -> asyncio.Future | None:
        """The lean hot path: write on an idle connection right now (no task); the response completes the record
        in a done callback. None when no connection is idle."""
        clock, t0 = self._clock, self._t0
        send = clock()
        sink = RecordSink(rec, t0, send)
        started = self._client.start_now(data, sink, send=send, timeout_s=self.cfg.timeout_s,
                                         idle_timeout_s=self.cfg.idle_timeout_s, request_id=rec.request_id)
        if started is None:
            return None
        fut, conn = started
        rec.actual_send_s = send - t0
        self._conn_of[fut] = conn
        self._inflight.add(fut)
        fut.add_done_callback(lambda f: self._sent_done(f, rec, sink))
        return fut

    def _sent_done(self, fut: asyncio.Future, rec: RequestRecord, sink: "RecordSink") -> None:
        self._inflight.discard(fut)
        self._conn_of.pop(fut, None)
        if fut.cancelled():
            rec.status, rec.error = R.CANCELLED, "cancelled at shutdown"
            sink.partial()
        else:
            e = fut.exception()
            if isinstance(e, StreamError):
                rec.status, rec.error = e.status, str(e)[:ERROR_CHARS]
                sink.partial()
            elif e is not None:
                rec.status, rec.error = R.ERROR, f"{type(e).__name__}: {e}"[:ERROR_CHARS]
        self._finished(rec, sink.end if sink.end is not None else self._clock(), None)

    def _finished(self, rec: RequestRecord, end: float, sem: asyncio.Semaphore | None) -> None:
        rec.end_s = end - self._t0
        self._active -= 1
        if sem is not None:
            sem.release()
        self.stats.finished += 1
        if rec.status != R.OK:
            self.stats.failed += 1
        self.sink(rec)

    async def _drain(self, grace_s: float | None) -> None:
        if not self._inflight:
            return
        pending = set(self._inflight)
        if grace_s is None:
            await asyncio.gather(*pending, return_exceptions=True)
            return
        done, pending = await asyncio.wait(pending, timeout=grace_s)
        for t in pending:
            conn = self._conn_of.get(t)
            if conn is not None:
                conn.cancel(t)   # fails the request with status cancelled (its done callback records it)
            else:
                t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, rec: RequestRecord, data: bytes, sem: asyncio.Semaphore | None) -> None:
        clock, t0 = self._clock, self._t0
        send = clock()
        rec.actual_send_s = send - t0
        sink = RecordSink(rec, t0, send)
        try:
            if self._client is not None:
                await self._client.request(data, sink, send=send, timeout_s=self.cfg.timeout_s,
                                           idle_timeout_s=self.cfg.idle_timeout_s, request_id=rec.request_id)
            else:
                await self._one_aiohttp(data, sink, rec.request_id)
        except asyncio.CancelledError:
            rec.status, rec.error = R.CANCELLED, "cancelled at shutdown"
            sink.partial()
        except StreamError as e:
            rec.status, rec.error = e.status, str(e)[:ERROR_CHARS]
            sink.partial()
        except asyncio.TimeoutError:
            rec.status, rec.error = R.TIMEOUT, f"no response within limits (total {self.cfg.timeout_s}s, " \
                                               f"idle {self.cfg.idle_timeout_s}s)"
            sink.partial()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
            rec.status, rec.error = R.DISCONNECTED, f"{type(e).__name__}: {e}"[:ERROR_CHARS]
            sink.partial()
        except aiohttp.ClientError as e:
            rec.status, rec.error = R.ERROR, f"{type(e).__name__}: {e}"[:ERROR_CHARS]
        except Exception as e:  # never crash the run on one bad response
            rec.status, rec.error = R.ERROR, f"{type(e).__name__}: {e}"[:ERROR_CHARS]
        finally:
            self._finished(rec, sink.end if sink.end is not None and rec.status == R.OK else clock(), sem)

    async def _one_aiohttp(self, data: bytes, sink: RecordSink, request_id: str) -> None:
        """The aiohttp transport: the same RecordSink, fed from aiohttp's stream reader."""
        clock = self._clock
        async with self._session.post(self.url, data=data, headers={"X-Request-Id": request_id}) as resp:
            sink.on_head(resp.status, resp.reason or "", resp.headers)
            if resp.status != 200:
                sink.on_body(await resp.content.read(ERROR_BODY_BYTES), clock())
            else:
                async for chunk in resp.content.iter_any():
                    sink.on_body(chunk, clock())
            sink.on_end(clock())
