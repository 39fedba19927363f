"""Open-loop async replayer: fires each request at its absolute intended time, timestamps every SSE chunk.

One aiohttp session (one uncapped connection pool); failures become records with a status, never exceptions.
"""
from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from .. import records as R
from ..records import RequestRecord
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
_ERROR_CHARS = 300


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

    # ------------------------------------------------------------------ public
    def request_stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()

    @property
    def inflight(self) -> int:
        return self._active

    async def run(self) -> ReplayStats:
        self.stop_event = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_s, sock_read=self.cfg.idle_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        gc.collect()
        gc.freeze()  # long-lived setup objects out of the GC's way: fewer pauses on the hot path
        async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                         headers={"Content-Type": "application/json", **self.cfg.headers},
                                         auto_decompress=False) as session:
            self._session = session
            sem = asyncio.Semaphore(self.cfg.max_inflight) if self.cfg.max_inflight else None
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
        try:
            async with self._session.post(self.url, data=data) as resp:
                rec.http_status = resp.status
                if resp.status != 200:
                    body = await resp.content.read(4096)
                    rec.status = R.HTTP_ERROR
                    rec.error = _error_text(body) or resp.reason or f"HTTP {resp.status}"
                elif resp.content_type == "text/event-stream":
                    await self._read_stream(resp, rec, send)
                else:
                    await self._read_json(resp, rec, send)
        except asyncio.CancelledError:
            rec.status, rec.error = R.CANCELLED, "cancelled at shutdown"
        except _StreamError as e:
            rec.status, rec.error = e.status, str(e)[:_ERROR_CHARS]
        except asyncio.TimeoutError:
            rec.status, rec.error = R.TIMEOUT, f"no response within limits (total {self.cfg.timeout_s}s, " \
                                               f"idle {self.cfg.idle_timeout_s}s)"
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
            rec.status, rec.error = R.DISCONNECTED, f"{type(e).__name__}: {e}"[:_ERROR_CHARS]
        except aiohttp.ClientError as e:
            rec.status, rec.error = R.ERROR, f"{type(e).__name__}: {e}"[:_ERROR_CHARS]
        except Exception as e:  # never crash the run on one bad response
            rec.status, rec.error = R.ERROR, f"{type(e).__name__}: {e}"[:_ERROR_CHARS]
        finally:
            rec.end_s = clock() - t0
            self._active -= 1
            if sem is not None:
                sem.release()
            self.stats.finished += 1
            if rec.status != R.OK:
                self.stats.failed += 1
            self.sink(rec)

    async def _read_stream(self, resp: aiohttp.ClientResponse, rec: RequestRecord, send: float) -> None:
        clock, t0 = self._clock, self._t0
        offsets, tokens = rec.chunk_offsets_s, rec.chunk_tokens
        buf = b""
        prev_completion = 0
        counted = 0
        done = False
        usage = None
        async for data in resp.content.iter_any():
            now = clock()
            buf += data
            while True:
                cut = buf.find(b"\n\n")
                if cut < 0:
                    break
                event, buf = buf[:cut], buf[cut + 2:]
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue  # comments / other SSE fields
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        continue
                    try:
                        msg = _loads(payload)
                    except ValueError:
                        raise _StreamError(R.ERROR, f"malformed SSE data: {payload[:80]!r}")
                    if "error" in msg and "choices" not in msg:
                        raise _StreamError(R.ERROR, _error_text(payload))
                    u = msg.get("usage")
                    choices = msg.get("choices") or ()
                    if u:
                        usage = u
                    if not choices:
                        continue  # e.g. the final usage-only chunk
                    if u and u.get("completion_tokens") is not None:
                        k = u["completion_tokens"] - prev_completion
                        prev_completion = u["completion_tokens"]
                    else:  # no continuous usage: one token per non-empty delta
                        c = choices[0]
                        text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                        k = 1 if text else 0
                    if k > 0:
                        if not offsets:
                            rec.first_token_s = now - t0
                        offsets.append(now - send)
                        tokens.append(k)
                        counted += k
                        rec.last_token_s = now - t0
        if usage:
            rec.actual_input_tokens = usage.get("prompt_tokens")
            rec.actual_output_tokens = usage.get("completion_tokens")
        else:
            rec.actual_output_tokens = counted
        if not done:
            rec.status, rec.error = R.DISCONNECTED, "stream ended without [DONE]"
        else:
            rec.status = R.OK

    async def _read_json(self, resp: aiohttp.ClientResponse, rec: RequestRecord, send: float) -> None:
        """Non-streaming server: the whole answer is one chunk."""
        msg = _loads(await resp.read())
        now = self._clock()
        usage = msg.get("usage") or {}
        rec.actual_input_tokens = usage.get("prompt_tokens")
        rec.actual_output_tokens = usage.get("completion_tokens")
        n = rec.actual_output_tokens or 1
        rec.first_token_s = rec.last_token_s = now - self._t0
        rec.chunk_offsets_s.append(now - send)
        rec.chunk_tokens.append(n)
        rec.status = R.OK


class _StreamError(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def _error_text(body: bytes) -> str:
    try:
        msg = _loads(body)
        err = msg.get("error", msg) if isinstance(msg, dict) else msg
        if isinstance(err, dict):
            err = err.get("message") or err
        return str(err)[:_ERROR_CHARS]
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:_ERROR_CHARS]


async def replay(workload: Workload, payload: Callable[[int, int], dict], cfg: ReplayConfig,
                 sink: Callable[[RequestRecord], None]) -> ReplayStats:
    return await Replayer(workload, payload, cfg, sink).run()
