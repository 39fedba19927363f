"""Lean HTTP/1.1 streaming client: a keep-alive pool without a cap over http_conn connections, one future per
request; plain-http reads carry kernel receive stamps (kstamp.py).

Each network read is timestamped and handed to the request's sink as it is handled (no task switch per chunk).
A sink has on_head(status, reason, headers), on_body(data, now) and on_end(now); they may raise StreamError.
"""
from __future__ import annotations

import asyncio
import ssl as _ssl
import time
from typing import Callable
from urllib.parse import urlsplit

from splitbench.client.http_conn import _Conn
from splitbench.client.kstamp import SUPPORTED as KSTAMP_SUPPORTED
from splitbench.client.kstamp import ClockMap, open_stamped
from splitbench.client.outcome import ERROR_CHARS, StreamError
from splitbench.errors import InputError
from splitbench.schema import records as R

__all__ = ["LeanClient", "LeanTransport"]
SPARE_CONNECTIONS = 32   # a replay keeps this many idle connections ready in the background


# ============================================================== the pool
class LeanClient:
    """POSTs to one URL over a keep-alive pool with no cap. Use from one event loop; close() when done."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, *,
                 clock: Callable[[], float] = time.perf_counter, keepalive_s: float = 4.0,
                 ssl_context: _ssl.SSLContext | None = None, kernel_stamps: bool = True,
                 default_headers: bool = True, connect_timeout_s: float | None = None):
        """default_headers=False sends Host alone besides `headers` (a proxy passing its client's headers on);
        connect_timeout_s bounds connecting (else the request's own limits do)."""
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InputError(f"URL must be http:// or https://host[:port]/path, got {url!r}")
        self.host, self.https = u.hostname, u.scheme == "https"
        self.port = u.port or (443 if self.https else 80)
        self.ssl = (ssl_context or _ssl.create_default_context()) if self.https else None
        self.clock, self.keepalive_s = clock, keepalive_s  # keepalive_s: below uvicorn's 5 s server default
        self.connect_timeout_s = connect_timeout_s
        # plain http: reads carry kernel receive stamps (kstamp.py), so a busy client loop does not inflate TTFT
        self.clock_map = ClockMap(clock) if kernel_stamps and not self.https and KSTAMP_SUPPORTED else None
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        default_port = 443 if self.https else 80
        hdrs = {"Host": self.host if self.port == default_port else f"{self.host}:{self.port}"}
        if default_headers:
            hdrs.update({"User-Agent": "splitbench", "Accept": "*/*", "Content-Type": "application/json"})
        lower = {k.lower(): k for k in hdrs}
        for k, v in (headers or {}).items():
            if any(c in f"{k}{v}" for c in "\r\n\0") or ":" in k or not k.strip():
                raise InputError(f"bad HTTP header {k!r}: names and values may not contain CR, LF or NUL")
            if k.lower() in ("content-length", "transfer-encoding", "connection"):
                continue  # framing belongs to the client
            hdrs.pop(lower.get(k.lower(), k), None)
            hdrs[k] = v
        self.path = path
        self._headers = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()).encode("latin-1")
        self._head = b"POST %s HTTP/1.1\r\n%s" % (path.encode("latin-1"), self._headers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Conn] = []
        self._conns: set[_Conn] = set()
        self._addr: tuple[str, int] | None = None  # the address the last connect reached (skips DNS)
        self.connections_opened = 0
        self.spare = 0       # keep this many idle connections ready (opened in the background, off the send path)
        self.due = float("inf")   # the replayer's next send time (run clock): a read handled after it calls on_due()
        self.on_due: Callable[[], None] | None = None
        self._opening = 0

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def request(self, body: bytes, sink, *, send: float | None = None, timeout_s: float = 600.0,
                      idle_timeout_s: float = 120.0, request_id: str | None = None,
                      headers: dict[str, str] | None = None, path: str | None = None, method: str = "POST") -> None:
        """Send one request (POST to the client's URL unless `method`/`path` say otherwise); `sink` receives the
        response. Raises StreamError on failure (status inside). `request_id` goes out as X-Request-Id (routers use
        it to log phases per request); `headers`: this request's own extra headers (a session's affinity headers)."""
        if send is None:
            send = self.clock()
        conn = self._acquire()
        if self.spare and len(self._idle) + self._opening < self.spare:
            self._top_up()
        if conn is None:
            limit_s = max(0.0, min(timeout_s - (self.clock() - send), idle_timeout_s))
            conn = await self._connect(min(limit_s, self.connect_timeout_s or limit_s))
        fut = self._loop.create_future()
        conn.start(fut, sink, self._request_bytes(body, request_id, headers, path, method), send, timeout_s,
                   idle_timeout_s)
        try:
            await fut
        except asyncio.CancelledError:
            conn.cancel(fut)
            raise

    def start_now(self, body: bytes, sink, *, send: float, timeout_s: float = 600.0, idle_timeout_s: float = 120.0,
                  request_id: str | None = None, headers: dict[str, str] | None = None, path: str | None = None,
                  method: str = "POST") -> asyncio.Future | None:
        """Write the request now on an idle connection, without a task: returns its future, or None when no
        connection is idle (then use request()). The future ends like request(); cancel it with cancel([fut])."""
        conn = self._acquire()
        if self.spare and len(self._idle) + self._opening < self.spare:
            self._top_up()
        if conn is None:
            return None
        fut = self._loop.create_future()
        conn.start(fut, sink, self._request_bytes(body, request_id, headers, path, method), send, timeout_s,
                   idle_timeout_s)
        return fut

    def _request_bytes(self, body: bytes, request_id: str | None, headers: dict[str, str] | None,
                       path: str | None = None, method: str = "POST") -> bytes:
        head = self._head if path is None and method == "POST" else \
            b"%s %s HTTP/1.1\r\n%s" % (method.encode("latin-1"), (path or self.path).encode("latin-1"), self._headers)
        rid = b"X-Request-Id: %s\r\n" % request_id.encode("latin-1") if request_id else b""
        if headers:
            rid += "".join(f"{k}: {v}\r\n" for k, v in headers.items()
                           if not any(c in f"{k}{v}" for c in "\r\n\0")).encode("latin-1", "replace")
        return b"%s%sContent-Length: %d\r\n\r\n%s" % (head, rid, len(body), body)

    def cancel(self, futs) -> None:
        """End these requests now (start_now futures fail with status cancelled; request() tasks are cancelled)."""
        serving = {c.fut: c for c in self._conns if c.fut is not None}
        for f in futs:
            conn = serving.get(f)
            if conn is not None:
                conn.cancel(f)
            else:
                f.cancel()

    async def close(self, timeout_s: float = 2.0) -> None:
        """Close every connection and wait until their sockets are gone."""
        self._idle.clear()
        conns = list(self._conns)
        for c in conns:
            if c.fut is not None:
                c.cancel(c.fut)
            elif c.transport is not None:
                c.transport.close()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=timeout_s)

    async def warm(self, n: int, timeout_s: float = 10.0) -> int:
        """Open up to n idle connections now (before a run starts); returns how many are idle."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        need = max(0, n - len(self._idle))
        self._opening += need
        await asyncio.gather(*(self._open_idle(timeout_s) for _ in range(need)))
        return len(self._idle)

    # ----------------------------------------------------------- internals
    def _top_up(self) -> None:
        for _ in range(self.spare - len(self._idle) - self._opening):
            self._opening += 1
            self._loop.create_task(self._open_idle(5.0))

    async def _open_idle(self, timeout_s: float) -> None:
        """Counted in _opening by the caller; the new connection joins the idle pool (a failure is left to the
        next request, which connects itself and reports it)."""
        try:
            conn = await self._connect(timeout_s)
        except StreamError:
            return
        finally:
            self._opening -= 1
        conn.idle_since = self.clock()
        self._idle.insert(0, conn)   # behind the warm ones: LIFO reuse keeps the busy set small

    def _acquire(self) -> _Conn | None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        idle = self._idle
        while idle:
            c = idle.pop()   # LIFO: the warmest connection; the pool stays as small as the load allows
            if c.transport.is_closing() or self.clock() - c.idle_since > self.keepalive_s:
                c.transport.close()
                continue
            return c
        return None

    async def _connect(self, timeout_s: float) -> _Conn:
        host, port = self._addr or (self.host, self.port)
        try:
            if self.clock_map is not None:
                opening = open_stamped(self._loop, host, port, lambda: _Conn(self), self.clock_map)
            else:
                opening = self._loop.create_connection(lambda: _Conn(self), host, port, ssl=self.ssl,
                                                       server_hostname=self.host if self.https else None)
            transport, conn = await asyncio.wait_for(opening, timeout_s)
        except asyncio.TimeoutError:
            raise StreamError(R.TIMEOUT, f"connecting to {self.host}:{self.port} timed out") from None
        except (OSError, _ssl.SSLError) as e:
            self._addr = None
            raise StreamError(R.ERROR, f"cannot connect to {self.host}:{self.port}: "
                                       f"{type(e).__name__}: {e}"[:ERROR_CHARS]) from None
        peer = transport.get_extra_info("peername")
        if self._addr is None and peer:
            self._addr = (peer[0], peer[1])
        self._conns.add(conn)
        self.connections_opened += 1
        return conn

    def _release(self, conn: _Conn) -> None:
        self._idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if conn in self._idle:   # rare: an idle connection closed by the server
            self._idle.remove(conn)


# ============================================================== the replayer's transport
class LeanTransport(LeanClient):
    """LeanClient behind the replayer's Transport protocol (transport.py): a request goes out on an idle
    connection at once, without a task; only when none is idle does a task connect and send it. Network reads
    that find a send due (due / on_due) send it from the read path."""

    def __init__(self, url: str, headers: dict[str, str] | None, *, clock: Callable[[], float], timeout_s: float,
                 idle_timeout_s: float, spare: int = SPARE_CONNECTIONS):
        super().__init__(url, headers, clock=clock)
        self.timeout_s, self.idle_timeout_s, self._spare = timeout_s, idle_timeout_s, spare

    async def open(self, warm: int) -> None:
        if warm:
            await self.warm(warm)
        self.spare = self._spare

    def start(self, body: bytes, sink, request_id: str, headers: dict[str, str] | None = None) -> asyncio.Future:
        fut = self.start_now(body, sink, send=sink.send, timeout_s=self.timeout_s,
                             idle_timeout_s=self.idle_timeout_s, request_id=request_id, headers=headers)
        if fut is None:
            fut = self._loop.create_task(self._connect_and_send(body, sink, request_id, headers))
        return fut

    async def _connect_and_send(self, body: bytes, sink, request_id: str, headers: dict[str, str] | None) -> None:
        sink.sent(self.clock())   # sent when this task runs: connecting counts in the answer's time, not the lag
        await self.request(body, sink, send=sink.send, timeout_s=self.timeout_s, idle_timeout_s=self.idle_timeout_s,
                           request_id=request_id, headers=headers)

    async def aclose(self) -> None:
        await self.close()
