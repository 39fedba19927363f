"""The router's lean HTTP/1.1 server (servers/lean_http.py) on raw sockets: keep-alive, pipelining, heads and bodies
split across packets, Expect: 100-continue, large bodies, malformed requests, a client that leaves mid-stream,
HTTP/1.0, unknown routes and methods, and a stop with a request in flight."""
from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from splitbench.servers.phaselog import load_phase_log
from splitbench.servers.router import Router
from splitbench.servers.stub_main import run_stub_in_thread

BODY = {"model": "stub-model", "prompt": [5] * 40, "max_tokens": 4, "stream": True}


@pytest.fixture(scope="module")
def stub_url():
    url, stop = run_stub_in_thread(ttft_s=0.005, tpot_s=0.002, prefix_block_tokens=0)
    yield url
    stop()


@contextlib.asynccontextmanager
async def running(url, tmp_path, **kw):
    r = Router([{"id": "b0", "url": url, "pool": "baseline"}], "jsq", phase_log=tmp_path / "p.jsonl",
               health_interval_s=3600, **kw)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


def post(body: dict | bytes, path: str = "/v1/completions", extra: str = "", version: str = "1.1") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    """One response: (status, lower-case headers, de-chunked body); a body without length: read to EOF."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
    if status == 100:
        return await read_response(reader)
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                return status, headers, body
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    return status, headers, await reader.read()


def events(body: bytes) -> list[bytes]:
    return [ln[6:] for ln in body.split(b"\n") if ln.startswith(b"data: ")]


def test_keep_alive_pipelining_and_split_packets(stub_url, tmp_path):
    async def go():
        async with running(stub_url, tmp_path) as r:
            reader, writer = await asyncio.open_connection(r.host, r.port)
            out = []
            # several requests one after the other on one connection
            for req in (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", post(BODY, extra="X-Request-Id: ka-1\r\n"),
                        post({**BODY, "stream": False}, extra="X-Request-Id: ka-2\r\n"),
                        b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"):
                writer.write(req)
                out.append(await read_response(reader))
            # three requests in one write (pipelined): answered in order
            writer.write(post(BODY, extra="X-Request-Id: pl-1\r\n") + b"GET /health HTTP/1.1\r\n\r\n" +
                         post({**BODY, "max_tokens": 2}, extra="X-Request-Id: pl-2\r\n"))
            piped = [await read_response(reader) for _ in range(3)]
            # a head and a body cut into small pieces, sent apart
            raw = post({**BODY, "max_tokens": 3}, extra="X-Request-Id: sp-1\r\n")
            for k in range(0, len(raw), 7):
                writer.write(raw[k:k + 7])
                await writer.drain()
                await asyncio.sleep(0.001)
            split = await read_response(reader)
            writer.close()
            return out, piped, split, dict(r.n)
    out, piped, split, n = asyncio.run(go())
    (hs, _, hb), (ss, sh, sb), (ws, wh, wb), (ms, mh, mb) = out
    assert hs == 200 and json.loads(hb)["status"] == "ok"
    assert ss == 200 and sh["transfer-encoding"] == "chunked" and sh["x-request-id"] == "ka-1"
    assert sh["content-type"].startswith("text/event-stream") and len(events(sb)) == 4 + 1
    assert events(sb)[-1] == b"[DONE]"
    assert ws == 200 and int(wh["content-length"]) == len(wb) and "transfer-encoding" not in wh   # passed on as is
    assert json.loads(wb)["usage"]["completion_tokens"] == 4
    assert ms == 200 and mh["content-type"] == "text/plain; charset=utf-8" and b"splitbench_router_ok_total" in mb
    assert [s for s, _, _ in piped] == [200, 200, 200]
    assert piped[0][1]["x-request-id"] == "pl-1" and len(events(piped[0][2])) == 5
    assert json.loads(piped[1][2])["status"] == "ok" and len(events(piped[2][2])) == 3
    assert split[0] == 200 and split[1]["x-request-id"] == "sp-1" and len(events(split[2])) == 4
    assert n["ok"] == 5 and n["inflight"] == 0
    log = load_phase_log(tmp_path / "p.jsonl")
    assert {k: log[k]["status"] for k in log} == {k: "ok" for k in ("ka-1", "ka-2", "pl-1", "pl-2", "sp-1")}


def test_large_body_expect_continue_and_bad_requests(stub_url, tmp_path):
    big = {**BODY, "prompt": list(range(1, 1_000_001)), "max_tokens": 2}   # ~6.9 MB of JSON

    async def go():
        async with running(stub_url, tmp_path) as r:
            res = {}
            reader, writer = await asyncio.open_connection(r.host, r.port)
            raw = post(big, extra="Expect: 100-continue\r\nX-Request-Id: big\r\n")
            cut = raw.index(b"\r\n\r\n") + 4
            writer.write(raw[:cut])   # the head alone: the server asks for the body
            res["continue"] = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(raw[cut:])
            res["big"] = await read_response(reader)
            for name, req in (("line", b"NONSENSE\r\n\r\n"), ("length", b"POST /v1/completions HTTP/1.1\r\n"
                                                                      b"Content-Length: x\r\n\r\n"),
                              ("chunked", b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
                              ("huge", b"POST /v1/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % 2**30)):
                rd, wr = await asyncio.open_connection(r.host, r.port)
                wr.write(req)
                res[name] = (await read_response(rd), await rd.read())   # answered, then closed (EOF)
                wr.close()
            rd, wr = await asyncio.open_connection(r.host, r.port)
            for name, req in (("json", post(b"[1,2")), ("route", b"GET /nope HTTP/1.1\r\n\r\n"),
                              ("method", b"GET /v1/completions HTTP/1.1\r\n\r\n"),
                              ("head", b"HEAD /health HTTP/1.1\r\n\r\n")):
                wr.write(req)
                res[name] = await (read_response(rd) if name != "head" else rd.readuntil(b"\r\n\r\n"))
            wr.write(post(BODY, version="1.0"))   # HTTP/1.0: no chunks, the end is the close
            res["http10"] = await read_response(rd)
            wr.close()
            return res, dict(r.n)
    res, n = asyncio.run(go())
    assert res["continue"].startswith(b"HTTP/1.1 100 Continue")
    status, _, body = res["big"]
    assert status == 200 and len(events(body)) == 3
    assert n["bad_request"] == 1 and n["ok"] == 2
    for name, code in (("line", 400), ("length", 400), ("chunked", 501), ("huge", 413)):
        (status, headers, body), rest = res[name]
        assert status == code and headers["connection"] == "close" and rest == b"", name
        assert json.loads(body)["error"]["code"] == code
    assert res["json"][0] == 400 and "bad request body" in json.loads(res["json"][2])["error"]["message"]
    assert res["route"][0] == 404 and res["method"][0] == 405 and res["method"][1]["allow"] == "POST"
    assert res["head"].startswith(b"HTTP/1.1 200 ") and b"Content-Length: " in res["head"]
    status, headers, body = res["http10"]
    assert status == 200 and "transfer-encoding" not in headers and events(body)[-1] == b"[DONE]"
    log = load_phase_log(tmp_path / "p.jsonl")
    assert log["big"]["status"] == "ok" and log["big"]["input_tokens"] == 1_000_000


@pytest.mark.parametrize("when", ["mid-stream", "before-first-token"])
def test_a_client_that_leaves_is_recorded_and_the_router_goes_on(tmp_path, when):
    """Mid-stream: the next write finds the client gone; before the first token nothing is written: the closed
    connection itself cancels the request (and its upstream request)."""
    url, stop = run_stub_in_thread(ttft_s=0.005 if when == "mid-stream" else 30.0, tpot_s=0.05)

    async def go():
        async with running(url, tmp_path) as r:
            reader, writer = await asyncio.open_connection(r.host, r.port)
            writer.write(post({**BODY, "max_tokens": 200}, extra="X-Request-Id: gone\r\n"))
            if when == "mid-stream":
                await reader.readuntil(b"data: ")    # the first event, then leave
            else:
                while not r.n["inflight"]:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
            writer.transport.abort()
            for _ in range(500):
                if r.n["cancelled"]:
                    break
                await asyncio.sleep(0.01)
            busy = sum(c.fut is not None for c in r.upstream["b0"].client._conns)
            if when != "mid-stream":
                return dict(r.n), busy, (200, {}, b"data: [DONE]")   # the stub's TTFT is 30 s: no second request
            reader, writer = await asyncio.open_connection(r.host, r.port)
            writer.write(post({**BODY, "max_tokens": 2}, extra="X-Request-Id: after\r\n"))
            after = await read_response(reader)
            writer.close()
            return dict(r.n), busy, after
    try:
        n, busy, after = asyncio.run(go())
    finally:
        stop()
    assert n["cancelled"] == 1 and n["inflight"] == 0 and busy == 0   # its upstream request was ended too
    assert after[0] == 200 and events(after[2])[-1] == b"[DONE]"
    log = load_phase_log(tmp_path / "p.jsonl")
    assert (log["gone"]["status"], log["gone"]["error"]) == ("cancelled", "client disconnected")
    if when == "mid-stream":
        assert log["gone"]["phases_unix_s"]["first_token"] < log["gone"]["phases_unix_s"]["done"]
        assert log["after"]["status"] == "ok"
    else:
        assert "first_token" not in log["gone"]["phases_unix_s"]


def test_stop_with_a_request_in_flight_logs_it(tmp_path):
    url, stop = run_stub_in_thread(ttft_s=30.0)

    async def go():
        r = Router([{"id": "b0", "url": url, "pool": "baseline"}], "jsq", phase_log=tmp_path / "p.jsonl",
                   health_interval_s=3600)
        await r.start()
        reader, writer = await asyncio.open_connection(r.host, r.port)
        writer.write(post(BODY, extra="X-Request-Id: late\r\n"))
        while not r.n["inflight"]:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await r.stop()
        stop_s = loop.time() - t0
        await r.stop()   # idempotent
        rest = await reader.read()
        return stop_s, rest
    try:
        stop_s, rest = asyncio.run(go())
    finally:
        stop()
    assert stop_s < 5 and rest == b""     # its connection was cut after the grace period
    log = load_phase_log(tmp_path / "p.jsonl")
    assert log["late"]["status"] == "cancelled"
