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

from .. import records as R
from ..errors import InputError
from ..records import RequestRecord
from .http_lean import ERROR_BODY_BYTES, ERROR_CHARS, LeanClient, StreamError, error_text
from .workload import Workload

try:
    import orjson as _json

    def _dumps(obj) -> bytes:
        return _json.dumps(obj)
    _loads = _json.loads
except ImportError:  # pragma: no cover
    import json as _json

    def _dumps(obj) -> bytes:
        return _json.dumps(obj).encode()
    _loads = _json.loads

PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
HTTP_TRANSPORTS = ("lean", "aiohttp")


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

    async def _run(self) -> ReplayStats:
        gc.collect()
        gc.freeze()  # long-lived setup objects out of the GC's way: fewer pauses on the hot path
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
            gc.unfreeze()
        return self.stats

    # ------------------------------------------------------------------ internals
    async def _dispatch(self, sem: asyncio.Semaphore | None) -> None:
        w, cfg, clock, t0 = self.w, self.cfg, self._clock, self._t0
        arrivals = w.arrival_s.tolist()
        idx = w.trace_index.tolist()
        ins = w.input_tokens.tolist()
        outs = w.output_tokens.tolist()
        base = {"model": cfg.model, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **cfg.extra_body}
        stop = self.stop_event
        loop = asyncio.get_running_loop()
        for i in range(len(arrivals)):
            if stop.is_set():
                self.stats.stopped_early = True
                return
            body = dict(base)
            body.update(self.payload(idx[i], ins[i]))
            body["max_tokens"] = outs[i]
            if cfg.force_output_length:
                body["min_tokens"] = outs[i]
                body["ignore_eos"] = True
            data = _dumps(body)   # built before the wait: off the critical path
            target = t0 + arrivals[i]
            delay = target - clock()
            if delay > cfg.spin_s:
                await asyncio.sleep(delay - cfg.spin_s)
            while clock() < target:  # yield-spin the last stretch; other tasks keep running
                await asyncio.sleep(0)
            if sem is not None:
                if sem.locked():
                    self.stats.inflight_cap_waits += 1
                await sem.acquire()
            rec = RequestRecord(request_id=f"r{idx[i]}", trace_index=idx[i], intended_send_s=arrivals[i],
                                planned_input_tokens=ins[i], planned_output_tokens=outs[i])
            task = loop.create_task(self._one(rec, data, sem))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            self.stats.sent += 1
            self._active += 1
            if self._active > self.stats.inflight_peak:
                self.stats.inflight_peak = self._active

    async def _drain(self, grace_s: float | None) -> None:
        if not self._inflight:
            return
        pending = set(self._inflight)
        if grace_s is None:
            await asyncio.gather(*pending, return_exceptions=True)
            return
        done, pending = await asyncio.wait(pending, timeout=grace_s)
        for t in pending:
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
            rec.end_s = clock() - t0
            self._active -= 1
            if sem is not None:
                sem.release()
            self.stats.finished += 1
            if rec.status != R.OK:
                self.stats.failed += 1
            self.sink(rec)

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


# ------------------------------------------------------------------ response -> record (both transports)
_SSE, _JSON, _ERR = 0, 1, 2


class RecordSink:
    """Turns one response into RequestRecord fields. Transports call on_head, on_body(data, now) per network
    read, then on_end(now); `now` is on the same clock as `send` and `t0`. on_body/on_end raise StreamError."""
    __slots__ = ("rec", "t0", "send", "mode", "buf", "prev", "counted", "done", "usage", "reason", "_last_now")

    def __init__(self, rec: RequestRecord, t0: float, send: float):
        self.rec, self.t0, self.send = rec, t0, send
        self.mode, self.buf, self.prev, self.counted, self.done, self.usage = _SSE, b"", 0, 0, False, None
        self.reason = ""
        self._last_now = -1.0

    def on_head(self, status: int, reason: str, headers: Any) -> None:
        self.rec.http_status, self.reason = status, reason
        if status != 200:
            self.mode = _ERR
        elif not (headers.get("content-type") or "").startswith("text/event-stream"):
            self.mode = _JSON

    def on_body(self, data: bytes, now: float) -> None:
        if self.mode == _SSE:
            self._feed(data, now)
        elif self.mode == _JSON or len(self.buf) < ERROR_BODY_BYTES:
            self.buf += data

    def on_end(self, now: float) -> None:
        rec = self.rec
        if self.mode == _ERR:
            rec.status = R.HTTP_ERROR
            rec.error = error_text(self.buf[:ERROR_BODY_BYTES]) or self.reason or f"HTTP {rec.http_status}"
        elif self.mode == _JSON:  # non-streaming server: the whole answer is one chunk
            try:
                msg = _loads(self.buf)
            except ValueError:
                raise StreamError(R.ERROR, f"malformed JSON response: {self.buf[:80]!r}") from None
            usage = (msg.get("usage") if isinstance(msg, dict) else None) or {}
            rec.actual_input_tokens = usage.get("prompt_tokens")
            rec.actual_output_tokens = usage.get("completion_tokens")
            rec.first_token_s = rec.last_token_s = now - self.t0
            rec.chunk_offsets_s.append(now - self.send)
            rec.chunk_tokens.append(rec.actual_output_tokens or 1)
            rec.status = R.OK
        else:
            self.partial()
            if self.done:
                rec.status = R.OK
            else:
                rec.status, rec.error = R.DISCONNECTED, "stream ended without [DONE]"

    def partial(self) -> None:
        """Token totals from what arrived so far (also called when a request fails mid-stream)."""
        if self.mode != _SSE or self.rec.http_status is None:
            return
        u = self.usage
        if u:
            self.rec.actual_input_tokens = u.get("prompt_tokens")
            self.rec.actual_output_tokens = u.get("completion_tokens")
        else:
            self.rec.actual_output_tokens = self.counted

    def _feed(self, data: bytes, now: float) -> None:
        buf = self.buf + data if self.buf else data
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        events = buf.split(b"\n\n")
        self.buf = events.pop()
        for ev in events:
            if ev.startswith(b"data:") and b"\n" not in ev:
                self._event(ev[5:].strip(), now)
            else:  # several lines: join the data fields (SSE); comments and other fields are skipped
                parts = [ln[5:].strip() for ln in ev.split(b"\n") if ln.startswith(b"data:")]
                if parts:
                    self._event(b"\n".join(parts), now)

    def _event(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = True
            return
        try:
            msg = _loads(payload)
        except ValueError:
            raise StreamError(R.ERROR, f"malformed SSE data: {payload[:80]!r}") from None
        if type(msg) is not dict:
            raise StreamError(R.ERROR, f"malformed SSE data: {payload[:80]!r}")
        if "error" in msg and "choices" not in msg:
            raise StreamError(R.ERROR, error_text(payload))
        u = msg.get("usage")
        choices = msg.get("choices")
        if u:
            self.usage = u
        if not choices:
            return  # e.g. the final usage-only chunk
        if u and u.get("completion_tokens") is not None:
            k = u["completion_tokens"] - self.prev
            self.prev = u["completion_tokens"]
        else:  # no continuous usage: one token per non-empty delta
            c = choices[0]
            text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
            k = 1 if text else 0
        if k > 0:
            rec = self.rec
            self.counted += k
            if rec.chunk_offsets_s and now == self._last_now:
                # events that arrived in the same network read are one chunk: the client saw them at once
                rec.chunk_tokens[-1] += k
                return
            if not rec.chunk_offsets_s:
                rec.first_token_s = now - self.t0
            self._last_now = now
            rec.chunk_offsets_s.append(now - self.send)
            rec.chunk_tokens.append(k)
            rec.last_token_s = now - self.t0
