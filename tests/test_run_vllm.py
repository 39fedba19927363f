"""End to end on a real vLLM (CPU build, tiny model): `splitbench run` replays an Azure window exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitbench.cli import app
from splitbench.schema import records as R

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()),
              ROOT.parent / "shared") / "traces"   # ../shared beside a clone; ../../shared beside a worktree


@pytest.mark.vllm
def test_replay_azure_conv_window_on_vllm(vllm_server, tmp_path):
    res = CliRunner().invoke(app, [
        "run", "--backend", "openai", "--url", vllm_server.url, "--trace", "azure-conv-2023",
        "--trace-dir", str(SHARED), "--duration", "20", "--rate-scale", "0.5",
        "--results", str(tmp_path), "--run-id", "conv", "--slo", "ttft_p99=30s"])
    assert res.exit_code == 0, res.output
    assert "Latency" in res.output and "fidelity verdict" in res.output
    run_dir = tmp_path / "conv"
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete"
    assert meta["model"]["max_model_len"] == 16384
    assert meta["workload"]["source"]["sha256"] == \
        "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8"
    recs = R.read_records(run_dir)
    ok = [r for r in recs if r.ok]
    assert len(recs) == meta["workload"]["requests"] >= 25
    assert len(ok) == len(recs), [(r.status, r.error) for r in recs if not r.ok][:3]
    for r in ok:   # the server generated exactly what the trace asked for
        assert r.actual_output_tokens == r.planned_output_tokens == sum(r.chunk_tokens)
        assert r.actual_input_tokens == r.planned_input_tokens
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["fidelity"]["tokens"]["output_mismatch"] == 0
    assert summary["latency"]["ttft_s"]["p50"] > 0


@pytest.mark.vllm
def test_chat_api_exact_prompt_and_output_lengths(vllm_server, tiny_model_dir, tmp_path):
    res = CliRunner().invoke(app, [
        "run", "--backend", "openai", "--url", vllm_server.url, "--api", "chat",
        "--trace", "synth:arrivals=poisson,rate=4,count=8,lengths=uniform,input=40-900,output=5-40,seed=2",
        "--results", str(tmp_path), "--run-id", "chat"])
    assert res.exit_code == 0, res.output
    recs = R.read_records(tmp_path / "chat")
    assert len(recs) == 8 and all(r.ok for r in recs), [(r.status, r.error) for r in recs]
    for r in recs:
        assert r.actual_input_tokens == r.planned_input_tokens
        assert r.actual_output_tokens == r.planned_output_tokens


@pytest.mark.vllm
def test_rate_scale_auto_sizes_against_the_real_server(vllm_server, tmp_path, monkeypatch):
    """`--rate-scale auto` on a real vLLM: the probe's reference becomes the run's, the window is replayed at the
    chosen scale, and the probe's requests stay out of the run's records (kept under sizing/)."""
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(app, [
        "run", "--backend", "openai", "--url", vllm_server.url, "--rate-scale", "auto", "--trace", "azure-conv-2023",
        "--trace-dir", str(SHARED), "--duration", "10", "--results", str(tmp_path), "--run-id", "sized"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "sized" / "run.json").read_text())
    sz = meta["sizing"]
    assert sz["rate_scale"] == meta["workload"]["transforms"]["rate_scale"] > 0 and not sz["cache_hit"]
    assert sz["reference"]["n_requests"] == 6 and sz["reference"]["tbt_s"] > 0 and sz["points"]
    assert sz["capacity_rps"] >= sz["unloaded_rps"] > 0 and sz["offered_rps"] > 0
    summary = json.loads((tmp_path / "sized" / "summary.json").read_text())
    assert summary["splitwise"]["reference"] == sz["reference"]            # judged against its own reference
    recs = R.read_records(tmp_path / "sized")
    assert len(recs) == meta["workload"]["requests"] and all(r.trace_index < 10 ** 9 for r in recs)
    assert R.read_records(tmp_path / "sized" / "sizing" / "reference")
