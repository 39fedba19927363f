"""One lean HTTP/1.1 keep-alive connection (asyncio.Protocol) and its response parser, a small state machine.

Each network read is handed to the request's sink as it is handled (no task switch per chunk); a read that is
exactly one HTTP chunk skips the parser. The pool is http_lean.LeanClient.
"""
from __future__ import annotations

import asyncio

from splitbench.client.outcome import ERROR_CHARS, StreamError
from splitbench.schema import records as R

MAX_HEAD_BYTES = 64 * 1024


# ============================================================== the HTTP/1.1 connection
(_IDLE, _HEAD, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _LENGTH, _UNTIL_CLOSE) = range(8)


class _Conn(asyncio.Protocol):
    """One keep-alive connection serving one request at a time; the response parser is a small state machine."""

    def __init__(self, client):   # client: http_lean.LeanClient
        self.client, self.clock = client, client.clock
        self.transport: asyncio.Transport | None = None
        self.closed = client._loop.create_future()
        self.state, self.buf, self.remaining, self.keep_alive = _IDLE, b"", 0, True
        self.fut: asyncio.Future | None = None
        self.sink = None
        self.timer: asyncio.TimerHandle | None = None
        self.send = self.last_rx = self.idle_since = 0.0
        self.timeout_s = self.idle_timeout_s = 0.0
        self.got_bytes = False

    # ----------------------------------------------------------- asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.client._forget(self)
        if not self.closed.done():
            self.closed.set_result(None)
        if self.fut is None:
            return
        if self.state == _UNTIL_CLOSE:   # body delimited by the end of the connection: a normal end
            self._complete(self.clock())
        else:
            where = "mid-response" if self.got_bytes else "before responding"
            self._fail(StreamError(R.DISCONNECTED, f"server closed the connection {where}"
                                                   + (f" ({exc})" if exc else "")))

    def data_received(self, data: bytes) -> None:
        self.data_received_at(data, self.clock())

    def data_received_at(self, data: bytes, now: float) -> None:
        """A network read; `now` is when it arrived (a kernel stamp on stamped sockets) on the run clock."""
        if self.state == _CHUNK_SIZE and not self.buf and self.fut is not None:
            # fast path: the read is exactly one whole chunk (one SSE event, typically)
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0:
                try:
                    end = eol + 2 + int(data[:eol], 16)
                except ValueError:
                    end = -1
                if end > eol + 2 and len(data) == end + 2 and data.endswith(b"\r\n"):
                    self.last_rx = now
                    try:
                        self.sink.on_body(data[eol + 2:end], now)
                    except StreamError as e:
                        self._fail(e)
                    return
        if self.fut is None:   # bytes nobody asked for: this connection is out of step
            self.keep_alive = False
            self.transport.abort()
            return
        self.last_rx, self.got_bytes = now, True
        if self.buf:
            data, self.buf = self.buf + data, b""
        try:
            self._parse(data, now)
        except StreamError as e:
            self._fail(e)
        except Exception as e:  # a bug or a broken response must fail the request, never the loop
            self._fail(StreamError(R.ERROR, f"bad HTTP response: {type(e).__name__}: {e}"[:ERROR_CHARS]))

    # ----------------------------------------------------------- request lifecycle
    def start(self, fut: asyncio.Future, sink, data: bytes, send: float, timeout_s: float,
              idle_timeout_s: float) -> None:
        self.fut, self.sink, self.send, self.last_rx = fut, sink, send, send
        self.timeout_s, self.idle_timeout_s, self.got_bytes = timeout_s, idle_timeout_s, False
        self.state, self.buf = _HEAD, b""
        self.transport.write(data)
        elapsed = self.clock() - send
        self.timer = self.client._loop.call_later(max(0.0, min(timeout_s - elapsed, idle_timeout_s)),
                                                  self._check_timeout)

    def cancel(self, fut: asyncio.Future) -> None:
        """The request's task was cancelled: drop the connection if it still serves that request."""
        if self.fut is fut:
            self._fail(StreamError(R.CANCELLED, "cancelled"))

    def _check_timeout(self) -> None:
        self.timer = None
        if self.fut is None:
            return
        now = self.clock()
        total_left = self.timeout_s - (now - self.send)
        idle_left = self.idle_timeout_s - (now - self.last_rx)
        if total_left <= 0 or idle_left <= 0:
            self._fail(StreamError(R.TIMEOUT, f"no response within limits (total {self.timeout_s:g}s, "
                                              f"idle {self.idle_timeout_s:g}s)"))
        else:  # bytes arrived meanwhile: one lazy timer instead of one per chunk
            self.timer = self.client._loop.call_later(min(total_left, idle_left), self._check_timeout)

    def _complete(self, now: float) -> None:
        fut, sink = self.fut, self.sink
        self.fut = self.sink = None
        self.state = _IDLE
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            sink.on_end(now)
        except StreamError as e:
            self.keep_alive = False
            if not fut.done():
                fut.set_exception(e)
        t = self.transport
        if self.keep_alive and not self.buf and not t.is_closing() and t.get_write_buffer_size() == 0:
            self.idle_since = now
            self.client._release(self)
        else:
            t.close()
        if not fut.done():
            fut.set_result(None)

    def _fail(self, exc: StreamError) -> None:
        fut = self.fut
        self.fut = self.sink = None
        self.state, self.keep_alive = _IDLE, False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.abort()   # never reuse a connection in an unknown state
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    # ----------------------------------------------------------- response parsing
    def _parse(self, data: bytes, now: float) -> None:
        pos, n, state, body = 0, len(data), self.state, []
        while True:
            if state == _CHUNK_SIZE:
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        raise StreamError(R.ERROR, "bad HTTP response: chunk-size line too long")
                    self.buf = data[pos:]
                    break
                size = int(data[pos:eol].split(b";", 1)[0], 16)
                if size < 0:
                    raise ValueError(f"negative chunk size {size}")
                pos = eol + 2
                if size == 0:
                    state = _TRAILERS
                else:
                    self.remaining, state = size, _CHUNK_DATA
            elif state == _CHUNK_DATA or state == _LENGTH:
                end = pos + self.remaining
                if end > n:
                    if pos < n:
                        body.append(data[pos:] if pos else data)
                    self.remaining -= n - pos
                    break
                body.append(data[pos:end])
                pos, self.remaining = end, 0
                if state == _LENGTH:
                    self.buf = data[pos:]   # leftover bytes after the body: the connection is not reusable
                    return self._finish(body, now)
                state = _CHUNK_END
            elif state == _CHUNK_END:
                if n - pos < 2:
                    self.buf = data[pos:]
                    break
                if data[pos:pos + 2] != b"\r\n":
                    raise StreamError(R.ERROR, "bad HTTP response: chunk not followed by CRLF")
                pos += 2
                state = _CHUNK_SIZE
            elif state == _UNTIL_CLOSE:
                if pos < n:
                    body.append(data[pos:])
                break
            else:   # the head or the trailers: once per response
                pos, state = self._head_or_trailers(data, pos, state)
                if pos < 0:
                    break
                if state == _IDLE:
                    return self._finish(body, now)
        self.state = state
        if body and self.fut is not None:
            self.sink.on_body(body[0] if len(body) == 1 else b"".join(body), now)

    def _head_or_trailers(self, data: bytes, pos: int, state: int) -> tuple[int, int]:
        """Parse the head (status line + headers) or the trailers from pos: (new pos, next state); pos -1 when the
        rest waits in self.buf for more bytes; state _IDLE when the response ended (the rest is in self.buf)."""
        if state == _TRAILERS:
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                self.buf = data[pos:]
                return -1, state
            if eol != pos:
                return eol + 2, state
            self.buf = data[eol + 2:]
            return eol + 2, _IDLE
        if state != _HEAD:
            raise StreamError(R.ERROR, "bad HTTP response: bytes after the end of the response")
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            if len(data) - pos > MAX_HEAD_BYTES:
                raise StreamError(R.ERROR, "bad HTTP response: header block too large")
            self.buf = data[pos:]
            return -1, state
        state = self._head(data[pos:end])
        if state == _IDLE:
            self.buf = data[end + 4:]
        return end + 4, state

    def _finish(self, body: list, now: float) -> None:
        if body:
            self.sink.on_body(body[0] if len(body) == 1 else b"".join(body), now)
        self._complete(now)

    def _head(self, head: bytes) -> int:
        """Parse a status line + headers; returns the body state (_HEAD again after a 1xx, _IDLE if no body)."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise StreamError(R.ERROR, f"bad HTTP response: status line {lines[0][:80]!r}")
        status, reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
        headers: dict[str, str] = {}
        for ln in lines[1:]:
            name, sep, value = ln.partition(":")
            if not sep:
                raise StreamError(R.ERROR, f"bad HTTP response: header line {ln[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if 100 <= status < 200:
            return _HEAD
        conn = headers.get("connection", "").lower()
        self.keep_alive = "close" not in conn and (parts[0] != "HTTP/1.0" or "keep-alive" in conn)
        enc = headers.get("content-encoding", "identity").lower()
        if enc not in ("identity", ""):
            raise StreamError(R.ERROR, f"bad HTTP response: unsupported content-encoding {enc!r}")
        self.sink.on_head(status, reason, headers)
        if status in (204, 304):
            return _IDLE
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return _CHUNK_SIZE
        if "content-length" in headers:
            self.remaining = int(headers["content-length"])
            return _LENGTH if self.remaining > 0 else _IDLE
        self.keep_alive = False
        return _UNTIL_CLOSE
