"""Bring your own instances on stubs (real sockets, real router and scraper processes): splitwise/mixed/vllm over
servers the user started (--prompt-url/--token-url/--url/--topology), the start checks (not an OpenAI server, no
KV connector: exit 2 naming it, nothing written), an instance killed mid-run, launch-only flags refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from splitbench.app.options import RunOptions, backend_options, resolve_defaults
from splitbench.app.runner import run
from splitbench.backends.registry import get_backend
from splitbench.backends.stub import StubBackend
from splitbench.errors import InputError
from splitbench.schema import records as R
from splitbench.servers.byo import load_topology
from splitbench.servers.scrape import snapshot

CLI = [sys.executable, "-m", "splitbench.cli"]
TRACE = "synth:arrivals=poisson,rate=20,count=8,lengths=uniform,input=40-80,output=3-6,seed=4"


def _stub(**kw) -> StubBackend:
    s = StubBackend(ttft_s=0.005, tpot_s=0.002, cpu=-1, **kw)
    s.start()
    return s


@pytest.fixture(scope="module")
def stubs():
    """prompt (NIXL series), token (NIXL series), a plain P/D stub (no connector series: the probe decides),
    and stubs started without a connector (kv_transfer_params ignored)."""
    made = {"p_nixl": _stub(kv_connector="nixl"), "t_nixl": _stub(kv_connector="nixl"), "plain": _stub(),
            "plain2": _stub(), "none": _stub(kv_connector="none")}
    yield {k: s.endpoint() for k, s in made.items()}
    for s in made.values():
        s.stop()


def _run(tmp_path, backend: str, run_id: str, trace: str = TRACE, machine: str | None = None, **flags):
    opts = RunOptions(trace=trace, backend=backend, backend_options=backend_options(backend, machine=machine, **flags),
                      results_dir=str(tmp_path), run_id=run_id, timeout_s=30, grace_s=2, machine=machine)
    res = run(opts)
    return res, json.loads((res.run_dir / "run.json").read_text()), R.read_records(res.run_dir)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, check=False)


def test_splitwise_over_user_instances_records_prompt_and_token(tmp_path, stubs):
    res, meta, recs = _run(tmp_path, "splitwise", "split", machine="cpu-host",
                           prompt_url=[stubs["p_nixl"]], token_url=[stubs["plain"] + "/v1/"])
    assert meta["status"] == "complete" and len(recs) == 8 and all(r.ok for r in recs)
    assert {(r.prefill_instance, r.decode_instance) for r in recs} == {("prompt-0", "token-0")}
    assert all(r.phases_s and "prefill_done" in r.phases_s for r in recs)
    b = meta["backend"]
    assert b["backend"] == "splitwise" and b["external"] and b["router"]["policy"] == "jsq"
    inst = {i["id"]: i for i in b["instances"]}
    assert inst["prompt-0"] == {**inst["prompt-0"], "pool": "prompt", "url": stubs["p_nixl"], "external": True,
                                "model": "stub-model", "connector": "metrics:nixl"}
    # the plain stub shows no connector series: the prefill probe proved it takes KV through kv_transfer_params
    assert inst["token-0"]["url"] == stubs["plain"] and inst["token-0"]["connector"] == "probe"
    assert inst["token-0"]["machine"] == "cpu-host"   # --machine: every instance the topology names none for
    assert meta["options"]["rate_scale"] == 1.0 and "sizing" not in meta
    hw = meta["hardware"]
    assert [(a["instance"], a["pool"], a["machine"], a["machines"]) for a in hw["allocations"]] == \
        [("prompt-0", "prompt", "cpu-host", 1.0), ("token-0", "token", "cpu-host", 1.0)]
    m = json.loads((res.run_dir / "metrics" / "summary.json").read_text())
    assert m["prompt-0"]["scraped"] and m["token-0"]["scraped"]
    assert m["token-0"]["counters"]["vllm:external_prefix_cache_hits_total"] > 0


def test_topology_file_machines_and_mixed(tmp_path, stubs):
    topo = tmp_path / "topo.toml"
    topo.write_text(f'[[instance]]\nurl = "{stubs["p_nixl"]}"\npool = "prompt"\nmachine = "dgx-h100"\n'
                    f'[[instance]]\nurl = "{stubs["t_nixl"]}"\npool = "token"\nmachine = "dgx-a100"\nmachines = 2\n'
                    f'id = "decoder-a"\n')
    res, meta, recs = _run(tmp_path, "mixed", "mixed", topology=str(topo))
    assert meta["status"] == "complete" and all(r.ok for r in recs)
    assert {r.prefill_instance for r in recs} <= {"prompt-0", "decoder-a"} and meta["backend"]["policy"] == "mixed-pool"
    alloc = {a["instance"]: (a["machine"], a["machines"]) for a in meta["hardware"]["allocations"]}
    assert alloc == {"prompt-0": ("dgx-h100", 1.0), "decoder-a": ("dgx-a100", 2.0)}
    assert set(meta["hardware"]["types"]) == {"dgx-h100", "dgx-a100"}


def test_vllm_backend_urls_behind_router_and_single_url_direct(tmp_path, stubs):
    res, meta, recs = _run(tmp_path, "vllm", "two", url=[stubs["plain"], stubs["plain2"]])
    assert all(r.ok for r in recs) and {r.pool for r in recs} == {"baseline"}
    assert {r.prefill_instance for r in recs} <= {"baseline-0", "baseline-1"}
    assert [i["id"] for i in meta["backend"]["instances"]] == ["baseline-0", "baseline-1"]
    res, meta, recs = _run(tmp_path, "vllm", "one", url=[stubs["plain"]])
    b = meta["backend"]
    assert all(r.ok for r in recs) and b["router"] is None and b["url"] == stubs["plain"] and b["phase_log"] is None
    assert json.loads((res.run_dir / "metrics" / "summary.json").read_text())["baseline-0"]["scraped"]


class _Html(BaseHTTPRequestHandler):
    """A web server that is not an OpenAI server: HTML everywhere (mode html), or /v1/models 404 (mode 404)."""
    mode = "html"

    def do_GET(self):  # noqa: N802
        status = 404 if self.mode == "404" and self.path.startswith("/v1/") else 200
        body = b"<html><body>hello</body></html>"
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("mode", ["html", "404"])
def test_not_an_openai_server_is_one_line_exit_2(tmp_path, stubs, mode):
    handler = type("H", (_Html,), {"mode": mode})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        p = _cli("run", "--backend", "splitwise", "--prompt-url", stubs["p_nixl"], "--token-url", url,
                 "--trace", TRACE, "--results", str(tmp_path / "res"))
    finally:
        srv.shutdown()
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "token-0" in lines[0] and url in lines[0] and "not" in lines[0], p.stderr
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())


def test_decode_instance_without_connector_exit_2_naming_it(tmp_path, stubs):
    before = snapshot(stubs["none"])["counters"]
    p = _cli("run", "--backend", "splitwise", "--prompt-url", stubs["p_nixl"], "--token-url", stubs["none"],
             "--trace", TRACE, "--results", str(tmp_path / "res"))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "token instance token-0" in lines[0] and stubs["none"] in lines[0], p.stderr
    assert "kv_role" in lines[0] and not (tmp_path / "res").exists()
    # only the one-token probe reached it, no replayed request
    after = snapshot(stubs["none"])["counters"]
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 1


def test_prompt_instance_without_connector_is_named(stubs):
    b = get_backend("splitwise", **backend_options("splitwise", prompt_url=[stubs["none"]],
                                                   token_url=[stubs["t_nixl"]]))
    with pytest.raises(InputError, match=r"prompt instance prompt-0 .*without kv_transfer_params"):
        b.check()


def test_instance_killed_mid_run_is_taken_out_and_its_failures_recorded(tmp_path, stubs):
    prompt = _stub(kv_connector="nixl")
    tokens = [StubBackend(ttft_s=0.005, tpot_s=0.02, cpu=-1, kv_connector="nixl") for _ in range(2)]
    for t in tokens:
        t.start()
    victim = tokens[1]

    def kill_when_busy():   # SIGKILL token-1 while it streams a request (its /metrics shows one running)
        while victim.proc is not None:
            try:
                if snapshot(victim.endpoint(), 1.0)["gauges"].get("vllm:num_requests_running", 0) >= 1:
                    os.kill(victim.proc.pid, signal.SIGKILL)
                    return
            except OSError:
                pass
            time.sleep(0.005)
    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    trace = "synth:arrivals=poisson,rate=8,count=16,lengths=uniform,input=40-80,output=40-40,seed=5"
    try:
        res, meta, recs = _run(tmp_path, "splitwise", "kill", trace=trace, prompt_url=[prompt.endpoint()],
                               token_url=[t.endpoint() for t in tokens])
    finally:
        killer.join(5)
        prompt.stop()
        for t in tokens:
            t.stop()
    assert meta["status"] == "complete" and len(recs) == 16
    failed = [r for r in recs if not r.ok]
    assert failed and {r.decode_instance for r in failed} == {"token-1"}
    assert any(r.ok for r in recs)
    # once a request failed on token-1, the router chose token-0 for every later request
    lines = [json.loads(x) for x in (res.run_dir / "router" / "phases.jsonl").read_text().splitlines()]
    entries = [e for e in lines if e.get("kind") != "anchor"]
    first_fail = min(e["t"]["done"] for e in entries if e["status"] != "ok")
    later = [e for e in entries if e["t"]["router_recv"] > first_fail]
    assert all(e["token_instance"] == "token-0" for e in later)


def test_launch_flags_refused_one_line(tmp_path, stubs):
    p = _cli("run", "--backend", "splitwise", "--prompt-url", stubs["p_nixl"], "--token-url", stubs["t_nixl"],
             "--cores", "0,1", "--results", str(tmp_path / "res"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--cores" in p.stderr, p.stderr
    u = "http://127.0.0.1:9"
    for backend, flags, words in [
            ("vllm", {"url": [u, u + "0"], "instances": 2}, "--instances"),
            ("splitwise", {"prompt_url": [u], "token_url": [u + "0"], "model_dir": "/m"}, "--model-dir"),
            ("splitwise", {"prompt_url": [u], "token_url": [u + "0"], "connector": "nixl"}, "--connector"),
            ("mixed", {"prompt_url": [u], "token_url": [u + "0"], "gpus": "0,1"}, "--gpus"),
            ("splitwise", {"url": [u]}, "--prompt-url"), ("vllm", {"prompt_url": [u]}, "--url"),
            ("openai", {"url": [u, u + "0"]}, "one --url"), ("stub", {"prompt_url": [u]}, "--backend"),
            ("vllm", {"url": [u, u]}, "twice")]:
        with pytest.raises(InputError, match=words):
            backend_options(backend, **flags)
    with pytest.raises(InputError, match="needs prompt and token"):
        get_backend("splitwise", **backend_options("splitwise", prompt_url=[u]))


def test_topology_file_errors_name_the_file(tmp_path):
    for text, words in [('[[instance]]\nurl = "http://h:1"\npool = "decode"\n', "pool must be"),
                        ('[[instance]]\nurl = "http://h:1"\npool = "token"\nport = 3\n', "unknown key 'port'"),
                        ('[[instance]]\npool = "token"\n', "needs url"), ("x = [", "not valid TOML"),
                        ('[[instance]]\nurl = "h:1"\npool = "token"\n', "needs a scheme")]:
        f = tmp_path / "t.toml"
        f.write_text(text)
        with pytest.raises(InputError, match=words) as e:
            load_topology(str(f))
        assert str(f) in str(e.value)
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"instance": [{"url": "http://a:1", "pool": "baseline"},
                                          {"url": "http://b:1", "pool": "baseline", "machine": "dgx-h100"}]}))
    assert [(i.id, i.machine) for i in load_topology(str(f))] == [("baseline-0", None), ("baseline-1", "dgx-h100")]
    opts = RunOptions(backend="vllm", backend_options=backend_options("vllm", topology=str(f)))
    assert resolve_defaults(opts).rate_scale == 1.0
