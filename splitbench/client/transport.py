"""The replayer's transport interface (after httpx's transports): one object sends a request and feeds its
RecordSink; lean (http_lean.py), aiohttp (http_aiohttp.py) and a scripted mock (mock.py) implement it."""
from __future__ import annotations

import asyncio
from typing import Callable, Iterable, Protocol

from splitbench.client.http_aiohttp import AiohttpTransport
from splitbench.client.http_lean import LeanTransport
from splitbench.client.sink import RecordSink
from splitbench.errors import InputError

HTTP_TRANSPORTS = {"lean": LeanTransport, "aiohttp": AiohttpTransport}


class Transport(Protocol):
    """How the replayer sends. `start` must not block: it returns a future that ends (result None, or the exception
    that outcome.classify maps to a status) once the answer has been fed to the sink. A transport that reads the
    network itself may call on_due() when a read is handled after `due` (the next send time, run clock)."""
    due: float
    on_due: Callable[[], None] | None

    async def open(self, warm: int) -> None:
        """Before the clock starts: get ready, with up to `warm` idle connections."""

    def start(self, body: bytes, sink: RecordSink, request_id: str,
              headers: dict[str, str] | None = None) -> asyncio.Future:
        """Send one request now; sink.send is its send time (a transport that sends later calls sink.sent).
        `headers`: this request's own extra headers (multi-turn sessions: the affinity headers)."""

    def cancel(self, futs: Iterable[asyncio.Future]) -> None:
        """End these requests now; each future ends cancelled or with a StreamError of status cancelled."""

    async def aclose(self) -> None:
        """Close every connection."""


def make_transport(kind: str, url: str, headers: dict[str, str], *, clock: Callable[[], float], timeout_s: float,
                   idle_timeout_s: float) -> Transport:
    """The HTTP transport named `kind` (lean | aiohttp) for POSTs to url."""
    cls = HTTP_TRANSPORTS.get(kind)
    if cls is None:
        raise InputError(f"http transport must be one of {', '.join(HTTP_TRANSPORTS)}, got {kind!r}")
    return cls(url, headers, clock=clock, timeout_s=timeout_s, idle_timeout_s=idle_timeout_s)
