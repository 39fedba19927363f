"""Built-in OpenAI-compatible stub server (vLLM's chunk shapes, exact TTFT/TPOT pacing, fault injection): config,
shared frames/counters and the run helpers. `python -m splitbench.servers.stub --port 8000 --ttft-ms 20`.
Servers: stub_lean.py (default; asyncio.Protocol + one shared ticker) and stub_aiohttp.py (`--server aiohttp`).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitbench.errors import InputError
from splitbench.timing import new_event_loop

DEFAULT_MODEL = "stub-model"
LOOPS = ("precise", "uvloop", "asyncio")
SERVERS = ("lean", "aiohttp")
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
    tick_s: float = 0.0002   # lean server: least time between two wakeups of the shared chunk ticker

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s", "kv_transfer_s", "tick_s"):
            if not getattr(self, name) >= 0:
                raise InputError(f"stub {name} must be >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.tokens_per_chunk, int) and self.tokens_per_chunk >= 1):
            raise InputError(f"stub tokens_per_chunk must be an integer >= 1, got {self.tokens_per_chunk!r}")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise InputError(f"stub fail_rate must be in [0, 1], got {self.fail_rate!r}")


class Pacer:
    """Wakes waiters at absolute loop-clock deadlines (no drift). One timer per wait: the aiohttp server's
    pacing and the lean server's non-streamed answers; the lean server's streams share one ticker instead."""

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
        if x and set(map(type, x)) == {int}:
            return len(x)
        return sum(count_input_tokens(p) for p in x)
    if isinstance(x, dict):
        return count_input_tokens(x.get("content") or x.get("text") or "")
    return 0


_N_DIGITS = 1 << 17
_DIGITS = [len(str(i)) for i in range(_N_DIGITS)]   # decimal width of small ints: chunk sizes without formatting


@functools.lru_cache(maxsize=64)
def _json_str(s: str) -> str:
    return json.dumps(s)


LATENESS_BIN_S = 1e-5   # lateness histogram: 10 µs bins up to 100 ms, then one overflow bin
LATENESS_BINS = 10_000


class Lateness:
    """Chunk emission lateness (emit time - schedule) as a fixed histogram: O(1) per chunk, quantiles on demand."""
    __slots__ = ("hist", "max_s")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.hist, self.max_s = [0] * (LATENESS_BINS + 1), 0.0

    def add(self, late_s: float) -> None:
        i = int(late_s * 1e5)
        self.hist[min(LATENESS_BINS, i)] += 1
        self.max_s = max(self.max_s, late_s)

    def summary(self) -> dict[str, float]:
        """{count, p50_s, p99_s, max_s}; a quantile is the upper edge of its 10 µs bin (never understated)."""
        hist, n = self.hist, sum(self.hist)
        out = {"count": n, "p50_s": 0.0, "p99_s": 0.0, "max_s": self.max_s}
        for key, q in (("p50_s", 0.5), ("p99_s", 0.99)):
            need, acc = q * n, 0
            for i, c in enumerate(hist):
                acc += c
                if c and acc >= need:
                    out[key] = min((i + 1) * LATENESS_BIN_S, self.max_s) if i < LATENESS_BINS else self.max_s
                    break
        return out


def _usage(n_in: int, n_out: int, chat_details: bool = False) -> bytes:
    details = ',"completion_tokens_details":null' if chat_details else ""
    return (f',"usage":{{"prompt_tokens":{n_in},"total_tokens":{n_in + n_out},'
            f'"completion_tokens":{n_out}{details}}}').encode()


class Frames:
    """Pre-encoded byte fragments of one streamed response, in vLLM's exact chunk shapes. mid() is the hot path
    (a full token chunk that is neither the first chat chunk nor the last): one concatenation, one %-format."""
    __slots__ = (
        "_cbase",
        "_ctpl",
        "_pre",
        "_suf",
        "chat",
        "close",
        "continuous",
        "head",
        "last",
        "mid_tail",
        "n_in",
        "open",
        "usage",
    )

    def __init__(self, chat: bool, model: str, n_in: int, usage: bool, continuous: bool, text: bytes = TOKEN,
                 rid: str | None = None):
        obj, prefix = ("chat.completion.chunk", "chatcmpl-") if chat else ("text_completion", "cmpl-")
        self.head = (f'data: {{"id":"{prefix}{rid or uuid.uuid4().hex}","object":"{obj}","created":{int(time.time())},'
                     f'"model":{_json_str(model)},"choices":[').encode()
        self.chat, self.n_in, self.usage, self.continuous = chat, n_in, usage, continuous
        if chat:
            self.open, self.close = b'{"index":0,"delta":{"content":"', b'"},"logprobs":null,'
            self.mid_tail = b'"finish_reason":null,"token_ids":null}]'
            self.last = b'"finish_reason":"length","stop_reason":null,"token_ids":null}]'
        else:
            self.open, self.close = b'{"index":0,"text":"', b'","logprobs":null,'
            self.mid_tail = b'"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]'
            self.last = b'"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]'
        self._pre = self.head + self.open + text + self.close + self.mid_tail  # a full mid chunk minus usage
        details = b',"completion_tokens_details":null' if chat else b""
        self._suf = (b',"usage":{"prompt_tokens":%d,"total_tokens":%%d,"completion_tokens":%%d%s}}\n\n'
                     % (n_in, details)) if continuous else b"}\n\n"
        if continuous:  # one %-format per chunk: a fixed-width (leading-zero) chunk size, then the two counts
            self._ctpl = b"%04x\r\n" + self._pre.replace(b"%", b"%%") + self._suf + b"\r\n"
            self._cbase = len(self._pre) + len(self._suf) - 4
        else:
            self._ctpl, self._cbase = b"%x\r\n%s\r\n" % (len(self._pre + self._suf), self._pre + self._suf), 0

    def mid_chunked(self, sent: int) -> bytes:
        """mid(sent) framed as one HTTP/1.1 chunk (chunk-size with leading zeros, which HTTP allows)."""
        if self.continuous:
            total = self.n_in + sent
            return self._ctpl % (self._cbase + (_DIGITS[total] if total < _N_DIGITS else len(str(total)))
                                 + (_DIGITS[sent] if sent < _N_DIGITS else len(str(sent))), total, sent)
        return self._ctpl

    def mid(self, sent: int) -> bytes:
        """A full token chunk (`text` of __init__) that brings the output to `sent` tokens; not first, not last."""
        if self.continuous:
            return self._pre + self._suf % (self.n_in + sent, sent)
        return self._pre + self._suf

    def chunk(self, k: int, text: bytes, sent: int, final: bool) -> bytes:
        """Bytes to write for token chunk k (0-based) that brings the output to `sent` tokens."""
        parts = []
        if k == 0 and self.chat:  # vLLM's role-only first chunk, sent with the first token
            parts += [self.head, (b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                                  b'"finish_reason":null}]'), _usage(self.n_in, 0, True) if self.continuous else b"",
                      b',"prompt_token_ids":null,"prompt_text":null}\n\n']
        parts += [self.head, self.open, text, self.close, self.last if final else self.mid_tail,
                  _usage(self.n_in, sent, self.chat) if self.continuous else b"", b"}\n\n"]
        if final:
            if self.usage:
                parts += [self.head, b"]", _usage(self.n_in, sent), b"}\n\n"]
            parts.append(DONE)
        return b"".join(parts)


def whole_completion(chat: bool, model: str, n_in: int, n_out: int) -> dict[str, Any]:
    """The body of a non-streamed completion (vLLM's shape) with n_out tokens; both servers send it."""
    text = (TOKEN * n_out).decode()
    usage = {"prompt_tokens": n_in, "total_tokens": n_in + n_out, "completion_tokens": n_out,
             "prompt_tokens_details": None}
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason="length", stop_reason=None)
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


def new_counters() -> dict[str, int]:
    return {"requests": 0, "running": 0, "success": 0, "prompt": 0, "generation": 0, "faults": 0,
            "prefill_only": 0, "remote_decode": 0, "kv_blocks": 0}


def metrics_text(model: str, n: dict[str, int], lateness: Lateness) -> str:
    """vLLM-named gauges/counters plus the stub's own, in Prometheus text format."""
    lab = f'{{model_name="{model}"}}'
    rows = [("vllm:num_requests_running", "gauge", lab, n["running"]),
            ("vllm:request_success_total", "counter", lab, n["success"]),
            ("vllm:prompt_tokens_total", "counter", lab, n["prompt"]),
            ("vllm:generation_tokens_total", "counter", lab, n["generation"]),
            ("splitbench_stub_requests_total", "counter", "", n["requests"]),
            ("splitbench_stub_faults_total", "counter", "", n["faults"]),
            ("splitbench_stub_prefill_only_total", "counter", "", n["prefill_only"]),
            ("splitbench_stub_remote_decode_total", "counter", "", n["remote_decode"])]
    text = "".join(f"# TYPE {k} {t}\n{k}{lb} {v}\n" for k, t, lb, v in rows)
    s, name = lateness.summary(), "splitbench_stub_chunk_lateness_seconds"
    return (text + f"# TYPE {name} summary\n{name}{{quantile=\"0.5\"}} {s['p50_s']:.6f}\n"
            f"{name}{{quantile=\"0.99\"}} {s['p99_s']:.6f}\n{name}{{quantile=\"1\"}} {s['max_s']:.6f}\n"
            f"{name}_count {s['count']}\n")


def stats(n: dict[str, int], lateness: Lateness) -> dict[str, Any]:
    """The exit summary: counters plus chunk lateness."""
    return {**n, "chunk_lateness": lateness.summary()}


async def serve(cfg: StubConfig, host: str = "127.0.0.1", port: int = 0, *, stop: asyncio.Event | None = None,
                on_ready=None, server: str = "lean", manage_gc: bool = False) -> dict[str, Any]:
    """Serve until `stop` is set (or the task is cancelled); on_ready(port) once listening. -> stats() at exit.
    server: "lean" (asyncio.Protocol + shared ticker, stub_lean.py) or "aiohttp" (stub_aiohttp.py).
    manage_gc: the lean server owns this process's GC (no automatic full collections); run_server sets it."""
    if server not in SERVERS:
        raise InputError(f"stub server must be one of {', '.join(SERVERS)}, got {server!r}")
    if server == "aiohttp":
        from splitbench.servers.stub_aiohttp import serve_aiohttp
        return await serve_aiohttp(cfg, host, port, stop or asyncio.Event(), on_ready)
    from splitbench.servers.stub_lean import serve_lean
    return await serve_lean(cfg, host, port, stop or asyncio.Event(), on_ready, manage_gc=manage_gc)


def run_stub_in_thread(ttft_s: float = 0.02, tpot_s: float = 0.005, tokens_per_chunk: int = 1,
                       host: str = "127.0.0.1", port: int = 0, loop: str = "precise", server: str = "lean",
                       **cfg: Any):
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
            ev_loop.run_until_complete(serve(config, host, port, stop=box["stop"], on_ready=on_ready,
                                             server=server))
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
               loop: str = "precise", port_file: str | None = None, server: str = "lean") -> dict[str, Any]:
    """Serve in the foreground until SIGINT/SIGTERM; pins this process to `cpu` when given. Prints a one-line
    exit summary (requests, chunks' emission lateness) and returns stats()."""
    if loop not in LOOPS:
        raise InputError(f"stub loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if server not in SERVERS:
        raise InputError(f"stub server must be one of {', '.join(SERVERS)}, got {server!r}")
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
              f"loop {loop}, server {server})", flush=True)
    try:
        st = ev_loop.run_until_complete(serve(cfg, host, port, stop=stop, on_ready=on_ready, server=server,
                                              manage_gc=True))
    except OSError as e:
        raise InputError(f"stub cannot listen on {host}:{port}: {e.strerror or e}") from None
    finally:
        ev_loop.close()
    print(summary_line(st), flush=True)
    return st


def summary_line(st: dict[str, Any]) -> str:
    la = st["chunk_lateness"]
    return (f"splitbench stub: {st['requests']} requests, {st['success']} ok, {st['generation']} tokens; chunk "
            f"lateness p50 {la['p50_s'] * 1e3:.3f} ms, p99 {la['p99_s'] * 1e3:.3f} ms, max {la['max_s'] * 1e3:.3f} ms "
            f"over {la['count']} chunks")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m splitbench.servers.stub", description=__doc__.split("\n")[0])
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
    p.add_argument("--server", choices=SERVERS, default="lean", help="lean (shared ticker) or aiohttp (comparison)")
    p.add_argument("--tick-ms", type=float, default=0.2, help="lean server: least time between ticker wakeups")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    a = p.parse_args(argv)
    try:
        cfg = StubConfig(a.ttft_ms / 1e3, a.tpot_ms / 1e3, a.tokens_per_chunk, a.model, a.fail_rate, a.seed,
                         kv_transfer_s=a.kv_transfer_ms / 1e3, tick_s=a.tick_ms / 1e3)
        run_server(cfg, a.host, a.port, cpu=a.cpu, loop=a.loop, port_file=a.port_file, server=a.server)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
