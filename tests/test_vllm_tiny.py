"""Real vLLM (CPU build) serving the tiny model: exact prompt/output token counts for token-id and chat prompts."""
from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest

from splitbench.procs import group_alive
from splitbench.workload.prompts import ChatPrompts, TokenIdPrompts


def stream(server, path: str, body: dict) -> list[dict]:
    """POST a streaming request; return the parsed SSE data events (without [DONE])."""
    body = {"model": server.model_name, "stream": True, **body}
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    events, done = [], False
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            events.append(json.loads(data))
    assert done, "stream ended without [DONE]"
    errors = [e["error"] for e in events if "error" in e]
    assert not errors, errors
    return events


@pytest.mark.vllm
@pytest.mark.parametrize("n_in,n_out", [(1, 3), (150, 17), (2500, 8), (14_050, 4)])
def test_token_id_prompt_exact_counts(vllm_server, tiny_model_dir, n_in, n_out):
    prompts = TokenIdPrompts.from_tokenizer(tiny_model_dir, seed=11)
    events = stream(vllm_server, "/v1/completions", {
        **prompts.payload(n_in, n_in), "max_tokens": n_out, "min_tokens": n_out, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    token_events = [e for e in events if e.get("choices")]
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["prompt_tokens"] == n_in
    assert final["usage"]["completion_tokens"] == n_out
    # continuous usage: completion_tokens grows by the tokens each chunk carries; their sum is n_out
    seen = [e["usage"]["completion_tokens"] for e in token_events]
    assert seen == sorted(seen) and seen[-1] == n_out
    per_chunk = [b - a for a, b in zip([0] + seen, seen)]
    assert sum(per_chunk) == n_out and all(k >= 1 for k in per_chunk)
    assert token_events[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.vllm
@pytest.mark.parametrize("target", [30, 1000, 3000])
def test_chat_prompt_calibrated_count(vllm_server, tiny_model_dir, target):
    chat = ChatPrompts(tiny_model_dir, seed=5)
    payload, planned = chat.build(target, target)
    assert planned == target
    events = stream(vllm_server, "/v1/chat/completions", {
        **payload, "max_tokens": 5, "min_tokens": 5, "ignore_eos": True,
        "stream_options": {"include_usage": True}})
    usage = events[-1]["usage"]
    assert usage["prompt_tokens"] == planned and usage["completion_tokens"] == 5
    assert sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")) >= 1


FAKE_SERVER = r"""
import http.server, os, signal, subprocess, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
print("fake vllm", " ".join(args), "bind=" + os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""), flush=True)
if os.environ.get("FAKE_MODE") == "die":
    print("ValueError: no such model", flush=True)
    sys.exit(3)
if os.environ.get("FAKE_MODE") == "nixl-hang":   # vLLM CPU 0.32 when its NIXL side-channel port is taken
    print("Exception in thread nixl_handshake_listener:", flush=True)
    print("Traceback (most recent call last):", flush=True)
    print('  File "zmq/backend/cython/_zmq.py", line 190, in zmq.backend.cython._zmq._check_rc', flush=True)
    print("zmq.error.ZMQError: Address already in use (addr='tcp://127.0.0.1:34295')", flush=True)
    time.sleep(300)
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
if os.environ.get("FAKE_MODE") == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(1.0)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def fake_python(tmp_path):
    """An executable standing in for `python`: it runs FAKE_SERVER whatever `-m vllm...` args it gets."""
    import sys
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
def test_launcher_start_health_and_group_stop(tmp_path, mode):
    from splitbench.servers.launcher import VllmServer, free_port
    srv = VllmServer(tmp_path / "model", port=free_port(), python=fake_python(tmp_path), cpu_cores=[0],
                     log_path=tmp_path / "s.log", env={"FAKE_MODE": mode}, extra_args=["--x", "1"])
    srv.start(timeout_s=30)
    try:
        assert srv.health() and srv.start_s is not None and srv.start_s >= 1.0
        pgid = srv.proc.pid
        assert os.getpgid(pgid) == pgid != os.getpgid(0)
        members = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True).stdout.split()
        assert len(members) >= 2   # the server and the child that ignores SIGTERM
        d = srv.describe()
        assert json.loads(json.dumps(d))["url"] == srv.url and d["cpu_cores"] == [0]
        log = (tmp_path / "s.log").read_text()
        assert "--port" in log and "--x 1" in log and "bind=0" in log
    finally:
        srv.stop(grace_s=1)
    assert not group_alive(pgid) and not srv.health()
    srv.stop()   # idempotent


def test_launcher_start_failure_shows_log(tmp_path):
    from splitbench.errors import ServerStartError
    from splitbench.servers.launcher import VllmServer, free_port
    srv = VllmServer(tmp_path / "model", port=free_port(), python=fake_python(tmp_path),
                     log_path=tmp_path / "bad.log", env={"FAKE_MODE": "die"})
    with pytest.raises(ServerStartError, match="(?s)exited with code 3.*no such model"):
        srv.start(timeout_s=30)
    assert srv.proc is None
    srv.stop()


def test_start_ends_at_once_when_the_nixl_handshake_thread_dies(tmp_path):
    from splitbench.errors import ServerStartError
    from splitbench.servers.launcher import VllmServer, free_port
    srv = VllmServer(tmp_path / "model", port=free_port(), python=fake_python(tmp_path),
                     log_path=tmp_path / "hang.log", env={"FAKE_MODE": "nixl-hang"})
    t0 = time.monotonic()
    with pytest.raises(ServerStartError, match="nixl_handshake_listener died: zmq.error.ZMQError: Address already in use"):
        srv.start(timeout_s=120)
    assert time.monotonic() - t0 < 60 and srv.proc is None   # not the whole timeout


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    import socket

    from splitbench.servers.launcher import ephemeral_range, free_port
    lo, hi = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert not any(lo <= p <= hi for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))
