"""The router's upstream leg: one keep-alive pool per instance on the lean HTTP client (client/http_lean.py), whole
answers (prefill, /health, /v1/models) and streamed ones passed on read by read; the prefill copy of a request.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from splitbench.client.http_lean import LeanClient
from splitbench.client.outcome import StreamError
from splitbench.schema import records as R

__all__ = ["PREFILL_KV_PARAMS", "Answer", "Stream", "StreamError", "Upstream", "prefill_body"]

# The prompt-instance copy of a request, as vLLM's disaggregated proxies send it (NixlConnector protocol).
PREFILL_KV_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                     "remote_block_ids": None, "remote_host": None, "remote_port": None}
KEEPALIVE_S = 4.0   # idle upstream connections are dropped before uvicorn's (vLLM's) 5 s keep-alive closes them


def prefill_body(body: dict) -> dict:
    """The prompt instance's copy: max_tokens 1, not streamed, asks for remote decode (vLLM's toy proxy)."""
    p = dict(body)
    p["kv_transfer_params"] = dict(PREFILL_KV_PARAMS)
    p["stream"] = False
    p["max_tokens"] = 1
    if "max_completion_tokens" in p:
        p["max_completion_tokens"] = 1
    for k in ("stream_options", "min_tokens", "min_completion_tokens"):  # min_*: not supported on P
        p.pop(k, None)
    return p


@dataclass
class Answer:
    """A whole upstream answer. headers: lower-case names."""
    status: int = 0
    headers: dict = field(default_factory=dict)
    body: bytes = b""

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "application/json").split(";", 1)[0].strip()


class _Collect:
    """Sink that keeps the whole answer."""
    __slots__ = ("answer", "parts")

    def __init__(self):
        self.answer, self.parts = Answer(), []

    def on_head(self, status: int, reason: str, headers: dict) -> None:
        self.answer.status, self.answer.headers = status, headers

    def on_body(self, data: bytes, now: float) -> None:
        self.parts.append(data)

    def on_end(self, now: float) -> None:
        self.answer.body = b"".join(self.parts)


class Stream:
    """One streamed upstream request, read by read: `await head()`, then `await next()` until None. The reads are
    queued by the connection's data_received (no task per read) and handed out joined. close() ends it early."""
    __slots__ = ("status", "headers", "_reads", "_fut", "_waiter", "_loop", "_client")

    def __init__(self, client: LeanClient, body: bytes, path: str, headers: dict | None, request_id: str | None,
                 timeout_s: float, idle_timeout_s: float):
        self.status, self.headers = 0, {}
        self._reads: deque[bytes] = deque()
        self._waiter: asyncio.Future | None = None
        self._loop, self._client = asyncio.get_running_loop(), client
        kw = dict(timeout_s=timeout_s, idle_timeout_s=idle_timeout_s, request_id=request_id, headers=headers,
                  path=path)
        fut = client.start_now(body, self, send=client.clock(), **kw)   # an idle connection: written now
        if fut is None:
            fut = self._loop.create_task(client.request(body, self, **kw))
        fut.add_done_callback(self._done)
        self._fut = fut

    # the sink side (called from the connection's data_received)
    def on_head(self, status: int, reason: str, headers: dict) -> None:
        self.status, self.headers = status, headers
        self._wake()

    def on_body(self, data: bytes, now: float) -> None:
        self._reads.append(data)
        self._wake()

    def on_end(self, now: float) -> None:
        pass   # the future's done callback wakes the reader

    def _done(self, fut: asyncio.Future) -> None:
        if not fut.cancelled():
            fut.exception()   # retrieved here: the reader may be gone (asyncio would log it as never retrieved)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _raise_if_failed(self) -> None:
        if self._fut.cancelled():
            raise StreamError(R.CANCELLED, "cancelled")
        exc = self._fut.exception()
        if exc is not None:
            raise exc if isinstance(exc, StreamError) else StreamError(R.ERROR, f"{type(exc).__name__}: {exc}")

    # the reader side
    async def head(self) -> int:
        """The answer's status once its head arrived; StreamError when the request failed first."""
        while not self.status:
            if self._fut.done():
                self._raise_if_failed()
                raise StreamError(R.ERROR, "the answer ended without a head")
            await self._wait()
        return self.status

    async def next(self) -> bytes | None:
        """The body bytes read since the last call (at least one read), None at the end; StreamError when the
        request failed (after the bytes read before it)."""
        reads = self._reads
        while not reads:
            if self._fut.done():
                self._raise_if_failed()
                return None
            await self._wait()
        if len(reads) == 1:
            return reads.popleft()
        data = b"".join(reads)
        reads.clear()
        return data

    def ended(self) -> bool:
        """Every read was handed out and the answer is complete (next() would return None at once): lets the
        caller write the last bytes and the end in one write."""
        fut = self._fut
        return not self._reads and fut.done() and not fut.cancelled() and fut.exception() is None

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while (data := await self.next()) is not None:
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """End the request now if it is still running (its connection is dropped, never reused)."""
        if not self._fut.done():
            self._client.cancel([self._fut])


class Upstream:
    """One instance's keep-alive pool (no cap, LIFO reuse, idle connections dropped after KEEPALIVE_S). Headers
    are the caller's (plus Host, Content-Length, X-Request-Id); failures raise StreamError with a record status."""

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0, keepalive_s: float = KEEPALIVE_S,
                 clock=time.perf_counter):
        self.url = url.rstrip("/")
        self.client = LeanClient(self.url + "/", clock=clock, keepalive_s=keepalive_s, kernel_stamps=False,
                                 default_headers=False, connect_timeout_s=connect_timeout_s)

    async def fetch(self, path: str, body: bytes = b"", *, method: str = "POST", headers: dict | None = None,
                    request_id: str | None = None, timeout_s: float = 600.0) -> Answer:
        """The whole answer of one request (any status); StreamError when none came (refused, timeout, cut)."""
        sink = _Collect()
        await self.client.request(body, sink, timeout_s=timeout_s, idle_timeout_s=timeout_s, request_id=request_id,
                                  headers=headers, path=path, method=method)
        return sink.answer

    def stream(self, path: str, body: bytes, *, headers: dict | None = None, request_id: str | None = None,
               timeout_s: float = 3600.0, idle_timeout_s: float = 120.0) -> Stream:
        """Start a POST whose answer is read as it arrives (call from the event loop)."""
        return Stream(self.client, body, path, headers, request_id, timeout_s, idle_timeout_s)

    async def close(self) -> None:
        await self.client.close()
