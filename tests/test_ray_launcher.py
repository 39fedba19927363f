"""`--launcher ray` on a local 2-node Ray cluster (tests/ray_nodes.py: a `prompt` node and a `token` node, 1 CPU
each): the tiny CPU split cluster placed across them (every request prefilled on the prompt node's instance,
decoded on the token node's), SIGTERM / SIGINT / SIGKILL of the CLI mid-start leave no vLLM process and no actor,
`design --ray` gives the design search's results unchanged; splitbench never imports ray otherwise."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from ray_nodes import ray_env, two_nodes
from test_cluster_vllm import assert_nothing_left, check_split, run_cluster

from splitbench.app.design import DesignSpec, search
from splitbench.procs import group_alive
from splitbench.servers.launcher import free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
no_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
CLI = [sys.executable, "-m", "splitbench.cli"]
GONE_BOUND_S = 90.0   # actors stop their vLLM (8 s grace) or die with the driver; this only bounds a hang


@pytest.fixture(scope="module")
def ray_address():
    with two_nodes() as address:
        yield address


def test_splitbench_never_imports_ray_without_launcher_ray():
    code = ("import sys\nfrom splitbench.cli import build\nfrom splitbench.backends.registry import get_backend\n"
            "import splitbench.app.runner, splitbench.app.design\nbuild()\nget_backend('splitwise', launcher='local')\n"
            "assert 'ray' not in sys.modules, [m for m in sys.modules if m.startswith('ray')][:5]\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_no_ray_cluster_is_one_line_exit_2_with_nothing_written(tmp_path):
    out = subprocess.run(CLI + ["run", "--backend", "splitwise", "--launcher", "ray", "--ray-address",
                                f"127.0.0.1:{free_port()}", "--results", str(tmp_path / "res")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "300"})
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no Ray cluster" in lines[0] and "ray start --head" in lines[0], out.stderr
    assert not (tmp_path / "res").exists()


@pytest.mark.vllm
@no_vllm
@pytest.mark.timeout(400)
def test_split_cluster_across_two_ray_nodes_prefill_on_prompt_node_decode_on_token_node(ray_address, tmp_path):
    res, meta, recs = run_cluster(tmp_path, "ray", "splitwise", connector="nixl", launcher="ray",
                                  ray_address=ray_address, cores="0,1")
    assert meta["status"] == "complete" and recs and all(r.ok for r in recs), [(r.status, r.error) for r in recs]
    b = meta["backend"]
    assert b["launcher"] == "ray"
    check_split(meta, res, recs, "nixl")   # every request: prefill on prompt-0, decode on token-0 (phases, /metrics)
    inst = {i["id"]: i for i in b["instances"]}
    assert inst["prompt-0"]["node_id"] != inst["token-0"]["node_id"]
    assert inst["prompt-0"]["node_resources"].get("prompt") == 1 and "token" not in inst["prompt-0"]["node_resources"]
    assert inst["token-0"]["node_resources"].get("token") == 1 and "prompt" not in inst["token-0"]["node_resources"]
    assert all(i["launcher"] == "ray" and i["url"].startswith(f"http://{i['node_ip']}:") for i in inst.values())
    assert_nothing_left(meta)
    assert not _actor_processes()


def _actor_processes() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith("ray::InstanceActor"):
            out.append(p)
    return out


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.Error:
        return False


def _vllm_under_actors() -> tuple[set[int], set[int]]:
    """(every pid under the InstanceActors, incl. them; the vLLM servers' process groups)."""
    tree, groups = set(), set()
    for a in _actor_processes():
        try:
            kids = a.children(recursive=True)
        except psutil.Error:
            continue
        tree |= {a.pid} | {k.pid for k in kids}
        for k in kids:
            try:
                if "vllm.entrypoints.openai.api_server" in " ".join(k.cmdline()):
                    groups.add(os.getpgid(k.pid))
            except (psutil.Error, OSError):
                pass
    return tree, groups


@pytest.mark.vllm
@no_vllm
@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_signal_of_the_cli_mid_start_leaves_no_vllm_and_no_actor(ray_address, tmp_path, how):
    err = open(tmp_path / "cli.err", "wb")
    cli = subprocess.Popen(CLI + ["run", "--backend", "splitwise", "--launcher", "ray", "--ray-address", ray_address,
                                  "--cores", "0,1", "--trace", "synth:arrivals=poisson,rate=2,count=4",
                                  "--rate-scale", "1", "--results", str(tmp_path / "res")],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                           env=ray_env())
    tree: set[int] = set()
    groups: set[int] = set()
    try:
        end = time.monotonic() + 240
        while len(groups) < 2:   # both vLLM servers spawned (they take a minute or more to be healthy)
            assert cli.poll() is None, (tmp_path / "cli.err").read_text()
            assert time.monotonic() < end, "the vLLM servers were never spawned"
            time.sleep(0.2)
            tree, groups = _vllm_under_actors()
        os.kill(cli.pid, getattr(signal, how))
        rc = cli.wait(120)
        assert rc == {"SIGTERM": 143, "SIGINT": 130, "SIGKILL": -9}[how], (tmp_path / "cli.err").read_text()
        end = time.monotonic() + GONE_BOUND_S
        while [p for p in tree if _alive(p)] or [g for g in groups if group_alive(g)] or _actor_processes():
            assert time.monotonic() < end, f"left: {[p for p in tree if _alive(p)]}, actors {_actor_processes()}"
            time.sleep(0.2)
        if how != "SIGKILL":
            meta = json.loads(next((tmp_path / "res").glob("*/run.json")).read_text())
            assert meta["status"] in ("failed", "interrupted")
    finally:
        err.close()
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        for p in tree:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_design_search_over_ray_tasks_gives_the_same_results(ray_address):
    spec = DesignSpec(designs=["baseline-a100", "splitwise-aa"], budget="iso-power", budget_design="baseline-a100",
                      budget_machines=4, splits=2, duration_s=20.0, processes=1)
    local = search(spec)
    remote = search(dataclasses.replace(spec, ray=True, ray_address=ray_address))
    assert len(local["evaluated"]) >= 3
    for key in ("evaluated", "best", "ratios"):
        assert remote[key] == local[key], key
    assert remote["spec"]["ray"] and not local["spec"]["ray"]


# A stand-in for `python -m vllm.entrypoints.openai.api_server`: serves /health on --host/--port after a child that
# ignores SIGTERM (like an EngineCore: a grandchild of the actor, which Ray's direct-children kill does not reach).
FAKE_VLLM = r"""
import http.server, os, subprocess, sys, time
args = sys.argv[1:]
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
print("fake vllm", " ".join(args), flush=True)
if os.environ.get("FAKE_MODE") == "die":
    print("RuntimeError: NIXL is not available on this host", flush=True)
    sys.exit(3)
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "time.sleep(300)"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404); self.end_headers()
    def log_message(self, *a): pass
http.server.HTTPServer((host, port), H).serve_forever()
"""
DRIVER = r"""
import json, sys, time
from pathlib import Path
from splitbench.servers.ray_launcher import RayCluster
from splitbench.servers.topology import plan_cluster
out, address, fake = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
spec = plan_cluster(out, prompt=1, token=1, connector="nixl", hardware="cpu-host", cores=[0, 1])
cluster = RayCluster(spec, out, address=address, cores_given=True, python=fake)
cluster.start(timeout_s=120)
print(json.dumps(cluster.describe()), flush=True)
time.sleep(600)
"""


@pytest.fixture
def fake_vllm(tmp_path):
    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    exe = tmp_path / "fake-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.mark.timeout(300)
def test_sigkill_of_the_driver_after_start_stops_the_whole_vllm_group_on_each_node(ray_address, tmp_path, fake_vllm):
    """The actors die with the driver's job; each one's watchdog then stops its server's group, grandchild too."""
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path), ray_address, fake_vllm],
                              stdout=subprocess.PIPE, stderr=open(tmp_path / "driver.err", "wb"), text=True,
                              start_new_session=True, env=ray_env())
    members: list[int] = []
    try:
        line = driver.stdout.readline()
        assert line, (tmp_path / "driver.err").read_text()
        inst = json.loads(line)
        assert {i["id"]: i["node_resources"].get(i["role"]) for i in inst} == {"prompt-0": 1, "token-0": 1}
        pgids = [i["pid"] for i in inst]
        members = [p.pid for g in pgids for p in psutil.Process(g).children(recursive=True)] + pgids
        assert len(members) >= 4 and all(_alive(p) for p in members)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(30)
        end = time.monotonic() + GONE_BOUND_S
        while [g for g in pgids if group_alive(g)] or _actor_processes():
            assert time.monotonic() < end, f"left: {[p for p in members if _alive(p)]}, actors {_actor_processes()}"
            time.sleep(0.2)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        for p in members:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_an_instance_that_dies_while_starting_is_one_error_naming_it_and_all_are_stopped(ray_address, tmp_path,
                                                                                         fake_vllm):
    from splitbench.errors import ServerStartError
    from splitbench.servers.ray_launcher import RayCluster
    from splitbench.servers.topology import plan_cluster
    spec = plan_cluster(tmp_path, prompt=1, token=1, connector="nixl", hardware="cpu-host", cores=[0, 1])
    cluster = RayCluster(spec, tmp_path, address=ray_address, cores_given=True, python=fake_vllm,
                         env={"FAKE_MODE": "die"})
    with pytest.raises(ServerStartError) as e:
        cluster.start(timeout_s=120)
    msg = str(e.value)
    assert "exited with code 3" in msg and "NIXL is not available" in msg and "all 2 instances stopped" in msg
    assert msg.startswith("instance prompt-0 on Ray node") or msg.startswith("instance token-0 on Ray node")
    assert not cluster.actors
    end = time.monotonic() + GONE_BOUND_S   # ray.kill() returns before the actor's process has exited
    while _actor_processes():
        assert time.monotonic() < end, _actor_processes()
        time.sleep(0.2)
    assert "fake vllm" in (tmp_path / "instances" / "prompt-0.log").read_text()
