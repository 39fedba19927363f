"""A scripted transport for tests, after httpx's MockTransport: handler(MockRequest) -> MockResponse says what the
server answers and when (status, first-token delay, chunk gaps and tokens, then done, a cut, a hang or an exception);
times run on the replayer's clock, a FakeClock in tests, so a replay needs no real time and no sockets."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from splitbench.client.sink import RecordSink
from splitbench.timing import Clock

try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

SSE_HEADERS = {"content-type": "text/event-stream"}
_EVENT = b'data: {"choices":[{"index":0,"text":" x"}],"usage":{"prompt_tokens":%d,"completion_tokens":%d}}\n\n'
_EVENT_IDS = (b'data: {"choices":[{"index":0,"text":" x","token_ids":%s}],'
              b'"usage":{"prompt_tokens":%d,"completion_tokens":%d}}\n\n')
_LAST = b'data: {"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d}}\n\ndata: [DONE]\n\n'


@dataclass
class MockRequest:
    index: int          # 0, 1, ... in send order
    request_id: str
    body: bytes
    send_s: float       # when it left, on the replayer's clock
    headers: dict[str, str] = field(default_factory=dict)   # the request's own extra headers

    def json(self) -> dict:
        return _loads(self.body)


@dataclass
class MockResponse:
    """The answer: after delay_s the head (status None: no answer at all), then each chunk (gap after the previous
    event, tokens), then `end` after end_delay_s: "done" (usage and [DONE]), "eof" (the stream stops without
    [DONE]), "hang" (nothing more: the request's timeout ends it) or an exception the request fails with."""
    status: int | None = 200
    delay_s: float = 0.0
    chunks: Sequence[tuple[float, int]] = ()
    end: str | BaseException = "done"
    end_delay_s: float = 0.0
    body: bytes = b'{"error": {"message": "mock error"}}'   # the body of a non-200 answer
    prompt_tokens: int | None = None                        # None: the length of the request's token-id prompt
    token_ids: Sequence[int] | None = None   # the output token ids, each chunk carrying its own (return_token_ids)
    headers: dict[str, str] = field(default_factory=dict)   # response headers besides the SSE content type

    @classmethod
    def stream(cls, tokens: int, ttft_s: float, tbt_s: float, **kw) -> "MockResponse":
        """`tokens` one-token chunks: the first ttft_s after the send, then one every tbt_s."""
        return cls(delay_s=ttft_s, chunks=[(0.0, 1)] + [(tbt_s, 1)] * (tokens - 1), **kw)


class MockTransport:
    """The Transport protocol (transport.py) answered by `handler`. A handler that raises fails its request with
    that exception at once; one that calls clock.advance() holds the loop that long (a blocking client). Reads are
    stamped with their scheduled arrival, as the lean transport's kernel stamps are."""

    def __init__(self, handler: Callable[[MockRequest], MockResponse], clock: Clock, *, timeout_s: float = 600.0,
                 idle_timeout_s: float = 120.0):
        self.handler, self.clock = handler, clock
        self.timeout_s, self.idle_timeout_s = timeout_s, idle_timeout_s
        self.due, self.on_due = float("inf"), None
        self.requests: list[MockRequest] = []
        self.warmed: int | None = None   # what open() was asked for
        self.closed = False
        self._live: dict[asyncio.Future, _Exchange] = {}

    async def open(self, warm: int) -> None:
        self.warmed = warm

    def start(self, body: bytes, sink: RecordSink, request_id: str,
              headers: dict[str, str] | None = None) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        req = MockRequest(len(self.requests), request_id, body, sink.send, dict(headers or {}))
        self.requests.append(req)
        try:
            resp = self.handler(req)
        except Exception as e:
            fut.set_exception(e)
            return fut
        self._live[fut] = _Exchange(self, fut, sink, resp, req)
        return fut

    def cancel(self, futs: Iterable[asyncio.Future]) -> None:
        for f in futs:
            ex = self._live.pop(f, None)
            if ex is not None:
                ex.stop()
            f.cancel()

    async def aclose(self) -> None:
        self.cancel(list(self._live))
        self.closed = True


class _Exchange:
    """One request's scripted answer: one timer at a time, each event at its absolute time on the clock."""

    def __init__(self, mock: MockTransport, fut: asyncio.Future, sink: RecordSink, resp: MockResponse,
                 req: MockRequest):
        self.mock, self.fut, self.sink, self.resp = mock, fut, sink, resp
        self.loop = asyncio.get_running_loop()
        self.send = self.last_rx = req.send_s
        self.tokens, self.step, self.handle = 0, -1, None
        self.prompt = resp.prompt_tokens if resp.prompt_tokens is not None else _prompt_len(req)
        self._at(self.send + resp.delay_s)

    def _at(self, t: float) -> None:
        """The next event at t, unless the request's timeout comes first."""
        m = self.mock
        deadline = min(self.send + m.timeout_s, self.last_rx + m.idle_timeout_s)
        due, call = (t, self._event) if t <= deadline else (deadline, self._timeout)
        self.handle = self.loop.call_later(due - m.clock.now(), call, due)

    def _event(self, t: float) -> None:
        resp, sink = self.resp, self.sink
        self.last_rx = t
        try:
            if self.step < 0:
                if resp.status is None:        # no answer: straight to the end (a hang, a cut, an exception)
                    self.step = len(resp.chunks) - 1
                else:
                    self._head(t)
                    if resp.status != 200:
                        return self._finish(t)
            elif self.step < len(resp.chunks):
                k = resp.chunks[self.step][1]
                self.tokens += k
                data = _EVENT % (self.prompt, self.tokens) if resp.token_ids is None else _EVENT_IDS % (
                    str(list(resp.token_ids[self.tokens - k:self.tokens])).encode(), self.prompt, self.tokens)
                if self.step == len(resp.chunks) - 1 and resp.end == "done" and not resp.end_delay_s:
                    return self._finish(t, data + _LAST % (self.prompt, self.tokens))   # one read: chunk and end
                sink.on_body(data, t)
            else:
                return self._end(t)
        except Exception as e:   # the sink rejected what arrived: the request fails with it
            return self._fail(e)
        self.step += 1
        if self.step < len(resp.chunks):
            self._at(t + resp.chunks[self.step][0])
        elif resp.end != "hang":
            self._at(t + resp.end_delay_s)
        else:
            self._at(float("inf"))

    def _head(self, t: float) -> None:
        self.sink.on_head(self.resp.status, "OK" if self.resp.status == 200 else "Mock Error",
                          {**SSE_HEADERS, **self.resp.headers})
        if self.resp.status != 200:
            self.sink.on_body(self.resp.body, t)

    def _end(self, t: float) -> None:
        end = self.resp.end
        if isinstance(end, BaseException):
            return self._fail(end)
        if self.resp.status is None:
            return self._fail(ConnectionResetError("mock: connection closed before any answer"))
        self._finish(t, _LAST % (self.prompt, self.tokens) if end == "done" else b"")

    def _finish(self, t: float, data: bytes = b"") -> None:
        self.mock._live.pop(self.fut, None)
        try:
            if data:
                self.sink.on_body(data, t)
            self.sink.on_end(t)
        except Exception as e:
            return self._fail(e)
        if not self.fut.done():
            self.fut.set_result(None)

    def _timeout(self, t: float) -> None:
        self._fail(TimeoutError(f"mock: no answer within limits at {t:g}"))

    def _fail(self, exc: BaseException) -> None:
        self.mock._live.pop(self.fut, None)
        if not self.fut.done():
            self.fut.set_exception(exc)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


def _prompt_len(req: MockRequest) -> int:
    prompt = req.json().get("prompt")
    return len(prompt) if isinstance(prompt, list) else 0
