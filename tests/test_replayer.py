"""The open-loop replayer against the real stub over loopback sockets: timing, token counts, failures, stop."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from splitbench.cli import app
from splitbench.client.replayer import ReplayConfig, Replayer
from splitbench.client.sink import RecordSink
from splitbench.schema import records as R
from splitbench.servers.stub_main import run_stub_in_thread
from splitbench.workload.prompts import TokenIdPrompts
from splitbench.workload.types import Workload


def _workload(n: int, rate_rps: float, inp: int = 64, out: int = 8, start: float = 0.0) -> Workload:
    gaps = np.full(n, 1.0 / rate_rps)
    gaps[0] = 0
    return Workload(name="t", arrival_s=start + np.cumsum(gaps), input_tokens=np.full(n, inp),
                    output_tokens=np.full(n, out) + np.arange(n) % 3, trace_index=np.arange(n) + 100)


def _replay(w: Workload, url: str, **cfg) -> tuple[list[R.RequestRecord], Replayer]:
    out: list[R.RequestRecord] = []
    prompts = TokenIdPrompts(vocab_size=5000, seed=1)
    rep = Replayer(w, prompts.payload, ReplayConfig(base_url=url, model="m", **cfg), out.append)
    asyncio.run(rep.run())
    return sorted(out, key=lambda r: r.trace_index), rep


@pytest.fixture(params=["lean", "aiohttp"])
def http(request):
    """Both HTTP transports must produce the same records."""
    return request.param


@pytest.fixture(scope="module")
def stub():
    url, stop = run_stub_in_thread(ttft_s=0.030, tpot_s=0.004)
    yield url
    stop()


def test_open_loop_timing_and_exact_tokens(stub, http):
    w = _workload(60, rate_rps=40)
    recs, rep = _replay(w, stub, http=http)
    assert len(recs) == 60 and all(r.ok for r in recs), [r.error for r in recs if not r.ok]
    assert [r.trace_index for r in recs] == list(range(100, 160))
    for r, planned in zip(recs, w.output_tokens.tolist()):
        assert r.planned_output_tokens == planned == r.actual_output_tokens == sum(r.chunk_tokens)
        assert r.actual_input_tokens == 64
        assert r.actual_send_s >= r.intended_send_s - 1e-4          # never early
        assert r.first_token_s <= r.last_token_s <= r.end_s
        assert r.chunk_offsets_s == sorted(r.chunk_offsets_s)
        assert abs(r.chunk_offsets_s[0] - (r.first_token_s - r.actual_send_s)) < 1e-9
    ttft = np.array([r.first_token_s - r.actual_send_s for r in recs])
    assert ttft.min() >= 0.030 - 1e-3   # never before the stub's TTFT (exact timing: tests/test_replay_clock.py)
    # open loop: sends follow the schedule, not completions (each answer takes >= 58 ms, arrivals are 25 ms apart)
    assert rep.stats.inflight_peak >= 2
    assert rep.stats.sent == rep.stats.finished == 60 and rep.stats.failed == 0


@pytest.mark.parametrize("fault,status,code", [
    ("status:500", R.HTTP_ERROR, 500),
    ("status:429", R.HTTP_ERROR, 429),
    ("disconnect:3", R.DISCONNECTED, 200),
    ("garbage", R.ERROR, 200),
])
def test_failures_become_records(stub, fault, status, code, http):
    recs, rep = _replay(_workload(4, rate_rps=50), stub, headers={"X-Stub-Fault": fault}, http=http)
    assert len(recs) == 4
    for r in recs:
        assert r.status == status and r.http_status == code and r.error
        assert r.end_s is not None and r.end_s >= r.actual_send_s
    if fault.startswith("disconnect"):
        assert all(sum(r.chunk_tokens) == 3 for r in recs)   # tokens before the cut are kept
        assert all(r.actual_output_tokens == 3 for r in recs)
    assert rep.stats.failed == 4


def test_hang_times_out(stub, http):
    recs, _ = _replay(_workload(2, rate_rps=50), stub, headers={"X-Stub-Fault": "hang"}, timeout_s=0.5, http=http)
    assert [r.status for r in recs] == [R.TIMEOUT] * 2
    assert all(r.end_s - r.actual_send_s >= 0.5 - 1e-3 for r in recs)   # not before the limit


def test_connection_refused_is_a_record(http):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    recs, _ = _replay(_workload(3, rate_rps=100), f"http://127.0.0.1:{port}", http=http)
    assert [r.status for r in recs] == [R.ERROR] * 3
    assert all("Connect" in r.error or "connect" in r.error for r in recs)


def test_max_inflight_binds_and_is_reported(stub, http):
    recs, rep = _replay(_workload(20, rate_rps=500, out=20), stub, max_inflight=2, http=http)
    assert all(r.ok for r in recs)
    assert rep.stats.inflight_peak <= 2
    assert rep.stats.inflight_cap_waits > 0
    lag = [r.actual_send_s - r.intended_send_s for r in recs]
    assert max(lag) > 0.1   # the cap delayed sends, and the records show it


def test_cli_run_writes_run_dir_and_report_reads_it(tmp_path):
    res = CliRunner().invoke(app, [
        "run", "--trace", "synth:arrivals=poisson,rate=30,duration=2,lengths=fixed,input=32,output=4,seed=3",
        "--results", str(tmp_path), "--run-id", "r1", "--slo", "ttft_p99=1s", "--stub-ttft-ms", "10",
        "--stub-tpot-ms", "2"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "r1"
    assert {"records.parquet", "run.json", "summary.json"} <= {p.name for p in run_dir.iterdir()}
    assert not (run_dir / R.JOURNAL_FILE).exists()
    table = pq.read_table(run_dir / "records.parquet")
    assert table.schema.metadata[b"splitbench_schema_version"] == str(R.SCHEMA_VERSION).encode()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "complete" and meta["backend"]["backend"] == "stub"
    assert meta["workload"]["requests"] == table.num_rows > 30
    assert meta["t0_unix_s"] > 1.7e9
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"]["ok"] == table.num_rows
    assert summary["latency"]["ttft_s"]["p50"] >= 0.010   # the stub's TTFT is a floor
    rep = CliRunner().invoke(app, ["report", str(run_dir)])
    assert rep.exit_code == 0 and "ttft" in rep.output and "fidelity verdict" in rep.output
    bad = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert bad.exit_code == 2


def test_api_key_never_written(tmp_path, stub, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_TEST_KEY", "sk-secret-value-123")
    res = CliRunner().invoke(app, [
        "run", "--backend", "openai", "--url", stub, "--api-key-env", "SPLITBENCH_TEST_KEY",
        "--trace", "synth:arrivals=poisson,rate=20,duration=1,lengths=fixed,input=8,output=2,seed=1",
        "--results", str(tmp_path), "--run-id", "k", "--vocab-size", "1000"])
    assert res.exit_code == 0, res.output
    for f in (tmp_path / "k").iterdir():
        assert b"sk-secret-value-123" not in f.read_bytes(), f
    assert "sk-secret-value-123" not in res.output


def test_sigterm_stops_sending_writes_records_and_exits_nonzero(tmp_path):
    cmd = [sys.executable, "-m", "splitbench.cli", "run", "--trace",
           "synth:arrivals=poisson,rate=50,duration=60,lengths=fixed,input=16,output=50,seed=1",
           "--results", str(tmp_path), "--run-id", "int", "--grace", "3", "--stub-tpot-ms", "20"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "int"
    deadline = time.time() + 60
    while time.time() < deadline:   # wait until the replay is underway (records being written)
        if (run_dir / R.JOURNAL_FILE).exists() and (run_dir / R.JOURNAL_FILE).stat().st_size > 0:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out.decode()[-2000:]
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "interrupted"
    recs = R.read_records(run_dir)
    assert 0 < len(recs) < 3000                      # stopped sending long before the trace's end
    assert sum(r.ok for r in recs) > 0
    assert {r.status for r in recs} <= {R.OK, R.CANCELLED}
    # the stub child process was torn down with the run
    pid = meta["backend"]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_events_in_one_read_are_one_chunk():
    """Several SSE events arriving in one network read are one chunk of k tokens (k gaps of g/k later)."""
    rec = R.RequestRecord(request_id="r0", trace_index=0, intended_send_s=0.0, planned_input_tokens=1,
                          planned_output_tokens=3)
    sink = RecordSink(rec, t0=0.0, send=1.0)
    sink.on_head(200, "OK", {"content-type": "text/event-stream"})

    def ev(n):
        return b'data: {"choices":[{"text":"x"}],"usage":{"prompt_tokens":1,"completion_tokens":%d}}\n\n' % n
    sink.on_body(ev(1), 1.5)
    sink.on_body(ev(2) + ev(3) + b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3}}\n\n'
                 b"data: [DONE]\n\n", 1.9)
    sink.on_end(1.9)
    assert rec.chunk_tokens == [1, 2]
    assert rec.chunk_offsets_s == [0.5, pytest.approx(0.9)]
    assert rec.first_token_s == 1.5 and rec.last_token_s == 1.9
    assert rec.actual_output_tokens == 3 and rec.status == R.OK
