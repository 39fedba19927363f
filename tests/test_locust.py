"""`splitbench locust`: shards and the shared start (pure + real replays), headless standalone and 2-worker runs
against the stub (Locust's CSV rows, run dir, each request once, SLO and dead-worker exit codes), and the web UI
driven in headless Chromium (start, TTFT row, LLM tab updating, stop, screenshot)."""
from __future__ import annotations

import asyncio
import csv
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from splitbench.client.locust_rows import (
    LiveLLM,
    PipeWriter,
    Samples,
    llm_samples,
    workload_from_json,
    workload_to_json,
)
from splitbench.client.replay import replay_workload
from splitbench.client.replayer import ReplayConfig
from splitbench.client.shards import shard_positions
from splitbench.schema import records as R
from splitbench.servers.stub_main import run_stub_in_thread
from splitbench.workload.types import Workload

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parent.parent / "shared") if p.is_dir()),
              ROOT.parent / "shared")   # ../shared beside a clone; ../../shared beside a worktree
SYNTH = "synth:arrivals=poisson,rate={rate},duration={dur},lengths=fixed,input=32,output={out},seed={seed}"


def _workload(n: int, rate_rps: float, first_index: int = 0) -> Workload:
    return Workload(name="t", arrival_s=np.arange(n) / rate_rps, input_tokens=np.full(n, 16),
                    output_tokens=np.full(n, 4), trace_index=np.arange(first_index, first_index + n))


@functools.lru_cache(maxsize=1)
def start_lead_s() -> float:
    """The shared start's lead for these runs, from this host now: each shard's replayer is a fresh Python process
    (import splitbench.client.locust_bridge) spawned after the start time is set, so the lead must cover that
    start-up; 4x its measured time (at least 1 s) holds on a busy host too."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import splitbench.client.locust_bridge"], check=True)
    return max(1.0, 4 * (time.perf_counter() - t))


def _cli(args: list[str], tmp_path: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitbench.cli", "locust", *args, "--results", str(tmp_path / "res"),
                           "--locust-log", str(tmp_path / "locust.log"), "--start-lead", f"{start_lead_s():.2f}"],
                          capture_output=True, text=True, timeout=timeout + start_lead_s(), cwd=tmp_path,
                          check=False)


def _locust_median_ms(values_ms: list[float]) -> int:
    """Locust's median of response times (locust.stats: bucket_response_time keeps ~2 significant digits, then
    calculate_response_time_percentile walks the buckets). Copied, not imported: importing locust monkey-patches
    this test process with gevent."""
    def bucket(t):
        return round(t) if t < 100 else int(round(t, -1)) if t < 1000 else int(round(t, -2)) if t < 10000 \
            else int(round(t, -3))
    counts, n = Counter(bucket(t) for t in values_ms), len(values_ms)
    done = 0
    for t in sorted(counts, reverse=True):
        done += counts[t]
        if n - done <= int(n * 0.5):
            return t
    return 0


def _stats_rows(run_dir: Path) -> dict[tuple[str, str], dict]:
    with open(run_dir / "locust_stats.csv") as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- pure pieces and the shared start

def test_shards_partition_the_workload_each_request_once():
    w = _workload(103, 10.0, first_index=500)
    for n in (1, 2, 3, 7):
        parts = [workload_from_json(workload_to_json(w, shard_positions(len(w), k, n))) for k in range(n)]
        idx = np.concatenate([p.trace_index for p in parts])
        assert sorted(idx.tolist()) == w.trace_index.tolist()          # every request exactly once
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
        for p in parts:                                               # absolute trace times kept, in order
            assert np.all(np.diff(p.arrival_s) > 0)
            assert np.allclose(p.arrival_s, (p.trace_index - 500) / 10.0)
    with pytest.raises(ValueError):
        shard_positions(10, 2, 2)


def test_live_samples_exact_below_cap_then_uniform_reservoir():
    rng = np.random.default_rng(3)
    vals = rng.exponential(20.0, 5000)
    s = Samples(cap=10_000)
    for chunk in np.array_split(vals, 37):
        s.extend(chunk)
    assert s.count == 5000 and s.percentiles([50, 99]) == pytest.approx(np.percentile(vals, [50, 99]))
    stream = np.arange(400_000, dtype=np.float64)          # beyond the cap: count/mean/max exact, sample uniform
    r = Samples(cap=4000, seed=1)
    for chunk in np.array_split(stream, 250):
        r.extend(chunk)
    kept = r.buf[:r.n]
    assert r.count == 400_000 and r.n == 4000 and r.max == 399_999 and r.total / r.count == stream.mean()
    assert len(np.unique(kept)) == 4000
    hist = np.histogram(kept, bins=4, range=(0, 400_000))[0]   # each quarter of the stream ~1000 (sd ~27)
    assert hist.min() > 850 and hist.max() < 1150, hist


def test_pipe_writer_never_blocks_the_loop_on_a_full_pipe():
    r, w = os.pipe()
    out = PipeWriter(w)
    line = b"x" * 1000 + b"\n"

    async def main():
        for _ in range(300):                     # 300 kB: far more than a pipe holds, nobody reading yet: a
            out.write(line)                      # blocking write would hang here (the test's timeout fails it)
        queued = len(out.buf)                    # what the pipe could not take yet waits in the writer's buffer
        got = b""
        os.set_blocking(r, False)
        while len(got) < 300 * len(line):        # the loop drains the rest as the reader catches up
            try:
                got += os.read(r, 1 << 16)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        return queued, got

    queued, got = asyncio.run(main())
    assert got == line * 300 and queued > 0
    out.write(b"tail\n")
    out.close()
    assert os.read(r, 100) == b"tail\n"
    os.close(r)
    os.close(w)


def test_replayer_shared_start_time_and_record_hook(tmp_path):
    url, stop = run_stub_in_thread(ttft_s=0.01, tpot_s=0.002)
    try:
        w = _workload(20, 40.0)
        seen: list[R.RequestRecord] = []
        start_at = time.time() + 1.0
        cfg = ReplayConfig(base_url=url, model="stub-model", start_at_unix_s=start_at)
        rep, interrupted = replay_workload(w, lambda i, n: {"prompt": [5] * n}, cfg, tmp_path / "a", "a",
                                           on_record=seen.append)
        assert not interrupted and rep.stats.t0_unix_s == start_at
        recs = R.read_records(tmp_path / "a")
        assert sorted(r.trace_index for r in seen) == [r.trace_index for r in recs] == list(range(20))
        lag = np.array([r.actual_send_s - r.intended_send_s for r in recs])
        assert lag.min() >= -1e-4                                # nothing before the shared start
        # a start time already past: everything is due at once, and the lag says how late
        cfg = ReplayConfig(base_url=url, model="stub-model", start_at_unix_s=time.time() - 1.0)
        replay_workload(w, lambda i, n: {"prompt": [5] * n}, cfg, tmp_path / "b", "b")
        past = R.read_records(tmp_path / "b")
        late = [r.actual_send_s - r.intended_send_s for r in past]
        assert all(r.ok and r.actual_send_s >= 1.0 - 1e-3 for r in past)   # clock 0 was 1 s before the call
        # run clock 0 is the shared wall time: on time there, a second late here (same host, same test)
        assert np.median(lag) < 0.5 * min(late), (np.median(lag), min(late))
    finally:
        stop()
    s = [llm_samples(r) for r in recs]
    live = LiveLLM(planned=20)
    for x in s:
        live.add(x)
    rows = {row["metric"]: row for row in live.rows()}
    ttfts = [x["ttft_ms"] for x in s]
    assert rows["TTFT (ms)"]["count"] == "20" and rows["TTFT (ms)"]["p50"] == f"{np.percentile(ttfts, 50):.2f}"
    # one gap per token after the first chunk (a busy client may read the first two tokens as one chunk)
    assert rows["TBT per token (ms)"]["count"] == str(sum(len(x["tbt_ms"]) for x in s)) == \
        str(sum(4 - r.chunk_tokens[0] for r in recs))
    assert rows["Requests ok/failed/planned"]["count"] == "20/0/20"


# ----------------------------------------------------------------------------- headless runs through the CLI

def test_headless_standalone_run_dir_csv_rows_and_slo_exit(tmp_path):
    trace = SYNTH.format(rate=25, dur=2, out=6, seed=3)
    p = _cli(["--backend", "stub", "--trace", trace, "--headless", "--run-id", "met", "--slo", "ttft_p99=5s"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:] + (tmp_path / "locust.log").read_text()[-3000:]
    run_dir = tmp_path / "res" / "met"
    meta = json.loads((run_dir / "run.json").read_text())
    recs = R.read_records(run_dir)
    planned = meta["workload"]["requests"]
    assert meta["status"] == "complete" and len(recs) == planned > 20 and all(r.ok for r in recs)
    assert meta["locust"]["mode"] == "standalone" and meta["locust"]["dead_workers"] == []
    for key in ("options", "backend", "model", "prompts", "replay", "t0_unix_s", "replay_stats", "hardware"):
        assert key in meta, key                                   # the keys `splitbench run` writes
    # Locust's CSV: TTFT/TBT/E2E rows of their own; the Aggregated row counts HTTP requests only
    rows = _stats_rows(run_dir)
    n_gaps = sum(len(llm_samples(r)["tbt_ms"]) for r in recs)
    assert int(rows[("POST", "/v1/completions")]["Request Count"]) == planned
    assert int(rows[("", "Aggregated")]["Request Count"]) == planned
    assert int(rows[("LLM", "TTFT")]["Request Count"]) == int(rows[("LLM", "E2E")]["Request Count"]) == planned
    # one TBT sample per token after the first chunk (a busy client may read two tokens as one chunk)
    assert int(rows[("LLM", "TBT")]["Request Count"]) == n_gaps == sum(6 - r.chunk_tokens[0] for r in recs)
    ttft_ms = [(r.first_token_s - r.actual_send_s) * 1e3 for r in recs]
    assert float(rows[("LLM", "TTFT")]["Median Response Time"]) == pytest.approx(_locust_median_ms(ttft_ms), abs=1)
    html = (run_dir / "locust.html").read_text()
    assert "TTFT" in html and "TBT" in html and "E2E" in html
    # report works on the Locust run and agrees with the records
    rep = subprocess.run([sys.executable, "-m", "splitbench.cli", "report", str(run_dir), "--json"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert rep.returncode == 0, rep.stderr
    summary = json.loads(rep.stdout)
    assert summary["counts"]["ok"] == planned and summary["slos"]["all_met"] is True
    # the same trace with an SLO the stub (20 ms TTFT) cannot meet: exit code 1, run still written
    p = _cli(["--backend", "stub", "--trace", trace, "--headless", "--run-id", "missed", "--slo", "ttft_p99=5ms"],
             tmp_path)
    assert p.returncode == 1, p.stderr[-3000:]
    missed = json.loads((tmp_path / "res" / "missed" / "summary.json").read_text())
    assert missed["slos"]["all_met"] is False and missed["counts"]["ok"] == planned
    bad = _cli(["--trace", trace, "--headless"], tmp_path)              # neither --url nor --backend
    assert bad.returncode == 2 and "--url" in bad.stderr


def _stub_requests_total(url: str) -> int:
    from splitbench.client.probe import http_get
    _status, body = http_get(url + "/metrics", timeout_s=5.0)
    line = next(ln for ln in body.decode().splitlines() if ln.startswith("splitbench_stub_requests_total"))
    return int(float(line.split()[-1]))


def test_two_workers_send_each_trace_request_once_at_100_rps(tmp_path):
    from splitbench.backends.stub import StubBackend
    stub = StubBackend()                      # its own process, pinned to the last core
    stub.start(tmp_path)
    try:
        url = stub.endpoint()
        p = _cli(["--url", url, "--trace", "azure-conv-2023", "--trace-dir", str(SHARED / "traces"), "--start", "600",
                  "--duration", "120", "--rate-scale", "19.9", "--headless", "--processes", "2", "--run-id", "two"],
                 tmp_path, timeout=120)
        served = _stub_requests_total(url)
    finally:
        stub.stop()
    assert p.returncode == 0, p.stderr[-3000:] + (tmp_path / "locust.log").read_text()[-3000:]
    run_dir = tmp_path / "res" / "two"
    meta = json.loads((run_dir / "run.json").read_text())
    planned = meta["workload"]["requests"]
    recs = R.read_records(run_dir)
    idx = [r.trace_index for r in recs]
    assert planned == 603 and len(idx) == len(set(idx)) == planned == served   # once each, server agrees
    assert all(r.ok for r in recs)
    shards = meta["locust"]["shards"]
    assert len(shards) == 2 and {s["status"] for s in shards} == {"done"} and meta["locust"]["duplicate_records"] == 0
    per_shard = [{r.trace_index for r in R.read_records(Path(s["shard_dir"]))} for s in shards]
    assert not per_shard[0] & per_shard[1] and per_shard[0] | per_shard[1] == set(idx)
    assert sorted(len(s) for s in per_shard) == [301, 302]
    summary = json.loads((run_dir / "summary.json").read_text())
    lag = summary["fidelity"]["lag_s"]
    rate = summary["fidelity"]["trace_rate_rps"]
    print(f"\n2 workers, {planned} requests at {rate:.1f} req/s: schedule lag p50 {lag['p50'] * 1e3:.2f} ms, "
          f"p99 {lag['p99'] * 1e3:.2f} ms, max {lag['max'] * 1e3:.2f} ms")
    assert 95 < rate < 105                                   # the trace's rate (planned, not timed)
    # both shards began at the shared start: a shard that missed it would lag by its start-up for every request
    # (the lead, measured on this host in this session, covers start-up with room to spare); 1.8-3.7 ms p99 idle
    assert 0 <= lag["p50"] and lag["p99"] < start_lead_s() / 2, summary["fidelity"]["reasons"]
    assert summary["fidelity"]["rate_ratio"] > 0.9
    rows = _stats_rows(run_dir)    # worker stats merged on the master, Aggregated = HTTP requests only
    assert int(rows[("", "Aggregated")]["Request Count"]) == planned == int(rows[("LLM", "TTFT")]["Request Count"])


def test_dead_worker_is_reported_and_exit_code_3(tmp_path):
    import psutil
    trace = SYNTH.format(rate=20, dur=14, out=4, seed=5)
    proc = subprocess.Popen([sys.executable, "-m", "splitbench.cli", "locust", "--backend", "stub", "--trace", trace,
                             "--headless", "--processes", "2", "--run-id", "dead", "--results", str(tmp_path / "res"),
                             "--locust-log", str(tmp_path / "locust.log"), "--start-lead", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        victim = None
        deadline = time.time() + 40
        while victim is None and time.time() < deadline:    # the replayer child of shard 1 -> its Locust worker
            for c in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if any("shard-1" in a for a in c.cmdline()) and "splitbench.client.locust_bridge" in c.cmdline():
                        victim = c.parent()
                except psutil.Error:
                    pass
            time.sleep(0.2)
        assert victim is not None, "shard 1's replayer never started"
        time.sleep(3)
        victim.kill()
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err[-3000:]
    assert "died" in err
    meta = json.loads((tmp_path / "res" / "dead" / "run.json").read_text())
    dead = meta["locust"]["dead_workers"]
    assert [d["shard"] for d in dead] == [1] and dead[0]["missing_requests"] > 0
    recs = R.read_records(tmp_path / "res" / "dead")
    planned = meta["workload"]["requests"]
    assert len(recs) == planned - dead[0]["missing_requests"] and len({r.trace_index for r in recs}) == len(recs)
    shard0 = next(s for s in meta["locust"]["shards"] if s["shard"] == 0)
    assert shard0["status"] == "done" and shard0["received"] == shard0["planned"]


# ----------------------------------------------------------------------------- the web UI in headless Chromium

def test_web_ui_start_ttft_row_llm_tab_stop_screenshot(tmp_path):
    from browser_check import launch
    from PIL import Image
    from playwright.sync_api import sync_playwright
    port = _free_port()
    trace = SYNTH.format(rate=20, dur=40, out=12, seed=7)
    proc = subprocess.Popen([sys.executable, "-m", "splitbench.cli", "locust", "--backend", "stub", "--trace", trace,
                             "--web-port", str(port), "--run-id", "ui", "--results", str(tmp_path / "res"),
                             "--locust-log", str(tmp_path / "locust.log"), "--start-lead", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.time() + 40
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, (tmp_path / "locust.log").read_text()[-2000:]
                time.sleep(0.3)
        with sync_playwright() as pw:
            browser = launch(pw)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("button[type=submit]", has_text="Start").click()   # users/ramp-up preset: ignored
            ttft_row = page.locator("tr", has=page.locator("td", has_text="TTFT"))
            page.wait_for_function("() => [...document.querySelectorAll('tr')].some(r => r.innerText.includes("
                                   "'TTFT') && parseInt(r.querySelectorAll('td')[2]?.innerText) > 0)", timeout=20000)
            cells = ttft_row.first.locator("td").all_inner_texts()
            assert cells[0] == "LLM" and int(cells[2]) > 0
            page.get_by_role("tab", name="LLM").click()
            llm_ttft = page.locator("tr", has=page.locator("td", has_text="TTFT (ms)")).first
            llm_ttft.wait_for(timeout=10000)
            first = llm_ttft.locator("td").all_inner_texts()
            page.wait_for_timeout(3000)
            second = llm_ttft.locator("td").all_inner_texts()
            table = page.locator("table").first.inner_text()
            print("\nLLM tab:\n" + table)
            assert int(second[1]) > int(first[1]) > 0, (first, second)      # it updates live
            live_p50_ms = float(second[3])                                  # checked against the records below
            assert "Schedule lag (ms)" in table and "Output tokens/s" in table
            page.get_by_role("button", name="Stop").click()
            page.get_by_text("STOPPED").first.wait_for(timeout=20000)
            shot = tmp_path / "locust_ui.png"
            page.screenshot(path=str(shot))
            assert errors == []
            browser.close()
        img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
        non_white = float((img.reshape(-1, 3).sum(axis=1) < 720).mean())
        assert img.shape[1] >= 1000 and non_white > 0.05 and len(np.unique(img.reshape(-1, 3), axis=0)) > 50
        deadline = time.time() + 30      # the stopped replay is assembled without closing the UI
        while json.loads((tmp_path / "res" / "ui" / "run.json").read_text())["status"] == "running":
            assert time.time() < deadline
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)   # closing the session: Locust writes its CSV/HTML and exits
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    meta = json.loads((tmp_path / "res" / "ui" / "run.json").read_text())
    recs = R.read_records(tmp_path / "res" / "ui")
    assert meta["status"] == "interrupted" and 0 < len(recs) < meta["workload"]["requests"]
    ttfts_ms = [(r.first_token_s - r.actual_send_s) * 1e3 for r in recs if r.ok]
    assert 20 * 0.95 <= min(ttfts_ms) <= live_p50_ms <= max(ttfts_ms)   # the stub's 20 ms is a floor
    assert json.loads((tmp_path / "res" / "ui" / "summary.json").read_text())["counts"]["ok"] > 0
