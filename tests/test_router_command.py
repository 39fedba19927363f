"""`splitbench router` as a real subprocess over real stub servers (real sockets): P/D streaming through it, the
phase log's instance names, the start check (a down URL, a server that is not OpenAI's: exit 2, one line), SIGTERM
(exit 0, nothing left behind); and the lean upstream leg's failures in process (cut streams, a client that leaves)."""
from __future__ import annotations

import asyncio
import http.server
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import aiohttp
import pytest

from splitbench.errors import InputError
from splitbench.procs import group_alive
from splitbench.servers.phaselog import load_phase_log
from splitbench.servers.router import Router
from splitbench.servers.router_process import name_instances
from splitbench.servers.stub_main import run_stub_in_thread

TPOT_S = 0.02
BODY = {"model": "stub-model", "prompt": [7] * 24, "max_tokens": 5, "min_tokens": 5, "stream": True}


@pytest.fixture
def stubs():
    stops = []

    def make(**kw):
        url, stop = run_stub_in_thread(**{"ttft_s": 0.01, "tpot_s": TPOT_S, **kw})
        stops.append(stop)
        return url
    yield make
    for s in stops:
        s()


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "splitbench.cli", "router", *args]


def _start(*args: str) -> tuple[subprocess.Popen, str]:
    """The router as a subprocess in its own session -> (process, its URL from the one line it prints)."""
    proc = subprocess.Popen(_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline, line = time.monotonic() + 120, b""
    while time.monotonic() < deadline and b"\n" not in line and proc.poll() is None:
        if sel.select(timeout=0.5):
            line += os.read(proc.stdout.fileno(), 4096)
    sel.close()
    if b"router on http://" not in line:
        proc.kill()
        raise AssertionError(f"router did not start: {line!r} {proc.stderr.read()!r}")
    return proc, line.split(b"router on ", 1)[1].split()[0].decode()


async def _stream(url: str, rid: str, body=BODY, headers=None):
    """-> (status, content type, [(data payload, client receive time)], raw body)"""
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/completions", json=body, headers={"X-Request-Id": rid, **(headers or {})}) as r:
            events, buf, raw = [], b"", b""
            async for chunk in r.content.iter_any():
                buf, raw = buf + chunk, raw + chunk
                *done, buf = buf.split(b"\n\n")
                events += [(e[6:], time.perf_counter()) for e in done if e.startswith(b"data: ")]
            return r.status, r.headers.get("Content-Type", ""), events, raw


def _group(pgid: int) -> list[int]:
    """The processes of a process group (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def test_router_command_serves_pd_over_running_instances_and_stops_clean_on_sigterm(stubs, tmp_path):
    prompt = stubs(ttft_s=0.03)
    token = stubs(ttft_s=60.0, kv_transfer_s=0.002)   # a decode that prefilled itself would take a minute
    log = tmp_path / "phases.jsonl"
    proc, url = _start("--prompt-url", prompt, "--token-url", token, "--port", "0", "--phase-log", str(log),
                       "--policy", "mixed-pool", "--policy-param", "prompt_threshold_tokens=100000")
    try:
        async def go():
            ok = await asyncio.gather(*(_stream(url, f"r{k}") for k in range(3)))
            failed = await _stream(url, "f", headers={"X-Stub-Fault": "status:500"})
            async with aiohttp.ClientSession() as s:
                async with s.get(url + "/v1/models") as m:
                    models = await m.json()
                async with s.get(url + "/health") as h:
                    alive = h.status in (200, 503)
            return ok, failed, models, alive
        ok, failed, models, alive = asyncio.run(go())
        members = _group(proc.pid)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    for status, ctype, events, _ in ok:
        assert status == 200 and ctype.startswith("text/event-stream")
        assert [e for e, _ in events][-1] == b"[DONE]" and len(events) == 5 + 1
        # streamed, not buffered: the events reached the client spread over the stub's pacing (a lower bound)
        assert events[-2][1] - events[0][1] >= 3 * TPOT_S
    assert failed[0] == 502 and "prefill on instance prompt-0" in json.loads(failed[3])["error"]["message"] and alive
    assert models["data"][0]["id"] == "stub-model"
    assert rc == 0 and members == [proc.pid] and not group_alive(proc.pid)   # no child of its own, none left
    entries = load_phase_log(log)
    for k in range(3):
        e = entries[f"r{k}"]
        assert (e["prompt_instance"], e["token_instance"], e["flow"], e["status"]) == ("prompt-0", "token-0",
                                                                                      "split", "ok")
        ph = e["phases_unix_s"]
        assert ph["prefill_done"] - ph["prefill_sent"] >= 0.03 and ph["done"] - ph["first_token"] >= 3 * TPOT_S
    assert (entries["f"]["status"], entries["f"]["stage"], entries["f"]["prompt_instance"]) == \
        ("upstream_error", "prefill", "prompt-0")
    anchor = json.loads(log.read_text().splitlines()[0])
    assert anchor["policy"] == "mixed-pool" and [i["id"] for i in anchor["instances"]] == ["prompt-0", "token-0"]


class _NotOpenAI(http.server.BaseHTTPRequestHandler):
    def do_GET(self):   # noqa: N802
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_a_down_or_foreign_instance_is_a_one_line_error_before_serving(stubs, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    foreign = f"http://127.0.0.1:{server.server_address[1]}"
    live = stubs()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        for args, named in ((("--prompt-url", live, "--token-url", closed, "--port", "0"), f"token-0 ({closed})"),
                            (("--url", live, "--url", foreign, "--port", "0"), f"baseline-1 ({foreign})"),
                            (("--prompt-url", live, "--port", "0"), "--token-url"),
                            (("--url", live, "--policy", "mixed-pool", "--policy-param", "nope=1"), "nope"),
                            (("--url", live, "--port", str(busy.getsockname()[1])), "cannot listen")):
            res = subprocess.run(_command(*args, "--phase-log", str(tmp_path / "p.jsonl")),
                                 capture_output=True, text=True, timeout=120)
            assert res.returncode == 2, (args, res.stderr)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], res.stderr
            assert "router on" not in res.stdout
    finally:
        busy.close()
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "p.jsonl").exists()   # nothing served, nothing written


def test_instance_names_follow_the_flags():
    inst = name_instances([("prompt", "http://a:1"), ("token", "http://b:2/"), ("prompt", "http://c:3"),
                           ("baseline", "http://d:4"), ("mixed", "http://e:5")])
    assert [(i["id"], i["url"]) for i in inst] == [("prompt-0", "http://a:1"), ("token-0", "http://b:2"),
                                                   ("prompt-1", "http://c:3"), ("baseline-0", "http://d:4"),
                                                   ("mixed-0", "http://e:5")]
    for bad in ([], [("token", "http://a:1")], [("baseline", "a:1")], [("baseline", "http://a:x")],
                [("baseline", "http://a:1"), ("baseline", "http://a:1/")], [("decode", "http://a:1")]):
        with pytest.raises(InputError):
            name_instances(bad)


def test_upstream_cut_mid_stream_and_a_client_that_leaves(stubs, tmp_path):
    """The lean upstream leg: a stream the instance cuts after 2 chunks cuts the client's connection too and is
    logged as an upstream error (the router goes on); a client that leaves mid-stream ends its upstream request."""
    url = stubs(tpot_s=0.05)

    async def go():
        r = Router([{"id": "baseline-0", "url": url, "pool": "baseline"}], "jsq", phase_log=tmp_path / "p.jsonl",
                   health_interval_s=3600)
        await r.start()
        try:
            cut = await _stream(r.url, "cut", {**BODY, "max_tokens": 8}, {"X-Stub-Fault": "disconnect:2"})
        except aiohttp.ClientPayloadError:
            cut = "cut"
        try:
            await r.poll_health()   # back in rotation
            async with aiohttp.ClientSession() as s:
                async with s.post(r.url + "/v1/completions", json={**BODY, "max_tokens": 100},
                                  headers={"X-Request-Id": "gone"}) as resp:
                    await resp.content.readline()   # the first event, then leave
            for _ in range(500):   # the router notices the closed connection (no time bound asserted)
                if r.n["cancelled"]:
                    break
                await asyncio.sleep(0.01)
            after = await _stream(r.url, "after")
            busy = sum(c.fut is not None for c in r.upstream["baseline-0"].client._conns)
        finally:
            await r.stop()
        return cut, after, busy
    cut, after, busy = asyncio.run(go())
    assert cut == "cut" or [e for e, _ in cut[2]][-1:] != [b"[DONE]"]
    assert after[0] == 200 and after[2][-1][0] == b"[DONE]" and busy == 0
    log = load_phase_log(tmp_path / "p.jsonl")
    assert (log["cut"]["status"], log["cut"]["http_status"], log["cut"]["stage"]) == ("upstream_error", 200, "request")
    assert "baseline-0" in log["cut"]["error"] and log["gone"]["status"] == "cancelled"
