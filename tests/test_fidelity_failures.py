"""The fidelity verdict names server failures: records whose statuses mimic a server that died mid-run, a real
replay against a stub answering 500s, and a real run whose server process is SIGKILLed half-way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.client.replay import replay_workload
from splitbench.client.replayer import ReplayConfig
from splitbench.metrics.fidelity import error_kind, fidelity_section, server_failures
from splitbench.metrics.summary import summarize
from splitbench.render.console import render_markdown, render_summary
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.schema.runmeta import read_run_meta
from splitbench.servers.stub_main import run_stub_in_thread
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.prompts import TokenIdPrompts

REFUSED = "cannot connect to 127.0.0.1:41234: ConnectionRefusedError: [Errno 111] Connect call failed"


def died_at(n: int, dead_from: int, lag_of_failed=lambda i: 0.0005) -> list[RequestRecord]:
    """n requests at 10 ms spacing; the server serves the first `dead_from` and refuses every later one."""
    out = []
    for i in range(n):
        t = 0.01 * i
        if i < dead_from:
            out.append(RequestRecord(f"r{i}", i, t, 8, 4, actual_send_s=t + 0.0005, first_token_s=t + 0.02,
                                     last_token_s=t + 0.035, end_s=t + 0.036, chunk_offsets_s=[0.02, 0.025, 0.03,
                                     0.035], chunk_tokens=[1, 1, 1, 1], actual_input_tokens=8,
                                     actual_output_tokens=4, status=R.OK))
        else:
            s = t + lag_of_failed(i)
            out.append(RequestRecord(f"r{i}", i, t, 8, 4, actual_send_s=s, end_s=s + 0.001, status=R.ERROR,
                                     error=REFUSED))
    return out


def test_server_that_died_with_lag_fine_is_server_failures():
    recs = died_at(400, 92)                       # 77% errors, every send 0.5 ms late
    f = fidelity_section(recs)
    assert f["lag_s"]["p99"] < 0.001 and f["rate_ratio"] == pytest.approx(1.0, abs=0.01)
    assert f["verdict"] == "server-failures" and f["flags"] == ["server-failures"]
    e = f["errors"]
    assert (e["attempted"], e["failed"]) == (400, 308) and e["error_rate"] == pytest.approx(0.77)
    assert e["dominant_kind"] == "error (ConnectionRefusedError)" and e["by_kind"] == {e["dominant_kind"]: 308}
    assert e["onset_s"] == pytest.approx(0.92) and e["error_rate_after_onset"] == 1.0
    assert "308 of 400" in f["reasons"][0] and "77.0%" in f["reasons"][0]
    assert "ConnectionRefusedError" in f["reasons"][0] and "server" in f["reasons"][0]


def test_failure_handling_lag_stays_a_flag_behind_the_server_verdict():
    # what a replay against a dead server looks like: the failed sends lag up to 80 ms (measured), the served ones not
    recs = died_at(400, 92, lag_of_failed=lambda i: 0.08 if i % 50 == 0 else 0.001)
    f = fidelity_section(recs)
    assert f["lag_s"]["p99"] > 0.010
    assert f["verdict"] == "server-failures" and f["flags"] == ["server-failures", "client-behind"]
    assert f["reasons"][0].startswith("308 of 400") and "send lag p99" in f["reasons"][1]


def test_few_failures_cancelled_and_kinds():
    recs = died_at(100, 97)                       # 3% failed: under the 5% limit
    assert fidelity_section(recs)["verdict"] == "ok"
    assert fidelity_section(recs, {"max_error_rate": 0.02})["verdict"] == "server-failures"
    for r in recs[50:]:                           # a Ctrl-C: cancelled and unsent requests are not the server's
        r.status, r.error = (R.CANCELLED, "cancelled at shutdown") if r.trace_index < 60 else (R.NOT_SENT, None)
    e = server_failures(recs)
    assert (e["attempted"], e["failed"], e["onset_s"]) == (60, 0, None)
    assert fidelity_section(recs)["verdict"] == "ok"
    kinds = [RequestRecord("a", 0, 0.0, 1, 1, status=R.HTTP_ERROR, http_status=503, error="Service Unavailable"),
             RequestRecord("b", 1, 0.0, 1, 1, status=R.TIMEOUT, error="no response within limits (total 5s)"),
             RequestRecord("c", 2, 0.0, 1, 1, status=R.DISCONNECTED, error="stream ended without [DONE]")]
    assert [error_kind(r) for r in kinds] == ["http_error 503", "timeout", "disconnected"]


def test_console_and_markdown_name_the_server_failures():
    s = summarize(died_at(400, 92))
    console = Console(record=True, width=200, force_terminal=False)
    render_summary(s, console)
    text = console.export_text()
    assert "fidelity verdict: server-failures" in text and "ConnectionRefusedError" in text
    assert "client-behind" not in text
    md = render_markdown(s)
    assert "Fidelity: server-failures" in md and "308 of 400" in md


# ----------------------------------------------------------------------------- real replays

def test_real_replay_against_a_stub_answering_500s(tmp_path):
    url, stop = run_stub_in_thread(ttft_s=0.002, tpot_s=0.001, fail_rate=0.8, seed=3)
    try:
        w = load(WorkloadSpec("synth:rate=50,count=100,input=8,output=4,seed=1"))
        cfg = ReplayConfig(base_url=url, model="m", timeout_s=30)
        replay_workload(w, TokenIdPrompts(vocab_size=1000).payload, cfg, tmp_path, "fail500")
    finally:
        stop()
    recs = R.read_records(tmp_path)
    f = fidelity_section(recs, {"lag_p99_limit_s": 60.0})   # this test is about failures, not this host's lag
    n_500 = sum(1 for r in recs if r.http_status == 500)
    assert len(recs) == 100 and 50 < n_500 < 100
    assert f["verdict"] == "server-failures" and f["errors"]["dominant_kind"] == "http_error 500"
    assert f["errors"]["failed"] == n_500 and f"{n_500} of 100" in f["reasons"][0]


def _free_stub(tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / "port"
    proc = subprocess.Popen([sys.executable, "-m", "splitbench.servers.stub_main", "--port", "0", "--ttft-ms", "5",
                             "--tpot-ms", "2", "--port-file", str(port_file)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(600):
        if port_file.exists() and port_file.read_text().strip():
            return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"
        if proc.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    proc.kill()
    pytest.fail("stub server did not start")


def test_run_whose_server_is_killed_half_way_says_server_failures(tmp_path):
    """End to end: `run` against a stub process that is SIGKILLed once 60 of 300 requests finished."""
    proc, url = _free_stub(tmp_path)

    def kill_when_busy(replayer):
        if replayer.stats.finished >= 60 and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    try:
        res = run(RunOptions(trace="synth:rate=60,count=300,input=8,output=4,seed=2", duration_s=None,
                             backend="openai", backend_options={"url": url}, vocab_size=1000,
                             results_dir=str(tmp_path / "results"), run_id="killed", timeout_s=20, grace_s=5),
                  on_progress=kill_when_busy)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    f = res.summary["fidelity"]
    assert proc.returncode == -signal.SIGKILL
    assert f["verdict"] == "server-failures", f["reasons"]
    assert f["errors"]["error_rate"] > 0.4 and f["errors"]["error_rate_after_onset"] > 0.9
    assert f["errors"]["dominant_kind"] == "error (ConnectionRefusedError)"
    saved = read_run_meta(res.run_dir)
    assert saved["status"] == "complete"
    assert (res.run_dir / R.SUMMARY_FILE).exists()
