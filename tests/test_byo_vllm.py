"""The acceptance test of bring-your-own instances: two vLLM CPU servers started by hand (not by splitbench's launcher),
each pinned to its own core with taskset, both with NixlConnector (kv_role kv_both), then
`splitbench run --backend splitwise --prompt-url P --token-url T` records every request as prefilled on the first and
decoded on the second, its KV moved by the connector (the decode instance's /metrics)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitbench.client.probe import http_get
from splitbench.procs import spawn, stop_group
from splitbench.schema import records as R
from splitbench.servers.launcher import DEFAULT_ENV, free_port
from splitbench.servers.vllm_plugin import ENV as AMX_ENV

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not installed")]
N_REQ = 5
TRACE = f"synth:arrivals=poisson,rate=2,count={N_REQ},lengths=uniform,input=300-1200,output=4-12,seed=7"
KV = '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}'


def _serve(model_dir: str, core: int, log: Path, kv: str | None = KV):
    """`vllm serve`-style command line a user would type: its own port, NIXL side channel and core."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "4096", "--enforce-eager",
           "--uvicorn-log-level", "warning"] + (["--kv-transfer-config", kv] if kv else [])
    ncpu = len(os.sched_getaffinity(0))
    if shutil.which("taskset") and ncpu >= 2:
        cmd = ["taskset", "-c", str(core)] + cmd
    env = {**os.environ, **DEFAULT_ENV, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
           "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", AMX_ENV: "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           **({"VLLM_CPU_OMP_THREADS_BIND": str(core)} if ncpu >= 2 else {})}
    return spawn(cmd, log_path=log, env=env), f"http://127.0.0.1:{port}"


def _wait_healthy(started: list, logs: list[Path]) -> None:
    deadline = time.monotonic() + 300
    for (proc, url), log in zip(started, logs):
        while http_get(url + "/health", timeout_s=1.0)[0] != 200:
            assert proc.poll() is None, f"vLLM exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "vLLM not healthy after 300 s"
            time.sleep(1.0)


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("byo-vllm")
    logs = [d / "prefill.log", d / "decode.log"]
    started = [_serve(tiny_model_dir, core, log) for core, log in zip((0, 1), logs)]
    try:
        _wait_healthy(started, logs)
        yield [url for _, url in started]
    finally:
        for proc, _ in started:
            stop_group(proc)


@pytest.mark.timeout(600)
def test_splitwise_over_hand_started_vllm_prefills_on_first_decodes_on_second(pair, tmp_path):
    prefill, decode = pair
    p = subprocess.run([sys.executable, "-m", "splitbench.cli", "run", "--backend", "splitwise", "--prompt-url", prefill,
                        "--token-url", decode, "--trace", TRACE, "--machine", "cpu-host", "--results", str(tmp_path),
                        "--run-id", "byo", "--timeout", "120"], capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    run_dir = tmp_path / "byo"
    recs = R.read_records(run_dir)
    assert len(recs) == N_REQ and all(r.ok for r in recs), [(r.status, r.error) for r in recs]
    assert all(r.prefill_instance == "prompt-0" and r.decode_instance == "token-0" for r in recs)
    assert all(r.actual_output_tokens == r.planned_output_tokens for r in recs)
    meta = json.loads((run_dir / "run.json").read_text())
    b = meta["backend"]
    assert b["external"] and b["connector"] == "nixl" and meta["options"]["rate_scale"] == 1.0
    assert [(i["id"], i["url"], i["connector"]) for i in b["instances"]] == \
        [("prompt-0", prefill, "metrics:nixl"), ("token-0", decode, "metrics:nixl")]
    m = json.loads((run_dir / "metrics" / "summary.json").read_text())
    pc, dc = m["prompt-0"]["counters"], m["token-0"]["counters"]
    assert pc["vllm:generation_tokens_total"] == N_REQ          # one token per prefill, nothing decoded there
    assert dc["vllm:generation_tokens_total"] == sum(r.planned_output_tokens for r in recs)
    assert dc["vllm:prompt_tokens_by_source_total{source=external_kv_transfer}"] > 0   # KV came through NIXL


@pytest.mark.timeout(400)
def test_decode_vllm_without_connector_is_refused_naming_it(pair, vllm_server, tmp_path):
    """A decode server started without --kv-transfer-config (the session's plain vLLM of the same model): its
    /metrics show no connector series, the prefill probe's KV does not reach it (no external_kv_transfer tokens):
    exit 2 naming token-0, nothing replayed."""
    plain = vllm_server.url
    p = subprocess.run([sys.executable, "-m", "splitbench.cli", "run", "--backend", "splitwise", "--prompt-url",
                        pair[0], "--token-url", plain, "--trace", TRACE, "--results", str(tmp_path / "res")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "token instance token-0" in lines[0] and plain.rstrip("/") in lines[0], p.stderr
    assert "did not take the prefill's KV" in lines[0], p.stderr
    assert not (tmp_path / "res").exists()
