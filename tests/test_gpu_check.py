"""benchmarks/gpu_check.py without a GPU or vLLM: its options per step (GPU and CPU path), its checks on fake
records / metrics / power summaries, and check_run() on stub runs with the fake NVML (GPU-only code paths)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pandas as pd
import pytest

from splitbench.app.options import RunOptions
from splitbench.app.runner import run

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
G = importlib.util.module_from_spec(spec)
spec.loader.exec_module(G)
FAKE_NVML = Path(__file__).resolve().parent / "fake_nvml"


def test_step_options_gpu_and_cpu_paths():
    a = G.parse_args(["--results", "/r", "--duration", "5"])
    base = G.step_options("baseline", a, "/m", 2, "t")
    assert base.backend == "vllm" and base.power == "auto" and base.duration_s == 5 and base.rate_scale == 1.0
    assert base.backend_options == {"model_dir": "/m", "vllm_args": G.GPU_VLLM_ARGS, "gpus": "2", "instances": 1}
    nixl = G.step_options("nixl", a, "/m", 0, "t")
    assert nixl.backend == "splitwise" and nixl.run_id == "gpucheck-t-nixl" and nixl.results_dir == "/r"
    assert nixl.backend_options == {"model_dir": "/m", "vllm_args": G.GPU_VLLM_ARGS, "gpus": "0",
                                    "layout": "splitwiser", "connector": "nixl"}
    cpu = G.step_options("example", a, "/m", None, "t")      # vLLM CPU: no --gpus, no layout, no power
    assert cpu.backend_options == {"model_dir": "/m", "connector": "example"} and cpu.power == "off"
    own = G.step_options("baseline", G.parse_args(["--vllm-args=--enforce-eager"]), "/m", 0, "t")
    assert own.backend_options["vllm_args"] == "--enforce-eager"


def frame(rows):
    cols = ("request_id", "status", "prefill_instance", "decode_instance", "prefill_pool", "decode_pool")
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


def test_placement_checks_prefill_on_prompt_and_decode_on_token():
    good = frame([("r0", "ok", "prompt-0", "token-0", "prompt", "token"),
                  ("r1", "http_error", None, None, None, None)])     # failures are counted elsewhere
    assert G.placement_problems(good) == []
    bad = frame([("r0", "ok", "prompt-0", "token-0", "prompt", "token"),
                 ("r1", "ok", "token-0", "token-0", "token", "token"), ("r2", "ok", None, None, None, None)])
    (why,) = G.placement_problems(bad)
    assert why.startswith("2 request(s) not prefilled on prompt / decoded on token (e.g. r1: token-0/token")


def metrics(external: float = 900.0, n: float = 4.0, s: float = 0.02, scraped: bool = True) -> dict:
    tok = {"scraped": scraped, "counters": {
        "vllm:prompt_tokens_by_source_total{source=external_kv_transfer}": external,
        "vllm:prompt_tokens_by_source_total{source=local_compute}": 100.0},
        "nixl": {"vllm:nixl_xfer_time_seconds_count": n, "vllm:nixl_xfer_time_seconds_sum": s}}
    return {"prompt-0": {"scraped": True, "counters": {}, "nixl": {}}, "token-0": tok}


def test_kv_checks_from_the_token_instances_metrics():
    assert G.kv_checks("nixl", metrics()) == (pytest.approx(5.0), [])
    assert G.kv_checks("example", metrics(n=0, s=0)) == (None, [])
    assert G.kv_checks("nixl", metrics(n=0, s=0))[1] == ["no NIXL transfer counted on the token instance"]
    assert "no KV from the connector" in G.kv_checks("example", metrics(external=0, n=0))[1][0]
    assert G.kv_checks("nixl", metrics(scraped=False)) == (None, ["no /metrics of the token instance"])
    assert G.kv_checks("nixl", {})[1] == ["no /metrics of the token instance"]


def power_meta(hz=20.0, method="counter", counter=2400.0):
    return {"power": {"summary": {"gpus": {"0": {"rate_hz": hz, "energy_j": 2400.0, "method": method,
                                                 "counter_energy_j": counter}}}}}


def test_power_checks_rate_and_energy_counter():
    assert G.power_checks(power_meta(), 0) == (20.0, 2400.0, [])
    assert G.power_checks(power_meta(hz=9.0), 0)[2] == ["power sampled at 9.0 Hz (< 10)"]
    assert "energy counter not read" in G.power_checks(power_meta(method="integrated", counter=None), 0)[2][0]
    assert G.power_checks(power_meta(), 1)[2] == ["GPU 1: no NVML power samples"]
    assert G.power_checks({"power": {"error": "SamplerError: nvmlInit() failed"}}, 0)[2] == \
        ["GPU 0: SamplerError: nvmlInit() failed"]


def test_table_is_one_row_per_step_with_the_reason():
    rows = [{"step": "baseline", "ok": True, "requests_ok": 31, "requests": 31, "ttft_p50_ms": 17.5,
             "ttft_p99_ms": 30.0, "tbt_p50_ms": 2.5, "nixl_xfer_ms": None, "power_hz": 20.0, "energy_j": 2463.2,
             "why": ""},
            {"step": "nixl", "ok": False, "why": "ServerStartError: instance token-0 exited"}]
    lines = G.table(rows).splitlines()
    assert lines[0].split()[:2] == ["step", "result"] and set(lines[1]) == {"-"} and len(lines) == 4
    assert lines[2].split()[:8] == ["baseline", "ok", "31/31", "17.5/30.0", "2.50", "-", "20.0", "2463"]
    assert lines[3].split()[:3] == ["nixl", "FAIL", "-"] and lines[3].endswith("token-0 exited")


def stub_run(tmp_path, run_id: str, **kw):
    return run(RunOptions(trace="synth:arrivals=poisson,rate=40,count=20,seed=4", backend="stub",
                          results_dir=str(tmp_path), run_id=run_id, **kw)).run_dir


def test_check_run_on_stub_runs_with_the_fake_nvml(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKE_NVML), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_NVML_GPUS", "H200:300,H200:100:noenergy")
    monkeypatch.setenv("SPLITBENCH_NVML_MODULE", "pynvml_fake")
    d = stub_run(tmp_path, "measured", power="nvml")
    row = G.check_run("baseline", d, 0)
    assert row["ok"], row["why"]
    assert row["requests_ok"] == row["requests"] == 20 and row["power_hz"] >= 10 and row["energy_j"] > 0
    assert row["ttft_p50_ms"] >= 20.0 and row["tbt_p50_ms"] > 0
    row1 = G.check_run("baseline", d, 1)       # GPU 1 has no energy counter
    assert not row1["ok"] and "energy counter not read" in row1["why"]
    split = G.check_run("nixl", d, 0)          # a stub says nothing of placement or KV: both fail
    assert not split["ok"] and "not prefilled on prompt" in split["why"] and "no /metrics" in split["why"]
    cpu = G.check_run("baseline", stub_run(tmp_path, "unmeasured", power="off"), None)
    assert cpu["ok"] and cpu["power_hz"] is None and cpu["energy_j"] is None


def test_device_run_dry_prints_every_steps_commands_and_runs_nothing(tmp_path):
    import subprocess
    env = {**os.environ, "DRY": "1", "OUT": str(tmp_path / "out"), "STEPS": "check live profile robust ceiling"}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "device_run.sh")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    log = p.stderr
    for step in ("check", "live", "profile", "robust", "ceiling"):
        assert f"== step {step}" in log
    assert "benchmarks/gpu_check.py --gpu 0" in log and "model random --config llama-3.1-8b" in log
    assert log.count("cli run --backend splitwise --connector nixl --layout splitwiser") == 3   # 2 live + robust
    assert "profile --backend splitwise --connector nixl" in log and "sim_vs_live.py" in log
    assert "env VLLM_USE_V2_MODEL_RUNNER=1" in log and "nvidia-smi --query-compute-apps" in log
    assert [f"--workers {w} --stubs {max(2, w)}" in log for w in (1, 2, 4, 8)] == [True] * 4
    assert (tmp_path / "out" / "steps.txt").read_text().count("+ ") == log.count("+ ")
    only = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "device_run.sh")], cwd=ROOT, check=False,
                          env={**env, "STEPS": "ceiling"}, capture_output=True, text=True, timeout=60).stderr
    assert "== step ceiling" in only and "== step check" not in only
