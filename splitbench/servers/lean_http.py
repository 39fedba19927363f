"""Lean HTTP/1.1 server plumbing on asyncio.Protocol, shared by the stub (stub_lean.py) and the router (router.py):
keep-alive, pipelining, Content-Length request bodies (Expect: 100-continue), whole responses, chunked or
Content-Length streamed responses whose head goes out with the first data (one write), write flow control, handlers
run as tasks (TaskConn)."""
from __future__ import annotations

import asyncio
import json
import time
from http import HTTPStatus

MAX_HEAD_BYTES = 64 * 1024
JSON = b"application/json; charset=utf-8"
EOF_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS: dict[int, bytes] = {}


def reason(status: int) -> bytes:
    """The reason phrase of an HTTP status (b"Error" for one HTTP does not name)."""
    r = _REASONS.get(status)
    if r is None:
        try:
            r = HTTPStatus(status).phrase.encode()
        except ValueError:
            r = b"Error"
        _REASONS[status] = r
    return r


def response(status: int, body: bytes, ctype: bytes = JSON, close: bool = False, version: bytes = b"1.1",
             extra: bytes = b"") -> bytes:
    """A whole response: status line, Content-Type, Content-Length, `extra` header lines (each ending CRLF), body."""
    conn = b"Connection: close\r\n" if close else b""
    return (b"HTTP/%s %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s"
            % (version, status, reason(status), ctype, len(body), extra, conn, body))


def error_body(status: int, message: str, kind: str) -> bytes:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


def header(head: bytes, low: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (b"\\r\\nname:", lower case) in a request head (`low` = head.lower())."""
    i = low.find(name)
    if i < 0:
        return None
    i += len(name)
    j = head.find(b"\r\n", i)
    return head[i:j if j >= 0 else len(head)].strip()


def header_items(head: bytes) -> list[tuple[str, str]]:
    """The (name, value) pairs of a request head, names as sent (latin-1 text)."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        k, sep, v = line.partition(b":")
        if sep:
            out.append((k.strip().decode("latin-1"), v.strip().decode("latin-1")))
    return out


class LeanConn(asyncio.Protocol):
    """One client connection: parses one request at a time (pipelined bytes wait until its response is done) and
    calls handle(); the handler answers with reply(), or begin() then send()... then finish(), or abort()."""
    max_body_bytes = 64 * 2**20
    clock = staticmethod(time.monotonic)     # t_recv of handle(): when the whole request had arrived

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf: bytes | bytearray = b""
        self._scan = 0             # the head's end was not found before this offset of buf
        self._pending: tuple | None = None   # a parsed head whose body is still arriving
        self.busy = False          # a request is being answered
        self.chunked = True        # HTTP/1.1: chunked streams; HTTP/1.0: stream until close
        self.close_after = False
        self.head_only = False
        self._head = b""           # a streamed response's head, written with its first data
        self._framed = True        # the streamed response is chunked (else Content-Length or until close)
        self.streaming = False     # begin() was called for the request being answered
        self.paused = False        # the transport's write buffer is over its high-water mark
        self._drain: asyncio.Future | None = None

    # ------------------------------------------------------------------ to override
    def handle(self, method: bytes, path: bytes, head: bytes, low: bytes, body: bytes, t_recv: float) -> None:
        raise NotImplementedError

    def on_done(self) -> None:
        """A response ended (or was cut): before the connection closes or serves the next request."""

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None
        self._wake_drain()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if not buf:
            self.buf = data
        elif type(buf) is bytes:
            self.buf = bytearray(buf)
            self.buf += data
        else:
            buf += data
        if not self.busy:
            self._next_request()

    # ------------------------------------------------------------------ parsing
    def _next_request(self) -> None:
        if self._pending is None:
            end = self.buf.find(b"\r\n\r\n", self._scan)
            if end < 0:
                self._scan = max(0, len(self.buf) - 3)
                if len(self.buf) > MAX_HEAD_BYTES:
                    self._bad(431, "request head too large")
                return
            if not self._parse_head(end):
                return
        method, path, head, low, end, size = self._pending
        buf = self.buf
        if len(buf) < end + 4 + size:
            return  # the rest of the body is still on its way
        body = bytes(buf[end + 4:end + 4 + size])
        self.buf = buf[end + 4 + size:]
        if type(self.buf) is bytearray and len(self.buf) < 65536:
            self.buf = bytes(self.buf)
        self._pending, self._scan, self.busy = None, 0, True
        self.handle(method, path, head, low, body, self.clock())

    def _parse_head(self, end: int) -> bool:
        """Parse the head ending at `end` into self._pending; False after answering a bad one."""
        head = bytes(self.buf[:end])
        low = head.lower()
        line = head[:head.find(b"\r\n")] if b"\r\n" in head else head
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return self._bad(400, f"bad request line {line[:80]!r}")
        te = header(head, low, b"\r\ntransfer-encoding:")
        if te is not None and te.lower() != b"identity":
            return self._bad(501, "chunked request bodies are not supported: send Content-Length")
        cl = header(head, low, b"\r\ncontent-length:")
        try:
            size = int(cl) if cl else 0
            if size < 0:
                raise ValueError
        except ValueError:
            return self._bad(400, f"bad Content-Length {cl!r}")
        if size > self.max_body_bytes:
            return self._bad(413, "request body too large")
        method, path, version = parts
        conn_hdr = (header(head, low, b"\r\nconnection:") or b"").lower()
        self.chunked = version != b"HTTP/1.0"
        self.close_after = b"close" in conn_hdr or (not self.chunked and b"keep-alive" not in conn_hdr)
        self.head_only = method == b"HEAD"
        self._pending = (method, path, head, low, end, size)
        if size and len(self.buf) < end + 4 + size and b"100-continue" in (header(head, low, b"\r\nexpect:") or b""):
            self.transport.write(_CONTINUE)
        return True

    def _bad(self, status: int, message: str) -> bool:
        self.close_after, self.busy, self.buf, self._pending = True, True, b"", None
        self.reply(status, error_body(status, message, "BadRequestError"))
        return False

    # ------------------------------------------------------------------ answering
    def reply(self, status: int, body: bytes, ctype: bytes = JSON, extra: bytes = b"") -> None:
        """A whole (Content-Length) response; ends the request."""
        if self.transport is None:
            return
        data = response(status, body, ctype, self.close_after, b"1.1" if self.chunked else b"1.0", extra)
        if self.head_only:
            data = data[:data.index(b"\r\n\r\n") + 4]
        self.transport.write(data)
        self._done()

    def begin(self, status: int, ctype: bytes, extra: bytes = b"", length: int | None = None) -> None:
        """Start a streamed response (its head is written with the first send or with finish): chunked, or
        `length` bytes (Content-Length), or on HTTP/1.0 until the connection closes."""
        self.streaming = True
        self._framed = self.chunked and length is None
        if self._framed:
            size = b"Transfer-Encoding: chunked\r\n"
        else:
            size = b"" if length is None else b"Content-Length: %d\r\n" % length
            self.close_after = self.close_after or length is None
        conn = b"Connection: close\r\n" if self.close_after else b""
        self._head = (b"HTTP/%s %d %s\r\nContent-Type: %s\r\n%s%s%s\r\n"
                      % (b"1.1" if self.chunked else b"1.0", status, reason(status), ctype, extra, size, conn))

    def send(self, data: bytes) -> None:
        """One piece of a streamed response, in one write (with the head, the first time); ConnectionError when
        the client is gone."""
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        if self.head_only:
            data = b""
        elif self._framed:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self._head:
            data, self._head = self._head + data, b""
        self.transport.write(data)

    def finish(self, data: bytes = b"") -> None:
        """The end of a streamed response (the last data, the chunked end marker, the head if still unsent)."""
        if self.transport is not None:
            if self.head_only:
                out = self._head
            elif self._framed:
                out = self._head + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else EOF_CHUNK)
            else:
                out = self._head + data
            self._head = b""
            if out:
                self.transport.write(out)
        self._done()

    def write_chunk(self, data: bytes) -> None:
        """One chunk of a stream whose head the caller wrote itself (the stub's ticker)."""
        self.transport.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def end_stream(self, data: bytes = b"") -> None:
        """The last event(s) and the end of such a stream, in one write."""
        if not self.chunked:
            self.close_after = True
        self._framed = self.chunked
        self.finish(data)

    def abort(self) -> None:
        """Cut the connection (a response that cannot be completed)."""
        if self.transport is not None:
            self.transport.abort()

    async def drain(self) -> None:
        """Wait while the write buffer is over its high-water mark; ConnectionError when the client is gone."""
        while self.paused and self.transport is not None:
            self._drain = self.loop.create_future()
            await self._drain
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")

    def _wake_drain(self) -> None:
        w, self._drain = self._drain, None
        if w is not None and not w.done():
            w.set_result(None)

    def _done(self) -> None:
        self.busy = self.streaming = False
        self.on_done()
        if self.transport is None:
            return
        if self.close_after:
            self.transport.close()
        elif self.buf:  # a pipelined request: serve it on the next loop turn
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self.transport is not None and not self.busy and self.buf:
            self._next_request()


class TaskConn(LeanConn):
    """A connection whose server's handle(conn, method, path, head, low, body, t_recv) answers at once (-> None) or
    returns a coroutine, run as the request's task and cancelled when the client leaves. A task that ends without
    an answer gets a 500 (or its started answer is cut). server.conns: the open connections."""

    def __init__(self, server, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.server = server
        self.task: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.conns.add(self)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.server.conns.discard(self)
        if self.task is not None:
            self.task.cancel()

    def handle(self, method: bytes, path: bytes, head: bytes, low: bytes, body: bytes, t_recv: float) -> None:
        coro = self.server.handle(self, method, path, head, low, body, t_recv)
        if coro is not None:
            self.task = self.loop.create_task(coro)
            self.task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        if self.task is not task:
            return      # a later request's task already runs (this one answered before it ended)
        self.task = None
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            self.loop.call_exception_handler({"message": "request handler failed", "exception": exc})
        if self.busy and self.transport is not None:
            if self.streaming:
                self.abort()
            else:
                self.reply(500, error_body(500, f"server error: {type(exc).__name__}" if exc else
                                           "server stopping", "InternalServerError"))
