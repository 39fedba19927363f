"""`splitbench search` end to end on the real stub (its capacity known by construction: --stub-max-concurrency K FIFO
slots), resume from finished probe directories, the simulator path, and bad input (exit 2, nothing written)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from splitbench.app.search import SearchSpec
from splitbench.cli import app
from splitbench.schema.search import read_search

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "splitbench.cli", "search"]
_spec = importlib.util.spec_from_file_location("search_accuracy", ROOT / "benchmarks" / "search_accuracy.py")
accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy)
ENV = {**os.environ, "COLUMNS": "200"}


def search(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=ENV)


def stub_args(results: Path, search_id: str, slots: int = 8, duration: float = 3.0) -> list[str]:
    """K slots of S = 50 ms + 15 x 10 ms = 200 ms: K / S = 40 req/s at K = 8 (time scales well above a busy host's
    scheduling hiccups)."""
    return ["--backend", "stub", "--stub-max-concurrency", str(slots), "--stub-ttft-ms", "50", "--stub-tpot-ms", "10",
            "--trace", accuracy.lengths_trace(16), "--arrivals", "gamma", "--cv", "0.01", "--probe-duration",
            str(duration), "--slo", "ttft_p90=300ms", "--results", str(results), "--search-id", search_id]


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
def test_stub_slots_queue_requests_fifo(server):
    """--max-concurrency 2: two requests that hang hold both slots, so a third gets no answer (a stub without the
    limit answers in 50 ms); once the hanging clients leave, the slots serve the next request."""
    import socket
    import time
    import urllib.request

    from splitbench.servers.stub_main import run_stub_in_thread
    url, stop = run_stub_in_thread(ttft_s=0.05, tpot_s=0.01, server=server, max_concurrency=2)
    host, port = url.rsplit("/", 1)[-1].split(":")
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 6, "stream": True}).encode()

    def post(headers: dict, timeout: float):
        req = urllib.request.Request(url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json", **headers})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    hangs = []
    try:
        for _ in range(2):
            sk = socket.create_connection((host, int(port)))
            sk.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Stub-Fault: hang\r\nContent-Type: "
                       b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            hangs.append(sk)
        deadline = time.monotonic() + 30
        while b"splitbench_stub_requests_total 2" not in urllib.request.urlopen(url + "/metrics").read():
            assert time.monotonic() < deadline, "the hanging requests never reached the stub"
            time.sleep(0.02)
        with pytest.raises(OSError):           # queued behind the two hanging requests: no answer at all
            post({}, timeout=0.5)
        for sk in hangs:
            sk.close()
        assert post({}, timeout=30).count(b"data: {") >= 6   # the freed slots serve again
    finally:
        for sk in hangs:
            sk.close()
        stop()


def test_fifo_model_of_the_stub():
    # 4 slots, 100 ms each: arrivals every 20 ms (50/s > 40/s) queue; every 30 ms (33/s) never wait
    import numpy as np
    t = accuracy.fifo_ttft_s(np.arange(20) * 0.02, 4, 0.1, 0.02)
    assert t[:4].tolist() == pytest.approx([0.02] * 4) and t[-1] == pytest.approx(0.02 + 0.02 * (19 // 4))   # each 4 later: 20 ms more
    assert accuracy.fifo_ttft_s(np.arange(20) * 0.03, 4, 0.1, 0.02).max() == pytest.approx(0.02)


def test_stub_capacity_is_found_within_5pct_and_its_ci_covers_it(tmp_path):
    a = Namespace(slots=8, ttft_ms=50.0, tpot_ms=10.0, output=16, probe_duration=3.0, slo_ms=300.0, stat="p90",
                  cv=0.01, seed=0)
    truth = accuracy.true_capacity(a, SearchSpec(arrivals="gamma", cv=0.01, probe_duration_s=3.0, seed=0,
                                                 slos="ttft_p90=300ms"))
    assert 40.0 <= truth <= 46.0      # K / S = 8 / 0.2 s; a 3 s probe meets the p90 a little past it
    out = search(*stub_args(tmp_path, "acc"), "--start-rate", "40", "--growth", "1.25", "--max-probes", "12")
    assert out.returncode == 0, out.stderr[-3000:]
    res = read_search(tmp_path / "acc")
    cap = res["searches"][0]["capacity"]
    assert abs(cap["rps"] - truth) / truth <= 0.05, (cap, truth)
    assert cap["ci_lo_rps"] <= truth <= cap["ci_hi_rps"], (cap, truth)
    # every probe is a normal run directory; an overloaded one was stopped early
    pts = res["searches"][0]["points"]
    for p in pts:
        d = tmp_path / "acc" / "search" / p["dir"]
        assert (d / "run.json").exists() and (d / "records.parquet").exists() and (d / "summary.json").exists()
    assert any(p["early_stop"] for p in pts if not p["passed"])
    html = (tmp_path / "acc" / "search.html").read_text()
    assert html.count("<svg") == 3 and 'id="plot-pareto"' in html
    assert "capacity: highest rate" in out.stdout


def sim_args(results: Path, search_id: str, *extra: str) -> list[str]:
    return ["search", "--simulate", "--cluster", "splitwise-aa:1,1", "--splitwise-slo", "--trace", "azure-conv-2023",
            "--arrivals", "poisson", "--probe-duration", "60", "--duration", "600", "--start-rate", "0.5",
            "--results", str(results), "--search-id", search_id, *extra]


def test_resume_reuses_finished_probes_and_reruns_an_unfinished_one(tmp_path):
    first = CliRunner().invoke(app, sim_args(tmp_path, "res", "--max-probes", "2"))
    assert first.exit_code == 0, first.output
    res = read_search(tmp_path / "res")
    assert res["status"] == "complete" and res["searches"][0]["capacity"]["stop"] == "max_probes"
    sdir = tmp_path / "res" / "search"
    kept = (sdir / "probe-001" / "run.json").read_text()
    # an interrupted third probe: its directory is there but unfinished
    (sdir / "probe-002").mkdir()
    (sdir / "probe-002" / "run.json").write_text(json.dumps({"schema_version": 2, "run_id": "probe-002",
                                                            "status": "running"}))
    again = CliRunner().invoke(app, sim_args(tmp_path, "res", "--max-probes", "3", "--resume"))
    assert again.exit_code == 0, again.output
    assert "reusing 2 finished probe(s)" in again.stderr
    assert (sdir / "probe-001" / "run.json").read_text() == kept          # reused, not simulated again
    assert json.loads((sdir / "probe-002" / "run.json").read_text())["status"] == "complete"
    after = read_search(tmp_path / "res")["searches"][0]["points"]
    assert len(after) == 3 and after[:2] == res["searches"][0]["points"]
    # the same id with another SLO is refused, nothing changes
    other = CliRunner().invoke(app, sim_args(tmp_path, "res", "--max-probes", "3", "--slo", "ttft_p99=1s"))
    assert other.exit_code == 2 and "other options or SLOs" in other.stderr
    assert len(read_search(tmp_path / "res")["searches"][0]["points"]) == 3


def test_sweep_configurations_and_their_predictions():
    from splitbench.app.options import RunOptions
    from splitbench.app.sweep import SearchRun, predict_options, sweep_configs
    opts = RunOptions(backend="splitwise", backend_options={"cores": "0,1,2", "connector": "nixl"})
    configs = sweep_configs(opts)
    assert [(label, b) for label, b, _ in configs] == [("1P2T", "splitwise"), ("2P1T", "splitwise"),
                                                       ("baseline-3", "vllm")]
    assert configs[0][2]["prompt_instances"] == 1 and configs[0][2]["token_instances"] == 2
    assert "connector" not in configs[2][2] and configs[2][2]["instances"] == 3
    run = SearchRun(predict="p.csv", predict_split_profile="pair.csv")
    sims = [predict_options(label, b, bo, opts, run) for label, b, bo in configs]
    assert [s.cluster for s in sims] == ["prompt=cpu-core:1,token=cpu-core:2", "prompt=cpu-core:2,token=cpu-core:1",
                                         "baseline=cpu-core:3"]
    assert [s.profile for s in sims] == ["pair.csv", "pair.csv", "p.csv"] and sims[0].first_token == "decode"
    with pytest.raises(Exception, match="at least 2 instances"):
        sweep_configs(RunOptions(backend="splitwise", backend_options={"cores": "0"}))


def test_simulated_search_same_path(tmp_path):
    out = CliRunner().invoke(app, sim_args(tmp_path, "sim", "--max-probes", "4", "--json"))
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    assert res["simulated"] and len(res["searches"][0]["points"]) <= 4
    first = res["searches"][0]["points"][0]
    assert any(i["name"].startswith("splitwise_") for i in first["items"])
    meta = json.loads((tmp_path / "sim" / "search" / "probe-000" / "run.json").read_text())
    assert meta["simulated"] is True and meta["probe"]["rate"] == 0.5
    # with a prediction beside it, the report and the tables render (rendering only reads the dict)
    from rich.console import Console

    from splitbench.app.sweep import finish
    from splitbench.render.search import render_search_html
    from splitbench.render.search_table import render_search
    both = finish({**res, "predictions": [dict(res["searches"][0])]})
    assert both["comparison"][0]["error"] == pytest.approx(0.0)
    page = render_search_html(both)
    assert page.count("<svg") == 3 and "Measured vs predicted" in page and "(predicted)" in page
    con = Console(record=True, width=200)
    render_search(both, con)
    assert "measured vs predicted" in con.export_text()


@pytest.mark.parametrize("bad, says", [
    (["--slo", "ttft_p99=fast"], "ttft_p99"),
    (["--tolerance", "2"], "--tolerance"),
    (["--arrivals", "uniform"], "--arrivals"),
    ([], "--slo"),
    (["--slo", "ttft_p99=1s", "--resume"], "--resume"),
    (["--slo", "ttft_p99=1s", "--simulate", "--cluster", "prompt=dgx-z1:1,token=dgx-a100:1"], "dgx-z1"),
    (["--slo", "ttft_p99=1s", "--sweep-splits"], "--sweep-splits"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, bad, says):
    out = CliRunner().invoke(app, ["search", "--backend", "stub", "--trace", accuracy.lengths_trace(5), "--results",
                                   str(tmp_path), "--search-id", "bad", *bad])
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith("error:") and says in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
