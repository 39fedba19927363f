"""The aiohttp stub server (`--server aiohttp`): one timer and one write per chunk. Kept for comparison with the
lean server (stub_lean.py), which it matches byte for byte; see benchmarks/stub_capacity.py."""
from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

from aiohttp import web

from splitbench.servers.stub import (
    DONE,
    GARBAGE,
    SSE_HEADERS,
    TOKEN,
    Frames,
    Lateness,
    Pacer,
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


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


class StubServer:
    """The aiohttp application and its counters."""

    def __init__(self, cfg: StubConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.n = new_counters()
        self.cache = PrefixCache(cfg.prefix_block_tokens, cfg.prefix_cache_blocks)
        self.lateness = Lateness()
        self.created = int(time.time())
        self.text = [TOKEN * i for i in range(cfg.tokens_per_chunk + 1)]  # text of a chunk of i tokens
        self.slots: asyncio.Semaphore | None = None   # cfg.max_concurrency (made on the serving loop)

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        m = self.cfg.model
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": self.created, "owned_by": "splitbench-stub", "root": m,
             "parent": None, "max_model_len": None, "permission": []}]})

    async def metrics(self, request: web.Request) -> web.Response:
        text = metrics_text(self.cfg.model, self.n, self.lateness, self.cfg.kv_connector)
        if request.query.get("reset") == "lateness":
            self.lateness.reset()
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """cfg.max_concurrency: a request waits for a slot (FIFO) and its time to first token counts from then."""
        if not self.cfg.max_concurrency:
            return await self._generate_now(request, chat)
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.cfg.max_concurrency)
        async with self.slots:
            return await self._generate_now(request, chat)

    async def _generate_now(self, request: web.Request, chat: bool) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        t_recv = loop.time()
        self.n["requests"] += 1
        try:
            body = json.loads(await request.read())
            n_out = body.get("max_tokens") or body.get("max_completion_tokens") or self.cfg.default_max_tokens
            if type(n_out) is not int or n_out < 1:
                raise ValueError(f"max_tokens must be an integer >= 1, got {n_out!r}")
            n_in = count_input_tokens(body.get("messages") if chat else body.get("prompt"))
        except (ValueError, TypeError, AttributeError) as e:
            return _error(400, f"bad request: {e}", "BadRequestError")
        fault = request.headers.get("X-Stub-Fault", "")
        kind, _, arg = fault.partition(":")
        if kind not in ("", "status", "disconnect", "hang", "garbage") or not (arg.isdigit() or not arg):
            return _error(400, f"bad X-Stub-Fault {fault!r} (status:CODE, disconnect:K, hang, garbage[:K])",
                          "BadRequestError")
        if kind == "status" or (not kind and self.cfg.fail_rate and self.rng.random() < self.cfg.fail_rate):
            self.n["faults"] += 1
            return _error(int(arg or 500), "injected fault (X-Stub-Fault or --fail-rate)", "InternalServerError")
        if kind:
            self.n["faults"] += 1
        if kind == "hang":
            await loop.create_future()  # until the client gives up (handler cancellation) or shutdown
        fault_at = int(arg or 0) if kind in ("disconnect", "garbage") else -1
        kv = body.get("kv_transfer_params") if self.cfg.kv_connector != "none" else None
        cached = cache_prompt(self.cache, self.n, body.get("messages") if chat else body.get("prompt"), kv)
        if isinstance(kv, dict) and kv.get("do_remote_decode"):  # P/D prefill instance: see _kv_prefill_only
            return await self._kv_prefill_only(request, chat, body, n_in, t_recv, cached)
        if isinstance(kv, dict) and kv.get("do_remote_prefill"):  # P/D decode instance: the KV arrives instead
            self.n["remote_decode"] += 1                         # of a prefill: kv_transfer_s replaces ttft_s
            t_recv += self.cfg.kv_transfer_s - self.cfg.ttft_s
        self.n["prompt"] += n_in
        self.n["running"] += 1
        try:
            model = str(body.get("model") or self.cfg.model)
            if body.get("stream"):
                return await self._stream(request, body, chat, model, n_in, n_out, t_recv, kind, fault_at, cached)
            return await self._whole(request, body, chat, model, n_in, n_out, t_recv, kind, cached)
        finally:
            self.n["running"] -= 1

    async def _kv_prefill_only(self, request, chat, body, n_in, t_recv, cached=None):
        """vLLM NixlConnector's prefill side: after ttft_s, one token, not streamed, with the kv_transfer_params
        the decode instance needs to pull the KV cache (fake block ids, this server's address)."""
        self.n["prefill_only"] += 1
        self.n["prompt"] += n_in
        wait = Pacer(asyncio.get_running_loop()).wait_until(t_recv + self.cfg.ttft_s)
        if wait is not None:
            await wait
        n_blocks, first_block = -(-max(n_in, 1) // 16), self.n["kv_blocks"]
        self.n["kv_blocks"] += n_blocks
        self.n["generation"] += 1
        self.n["success"] += 1
        host, port = (request.transport.get_extra_info("sockname") or ("127.0.0.1", 0))[:2]
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        kv = {"do_remote_prefill": True, "do_remote_decode": False,
              "remote_block_ids": list(range(first_block, first_block + n_blocks)),
              "remote_engine_id": f"stub-{port}", "remote_request_id": rid, "remote_host": host,
              "remote_port": port, "tp_size": 1}
        if cached is not None:   # vLLM 0.32: the decode instance reports this as its cached_tokens
            kv["remote_prefill_cached_tokens"] = cached
        text = TOKEN.decode()
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason="length", stop_reason=None)
        return web.json_response({
            "id": ("chatcmpl-" if chat else "cmpl-") + rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": str(body.get("model") or self.cfg.model), "choices": [choice],
            "usage": {"prompt_tokens": n_in, "total_tokens": n_in + 1, "completion_tokens": 1,
                      "prompt_tokens_details": prompt_details(cached)},
            "kv_transfer_params": kv})

    async def _stream(self, request, body, chat, model, n_in, n_out, t_recv, kind, fault_at, cached=None):
        opts = body.get("stream_options") or {}
        usage = bool(opts.get("include_usage"))
        ids, prompt_ids = answer_ids(body, chat, n_out)
        f = Frames(chat, model, n_in, usage, usage and bool(opts.get("continuous_usage_stats")), ids=ids,
                   prompt_ids=prompt_ids, cached=cached)
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        pacer, tpc, sent = Pacer(loop), self.cfg.tokens_per_chunk, 0
        first, gap = t_recv + self.cfg.ttft_s, tpc * self.cfg.tpot_s
        try:
            for k in range(-(-n_out // tpc)):
                wait = pacer.wait_until(first + k * gap)
                if wait is not None:
                    await wait
                self.lateness.add(max(0.0, time.monotonic() - (first + k * gap)))
                if k == fault_at:
                    if kind == "disconnect":
                        request.transport.abort()
                    else:
                        await resp.write(GARBAGE + DONE)
                    return resp
                n = min(tpc, n_out - sent)
                sent += n
                await resp.write(f.chunk(k, self.text[n], sent, sent == n_out))
                self.n["generation"] += n
        except ConnectionError:  # the client went away mid-stream
            return resp
        self.n["success"] += 1
        return resp

    async def _whole(self, request, body, chat, model, n_in, n_out, t_recv, kind, cached=None):
        cfg = self.cfg
        n_chunks = -(-n_out // cfg.tokens_per_chunk)
        wait = Pacer(asyncio.get_running_loop()).wait_until(
            t_recv + cfg.ttft_s + (n_chunks - 1) * cfg.tokens_per_chunk * cfg.tpot_s)
        if wait is not None:
            await wait
        if kind == "disconnect":
            request.transport.abort()
            return web.Response(status=499)
        if kind == "garbage":
            return web.Response(body=b'{"id": "garbage", "choices": [', content_type="application/json")
        self.n["generation"] += n_out
        self.n["success"] += 1
        return web.json_response(whole_completion(chat, model, n_in, n_out, *answer_ids(body, chat, n_out), cached))


async def serve_aiohttp(cfg: StubConfig, host: str, port: int, stop: asyncio.Event, on_ready=None,
                        reuse_port: bool = False) -> dict:
    """Serve until `stop` is set; on_ready(port) once listening. -> stats() at exit."""
    srv = StubServer(cfg)
    runner = web.AppRunner(srv.make_app(), access_log=None, handler_cancellation=True,
                           shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True, reuse_port=reuse_port or None)
        await site.start()
        if on_ready is not None:
            on_ready(runner.addresses[0][1])
        await stop.wait()
    finally:
        await runner.cleanup()
    return stats(srv.n, srv.lateness)
