"""The lean stub server (default): HTTP/1.1 on lean_http.py (keep-alive, Content-Length bodies, chunked SSE)
and ONE shared ticker (stub_ticker.py) that emits every due chunk of every stream in deadline order, so the server
costs about one heap operation and one transport.write per chunk. Behaviour matches stub_aiohttp.py byte for byte."""
from __future__ import annotations

import asyncio
import gc
from collections import deque
import json
import random
import time
import uuid

try:
    from orjson import loads
except ImportError:  # pragma: no cover - orjson is a dependency; json is only slower
    from json import loads

from splitbench.servers.stub import (
    DONE,
    GARBAGE,
    TOKEN,
    Frames,
    Lateness,
    PrefixCache,
    StubConfig,
    answer_ids,
    cache_prompt,
    count_input_tokens,
    metrics_text,
    new_counters,
    prompt_details,
    stats,
    whole_completion,
)
from splitbench.servers.lean_http import LeanConn, error_body, header
from splitbench.servers.stub_ticker import Call, Stream, Ticker

MAX_BODY_BYTES = 64 * 2**20
GC_PERIOD_S = 1.0     # manage_gc: young-generation collections this often
_SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")
_SSE_HEAD_10 = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"


class LeanStub:
    """Server state shared by the connections: config, counters, lateness histogram, the ticker."""

    def __init__(self, cfg: StubConfig, loop: asyncio.AbstractEventLoop):
        self.cfg, self.loop = cfg, loop
        self.rng = random.Random(cfg.seed)       # --fail-rate only: its sequence must not depend on anything else
        self.ids = random.Random()                # response ids (no syscall per request, unlike uuid4)
        self.n = new_counters()
        self.cache = PrefixCache(cfg.prefix_block_tokens, cfg.prefix_cache_blocks)
        self.lateness = Lateness()
        self.created = int(time.time())
        self.full_text = TOKEN * cfg.tokens_per_chunk
        self.gap_s = cfg.tokens_per_chunk * cfg.tpot_s
        self.ticker = Ticker(self, loop, cfg.tick_s)
        self.conns: set[_Conn] = set()
        self.active = 0                           # cfg.max_concurrency: requests holding a slot
        self.waiting: deque = deque()             # ... and those queued for one (FIFO)

    def admit(self, conn: _Conn, chat: bool, head: bytes, low: bytes, body: bytes, t_recv: float) -> None:
        """A generation request takes a free slot now (its time to first token counts from here) or queues."""
        if self.cfg.max_concurrency and self.active >= self.cfg.max_concurrency:
            self.waiting.append((conn, chat, head, low, body))
            return
        self.active += 1
        conn.slot = True
        self._generate(conn, chat, head, low, body, t_recv)

    def release(self) -> None:
        """A slot's response ended (or its client left): the oldest queued request still connected takes it."""
        self.active -= 1
        while self.waiting:
            conn, chat, head, low, body = self.waiting.popleft()
            if conn.transport is not None:
                return self.admit(conn, chat, head, low, body, time.monotonic())

    def end_fault(self, s: Stream) -> None:
        """Chunk k == fault_at of a disconnect/garbage stream: drop the connection or send garbage and end."""
        self.n["running"] -= 1
        if s.kind == "disconnect":
            s.conn.transport.abort()
        else:
            s.conn.end_stream(GARBAGE + DONE)

    # ----------------------------------------------------------------- requests
    def handle(self, conn: _Conn, method: bytes, path: bytes, head: bytes, low: bytes, body: bytes,
               t_recv: float) -> None:
        path = path.split(b"?", 1)[0]
        if path in (b"/v1/completions", b"/v1/chat/completions"):
            if method != b"POST":
                return conn.reply(405, error_body(405, "method not allowed", "BadRequestError"))
            return self.admit(conn, path == b"/v1/chat/completions", head, low, body, t_recv)
        if method not in (b"GET", b"HEAD"):
            return conn.reply(405, error_body(405, "method not allowed", "BadRequestError"))
        if path == b"/health":
            return conn.reply(200, b"")
        if path == b"/v1/models":
            m = self.cfg.model
            return conn.reply(200, json.dumps({"object": "list", "data": [
                {"id": m, "object": "model", "created": self.created, "owned_by": "splitbench-stub", "root": m,
                 "parent": None, "max_model_len": None, "permission": []}]}).encode())
        if path == b"/metrics":
            text = metrics_text(self.cfg.model, self.n, self.lateness, self.cfg.kv_connector).encode()
            if b"reset=lateness" in head.split(b"\r\n", 1)[0]:
                self.lateness.reset()
            return conn.reply(200, text, b"text/plain; charset=utf-8")
        return conn.reply(404, error_body(404, "not found", "NotFoundError"))

    def _generate(self, conn: _Conn, chat: bool, head: bytes, low: bytes, body_bytes: bytes, t_recv: float):
        cfg, n = self.cfg, self.n
        n["requests"] += 1
        try:
            body = loads(body_bytes)
            n_out = body.get("max_tokens") or body.get("max_completion_tokens") or cfg.default_max_tokens
            if type(n_out) is not int or n_out < 1:
                raise ValueError(f"max_tokens must be an integer >= 1, got {n_out!r}")
            n_in = count_input_tokens(body.get("messages") if chat else body.get("prompt"))
        except (ValueError, TypeError, AttributeError) as e:
            return conn.reply(400, error_body(400, f"bad request: {e}", "BadRequestError"))
        fault = (header(head, low, b"\r\nx-stub-fault:") or b"").decode("latin-1")
        kind, _, arg = fault.partition(":")
        if kind not in ("", "status", "disconnect", "hang", "garbage") or not (arg.isdigit() or not arg):
            return conn.reply(400, error_body(400, f"bad X-Stub-Fault {fault!r} (status:CODE, disconnect:K, hang, "
                                                    "garbage[:K])", "BadRequestError"))
        if kind == "status" or (not kind and cfg.fail_rate and self.rng.random() < cfg.fail_rate):
            n["faults"] += 1
            code = int(arg or 500)
            return conn.reply(code, error_body(code, "injected fault (X-Stub-Fault or --fail-rate)",
                                                "InternalServerError"))
        if kind:
            n["faults"] += 1
        if kind == "hang":
            return  # nothing more is sent: the connection stays busy until the client gives up
        fault_at = int(arg or 0) if kind in ("disconnect", "garbage") else -1
        kv = body.get("kv_transfer_params") if cfg.kv_connector != "none" else None
        cached = cache_prompt(self.cache, n, body.get("messages") if chat else body.get("prompt"), kv)
        if isinstance(kv, dict) and kv.get("do_remote_decode"):  # P/D prefill instance
            return self._kv_prefill_only(conn, chat, body, n_in, t_recv, head, low, cached)
        if isinstance(kv, dict) and kv.get("do_remote_prefill"):  # P/D decode instance: the KV arrives instead
            n["remote_decode"] += 1                               # of a prefill: kv_transfer_s replaces ttft_s
            t_recv += cfg.kv_transfer_s - cfg.ttft_s
        n["prompt"] += n_in
        n["running"] += 1
        model = str(body.get("model") or cfg.model)
        tpc = cfg.tokens_per_chunk
        ids, prompt_ids = answer_ids(body, chat, n_out)
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            usage = bool(opts.get("include_usage"))
            frames = Frames(chat, model, n_in, usage, usage and bool(opts.get("continuous_usage_stats")),
                            self.full_text, f"{self.ids.getrandbits(128):032x}", ids, prompt_ids, cached)
            conn.transport.write(_SSE_HEAD if conn.chunked else _SSE_HEAD_10)
            s = Stream(conn, frames, n_out, t_recv + cfg.ttft_s, kind, fault_at)
            conn.stream = s
            return self.ticker.add(s.first, s)
        last = t_recv + cfg.ttft_s + (-(-n_out // tpc) - 1) * tpc * cfg.tpot_s
        self.ticker.add(last, Call(self._whole, conn, chat, model, n_in, n_out, kind, ids, prompt_ids, cached))

    def _whole(self, conn: _Conn, chat: bool, model: str, n_in: int, n_out: int, kind: str, ids=None,
               prompt_ids=None, cached=None) -> None:
        self.n["running"] -= 1
        if conn.transport is None:
            return
        if kind == "disconnect":
            return conn.transport.abort()
        if kind == "garbage":
            return conn.reply(200, b'{"id": "garbage", "choices": [')
        self.n["generation"] += n_out
        self.n["success"] += 1
        conn.reply(200, json.dumps(whole_completion(chat, model, n_in, n_out, ids, prompt_ids, cached)).encode())

    def _kv_prefill_only(self, conn, chat, body, n_in, t_recv, head, low, cached=None) -> None:
        """vLLM NixlConnector's prefill side: after ttft_s, one token, not streamed, with the kv_transfer_params
        the decode instance needs to pull the KV cache (fake block ids, this server's address)."""
        self.n["prefill_only"] += 1
        self.n["prompt"] += n_in
        rid = (header(head, low, b"\r\nx-request-id:") or b"").decode("latin-1") or uuid.uuid4().hex
        self.ticker.add(t_recv + self.cfg.ttft_s, Call(self._kv_answer, conn, chat, body, n_in, rid, cached))

    def _kv_answer(self, conn, chat, body, n_in, rid, cached=None) -> None:
        if conn.transport is None:
            return
        n_blocks, first_block = -(-max(n_in, 1) // 16), self.n["kv_blocks"]
        self.n["kv_blocks"] += n_blocks
        self.n["generation"] += 1
        self.n["success"] += 1
        host, port = (conn.transport.get_extra_info("sockname") or ("127.0.0.1", 0))[:2]
        kv = {"do_remote_prefill": True, "do_remote_decode": False,
              "remote_block_ids": list(range(first_block, first_block + n_blocks)),
              "remote_engine_id": f"stub-{port}", "remote_request_id": rid, "remote_host": host,
              "remote_port": port, "tp_size": 1}
        if cached is not None:   # vLLM 0.32: the decode instance reports this as its cached_tokens
            kv["remote_prefill_cached_tokens"] = cached
        text = TOKEN.decode()
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason="length", stop_reason=None)
        conn.reply(200, json.dumps({
            "id": ("chatcmpl-" if chat else "cmpl-") + rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": str(body.get("model") or self.cfg.model), "choices": [choice],
            "usage": {"prompt_tokens": n_in, "total_tokens": n_in + 1, "completion_tokens": 1,
                      "prompt_tokens_details": prompt_details(cached)},
            "kv_transfer_params": kv}).encode())


class _Conn(LeanConn):
    """One client connection (lean_http.LeanConn) of the stub: its stream and its max_concurrency slot."""
    max_body_bytes = MAX_BODY_BYTES

    def __init__(self, srv: LeanStub):
        super().__init__(srv.loop)
        self.srv = srv
        self.stream: Stream | None = None
        self.slot = False          # holds one of the server's max_concurrency slots

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.srv.conns.add(self)

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)   # the ticker drops this connection's stream at its next deadline
        if self.stream is not None:
            self.stream.fast = False
            self.stream = None     # no reference cycles: the stub may run with the cyclic GC off
        self.srv.conns.discard(self)
        self._free_slot()

    def handle(self, method: bytes, path: bytes, head: bytes, low: bytes, body: bytes, t_recv: float) -> None:
        self.srv.handle(self, method, path, head, low, body, t_recv)

    def end_stream(self, data: bytes = b"") -> None:
        self.stream = None
        super().end_stream(data)

    def on_done(self) -> None:
        self._free_slot()

    def _free_slot(self) -> None:
        if self.slot:
            self.slot = False
            self.srv.release()


def _young_gc(loop: asyncio.AbstractEventLoop) -> None:
    gc.collect(1)   # young generations only: ~0.1 ms, where an automatic full collection stalls tens of ms
    loop.call_later(GC_PERIOD_S, _young_gc, loop)


async def serve_lean(cfg: StubConfig, host: str, port: int, stop: asyncio.Event, on_ready=None,
                     manage_gc: bool = False, reuse_port: bool = False) -> dict:
    """Serve until `stop` is set; on_ready(port) once listening. -> stats() at exit. manage_gc (a process of its
    own only): freeze what exists, turn the automatic cyclic GC off and collect young objects every second.
    reuse_port: SO_REUSEPORT, so several stub processes share one port (the kernel spreads connections)."""
    loop = asyncio.get_running_loop()
    srv = LeanStub(cfg, loop)
    if manage_gc:
        gc.collect()
        gc.freeze()
        gc.disable()
        loop.call_later(GC_PERIOD_S, _young_gc, loop)
    server = await loop.create_server(lambda: _Conn(srv), host, port, backlog=4096, reuse_address=True,
                                      reuse_port=reuse_port or None)
    try:
        if on_ready is not None:
            on_ready(server.sockets[0].getsockname()[1])
        await stop.wait()
    finally:
        server.close()
        srv.ticker.close()
        for c in list(srv.conns):
            if c.transport is not None:
                c.transport.abort()
        await asyncio.sleep(0)
    return stats(srv.n, srv.lateness)
