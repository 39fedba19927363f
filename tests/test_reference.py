"""`splitbench reference` on the stub: the fitted unloaded model recovers the stub's configured timing."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from splitbench.cli import app
from splitbench.metrics.slo import load_reference


def test_reference_recovers_stub_timing_and_feeds_the_splitwise_verdict(tmp_path):
    ref_path = tmp_path / "ref.json"
    res = CliRunner().invoke(app, [
        "reference", "--out", str(ref_path), "--sizes", "16,256,1024", "--repeats", "2",
        "--output-tokens", "6", "--stub-ttft-ms", "30", "--stub-tpot-ms", "8", "--results", str(tmp_path)])
    assert res.exit_code == 0, res.output
    ref = load_reference(ref_path)
    # the stub's TTFT does not depend on prompt length: the fitted line stays near 30 ms over the sizes measured
    # (a bound on the slope's effect, not on the slope: one late request of six, a few ms on a busy host, tilts
    # it by ~8e-6 s/token; a TTFT that grew with the prompt would leave the window at one end)
    for size in (16, 1024):
        assert 0.029 < ref.ttft_intercept_s + size * ref.ttft_per_token_s < 0.040, size
    assert abs(ref.ttft_per_token_s) * (1024 - 16) < 0.010
    assert 0.0075 < ref.tbt_s < 0.010
    # a loaded run on the same stub is judged against it: unloaded stub -> every slowdown ~1x -> pass
    run = CliRunner().invoke(app, [
        "run", "--trace", "synth:arrivals=poisson,rate=20,duration=2,lengths=fixed,input=100,output=6,seed=1",
        "--stub-ttft-ms", "30", "--stub-tpot-ms", "8", "--reference", str(ref_path),
        "--results", str(tmp_path), "--run-id", "judged"])
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "judged" / "summary.json").read_text())
    assert summary["splitwise"]["passed"] is True
    assert len(summary["splitwise"]["checks"]) == 9
    # a slower server (2x TTFT, 3x per token) fails the TBT and E2E checks against the same reference
    slow = CliRunner().invoke(app, [
        "run", "--trace", "synth:arrivals=poisson,rate=20,duration=2,lengths=fixed,input=100,output=6,seed=1",
        "--stub-ttft-ms", "60", "--stub-tpot-ms", "24", "--reference", str(ref_path),
        "--results", str(tmp_path), "--run-id", "slow"])
    assert slow.exit_code == 0
    s2 = json.loads((tmp_path / "slow" / "summary.json").read_text())
    assert s2["splitwise"]["passed"] is False
