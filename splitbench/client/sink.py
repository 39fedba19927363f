"""Response -> RequestRecord for every replayer transport: SSE events to token chunks (usage/continuous stats, or
one token per non-empty delta), non-streamed JSON answers, error bodies. The hot path only appends each read."""
from __future__ import annotations

from typing import Any

from splitbench.client.outcome import ERROR_BODY_BYTES, StreamError, answer_status, error_text
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord

try:
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    from json import loads as _loads

_SSE, _JSON, _ERR = 0, 1, 2


def cached_tokens(usage: dict) -> int | None:
    """usage.prompt_tokens_details.cached_tokens (vLLM with --enable-prompt-tokens-details, OpenAI; in a vLLM stream
    only the final usage chunk carries it), else None."""
    details = usage.get("prompt_tokens_details")
    v = details.get("cached_tokens") if isinstance(details, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class RecordSink:
    """Turns one response into RequestRecord fields. Transports call on_head, on_body(data, now) per network
    read, then on_end(now); `now` is on the same clock as `send` and `t0`. on_body/on_end raise StreamError.
    `ids`: a list to collect the output token ids into (vLLM's `return_token_ids` answers), None: not kept."""
    __slots__ = ("rec", "t0", "send", "mode", "buf", "prev", "counted", "done", "usage", "reason", "_last_now",
                 "reads", "end", "ids")

    def __init__(self, rec: RequestRecord, t0: float, send: float):
        self.rec, self.t0, self.send = rec, t0, send
        self.mode, self.buf, self.prev, self.counted, self.done, self.usage = _SSE, b"", 0, 0, False, None
        self.reason = ""
        self._last_now = -1.0
        self.reads: list = []   # SSE reads as (data, now), parsed at the end: the hot path only appends
        self.end: float | None = None   # on_end's `now`: when the response's last byte arrived
        self.ids: list[int] | None = None

    def sent(self, now: float) -> None:
        """The request left at `now` (a transport that sends from a task of its own stamps it there)."""
        self.send = now
        self.rec.actual_send_s = now - self.t0

    def on_head(self, status: int, reason: str, headers: Any) -> None:
        self.rec.http_status, self.reason = status, reason
        if status != 200:
            self.mode = _ERR
        elif not (headers.get("content-type") or "").startswith("text/event-stream"):
            self.mode = _JSON

    def on_body(self, data: bytes, now: float) -> None:
        if self.mode == _SSE:
            self.reads.append((data, now))
        elif self.mode == _JSON or len(self.buf) < ERROR_BODY_BYTES:
            self.buf += data

    def on_end(self, now: float) -> None:
        self.end = now
        rec = self.rec
        if self.mode == _ERR:
            rec.status = answer_status(rec.http_status)
            rec.error = error_text(self.buf[:ERROR_BODY_BYTES]) or self.reason or f"HTTP {rec.http_status}"
        elif self.mode == _JSON:  # non-streaming server: the whole answer is one chunk
            try:
                msg = _loads(self.buf)
            except ValueError:
                raise StreamError(R.ERROR, f"malformed JSON response: {self.buf[:80]!r}") from None
            usage = (msg.get("usage") if isinstance(msg, dict) else None) or {}
            rec.actual_input_tokens = usage.get("prompt_tokens")
            rec.actual_output_tokens = usage.get("completion_tokens")
            rec.cached_input_tokens = cached_tokens(usage)
            if self.ids is not None:
                self._keep_ids(msg.get("choices"))
            rec.first_token_s = rec.last_token_s = now - self.t0
            rec.chunk_offsets_s.append(now - self.send)
            rec.chunk_tokens.append(rec.actual_output_tokens or 1)
            rec.status = answer_status(rec.http_status)
        else:
            self._parse_reads()
            self.partial()
            rec.status = answer_status(rec.http_status, self.done)
            if not self.done:
                rec.error = "stream ended without [DONE]"

    def partial(self) -> None:
        """Token totals from what arrived so far (also called when a request fails mid-stream)."""
        if self.mode != _SSE or self.rec.http_status is None:
            return
        if self.reads:   # a failed request: what parses of its reads still counts
            try:
                self._parse_reads()
            except StreamError:
                pass
        u = self.usage
        if u:
            self.rec.actual_input_tokens = u.get("prompt_tokens")
            self.rec.actual_output_tokens = u.get("completion_tokens")
            self.rec.cached_input_tokens = cached_tokens(u)
        else:
            self.rec.actual_output_tokens = self.counted

    def _parse_reads(self) -> None:
        reads, self.reads = self.reads, []
        for data, now in reads:
            buf = self.buf + data if self.buf else data
            if b"\r" in buf:
                buf = buf.replace(b"\r\n", b"\n")
            events = buf.split(b"\n\n")
            self.buf = events.pop()
            for ev in events:
                if ev[:5] == b"data:" and b"\n" not in ev:
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
        if self.ids is not None:
            self._keep_ids(choices)
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

    def _keep_ids(self, choices) -> None:
        """The first choice's output token ids (`token_ids`: this chunk's delta) onto self.ids."""
        c = choices[0] if isinstance(choices, list) and choices and type(choices[0]) is dict else None
        ids = c.get("token_ids") if c is not None else None
        if isinstance(ids, list):
            self.ids.extend(ids)
