"""Client calibration: the ceiling search, point scoring, the per-host store, and runs that record and judge
their peak offered rate against it (real stub runs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from splitbench.app import calibrate as C
from splitbench.app.baselines import gate
from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.hardware import ceiling as H
from splitbench.metrics.fidelity import fidelity_section, peak_rate_rps
from splitbench.metrics.gate import lag_limit_ms, preconditions
from splitbench.metrics.gate_rules import load_rules
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.schema.runmeta import host_info
from splitbench.workload.load import WorkloadSpec, load

pytestmark = pytest.mark.timeout(60)
BLOCK_S = 0.3
ROOT = Path(__file__).resolve().parents[1]


def test_peak_rate_is_the_busiest_one_second_window():
    # 3 requests in [0, 1), then 5 packed into [2.0, 2.4], then one at 10
    a = np.array([0.0, 0.5, 0.9, 2.0, 2.1, 2.2, 2.3, 2.4, 10.0])
    assert peak_rate_rps(a) == 5.0
    assert peak_rate_rps(a, window_s=0.25) == 12.0   # 3 in [2.0, 2.25)
    assert peak_rate_rps(np.array([])) is None


def _pt(rate, ok):
    return {"target_rps": rate, "pass": ok}


def test_search_climbs_then_bisects_to_the_resolution():
    ramp = (250, 500, 1000, 2000)
    assert C.next_rate([], ramp) == 250
    assert C.next_rate([_pt(250, True), _pt(500, True)], ramp) == 1000
    pts = [_pt(250, True), _pt(500, True), _pt(1000, False)]
    assert C.next_rate(pts, ramp) == 750
    pts += [_pt(750, True)]
    assert C.next_rate(pts, ramp) == 875
    pts += [_pt(875, False), _pt(812.5, True)]
    assert C.next_rate(pts, ramp) is None   # 812.5 .. 875 is within 10%
    assert C.next_rate([_pt(r, True) for r in ramp], ramp) is None   # passed the whole ramp
    assert C.next_rate([_pt(250, False)], ramp) == 125
    assert C.next_rate([_pt(250, False), _pt(125, False), _pt(62.5, False)], ramp) is None


def _recs(n, rate, lag_s=0.0, ttft_s=0.02):
    out = []
    for i in range(n):
        t = 1.0 + i / rate
        r = RequestRecord(f"r{i}", i, t, 8, 4, actual_send_s=t + lag_s, status=R.OK, actual_output_tokens=4)
        r.first_token_s = r.actual_send_s + ttft_s
        r.end_s = r.first_token_s + 0.01
        out.append(r)
    return out


def test_stub_layout_puts_stubs_on_the_last_cores_and_senders_on_the_first():
    assert C.stub_layout(1, 1, 2) == ({0}, [1])                     # the single-stub default, as before
    assert C.stub_layout(8, 8, 16) == (set(range(8)), list(range(8, 16)))
    assert C.stub_layout(2, 4, 16) == ({0, 1}, [12, 13, 14, 15])
    assert C.stub_layout(4, 8, 4) == ({0}, [1, 2, 3])               # too few cores: at least one for senders
    assert C.stub_layout(1, 1, 1) == (None, None)
    opts = C.point_options(100.0, 1.0, 2, None, "lean", "/tmp", stub_cpus=[6, 7])
    assert opts.backend_options["processes"] == 2 and opts.backend_options["cpus"] == [6, 7]
    assert C.RAMP_RPS[-1] > 10000   # the ramp reaches the multi-worker target


def test_score_point_applies_each_criterion():
    good = C.score_point(_recs(200, 100.0), 100.0, 0.02, cpu_s=0.5)
    assert good["pass"] and abs(good["achieved_rps"] - 100.0) < 1e-6 and good["cpu_s_per_request"] == 0.0025
    slow = C.score_point(_recs(200, 100.0, ttft_s=0.0265), 100.0, 0.02, cpu_s=0.5)
    assert not slow["pass"] and "TTFT p99 error 6.50 ms" in slow["reason"]
    recs = _recs(200, 100.0)
    for r in recs[-5:]:   # 2.5% of sends 3 ms late: p99 lag is over 2 ms
        r.actual_send_s += 0.003
    assert "lag p99" in C.score_point(recs, 100.0, 0.02, cpu_s=0.5)["reason"]
    recs = _recs(200, 100.0)
    for r in recs[::10]:
        r.status = R.TIMEOUT
    assert "failed" in C.score_point(recs, 100.0, 0.02, cpu_s=0.5)["reason"]


def test_store_roundtrip_per_host_and_workers(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path))
    assert H.stored_ceiling(1) is None
    path = H.save_result({"workers": 1, "ceiling_rps": 1800.0, "created_unix_s": 1.0})
    H.save_result({"workers": 2, "ceiling_rps": 3000.0})
    assert path.parent == tmp_path / "calibration" and path.name == H.host_id() + ".json"
    data = json.loads(path.read_text())
    assert data["host"]["hostname"] == host_info()["hostname"]
    assert H.stored_ceiling(1)["ceiling_rps"] == 1800.0 and H.stored_ceiling(2)["ceiling_rps"] == 3000.0
    sec = H.client_section(np.arange(2048) / 1024, workers=1)   # exact binary fractions: 1024 per second
    assert sec["ceiling_rps"] == 1800.0 and sec["peak_offered_rps"] == 1024.0
    assert sec["headroom"] == 1800.0 / 1024
    path.write_text("{not json")
    assert "unreadable calibration file" in H.client_section(np.zeros(3))["error"]


def test_fidelity_flags_over_ceiling():
    recs = _recs(600, 256.0)   # exact binary fractions: 256 sends in every 1 s window
    f = fidelity_section(recs, {"ceiling_rps": 150.0})
    assert f["verdict"] == "over-ceiling" and "over-ceiling" in f["flags"] and f["peak_offered_rps"] == 256.0
    assert "calibrated ceiling 150" in f["reasons"][0]
    assert fidelity_section(recs, {"ceiling_rps": 260.0})["verdict"] == "ok"
    assert fidelity_section(recs)["verdict"] == "ok"


def test_measure_point_against_the_stub_scores_every_request_of_the_point():
    p = C.measure_point(100.0, 1.0, stub_cpu=-1)
    w = C.WORKLOAD      # the point's workload is seeded: the requests after the warm-up are known exactly
    spec = (f"synth:arrivals=poisson,rate=100.0,duration={1.0 + C.WARMUP_S},lengths=fixed,input={w['input_tokens']},"
            f"output={w['output_tokens']},seed=1")
    scored = int((load(WorkloadSpec(spec)).arrival_s >= C.WARMUP_S).sum())
    assert p["ok"] == p["requests"] == scored, p             # every one sent and answered, whatever the host
    # the verdict follows from the figures (timing itself is the host's business: no thresholds here)
    assert p["pass"] == (p["lag_p99_s"] <= 0.002 and p["ttft_p99_error_s"] <= 0.005 and p["rate_ratio"] >= 0.95)
    assert p["planned_rps"] > 0 and p["rate_ratio"] == pytest.approx(p["achieved_rps"] / p["planned_rps"])
    assert p["ttft_p50_error_s"] >= -0.001                   # nothing came before the stub's configured TTFT
    assert p["cpu_s_per_request"] > 0 and p["tokens_per_s"] > 0
    assert isinstance(p["stub_lateness_p99_s"], float)       # the stub's own lateness, read from its /metrics


def test_runs_record_the_stored_ceiling_and_are_judged_by_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "cache"))
    H.save_result({"workers": 1, "ceiling_rps": 50.0, "created_unix_s": 1.0, "tokens_per_s": 1600.0})
    spec = "synth:arrivals=poisson,rate=120,duration=1,lengths=fixed,input=16,output=4,seed=2"
    res = run(RunOptions(trace=spec, duration_s=None, backend="stub", results_dir=str(tmp_path / "r"),
                         vocab_size=1000, backend_options={"ttft_s": 0.005, "tpot_s": 0.001, "cpu": -1}))
    client = json.loads((res.run_dir / R.RUN_FILE).read_text())["client"]
    assert client["ceiling_rps"] == 50.0 and client["peak_offered_rps"] > 60
    assert client["headroom"] == pytest.approx(50.0 / client["peak_offered_rps"])
    assert client["calibration"]["tokens_per_s"] == 1600.0
    f = res.summary["fidelity"]
    assert "over-ceiling" in f["flags"] and f["ceiling_rps"] == 50.0


def test_a_busy_client_loop_does_not_land_in_ttft():
    """The loop is blocked 300 ms while the first token arrives (stub TTFT 20 ms, served from another thread):
    kernel receive stamps still put the first token at ~20 ms; user-space stamps (kernel_stamps=False) only after
    the block. Bounds are the block itself, not host speed: a busy host would have to delay the stub by 280 ms."""
    import asyncio
    import time

    from splitbench.client.http_lean import LeanClient
    from splitbench.client.sink import RecordSink
    from splitbench.servers.stub_main import run_stub_in_thread
    from splitbench.timing import run as run_loop

    url, stop = run_stub_in_thread(ttft_s=0.02, tpot_s=0.002)
    body = json.dumps({"model": "stub-model", "prompt": [5] * 8, "max_tokens": 3, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()

    async def one(kernel_stamps: bool) -> float:
        client = LeanClient(url + "/v1/completions", kernel_stamps=kernel_stamps)
        try:
            await client.warm(1)
            rec = RequestRecord("r", 0, 0.0, 8, 3)
            send = time.perf_counter()
            asyncio.get_running_loop().call_later(0.005, time.sleep, BLOCK_S)   # the client is busy elsewhere
            await client.request(body, RecordSink(rec, 0.0, send), send=send)
            assert rec.status == R.OK and rec.actual_output_tokens == 3
            return rec.first_token_s - send
        finally:
            await client.close()
    try:
        stamped = run_loop(one(True))
        unstamped = run_loop(one(False))
    finally:
        stop()
    assert 0.019 < stamped < 0.005 + BLOCK_S, stamped         # when the bytes arrived, inside the block
    assert unstamped > 0.005 + BLOCK_S, unstamped              # when the loop got to them: after it


# ----------------------------------------------------------------------------- the CI gate follows the host

def _summary(lag_p99_s: float, host_lag_s: float | None) -> dict:
    limits = {"host_lag_p99_s": host_lag_s} if host_lag_s is not None else {}
    return {"fidelity": {"lag_s": {"p99": lag_p99_s}, "achieved_rate_rps": 20.0, "trace_rate_rps": 20.0,
                         "tokens": {"input_mismatch": 0, "output_mismatch": 0}, "limits": limits},
            "counts": {"error_rate": 0.0}, "run": {"workload_sha256": "x"}}


def test_lag_precondition_follows_the_hosts_calibrated_lag():
    pre = load_rules(ROOT / "gates" / "stub.toml").pre
    assert pre["max_lag_p99_host_multiple"] == 10 and pre["max_lag_p99_ms"] == 10
    assert lag_limit_ms(pre, {}) == (10.0, "no client calibration recorded for this host: the absolute limit applies")
    assert lag_limit_ms(pre, {"host_lag_p99_s": 0.0005})[0] == 10.0         # a quiet host: the absolute floor
    limit, why = lag_limit_ms(pre, {"host_lag_p99_s": 0.008})               # a busy one: 10 x what it showed
    assert limit == pytest.approx(80.0) and "10 x this host's calibrated lag p99 8.00 ms" in why
    runs = [{"label": "busy", "side": "candidate", "summary": _summary(0.013, 0.008)},
            {"label": "behind", "side": "candidate", "summary": _summary(0.400, 0.008)},
            {"label": "uncalibrated", "side": "candidate", "summary": _summary(0.013, None)}]
    lag = {c["run"]: c["ok"] for c in preconditions(runs, pre) if c["check"] == "send lag p99 (ms)"}
    assert lag == {"candidate:busy": True, "candidate:behind": False, "candidate:uncalibrated": False}
    assert load_rules(ROOT / "gates" / "vllm-tiny.toml").pre["max_lag_p99_host_multiple"] == 10


def test_client_section_records_the_calibrations_median_lag(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path))
    H.save_result({"workers": 1, "ceiling_rps": 0.0, "points": [{"lag_p99_s": 0.012}, {"lag_p99_s": 0.007},
                                                               {"lag_p99_s": 0.009}, {"target_rps": 250}]})
    sec = H.client_section(np.arange(10) / 10.0)
    assert sec["calibration"]["lag_p99_median_s"] == 0.009 and sec["ceiling_rps"] == 0.0


@pytest.mark.timeout(300)
def test_ci_stub_gate_passes_a_replicate_and_fails_a_slowed_stub_on_this_host(tmp_path, monkeypatch):
    """gates/stub.toml as .ci/run uses it, on this host now: a short calibration, then a baseline run, a replicate
    and a run whose stub answers 10 ms later. The replicate passes and the slowed stub is a regression, busy or
    idle (the lag precondition follows the calibration; the latency rules are medians)."""
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "cache"))
    C.calibrate(duration_s=1.0, max_points=2, retries=0)
    spec = "synth:arrivals=poisson,rate=20,count=300,seed=7"          # .ci/run's stub workload

    def one(name, ttft_s):
        return run(RunOptions(trace=spec, duration_s=None, backend="stub", results_dir=str(tmp_path / "r"),
                              run_id=name, vocab_size=1000, backend_options={"ttft_s": ttft_s, "tpot_s": 0.005})).run_dir
    base, same, slow = one("base", 0.02), one("same", 0.02), one("slow", 0.03)
    rules = ROOT / "gates" / "stub.toml"
    ok, bad = gate([str(base)], [str(same)], rules), gate([str(base)], [str(slow)], rules)
    why = [(p["run"], p["check"], p["value"], p["limit"]) for p in ok["preconditions"] + bad["preconditions"]
           if not p["ok"]]
    assert ok["verdict"] == "pass" and bad["verdict"] == "regression", (why, ok["rules"], bad["rules"])
    assert [r["metric"] for r in bad["rules"] if r["decision"] == "regression"] == ["ttft_p50"]
