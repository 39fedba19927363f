"""Built-in OpenAI-compatible stub server (vLLM's chunk shapes, exact TTFT/TPOT pacing, fault injection) and the
`stub` backend that runs it as a child process.  `python -m splitbench.backends.stub --port 8000 --ttft-ms 20`.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable

from aiohttp import web

from ..errors import InputError
from ..timing import new_event_loop

DEFAULT_MODEL = "stub-model"
LOOPS = ("precise", "uvloop", "asyncio")
TOKEN = b" tok"  # the text of every output token
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
GARBAGE = b'data: {"id": "garbage", "choices": [{"text": \n\n'


@dataclass(frozen=True)
class StubConfig:
    """Server behaviour. Token chunk k (0-based) leaves at t_recv + ttft_s + k * tokens_per_chunk * tpot_s."""
    ttft_s: float = 0.02
    tpot_s: float = 0.005
    tokens_per_chunk: int = 1
    model: str = DEFAULT_MODEL
    fail_rate: float = 0.0   # fraction of requests answered 500 (seeded)
    seed: int = 0
    default_max_tokens: int = 16
    kv_transfer_s: float = 0.0  # P/D: a do_remote_prefill request's first token comes this long after receipt

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s"):
            if not getattr(self, name) >= 0:
                raise InputError(f"stub {name} must be >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.tokens_per_chunk, int) and self.tokens_per_chunk >= 1):
            raise InputError(f"stub tokens_per_chunk must be an integer >= 1, got {self.tokens_per_chunk!r}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise InputError(f"stub fail_rate must be in [0, 1], got {self.fail_rate!r}")


class Pacer:
    """Wakes waiters at absolute loop-clock deadlines (no drift). One timer per wait; a shared ticker that
    batches all chunks due in one tick can replace this class without touching the handlers."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def wait_until(self, deadline: float) -> Awaitable[None] | None:
        """None when the deadline has passed (send now), else a future resolved at the deadline."""
        if deadline <= self.loop.time():
            return None
        fut = self.loop.create_future()
        self.loop.call_at(deadline, _wake, fut)
        return fut


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def count_input_tokens(x: Any) -> int:
    """Token-id list -> its length; text, messages, content parts -> a rough word count."""
    if isinstance(x, str):
        return len(x.split())
    if isinstance(x, list):
        if x and all(type(t) is int for t in x):
            return len(x)
        return sum(count_input_tokens(p) for p in x)
    if isinstance(x, dict):
        return count_input_tokens(x.get("content") or x.get("text") or "")
    return 0


def _error(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return web.json_response(body, status=status)


def _usage(n_in: int, n_out: int, chat_details: bool = False) -> bytes:
    details = ',"completion_tokens_details":null' if chat_details else ""
    return (f',"usage":{{"prompt_tokens":{n_in},"total_tokens":{n_in + n_out},'
            f'"completion_tokens":{n_out}{details}}}').encode()


class _Frames:
    """Pre-encoded byte fragments of one streamed response, in vLLM's exact chunk shapes."""
    __slots__ = ("head", "open", "close", "mid", "last", "chat", "n_in", "usage", "continuous")

    def __init__(self, chat: bool, model: str, n_in: int, usage: bool, continuous: bool):
        obj, rid = ("chat.completion.chunk", "chatcmpl-") if chat else ("text_completion", "cmpl-")
        self.head = (f'data: {{"id":"{rid}{uuid.uuid4().hex}","object":"{obj}","created":{int(time.time())},'
                     f'"model":{json.dumps(model)},"choices":[').encode()
        self.chat, self.n_in, self.usage, self.continuous = chat, n_in, usage, continuous
        if chat:
            self.open, self.close = b'{"index":0,"delta":{"content":"', b'"},"logprobs":null,'
            self.mid = b'"finish_reason":null,"token_ids":null}]'
            self.last = b'"finish_reason":"length","stop_reason":null,"token_ids":null}]'
        else:
            self.open, self.close = b'{"index":0,"text":"', b'","logprobs":null,'
            self.mid = b'"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]'
            self.last = b'"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]'

    def chunk(self, k: int, text: bytes, sent: int, final: bool) -> bytes:
        """Bytes to write for token chunk k (0-based) that brings the output to `sent` tokens."""
        parts = []
        if k == 0 and self.chat:  # vLLM's role-only first chunk, sent with the first token
            parts += [self.head, b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                      b'"finish_reason":null}]', _usage(self.n_in, 0, True) if self.continuous else b"",
                      b',"prompt_token_ids":null,"prompt_text":null}\n\n']
        parts += [self.head, self.open, text, self.close, self.last if final else self.mid,
                  _usage(self.n_in, sent, self.chat) if self.continuous else b"", b"}\n\n"]
        if final:
            if self.usage:
                parts += [self.head, b"]", _usage(self.n_in, sent), b"}\n\n"]
            parts.append(DONE)
        return b"".join(parts)


class StubServer:
    """The aiohttp application and its counters."""

    def __init__(self, cfg: StubConfig):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.n = {"requests": 0, "running": 0, "success": 0, "prompt": 0, "generation": 0, "faults": 0}
        self.created = int(time.time())
        self.text = [TOKEN * i for i in range(cfg.tokens_per_chunk + 1)]  # text of a chunk of i tokens
        self.n.update(prefill_only=0, remote_decode=0, kv_blocks=0)  # P/D (kv_transfer_params) counters

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
        n, lab = self.n, f'{{model_name="{self.cfg.model}"}}'
        rows = [("vllm:num_requests_running", "gauge", lab, n["running"]),
                ("vllm:request_success_total", "counter", lab, n["success"]),
                ("vllm:prompt_tokens_total", "counter", lab, n["prompt"]),
                ("vllm:generation_tokens_total", "counter", lab, n["generation"]),
                ("splitbench_stub_requests_total", "counter", "", n["requests"]),
                ("splitbench_stub_faults_total", "counter", "", n["faults"]),
                ("splitbench_stub_prefill_only_total", "counter", "", n["prefill_only"]),
                ("splitbench_stub_remote_decode_total", "counter", "", n["remote_decode"])]
        text = "".join(f"# TYPE {k} {t}\n{k}{lb} {v}\n" for k, t, lb, v in rows)
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
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
        kv = body.get("kv_transfer_params")
        if isinstance(kv, dict) and kv.get("do_remote_decode"):  # P/D prefill instance: see _kv_prefill_only
            return await self._kv_prefill_only(request, chat, body, n_in, t_recv)
        if isinstance(kv, dict) and kv.get("do_remote_prefill"):  # P/D decode instance: the KV arrives instead
            self.n["remote_decode"] += 1                         # of a prefill: kv_transfer_s replaces ttft_s
            t_recv += self.cfg.kv_transfer_s - self.cfg.ttft_s
        self.n["prompt"] += n_in
        self.n["running"] += 1
        try:
            model = str(body.get("model") or self.cfg.model)
            if body.get("stream"):
                return await self._stream(request, body, chat, model, n_in, n_out, t_recv, kind, fault_at)
            return await self._whole(request, chat, model, n_in, n_out, t_recv, kind)
        finally:
            self.n["running"] -= 1

    async def _kv_prefill_only(self, request, chat, body, n_in, t_recv):
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
        text = TOKEN.decode()
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason="length", stop_reason=None)
        return web.json_response({
            "id": ("chatcmpl-" if chat else "cmpl-") + rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": str(body.get("model") or self.cfg.model), "choices": [choice],
            "usage": {"prompt_tokens": n_in, "total_tokens": n_in + 1, "completion_tokens": 1},
            "kv_transfer_params": kv})

    async def _stream(self, request, body, chat, model, n_in, n_out, t_recv, kind, fault_at):
        opts = body.get("stream_options") or {}
        usage = bool(opts.get("include_usage"))
        f = _Frames(chat, model, n_in, usage, usage and bool(opts.get("continuous_usage_stats")))
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        pacer, tpc, sent = Pacer(asyncio.get_running_loop()), self.cfg.tokens_per_chunk, 0
        first, gap = t_recv + self.cfg.ttft_s, tpc * self.cfg.tpot_s
        try:
            for k in range(-(-n_out // tpc)):
                wait = pacer.wait_until(first + k * gap)
                if wait is not None:
                    await wait
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

    async def _whole(self, request, chat, model, n_in, n_out, t_recv, kind):
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
        text = (TOKEN * n_out).decode()
        usage = {"prompt_tokens": n_in, "total_tokens": n_in + n_out, "completion_tokens": n_out,
                 "prompt_tokens_details": None}
        choice: dict[str, Any] = {"index": 0}
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason="length", stop_reason=None)
        self.n["generation"] += n_out
        self.n["success"] += 1
        return web.json_response({
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage})


async def serve(cfg: StubConfig, host: str = "127.0.0.1", port: int = 0, *,
                stop: asyncio.Event | None = None, on_ready=None) -> None:
    """Serve until `stop` is set (or the task is cancelled). on_ready(port) is called once listening."""
    runner = web.AppRunner(StubServer(cfg).make_app(), access_log=None, handler_cancellation=True,
                           shutdown_timeout=0.5, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=4096, reuse_address=True)
        await site.start()
        if on_ready is not None:
            on_ready(runner.addresses[0][1])
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def run_stub_in_thread(ttft_s: float = 0.02, tpot_s: float = 0.005, tokens_per_chunk: int = 1,
                       host: str = "127.0.0.1", port: int = 0, loop: str = "precise", **cfg: Any):
    """Serve from a daemon thread with its own loop -> (url, stop_fn); for tests, sync or async.
    stop_fn() blocks until the server has shut down."""
    config = StubConfig(ttft_s, tpot_s, tokens_per_chunk, **cfg)
    ev_loop, ready, box = new_event_loop(loop), threading.Event(), {}

    def on_ready(p: int) -> None:
        box["port"] = p
        ready.set()

    def main() -> None:
        asyncio.set_event_loop(ev_loop)
        box["stop"] = asyncio.Event()
        try:
            ev_loop.run_until_complete(serve(config, host, port, stop=box["stop"], on_ready=on_ready))
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            box["error"] = e
        finally:
            ready.set()
            ev_loop.close()

    thread = threading.Thread(target=main, name="splitbench-stub", daemon=True)
    thread.start()
    ready.wait(30)
    if "port" not in box:
        raise RuntimeError(f"stub server did not start: {box.get('error')!r}")

    def stop_fn() -> None:
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):
                ev_loop.call_soon_threadsafe(box["stop"].set)
            thread.join(10)

    return f"http://{host}:{box['port']}", stop_fn


def run_server(cfg: StubConfig, host: str = "127.0.0.1", port: int = 8000, *, cpu: int | None = None,
               loop: str = "precise", port_file: str | None = None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM; pins this process to `cpu` when given."""
    if loop not in LOOPS:
        raise InputError(f"stub loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if cpu is not None:
        if not 0 <= cpu < (os.cpu_count() or 1):
            raise InputError(f"--cpu {cpu} is not a core of this machine (0..{(os.cpu_count() or 1) - 1})")
        os.sched_setaffinity(0, {cpu})
    with contextlib.suppress(Exception):  # 1 µs timer slack instead of 50 µs (Linux; best effort)
        import ctypes
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, ns
    ev_loop = new_event_loop(loop)
    asyncio.set_event_loop(ev_loop)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        ev_loop.add_signal_handler(sig, stop.set)

    def on_ready(bound: int) -> None:
        if port_file:
            tmp = f"{port_file}.tmp"
            Path(tmp).write_text(str(bound))
            os.replace(tmp, port_file)
        print(f"splitbench stub listening on http://{host}:{bound} (ttft {cfg.ttft_s * 1e3:g} ms, tpot "
              f"{cfg.tpot_s * 1e3:g} ms, {cfg.tokens_per_chunk} token/chunk, pid {os.getpid()}, cpu {cpu}, "
              f"loop {loop})", flush=True)
    try:
        ev_loop.run_until_complete(serve(cfg, host, port, stop=stop, on_ready=on_ready))
    except OSError as e:
        raise InputError(f"stub cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        ev_loop.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m splitbench.backends.stub", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="request received -> first token chunk")
    p.add_argument("--tpot-ms", type=float, default=5.0, help="time per output token after the first chunk")
    p.add_argument("--tokens-per-chunk", type=int, default=1)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--fail-rate", type=float, default=0.0, help="fraction of requests answered 500")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv-transfer-ms", type=float, default=0.0, help="P/D: replaces ttft for do_remote_prefill")
    p.add_argument("--cpu", type=int, default=None, help="pin the server to this core")
    p.add_argument("--loop", choices=LOOPS, default="precise")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    a = p.parse_args(argv)
    try:
        cfg = StubConfig(a.ttft_ms / 1e3, a.tpot_ms / 1e3, a.tokens_per_chunk, a.model, a.fail_rate, a.seed,
                         kv_transfer_s=a.kv_transfer_ms / 1e3)
        run_server(cfg, a.host, a.port, cpu=a.cpu, loop=a.loop, port_file=a.port_file)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
