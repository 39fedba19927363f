"""The built-in OpenAI-compatible stub server's shared pieces (config, vLLM's chunk shapes as pre-encoded frames,
counters, lateness histogram, /metrics text) used by both servers: stub_lean.py (default) and stub_aiohttp.py.
Running it: stub_main.py (`python -m splitbench.servers.stub_main --port 8000 --ttft-ms 20`).
"""
from __future__ import annotations

import asyncio
import functools
import json
import random
import time
import uuid
import zlib
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from splitbench.errors import InputError
from splitbench.prefix_policy import BlockIndex, chained_block_hashes

DEFAULT_MODEL = "stub-model"
LOOPS = ("precise", "uvloop", "asyncio")
SERVERS = ("lean", "aiohttp")
TOKEN = b" tok"  # the text of every output token
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
GARBAGE = b'data: {"id": "garbage", "choices": [{"text": \n\n'
STUB_VOCAB = 50_000
# --kv-connector: None (P/D answers, no connector series), nixl (vllm:nixl_* and the consumer gauge, as vLLM 0.32's
# NixlConnector kv_both), consumer (the consumer gauge only), none (no connector: kv_transfer_params ignored)
KV_CONNECTORS = (None, "nixl", "consumer", "none")   # the stub's output token ids (return_token_ids) are in [10, STUB_VOCAB)


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
    prefix_block_tokens: int = 16      # prefix cache block (vLLM's GPU default); 0: no prefix cache
    prefix_cache_blocks: int = 1 << 16  # blocks the prefix cache holds (LRU)
    kv_connector: str | None = None    # what /metrics shows of a KV connector (KV_CONNECTORS); "none": P/D
                                       # kv_transfer_params are ignored, as by a vLLM started without one
    max_concurrency: int = 0           # requests served at once (FIFO slots; later ones queue); 0: no limit

    def __post_init__(self):
        for name in ("ttft_s", "tpot_s", "kv_transfer_s", "tick_s"):
            if not getattr(self, name) >= 0:
                raise InputError(f"stub {name} must be >= 0, got {getattr(self, name)!r}")
        if not (isinstance(self.tokens_per_chunk, int) and self.tokens_per_chunk >= 1):
            raise InputError(f"stub tokens_per_chunk must be an integer >= 1, got {self.tokens_per_chunk!r}")
        for name in ("prefix_block_tokens", "prefix_cache_blocks", "max_concurrency"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise InputError(f"stub {name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.kv_connector not in KV_CONNECTORS:
            raise InputError(f"stub kv_connector must be one of nixl, consumer, none, got {self.kv_connector!r}")
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


def prompt_units(x: Any) -> list:
    """The prompt as count_input_tokens counts it: token ids, else words (the prefix cache's "tokens")."""
    if isinstance(x, str):
        return x.split()
    if isinstance(x, list):
        if x and set(map(type, x)) == {int}:
            return x
        return [u for p in x for u in prompt_units(p)]
    if isinstance(x, dict):
        return prompt_units(x.get("content") or x.get("text") or "")
    return []


class PrefixCache:
    """One server's prefix cache, as vLLM's counts it: whole blocks of `block_tokens` prompt tokens keyed by the
    chained hash of every block through them (prefix_policy.chained_block_hashes), LRU over `capacity_blocks`
    (prefix_policy.BlockIndex). A hit is the longest run of leading blocks seen before, at most (n - 1) tokens
    (vLLM recomputes the last prompt token)."""

    def __init__(self, block_tokens: int, capacity_blocks: int):
        self.block_tokens, self.capacity = block_tokens, capacity_blocks
        self.index = BlockIndex(capacity_blocks) if block_tokens and capacity_blocks else None

    def lookup(self, units: list) -> int:
        """Cached tokens of a prompt; its full blocks are then cached (most recently used)."""
        if self.index is None:
            return 0
        bt = self.block_tokens
        hashes = chained_block_hashes(units, bt)
        hit = max(0, min(self.index.matched(hashes), (len(units) - 1) // bt))
        self.index.add(hashes)
        return hit * bt


def stub_token_ids(prompt: Any, n: int) -> list[int]:
    """The stub's n output token ids for a prompt: a pure function of the prompt (crc32 of its JSON seeds them),
    so a test can tell which answer a later prompt carries (multi-turn threading)."""
    rng = random.Random(zlib.crc32(json.dumps(prompt, separators=(",", ":")).encode()))
    return [rng.randrange(10, STUB_VOCAB) for _ in range(n)]


def answer_ids(body: dict, chat: bool, n_out: int) -> tuple[list[int] | None, list[int] | None]:
    """vLLM's `return_token_ids`: (output token ids, prompt token ids of a token-id completion prompt), else
    (None, None)."""
    if not body.get("return_token_ids"):
        return None, None
    prompt = body.get("messages") if chat else body.get("prompt")
    return stub_token_ids(prompt, n_out), (prompt if not chat and isinstance(prompt, list) else None)


N_DIGITS = 1 << 17
DIGITS = [len(str(i)) for i in range(N_DIGITS)]   # decimal width of small ints: chunk sizes without formatting


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


def _usage(n_in: int, n_out: int, chat_details: bool = False, cached: int | None = None) -> bytes:
    """A usage object; `cached` (the final usage chunk): vLLM's prompt_tokens_details with cached_tokens."""
    details = ',"completion_tokens_details":null' if chat_details else ""
    if cached is not None:
        details += f',"prompt_tokens_details":{{"cached_tokens":{cached}}}'
    return (f',"usage":{{"prompt_tokens":{n_in},"total_tokens":{n_in + n_out},'
            f'"completion_tokens":{n_out}{details}}}').encode()


def prompt_details(cached: int | None) -> dict | None:
    """usage.prompt_tokens_details of a non-streamed answer (None: the server keeps no prefix cache)."""
    return None if cached is None else {"cached_tokens": cached}


class Frames:
    """Pre-encoded byte fragments of one streamed response, in vLLM's exact chunk shapes. mid() is the hot path
    (a full token chunk that is neither the first chat chunk nor the last): one concatenation, one %-format."""
    __slots__ = (
        "_cbase",
        "_ctpl",
        "_pre",
        "_prev",
        "_suf",
        "cached",
        "chat",
        "close",
        "continuous",
        "head",
        "ids",
        "last",
        "mid_tail",
        "n_in",
        "open",
        "prompt_ids",
        "usage",
    )

    def __init__(self, chat: bool, model: str, n_in: int, usage: bool, continuous: bool, text: bytes = TOKEN,
                 rid: str | None = None, ids: list[int] | None = None, prompt_ids: list[int] | None = None,
                 cached: int | None = None):
        self.ids, self.prompt_ids, self._prev = ids, prompt_ids, 0   # return_token_ids: chunk() only, no mid()
        self.cached = cached   # prompt tokens from the prefix cache: the final usage chunk's prompt_tokens_details
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
            return self._ctpl % (self._cbase + (DIGITS[total] if total < N_DIGITS else len(str(total)))
                                 + (DIGITS[sent] if sent < N_DIGITS else len(str(sent))), total, sent)
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
        tail = self.last if final else self.mid_tail
        if self.ids is not None:   # this chunk's token ids (and the prompt's in the first one), as vLLM sends them
            tail = tail.replace(b'"token_ids":null', b'"token_ids":%s' % _ids(self.ids[self._prev:sent]))
            if k == 0 and self.prompt_ids is not None:
                tail = tail.replace(b'"prompt_token_ids":null', b'"prompt_token_ids":%s' % _ids(self.prompt_ids))
            self._prev = sent
        parts += [self.head, self.open, text, self.close, tail,
                  _usage(self.n_in, sent, self.chat) if self.continuous else b"", b"}\n\n"]
        if final:
            if self.usage:
                parts += [self.head, b"]", _usage(self.n_in, sent, cached=self.cached), b"}\n\n"]
            parts.append(DONE)
        return b"".join(parts)


def _ids(ids: list[int]) -> bytes:
    return json.dumps(ids, separators=(",", ":")).encode()


def whole_completion(chat: bool, model: str, n_in: int, n_out: int, ids: list[int] | None = None,
                     prompt_ids: list[int] | None = None, cached: int | None = None) -> dict[str, Any]:
    """The body of a non-streamed completion (vLLM's shape) with n_out tokens; both servers send it. ids (and
    prompt_ids): return_token_ids was asked (answer_ids); cached: prompt tokens from the prefix cache."""
    text = (TOKEN * n_out).decode()
    usage = {"prompt_tokens": n_in, "total_tokens": n_in + n_out, "completion_tokens": n_out,
             "prompt_tokens_details": prompt_details(cached)}
    choice: dict[str, Any] = {"index": 0}
    if chat:
        choice["message"] = {"role": "assistant", "content": text, "tool_calls": []}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason="length", stop_reason=None)
    if ids is not None:
        choice.update(token_ids=ids, **({} if chat else {"prompt_token_ids": prompt_ids}))
    return {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}


def new_counters() -> dict[str, int]:
    return {"requests": 0, "running": 0, "success": 0, "prompt": 0, "generation": 0, "faults": 0,
            "prefill_only": 0, "remote_decode": 0, "kv_blocks": 0, "prefix_queries": 0, "prefix_hits": 0,
            "external_queries": 0, "external_hits": 0}


def cache_prompt(cache: PrefixCache, n: dict[str, int], prompt: Any, kv: Any) -> int | None:
    """Cached prompt tokens of one request, counted as vLLM counts them (vllm:prefix_cache_* in tokens). A P/D
    decode request (do_remote_prefill) gets its KV from the prompt instance: it reports the prompt instance's
    hit (kv_transfer_params.remote_prefill_cached_tokens, as vLLM 0.32 does) and counts external hits.
    None when the server keeps no prefix cache."""
    if not cache.block_tokens:
        return None
    units = prompt_units(prompt)
    if isinstance(kv, dict) and kv.get("do_remote_prefill"):
        n["external_queries"] += len(units)
        n["external_hits"] += len(units)
        remote = kv.get("remote_prefill_cached_tokens")
        return remote if type(remote) is int else 0
    hit = cache.lookup(units)
    n["prefix_queries"] += len(units)
    n["prefix_hits"] += hit
    return hit


def connector_rows(lab: str, kv_connector: str | None) -> list[tuple]:
    """The KV-connector series vLLM 0.32 registers at start for this connector (zero-valued here)."""
    rows = [("vllm:nixl_num_failed_transfers_total", "counter", lab, 0)] if kv_connector == "nixl" else []
    if kv_connector in ("nixl", "consumer"):
        rows.append(("vllm:num_requests_kv_fetch_by_stage", "gauge", lab[:-1] + ',stage="in_progress"}', 0))
    return rows


def metrics_text(model: str, n: dict[str, int], lateness: Lateness, kv_connector: str | None = None) -> str:
    """vLLM-named gauges/counters plus the stub's own, in Prometheus text format."""
    lab = f'{{model_name="{model}"}}'
    rows = [("vllm:num_requests_running", "gauge", lab, n["running"]),
            ("vllm:request_success_total", "counter", lab, n["success"]),
            ("vllm:prompt_tokens_total", "counter", lab, n["prompt"]),
            ("vllm:generation_tokens_total", "counter", lab, n["generation"]),
            ("vllm:prefix_cache_queries_total", "counter", lab, n["prefix_queries"]),
            ("vllm:prefix_cache_hits_total", "counter", lab, n["prefix_hits"]),
            ("vllm:external_prefix_cache_queries_total", "counter", lab, n["external_queries"]),
            ("vllm:external_prefix_cache_hits_total", "counter", lab, n["external_hits"]),
            ("splitbench_stub_requests_total", "counter", "", n["requests"]),
            ("splitbench_stub_faults_total", "counter", "", n["faults"]),
            ("splitbench_stub_prefill_only_total", "counter", "", n["prefill_only"]),
            ("splitbench_stub_remote_decode_total", "counter", "", n["remote_decode"])] + connector_rows(lab, kv_connector)
    text = "".join(f"# TYPE {k} {t}\n{k}{lb} {v}\n" for k, t, lb, v in rows)
    s, name = lateness.summary(), "splitbench_stub_chunk_lateness_seconds"
    return (text + f"# TYPE {name} summary\n{name}{{quantile=\"0.5\"}} {s['p50_s']:.6f}\n"
            f"{name}{{quantile=\"0.99\"}} {s['p99_s']:.6f}\n{name}{{quantile=\"1\"}} {s['max_s']:.6f}\n"
            f"{name}_count {s['count']}\n")


def stats(n: dict[str, int], lateness: Lateness) -> dict[str, Any]:
    """The exit summary: counters plus chunk lateness."""
    return {**n, "chunk_lateness": lateness.summary()}
