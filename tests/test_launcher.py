"""Fast tests (no vLLM): topology planning, vLLM args/env, CPU pinning, parallel start with log-tail errors,
process-group teardown (also when the parent is SIGKILLed: the reaper), the scraper's parsing and files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from splitbench.errors import InputError, ServerStartError
from splitbench.procs import group_alive
from splitbench.servers.launcher import Cluster, VllmServer
from splitbench.servers.topology import assign_cores, assign_gpus, connector_config, plan_cluster

FAKE_SERVER = r"""
import http.server, os, signal, subprocess, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
print("fake vllm", " ".join(args), flush=True)
print("env", "bind=" + os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
      "side=" + os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", ""), "cuda=" + os.environ.get("CUDA_VISIBLE_DEVICES", "-"),
      "affinity=" + ",".join(map(str, sorted(os.sched_getaffinity(0)))), flush=True)
mode = os.environ.get("FAKE_MODE", "")
if mode == "die" or (mode.startswith("die-port") and str(port) in mode):
    time.sleep(float(os.environ.get("FAKE_DIE_AFTER", "0.3")))
    print("RuntimeError: NIXL is not available on this host", flush=True)
    sys.exit(3)
# a worker child that ignores SIGTERM, like an engine core stuck in a kernel
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
if mode == "never":
    time.sleep(300)
time.sleep(float(os.environ.get("FAKE_READY_AFTER", "0.5")))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture
def fake_python(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


def wait_for(cond, timeout_s=120.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


def wait_gone(pgids, timeout_s=15.0) -> list[int]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        alive = [g for g in pgids if group_alive(g)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


# ----------------------------------------------------------------------------- topology

def test_splitwise_plan_pins_prompt_core0_token_core1_with_nixl(tmp_path):
    spec = plan_cluster(tmp_path, prompt=1, token=1, connector="nixl", hardware="cpu-host", cores=[0, 1],
                        base_args=["--enforce-eager"])
    p, t = spec.instances
    assert (p.id, p.role, p.pool, p.cpu_cores) == ("prompt-0", "prompt", "prompt", [0])
    assert (t.id, t.role, t.pool, t.cpu_cores) == ("token-0", "token", "token", [1])
    assert len({p.port, t.port, p.side_channel_port, t.side_channel_port}) == 4
    args = p.vllm_args()
    assert args[0] == "--enforce-eager"
    kv = json.loads(args[args.index("--kv-transfer-config") + 1])
    assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
    assert p.environment()["VLLM_NIXL_SIDE_CHANNEL_PORT"] == str(p.side_channel_port)
    assert spec.connector == "nixl" and spec.disaggregated
    assert json.loads(json.dumps(spec.describe()))["instances"][1]["cpu_cores"] == [1]


def test_connector_configs():
    assert connector_config("nixl", hardware="gpu-host")["kv_buffer_device"] == "cuda"
    ex = connector_config("example", hardware="cpu-host", shared_dir="/x/kv")
    assert ex == {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                  "kv_connector_extra_config": {"shared_storage_path": "/x/kv"}}
    raw = connector_config(None, hardware="gpu-host", raw='{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}')
    assert raw == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert connector_config(None, hardware="cpu-host") is None
    with pytest.raises(InputError, match="not valid JSON"):
        connector_config(None, hardware="cpu-host", raw="{kv_connector:")
    with pytest.raises(InputError, match="unknown connector 'p2p'"):
        connector_config("p2p", hardware="cpu-host")


def test_plan_rejects_bad_shapes(tmp_path):
    with pytest.raises(InputError, match="need a KV connector"):
        plan_cluster(tmp_path, prompt=1, token=1, hardware="cpu-host")
    with pytest.raises(InputError, match="needs prompt and token"):
        plan_cluster(tmp_path, prompt=2, connector="nixl", hardware="cpu-host")
    with pytest.raises(InputError, match="splitwiser.*needs GPUs"):
        plan_cluster(tmp_path, prompt=1, token=1, connector="nixl", hardware="cpu-host", layout="splitwiser")
    with pytest.raises(InputError, match="need 4 GPUs, only 2"):
        plan_cluster(tmp_path, baseline=2, hardware="gpu-host", gpus="0,1", tensor_parallel=2)


def test_core_and_gpu_assignment():
    assert assign_cores(2, [0, 1]) == [[0], [1]]
    assert assign_cores(2, [0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert assign_cores(3, [0, 1]) == [[0], [1], [0]]        # more instances than cores: shared round-robin
    assert assign_gpus(["prompt", "token"], [4, 5, 6, 7], 2, "separate") == [[4, 5], [6, 7]]
    assert assign_gpus(["prompt", "prompt", "token", "token"], [0, 1], 1, "splitwiser") == [[0], [1], [0], [1]]


def test_splitwiser_layout_shares_a_gpu_with_memory_fractions(tmp_path):
    spec = plan_cluster(tmp_path, prompt=1, token=1, connector="nixl", gpus="3", layout="splitwiser",
                        gpu_memory_shares=(0.3, 0.6))
    p, t = spec.instances
    assert spec.hardware == "gpu-host" and spec.layout == "splitwiser"
    assert p.gpu_ids == t.gpu_ids == [3] and p.cpu_cores is None
    ap, at = p.vllm_args(), t.vllm_args()
    assert ap[ap.index("--gpu-memory-utilization") + 1] == "0.3"
    assert at[at.index("--gpu-memory-utilization") + 1] == "0.6"
    assert json.loads(ap[ap.index("--kv-transfer-config") + 1])["kv_buffer_device"] == "cuda"
    # the server's environment and command carry the GPU and tensor-parallel settings
    srv = VllmServer(tmp_path, port=p.port, gpu_ids=p.gpu_ids, tensor_parallel=2, extra_args=ap,
                     env=p.environment())
    assert srv.environment()["CUDA_VISIBLE_DEVICES"] == "3"
    cmd = srv.command()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and "taskset" not in cmd
    assert spec.describe()["instances"][0]["gpu_memory_utilization"] == 0.3


# ----------------------------------------------------------------------------- launcher with a fake vLLM

def _cluster(tmp_path, fake_python, env=None, **plan):
    spec = plan_cluster(tmp_path / "model", hardware="cpu-host", cores=[0, 1], base_args=["--x", "1"], **plan)
    return Cluster(spec, tmp_path / "run", python=fake_python, env=env, grace_s=0.5)


def test_cluster_starts_in_parallel_pins_cores_and_stops_groups(tmp_path, fake_python):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    c = _cluster(tmp_path, fake_python, env={"FAKE_READY_AFTER": "2.0"}, prompt=1, token=1, connector="nixl")
    c.start(timeout_s=120)
    pgids = [s.proc.pid for s in c.servers.values()]
    try:
        # in parallel: every instance was spawned before the first one was ready (each takes >= 2 s)
        spawned = [s.start_unix_s for s in c.servers.values()]
        ready = [s.start_unix_s + s.start_s for s in c.servers.values()]
        assert max(spawned) < min(ready), f"instances were not started in parallel: {spawned} vs {ready}"
        assert all(s.health() for s in c.servers.values())
        for iid, core in (("prompt-0", "0"), ("token-0", "1")):
            log = (tmp_path / "run" / "instances" / f"{iid}.log").read_text()
            assert f"bind={core}" in log and f"affinity={core}" in log and "--kv-transfer-config" in log
            side = c.spec.instances[0 if iid == "prompt-0" else 1].side_channel_port
            assert f"side={side}" in log
        d = c.describe()
        assert [x["id"] for x in d] == ["prompt-0", "token-0"] and all(x["start_s"] > 1.5 for x in d)
        assert d[0]["hardware"] == "cpu-host" and d[0]["connector"] == "nixl" and d[0]["pid"] == pgids[0]
    finally:
        c.stop()
    assert wait_gone(pgids, 60) == []   # stop() waited for the groups; only an orphan's zombie may linger
    c.stop()   # idempotent


def test_cluster_start_failure_stops_all_and_shows_log_tail(tmp_path, fake_python):
    spec = plan_cluster(tmp_path / "model", baseline=2, hardware="cpu-host", cores=[0, 1])
    bad = spec.instances[1]
    c = Cluster(spec, tmp_path / "run", python=fake_python, grace_s=0.5,
                env={"FAKE_MODE": f"die-port{bad.port}", "FAKE_DIE_AFTER": "1.0"})
    with pytest.raises(ServerStartError) as ei:
        c.start(timeout_s=120)
    msg = str(ei.value)
    first, _, rest = msg.partition("\n")
    assert "baseline-1" in first and "exited with code 3" in first and "all 2 instances stopped" in first
    assert "exited with code 3 while starting: RuntimeError: NIXL is not available on this host;" in first
    assert "NIXL is not available" in rest and "baseline-1.log" in first
    assert all(s.proc is None for s in c.servers.values())   # the healthy one was stopped too


def test_cluster_start_timeout_names_pending_instances(tmp_path, fake_python):
    c = _cluster(tmp_path, fake_python, env={"FAKE_MODE": "never"}, baseline=1)
    with pytest.raises(ServerStartError, match=r"baseline-0 not healthy after 2 s"):
        c.start(timeout_s=2)
    assert all(s.proc is None for s in c.servers.values())


PARENT = r"""
import os, sys, time
from pathlib import Path
from splitbench.servers.launcher import Cluster
from splitbench.servers.topology import plan_cluster
spec = plan_cluster(sys.argv[1], baseline=2, hardware="cpu-host", cores=[0])
c = Cluster(spec, sys.argv[2], python=sys.argv[3], grace_s=1.0)
c.start(timeout_s=120)
print(" ".join(str(s.proc.pid) for s in c.servers.values()), flush=True)
time.sleep(300)
"""


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_orphans_when_parent_is_terminated_or_killed(tmp_path, fake_python, how):
    """SIGTERM: SystemExit -> atexit stop(); SIGKILL: nothing runs in the parent, the reaper kills the groups."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path / "m"), str(tmp_path / "run"), fake_python],
                              stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
                              env={**os.environ, "SPLITBENCH_REAPER_GRACE_S": "1"})
    try:
        line = parent.stdout.readline()
        pgids = [int(x) for x in line.split()]
        assert len(pgids) == 2 and all(group_alive(g) for g in pgids)
        parent.send_signal(getattr(signal, how))
        parent.wait(30)
        assert wait_gone(pgids, 60) == [], f"orphaned process groups after {how}"
    finally:
        if parent.poll() is None:
            parent.kill()


# ----------------------------------------------------------------------------- scraper

METRICS = textwrap.dedent("""\
    # HELP vllm:num_requests_running Number of requests in model execution batches.
    # TYPE vllm:num_requests_running gauge
    vllm:num_requests_running{engine="0",model_name="m"} 3.0
    vllm:num_requests_running{engine="1",model_name="m"} 2.0
    vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
    vllm:prompt_tokens_total{engine="0",model_name="m"} %(prompt)s
    vllm:generation_tokens_total{engine="0",model_name="m"} %(gen)s
    vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 4.0
    vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1.0
    vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} %(n)s
    vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} %(n)s
    vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} %(sum)s
    vllm:time_to_first_token_seconds_created{engine="0",model_name="m"} 1.7e9
    vllm:request_decode_time_seconds_bucket{engine="0",le="1.0",model_name="m"} 1.0
    vllm:request_decode_time_seconds_count{engine="0",model_name="m"} 2.0
    vllm:request_decode_time_seconds_sum{engine="0",model_name="m"} 3.0
    vllm:nixl_xfer_time_seconds_count{engine="0",model_name="m"} 7.0
    vllm:nixl_xfer_time_seconds_bucket{engine="0",le="0.1",model_name="m"} 7.0
    vllm:nixl_num_failed_transfers_total{engine="0",model_name="m"} 1.0
    python_gc_objects_collected_total{generation="0"} 99.0
    garbage line without value
    """)


def test_prometheus_selection():
    from splitbench.servers.scrape import parse_prometheus, select
    d = select(parse_prometheus(METRICS % {"prompt": 100.0, "gen": 7.0, "n": 4.0, "sum": 2.0}))
    assert d["gauges"] == {"vllm:num_requests_running": 5.0, "vllm:kv_cache_usage_perc": 0.25}
    assert d["counters"]["vllm:prompt_tokens_total"] == 100.0
    assert d["counters"]["vllm:request_success_total{finished_reason=length}"] == 4.0
    ttft = d["histograms"]["vllm:time_to_first_token_seconds"]
    assert ttft == {"sum": 2.0, "count": 4.0, "buckets": [[0.1, 1.0], ["+Inf", 4.0]]}
    assert d["histograms"]["vllm:request_decode_time_seconds"] == {"sum": 3.0, "count": 2.0}   # no buckets kept
    assert d["nixl"] == {"vllm:nixl_xfer_time_seconds_count": 7.0, "vllm:nixl_num_failed_transfers_total": 1.0}
    assert not any("python_gc" in k for part in d.values() for k in part)


def test_scraper_writes_timestamped_series_and_deltas(tmp_path):
    from splitbench.servers.scrape import MetricsScraper, read_series
    state = {"prompt": 100.0, "gen": 7.0, "n": 4.0, "sum": 2.0}

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = (METRICS % state).encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        sc = MetricsScraper({"a": url, "dead": "http://127.0.0.1:9"}, tmp_path / "metrics", interval_s=0.1)
        t0 = time.time()
        sc.start()
        wait_for(lambda: sc.n_scrapes >= 3)
        state.update(prompt=160.0, gen=20.0, n=6.0, sum=5.0)
        wait_for(lambda: sc.n_scrapes >= 6)
        summary = sc.stop()
    finally:
        httpd.shutdown()
    rows = read_series(tmp_path / "metrics" / "a.jsonl")
    assert len(rows) == sc.n_scrapes >= 7 and all(r["ok"] for r in rows)
    ts = [r["t_unix_s"] for r in rows]
    assert ts == sorted(ts) and t0 <= ts[0] <= time.time()
    assert rows[0]["counters"]["vllm:prompt_tokens_total"] == 100.0
    assert rows[-1]["counters"]["vllm:prompt_tokens_total"] == 160.0
    dead = read_series(tmp_path / "metrics" / "dead.jsonl")
    assert dead and not any(r["ok"] for r in dead) and "error" in dead[0]
    a = summary["a"]
    assert a["counters"]["vllm:prompt_tokens_total"] == 60.0 and a["counters"]["vllm:generation_tokens_total"] == 13.0
    assert a["histograms"]["vllm:time_to_first_token_seconds"] == {"count": 2.0, "mean": 1.5}
    assert summary["dead"] == {"scraped": False}
    assert json.loads((tmp_path / "metrics" / "summary.json").read_text()) == json.loads(json.dumps(summary))


# ----------------------------------------------------------------------------- backends (no start)

def test_backends_table_builds_each_by_name_with_options():
    from splitbench.backends.openai import OpenAIBackend
    from splitbench.backends.registry import BACKENDS, get_backend
    from splitbench.backends.stub import StubBackend
    assert list(BACKENDS) == ["openai", "stub", "vllm", "splitwise", "mixed"]
    assert all(cls.name == name for name, cls in BACKENDS.items())
    assert isinstance(get_backend("stub", ttft_s=0.01), StubBackend)
    assert isinstance(get_backend("openai", url="http://127.0.0.1:9/v1"), OpenAIBackend)
    v = get_backend("vllm", instances=3)
    assert v.counts == {"baseline": 3} and v.needs_router and v.policy == "jsq"
    assert get_backend("vllm").counts == {"baseline": 2}   # default: iso-hardware with 1 prompt + 1 token
    assert not get_backend("vllm", instances=1).needs_router
    s = get_backend("splitwise", prompt_instances=2, token_instances=1, connector="example")
    assert s.counts == {"prompt": 2, "token": 1} and s.connector == "example" and s.policy == "jsq"
    assert get_backend("splitwise").connector == "nixl"
    m = get_backend("mixed", prompt_instances=1, token_instances=1)
    assert m.policy == "mixed-pool" and m.describe()["started"] is False and m.describe()["backend"] == "mixed"
    with pytest.raises(InputError, match="--instances must be a whole number >= 1"):
        get_backend("vllm", instances=0)
    with pytest.raises(InputError, match="--prompt-instances must be a whole number, got 'x'"):
        get_backend("splitwise", prompt_instances="x")
    with pytest.raises(InputError, match=r"unknown backend 'sglang' \(known: openai, stub, vllm, splitwise, mixed\)"):
        get_backend("sglang")


def test_importing_the_backends_starts_and_loads_nothing_heavy():
    code = ("import sys, splitbench.backends; "
            "print(sorted(m for m in ('vllm', 'torch', 'transformers', 'locust', 'gevent', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
