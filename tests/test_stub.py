"""The stub server (chunk shapes, usage, pacing, faults), StubBackend's child process and OpenAIBackend."""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import aiohttp
import pytest
from typer.testing import CliRunner

from splitbench.backends.base import get_backend
from splitbench.backends.openai import OpenAIBackend
from splitbench.backends.stub import count_input_tokens, run_stub_in_thread
from splitbench.backends.stub_backend import StubBackend
from splitbench.cli import app
from splitbench.errors import InputError


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
    assert usage_chunk["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
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
    assert out[-2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


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

def test_timing_ttft_and_gaps_from_child_process(tmp_path):
    ttft_s, tpot_s, n_out, n_req = 0.03, 0.01, 6, 16
    be = StubBackend(ttft_s=ttft_s, tpot_s=tpot_s)
    be.start(run_dir=tmp_path)
    try:
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
    finally:
        be.stop()
    ttfts = [o[0] for o in offsets]
    gaps = [b - a for o in offsets for a, b in zip(o, o[1:])]
    lasts = [o[-1] for o in offsets]
    assert min(ttfts) >= ttft_s  # never early: deadlines count from when the server got the request
    assert statistics.median(ttfts) - ttft_s < 0.003
    assert abs(statistics.median(gaps) - tpot_s) < 0.001
    # absolute deadlines: no drift over the stream
    assert statistics.median(lasts) - (ttft_s + (n_out - 1) * tpot_s) < 0.003
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


def test_stub_backend_dies_on_busy_port_with_log_tail(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        be = StubBackend(port=s.getsockname()[1], cpu=-1)
        with pytest.raises(InputError, match="exited with code 2 .*cannot listen"):
            be.start(run_dir=tmp_path)
    assert be.pid is None


def test_module_help_and_cli_validation():
    r = subprocess.run([sys.executable, "-m", "splitbench.backends.stub", "--help"], capture_output=True,
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
