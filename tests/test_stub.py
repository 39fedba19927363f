"""The stub server (chunk shapes, usage, pacing, faults), StubBackend's child process and OpenAIBackend."""
from __future__ import annotations

import asyncio
import http.server
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import pytest
from typer.testing import CliRunner

from splitbench.backends.openai import OpenAIBackend
from splitbench.backends.registry import get_backend
from splitbench.backends.stub import StubBackend
from splitbench.cli import app
from splitbench.errors import InputError, ServerStartError
from splitbench.servers.stub import count_input_tokens
from splitbench.servers.stub_main import run_stub_in_thread


@pytest.fixture(scope="module")
def stub_url():
    url, stop = run_stub_in_thread(ttft_s=0.004, tpot_s=0.001)
    yield url
    stop()


async def _sse(url: str, path: str, body: dict, headers: dict | None = None) -> tuple[list, list[float]]:
    """POST and read the SSE stream -> (payloads as parsed JSON or the raw '[DONE]'/bad text, arrival times)."""
    out, times = [], []
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers=headers or {}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    times.append(time.perf_counter())
                    text = line[6:].strip().decode()
                    try:
                        out.append(json.loads(text) if text != "[DONE]" else text)
                    except ValueError:
                        out.append(("bad", text))
    return out, times


def _tokens(chunk: dict) -> int:
    c = chunk["choices"][0]
    text = c["text"] if "text" in c else c["delta"].get("content", "")
    return text.count(" tok")


def test_stream_completion_exact_tokens_and_final_usage(stub_url):
    body = {"model": "m1", "prompt": [7] * 5, "max_tokens": 7, "stream": True,
            "stream_options": {"include_usage": True}}
    out, _ = asyncio.run(_sse(stub_url, "/v1/completions", body))
    assert out[-1] == "[DONE]"
    usage_chunk, token_chunks = out[-2], out[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["model"] == "m1"
    assert usage_chunk["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                                    "prompt_tokens_details": {"cached_tokens": 0}}   # 5 tokens: no whole block
    assert len(token_chunks) == 7 and sum(map(_tokens, token_chunks)) == 7
    assert all("usage" not in c for c in token_chunks)
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 6 + ["length"]
    assert len({c["id"] for c in out[:-1]}) == 1 and out[0]["object"] == "text_completion"


def test_stream_continuous_usage_and_no_usage_by_default(stub_url):
    body = {"prompt": "one two three four", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    out, _ = asyncio.run(_sse(stub_url, "/v1/completions", body))
    assert [c["usage"]["completion_tokens"] for c in out[:4]] == [1, 2, 3, 4]
    assert all(c["usage"]["prompt_tokens"] == 4 and c["usage"]["total_tokens"] == 4 + i + 1
               for i, c in enumerate(out[:4]))
    plain, _ = asyncio.run(_sse(stub_url, "/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True}))
    assert len(plain) == 4 and plain[-1] == "[DONE]" and all("usage" not in c for c in plain[:-1])


def test_default_max_tokens_is_16(stub_url):
    out, _ = asyncio.run(_sse(stub_url, "/v1/completions", {"prompt": "x", "stream": True}))
    assert sum(_tokens(c) for c in out[:-1]) == 16


def test_chat_stream_first_chunk_is_role_only(stub_url):
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hello there stub"}]}],
            "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    out, _ = asyncio.run(_sse(stub_url, "/v1/chat/completions", body))
    first = out[0]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert _tokens(first) == 0
    content = out[1:-2]
    assert len(content) == 3 and all(set(c["choices"][0]["delta"]) == {"content"} for c in content)
    assert out[-2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                "prompt_tokens_details": {"cached_tokens": 0}}


def test_tokens_per_chunk_groups_tokens():
    url, stop = run_stub_in_thread(ttft_s=0.002, tpot_s=0.001, tokens_per_chunk=3)
    try:
        out, _ = asyncio.run(_sse(url, "/v1/completions", {"prompt": "x", "max_tokens": 7, "stream": True}))
    finally:
        stop()
    assert [_tokens(c) for c in out[:-1]] == [3, 3, 1]


def test_non_streaming_responses(stub_url):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(stub_url + "/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5}) as r:
                comp = await r.json()
            async with s.post(stub_url + "/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": "a b"}], "max_tokens": 2}) as r:
                chat = await r.json()
        return comp, chat
    comp, chat = asyncio.run(go())
    assert comp["choices"][0]["text"].count(" tok") == 5 and comp["choices"][0]["finish_reason"] == "length"
    assert comp["usage"]["prompt_tokens"] == 3 and comp["usage"]["completion_tokens"] == 5
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["usage"]["total_tokens"] == 4


def test_health_models_metrics(stub_url):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.get(stub_url + "/health") as r:
                assert r.status == 200
            async with s.get(stub_url + "/v1/models") as r:
                models = await r.json()
            async with s.get(stub_url + "/metrics") as r:
                before = await r.text()
            await _sse(stub_url, "/v1/completions", {"prompt": [1] * 11, "max_tokens": 9, "stream": True})
            async with s.get(stub_url + "/metrics") as r:
                after = await r.text()
        return models, before, after

    def val(text, name):
        return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))
    models, before, after = asyncio.run(go())
    assert models["data"][0]["id"] == "stub-model"
    assert val(after, "vllm:generation_tokens_total") - val(before, "vllm:generation_tokens_total") == 9
    assert val(after, "vllm:prompt_tokens_total") - val(before, "vllm:prompt_tokens_total") == 11
    assert val(after, "splitbench_stub_requests_total") - val(before, "splitbench_stub_requests_total") == 1


def test_count_input_tokens():
    assert count_input_tokens([5, 6, 7]) == 3
    assert count_input_tokens("a b  c\nd") == 4
    assert count_input_tokens([{"role": "user", "content": "x y"}, {"role": "user", "content": None}]) == 2


# ----------------------------------------------------------------------------- faults

def test_fault_status(stub_url):
    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(stub_url + "/v1/completions", json={"prompt": "x", "stream": True},
                              headers={"X-Stub-Fault": "status:503"}) as r:
                return r.status, await r.json()
    status, body = asyncio.run(go())
    assert status == 503 and body["error"]["code"] == 503 and body["error"]["message"]


def test_fault_disconnect_after_k_chunks(stub_url):
    got = []

    async def go():
        async with aiohttp.ClientSession() as s:
            async with s.post(stub_url + "/v1/completions", json={"prompt": "x", "max_tokens": 8, "stream": True},
                              headers={"X-Stub-Fault": "disconnect:3"}) as r:
                async for line in r.content:
                    if line.startswith(b"data: "):
                        got.append(line)
    with pytest.raises(aiohttp.ClientPayloadError):
        asyncio.run(go())
    assert len(got) == 3 and all(b'"text":" tok"' in g for g in got)


def test_fault_hang_until_client_gives_up(stub_url):
    async def go():
        t0 = time.perf_counter()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as s:
            with pytest.raises(asyncio.TimeoutError):
                async with s.post(stub_url + "/v1/completions", json={"prompt": "x", "stream": True},
                                  headers={"X-Stub-Fault": "hang"}) as r:
                    await r.read()
        waited = time.perf_counter() - t0
        out, _ = await _sse(stub_url, "/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True})
        return waited, out
    waited, out = asyncio.run(go())
    assert waited >= 0.29 and out[-1] == "[DONE]"  # it hung, and the server still serves others


def test_fault_garbage_and_bad_header(stub_url):
    out, _ = asyncio.run(_sse(stub_url, "/v1/completions", {"prompt": "x", "max_tokens": 4, "stream": True},
                              {"X-Stub-Fault": "garbage"}))
    assert out[0][0] == "bad"

    async def bad():
        async with aiohttp.ClientSession() as s:
            async with s.post(stub_url + "/v1/completions", json={"prompt": "x"},
                              headers={"X-Stub-Fault": "explode"}) as r:
                return r.status
    assert asyncio.run(bad()) == 400


def test_fail_rate_is_seeded():
    async def statuses(url):
        async with aiohttp.ClientSession() as s:
            res = []
            for _ in range(30):
                async with s.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as r:
                    res.append(r.status)
            return res

    def run_once():
        url, stop = run_stub_in_thread(ttft_s=0, tpot_s=0, fail_rate=0.5, seed=1)
        try:
            return asyncio.run(statuses(url))
        finally:
            stop()
    a, b = run_once(), run_once()
    assert a == b and set(a) == {200, 500}


# ----------------------------------------------------------------------------- timing (child process)

def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in r.read().decode().splitlines()
                if ln and not ln.startswith("#")}


LATENESS = "splitbench_stub_chunk_lateness_seconds"


def assert_server_lateness_bounded_by_client(m: dict[str, float], client_late_s: list[float]) -> None:
    """Each chunk's lateness seen by the client (its receipt - its own send - schedule) is at least what the stub
    recorded for it (its emission - its receipt of the request - schedule), so every quantile of the client's
    values bounds the stub's (which is the upper edge of its 10 µs bin). Holds on any host, busy or not."""
    c = sorted(client_late_s)
    assert m[f"{LATENESS}_count"] == len(c)   # every chunk, nothing before the reset
    for q, key in ((0.5, 'quantile="0.5"'), (0.99, 'quantile="0.99"')):
        assert m[f"{LATENESS}{{{key}}}"] <= c[math.ceil(q * len(c)) - 1] + 1e-5 + 1e-9
    assert m[f'{LATENESS}{{quantile="1"}}'] <= c[-1] + 1e-9
    assert 0 <= m[f'{LATENESS}{{quantile="0.5"}}'] <= m[f'{LATENESS}{{quantile="0.99"}}'] \
        <= m[f'{LATENESS}{{quantile="1"}}']


def test_child_process_stub_is_never_early_and_its_lateness_is_honest(tmp_path):
    """Real process, real sockets: no chunk reaches the client before its schedule (ttft + k * tpot after the
    client sent), and the stub's own lateness histogram never claims better than what the client saw. The exact
    pacing logic is tested on a fake clock (test_stub_ticker.py); precision on an idle host: benchmarks/."""
    ttft_s, tpot_s, n_out, n_req = 0.03, 0.01, 6, 16
    be = StubBackend(ttft_s=ttft_s, tpot_s=tpot_s)
    be.start(run_dir=tmp_path)
    try:
        urllib.request.urlopen(be.endpoint() + "/metrics?reset=lateness", timeout=30).read()

        async def one(delay):
            await asyncio.sleep(delay)
            t0 = time.perf_counter()
            out, times = await _sse(be.endpoint(), "/v1/completions",
                                    {"prompt": "x", "max_tokens": n_out, "stream": True})
            assert sum(_tokens(c) for c in out[:-1]) == n_out
            return [t - t0 for t in times[:n_out]]

        async def go():
            return await asyncio.gather(*(one(i * 0.004) for i in range(n_req)))
        offsets = asyncio.run(go())
        m = _metrics(be.endpoint())
    finally:
        be.stop()
    late = [off - (ttft_s + k * tpot_s) for o in offsets for k, off in enumerate(o)]
    assert len(late) == n_req * n_out and min(late) >= 0   # never early: deadlines count from the server's receipt
    assert_server_lateness_bounded_by_client(m, late)
    assert "listening on" in (tmp_path / "stub.log").read_text()


# ----------------------------------------------------------------------------- StubBackend process

def test_stub_backend_start_stop_leaves_no_process(tmp_path):
    be = get_backend("stub", ttft_s=0.001, tpot_s=0.001, cpu=os.cpu_count() - 1)
    be.start(run_dir=tmp_path)
    pid = be.pid
    try:
        assert be.health() and be.endpoint().startswith("http://127.0.0.1:")
        d = be.describe()
        assert d["backend"] == "stub" and d["pid"] == pid and d["url"] == be.endpoint()
        assert d["cpu"] == os.cpu_count() - 1 and os.sched_getaffinity(pid) == {d["cpu"]}
        assert be.headers() == {} and be.discover_model() == "stub-model"
        json.dumps(d)
    finally:
        be.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    be.stop()  # idempotent
    assert be.describe()["pid"] is None


def test_several_stub_processes_share_one_port_and_each_serves(tmp_path):
    """processes=2: one port (SO_REUSEPORT), both answer (the kernel spreads new connections), both stopped."""
    be = StubBackend(ttft_s=0.001, tpot_s=0.001, processes=2, cpus=[-1, -1])
    be.start(run_dir=tmp_path)
    pids = [p.pid for p in be.procs]
    try:
        assert len(set(pids)) == 2 and be.describe()["processes"] == 2 and be.describe()["pids"] == pids
        body = json.dumps({"model": "stub-model", "prompt": [1, 2], "max_tokens": 2}).encode()
        for _ in range(24):   # a new connection each: 24 connections all hashed to one listener: p = 2^-23
            req = urllib.request.Request(be.endpoint() + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
    finally:
        be.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    served = [int(re.search(r"stub: (\d+) requests", f.read_text()).group(1))
              for f in (tmp_path / "stub.log", tmp_path / "stub-1.log")]
    assert sum(served) == 24 and min(served) > 0, served
    with pytest.raises(InputError, match="one core each"):
        StubBackend(processes=2, cpus=[3])


def test_stub_backend_dies_on_busy_port_with_log_tail(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        be = StubBackend(port=s.getsockname()[1], cpu=-1)
        with pytest.raises(ServerStartError, match="exited with code 2 .*cannot listen"):
            be.start(run_dir=tmp_path)
    assert be.pid is None


def test_module_help_and_cli_validation():
    r = subprocess.run([sys.executable, "-m", "splitbench.servers.stub_main", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--ttft-ms" in r.stdout and "--tokens-per-chunk" in r.stdout
    res = CliRunner().invoke(app, ["serve-stub", "--tokens-per-chunk", "0"])
    assert res.exit_code == 2 and "tokens_per_chunk" in res.output


# ----------------------------------------------------------------------------- OpenAIBackend

def test_openai_backend_against_stub_never_leaks_key(stub_url, monkeypatch):
    secret = "sk-test-SECRET-1234567890"
    monkeypatch.setenv("SPLITBENCH_TEST_KEY", secret)
    be = get_backend("openai", url=stub_url + "/v1/", api_key_env="SPLITBENCH_TEST_KEY")
    be.start()
    assert be.endpoint() == stub_url and be.health() and be.discover_model() == "stub-model"
    assert be.headers() == {"Authorization": f"Bearer {secret}"}
    d = be.describe()
    assert d == {"backend": "openai", "url": stub_url, "api_key_env": "SPLITBENCH_TEST_KEY",
                 "api_key_set": True, "model": None}
    assert secret not in json.dumps(d) + repr(be) + str(be)
    monkeypatch.delenv("SPLITBENCH_TEST_KEY")
    assert be.headers() == {} and be.describe()["api_key_set"] is False


def test_openai_backend_bad_url_and_unreachable():
    with pytest.raises(InputError, match="needs a scheme"):
        OpenAIBackend(url="127.0.0.1:8000")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = OpenAIBackend(url=f"http://127.0.0.1:{port}", health_timeout_s=0.5)
    with pytest.raises(InputError, match="not reachable"):
        be.start()


def test_openai_backend_health_falls_back_to_models():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/v1/models":
                body = b'{"object":"list","data":[{"id":"only-models","object":"model"}]}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        be = OpenAIBackend(url=f"http://127.0.0.1:{srv.server_address[1]}")
        be.start()
        assert be.health() and be.discover_model() == "only-models"
        assert OpenAIBackend(url=be.endpoint(), model="given").discover_model() == "given"
    finally:
        srv.shutdown()
        srv.server_close()


# ----------------------------------------------------------------------------- lean server (shared ticker)

def _strip_ids(payloads: list) -> list:
    """SSE payloads without the per-response random parts (id, created)."""
    out = []
    for p in payloads:
        if isinstance(p, dict):
            p = {k: v for k, v in p.items() if k not in ("id", "created")}
        out.append(p)
    return out


_SAME_BODIES = [
    ("/v1/completions", {"model": "m1", "prompt": [3] * 9, "max_tokens": 5, "stream": True,
                         "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("/v1/completions", {"prompt": "a b c", "max_tokens": 4, "stream": True}),
    ("/v1/completions", {"prompt": "a b c", "max_tokens": 12, "stream": True,   # 2-digit counts mid-stream
                         "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3,
                              "stream": True, "stream_options": {"include_usage": True,
                                                                 "continuous_usage_stats": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
                              "stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize("tpc", [1, 3])
def test_lean_and_aiohttp_servers_stream_the_same_events(tpc):
    """The lean server's hot path (templates, fixed-width chunk sizes) yields exactly the aiohttp server's events."""
    got = {}
    for server in ("lean", "aiohttp"):
        url, stop = run_stub_in_thread(ttft_s=0.001, tpot_s=0.0005, tokens_per_chunk=tpc, server=server)
        try:
            got[server] = [_strip_ids(asyncio.run(_sse(url, path, body))[0]) for path, body in _SAME_BODIES]
        finally:
            stop()
    assert got["lean"] == got["aiohttp"]
    assert got["lean"][2][-2]["usage"]["completion_tokens"] == 12   # and they are real streams, not both empty
    assert [_tokens(c) for c in got["lean"][1][:-1]] == ([1, 1, 1, 1] if tpc == 1 else [3, 1])


def _raw_http(port: int, data: bytes, timeout_s: float = 60.0) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_lean_http_framing_keepalive_pipelining_http10_and_bad_requests():
    url, stop = run_stub_in_thread(ttft_s=0.001, tpot_s=0.0005)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": [1, 2], "max_tokens": 3, "stream": True}).encode()
    post = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    try:
        # two pipelined requests on one keep-alive connection, then a GET that closes it
        raw = _raw_http(port, post + post + b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert raw.count(b"HTTP/1.1 200 OK") == 3 and raw.count(b"Transfer-Encoding: chunked") == 2
        assert raw.count(b"data: [DONE]") == 2 and raw.count(b"\r\n0\r\n\r\n") == 2
        assert raw.endswith(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        # HTTP/1.0: no chunked encoding, the stream ends with the connection
        raw10 = _raw_http(port, post.replace(b"HTTP/1.1", b"HTTP/1.0"))
        head, _, rest = raw10.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
        assert rest.startswith(b"data: {") and rest.endswith(b"data: [DONE]\n\n")
        # the body may arrive in pieces
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(post[:-5])
            time.sleep(0.05)
            s.sendall(post[-5:] + b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        assert raw.count(b"data: [DONE]") == 1 and b"HTTP/1.1 404 Not Found" in raw
        assert _raw_http(port, b"POST /v1/completions HTTP/1.1\r\nContent-Length: x\r\n\r\n").startswith(
            b"HTTP/1.1 400")
        assert _raw_http(port, b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").startswith(
            b"HTTP/1.1 501")
        assert _raw_http(port, b"GET /v1/completions HTTP/1.1\r\nConnection: close\r\n\r\n").startswith(
            b"HTTP/1.1 405")
    finally:
        stop()


def test_lateness_histogram_quantiles():
    from splitbench.servers.stub import Lateness
    lat = Lateness()
    assert lat.summary() == {"count": 0, "p50_s": 0.0, "p99_s": 0.0, "max_s": 0.0}
    for _ in range(98):
        lat.add(0.00005)
    lat.add(0.003)
    lat.add(0.0031)
    s = lat.summary()
    assert s["count"] == 100 and 0.00005 <= s["p50_s"] <= 0.00006 + 1e-12   # upper edge of its 10 µs bin
    assert 0.003 <= s["p99_s"] <= 0.00301 and s["max_s"] == 0.0031
    lat.add(5.0)   # beyond the histogram: counted, and the max is exact
    assert lat.summary()["max_s"] == 5.0 and lat.summary()["count"] == 101
    lat.reset()
    assert lat.summary()["count"] == 0


def test_shared_ticker_keeps_many_streams_on_schedule(tmp_path):
    """200 concurrent streams against the lean server in its own process: no chunk is early (client clock), the
    stub's lateness histogram counts every chunk and is bounded by the client's view, /metrics?reset=lateness
    starts it over, and the exit summary reports it."""
    from splitbench.client.http_lean import LeanClient
    from splitbench.client.sink import RecordSink
    from splitbench.schema.records import RequestRecord
    ttft_s, tpot_s, n_out, n_req = 0.02, 0.002, 8, 200
    be = StubBackend(ttft_s=ttft_s, tpot_s=tpot_s, loop="uvloop")
    be.start(run_dir=tmp_path)
    try:
        urllib.request.urlopen(be.endpoint() + "/metrics?reset=lateness", timeout=30).read()
        body = json.dumps({"prompt": [1] * 16, "max_tokens": n_out, "stream": True,
                           "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()

        async def one(client, delay):
            await asyncio.sleep(delay)
            send = time.perf_counter()
            rec = RequestRecord("r", 0, 0.0, 16, n_out)
            await client.request(body, RecordSink(rec, send, send), send=send)
            return rec

        async def go():
            client = LeanClient(be.endpoint() + "/v1/completions")
            try:
                return await asyncio.gather(*(one(client, i * 0.0005) for i in range(n_req)))
            finally:
                await client.close()
        recs = asyncio.run(go())
        m = _metrics(be.endpoint())
    finally:
        be.stop()
    late = []
    for r in recs:
        assert r.actual_output_tokens == n_out == sum(r.chunk_tokens)
        # a client read may carry several chunks: token k arrived with the read that brought the output past k
        arrivals = [off for off, n in zip(r.chunk_offsets_s, r.chunk_tokens) for _ in range(n)]
        late += [off - (ttft_s + k * tpot_s) for k, off in enumerate(arrivals)]
    assert min(late) >= 0   # never early
    assert_server_lateness_bounded_by_client(m, late)   # the stub counts every chunk and never flatters itself
    log = (tmp_path / "stub.log").read_text()
    assert "server lean" in log and "chunk lateness p50" in log and f"{n_req * n_out} chunks" in log


def test_serve_stub_cli_rejects_unknown_server():
    res = CliRunner().invoke(app, ["serve-stub", "--server", "nginx"])
    assert res.exit_code == 2 and "lean, aiohttp" in res.output
    r = subprocess.run([sys.executable, "-m", "splitbench.servers.stub_main", "--help"], capture_output=True,
                       text=True, timeout=60, check=True)
    assert "--server" in r.stdout and "--tick-ms" in r.stdout
