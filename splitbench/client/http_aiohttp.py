"""The aiohttp transport (`--http aiohttp`): one ClientSession without a connection cap; each request is a task that
feeds the RecordSink from aiohttp's stream reader. Its exceptions are classified by outcome.classify."""
from __future__ import annotations

import asyncio
from typing import Callable

import aiohttp

from splitbench.client.outcome import ERROR_BODY_BYTES


class AiohttpTransport:
    """The Transport protocol (transport.py) over aiohttp; connections open on demand (none are warmed)."""

    def __init__(self, url: str, headers: dict[str, str] | None, *, clock: Callable[[], float], timeout_s: float,
                 idle_timeout_s: float):
        self.url, self.headers, self.clock = url, dict(headers or {}), clock
        self.timeout_s, self.idle_timeout_s = timeout_s, idle_timeout_s
        self.due, self.on_due = float("inf"), None   # no read path of its own: sends come from the dispatcher
        self.session: aiohttp.ClientSession | None = None

    async def open(self, warm: int) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_read=self.idle_timeout_s)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, headers=self.headers,
                                             auto_decompress=False)

    def start(self, body: bytes, sink, request_id: str, headers: dict[str, str] | None = None) -> asyncio.Future:
        return asyncio.get_running_loop().create_task(self._post(body, sink, request_id, headers))

    def cancel(self, futs) -> None:
        for f in futs:
            f.cancel()

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _post(self, body: bytes, sink, request_id: str, headers: dict[str, str] | None) -> None:
        clock = self.clock
        sink.sent(clock())
        async with self.session.post(self.url, data=body, headers={"X-Request-Id": request_id, **(headers or {})}
                                     ) as resp:
            sink.on_head(resp.status, resp.reason or "", resp.headers)
            if resp.status != 200:
                sink.on_body(await resp.content.read(ERROR_BODY_BYTES), clock())
            else:
                async for chunk in resp.content.iter_any():
                    sink.on_body(chunk, clock())
            sink.on_end(clock())
