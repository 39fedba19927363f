"""Compare report: plot-data functions on hand-built and real runs, and the HTML page opened in headless Chromium."""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from browser_check import check_rendered, launch

from splitbench.hardware.catalog import load_catalog, plan_allocation
from splitbench.metrics.compare import build_comparison as lead_build
from splitbench.metrics.efficiency import efficiency_section
from splitbench.metrics.series import (
    TTFT_COMPONENTS,
    cdf_points,
    inflight_series,
    instance_series,
    run_series,
    ttft_breakdown,
    ttft_components,
)
from splitbench.metrics.summary import summarize
from splitbench.render.html import render_html
from splitbench.schema import records as R
from splitbench.schema.files import atomic_write_bytes
from splitbench.schema.records import RequestRecord
from splitbench.schema.runmeta import read_run_meta


def rec(i, send, end=None, first=None, status="ok", phases=None) -> RequestRecord:
    return RequestRecord(request_id=f"r{i}", trace_index=i, intended_send_s=send or 0.0, planned_input_tokens=8,
                         planned_output_tokens=4, actual_send_s=send, first_token_s=first, end_s=end,
                         last_token_s=end, status=status, phases_s=phases or {})


# ----------------------------------------------------------------------------- pure series

def test_cdf_points_downsamples_evenly_keeping_min_and_max():
    vals = [float(v) for v in range(1000)]
    random.Random(1).shuffle(vals)
    c = cdf_points(vals + [None], max_points=50)
    assert len(c["x"]) == len(c["p"]) == 50
    assert c["x"][0] == 0.0 and c["x"][-1] == 999.0 and c["p"][-1] == 1.0 and c["p"][0] == 0.001
    assert c["x"] == sorted(c["x"]) and all(b > a for a, b in zip(c["p"], c["p"][1:]))
    # p is the empirical CDF at x: value v is the (v+1)-th smallest of 1000
    assert all(math.isclose(p, (x + 1) / 1000) for x, p in zip(c["x"], c["p"]))
    small = cdf_points([3.0, 1.0, 2.0])
    assert small == {"x": [1.0, 2.0, 3.0], "p": [1 / 3, 2 / 3, 1.0]}
    assert cdf_points([]) == {"x": [], "p": []}


def test_inflight_series_counts_sent_not_ended_requests():
    recs = [rec(0, 0.1, end=0.6), rec(1, 0.3, end=1.1), rec(2, None, status=R.NOT_SENT), rec(3, 0.55, end=None)]
    s = inflight_series(recs, step_s=0.25)
    assert s["t_s"] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.25])
    # t=0.5: r0, r1; 0.75: r1, r3 (no end: in flight to the end); 1.25: only r3
    assert s["requests"] == [0, 1, 2, 2, 2, 1]
    assert inflight_series([rec(0, None, status=R.NOT_SENT)]) == {"t_s": [], "requests": []}
    with pytest.raises(ValueError):
        inflight_series(recs, step_s=0)


def test_ttft_breakdown_components_sum_to_client_ttft():
    rng = random.Random(7)
    recs = []
    for i in range(50):
        send = rng.uniform(0, 10)
        ts = [send]
        for _ in range(5):
            ts.append(ts[-1] + rng.uniform(0.0001, 0.3))
        first = ts[-1] + rng.uniform(0, 0.002)
        recs.append(rec(i, send, end=first + 1, first=first,
                        phases=dict(zip(("router_recv", "prefill_sent", "prefill_done", "decode_sent",
                                         "first_token"), ts[1:]), done=first + 1)))
    colocated = rec(50, 1.0, end=2.0, first=1.2, phases={"router_recv": 1.001, "sent": 1.002, "first_token": 1.1})
    failed = rec(51, 1.0, end=1.5, status=R.HTTP_ERROR, phases=recs[0].phases_s)
    for r in recs:
        c = ttft_components(r)
        assert list(c) == list(TTFT_COMPONENTS)
        assert sum(c.values()) == pytest.approx(r.first_token_s - r.actual_send_s, abs=1e-12)
        assert c["prefill"] == pytest.approx(r.phases_s["prefill_done"] - r.phases_s["prefill_sent"])
    assert ttft_components(colocated) is None and ttft_components(failed) is None
    b = ttft_breakdown(recs + [colocated, failed])
    assert b["requests"] == 50 and b["components"] == list(TTFT_COMPONENTS)
    ttfts = [r.first_token_s - r.actual_send_s for r in recs]
    assert sum(b["mean_s"].values()) == pytest.approx(sum(ttfts) / 50) == pytest.approx(b["ttft_mean_s"])
    handoffs = sorted(r.phases_s["decode_sent"] - r.phases_s["prefill_done"] for r in recs)
    assert b["p50_s"]["handoff"] == pytest.approx((handoffs[24] + handoffs[25]) / 2)
    assert ttft_breakdown([colocated, failed, rec(52, 0.1, end=0.2, first=0.15)]) is None


def test_instance_series_from_scrape_rows():
    rows = {"p0": [
        {"t_unix_s": 1002.0, "instance": "p0", "ok": True, "gauges": {
            "vllm:num_requests_running": 2.0, "vllm:num_requests_waiting": 5.0, "vllm:kv_cache_usage_perc": 0.25}},
        {"t_unix_s": 1001.0, "instance": "p0", "ok": True, "gauges": {
            "vllm:num_requests_running": 1.0, "vllm:num_requests_waiting": 0.0, "vllm:kv_cache_usage_perc": 0.5}},
        {"t_unix_s": 1003.0, "instance": "p0", "ok": False, "error": "ConnectionRefusedError"}],
        "t0": [{"t_unix_s": 1001.5, "instance": "t0", "ok": True,
                "gauges": {"vllm:num_requests_running": 3.0, "vllm:gpu_cache_usage_perc": 0.1}}]}
    s = instance_series(rows, [{"id": "p0", "pool": "prompt"}, {"id": "t0", "role": "token"},
                               {"id": "x9", "pool": "token"}], t0_unix_s=1000.0)
    assert s["p0"] == {"pool": "prompt", "t_s": [1.0, 2.0], "running": [1.0, 2.0], "waiting": [0.0, 5.0],
                       "kv_usage": [0.5, 0.25]}
    assert s["t0"] == {"pool": "token", "t_s": [1.5], "running": [3.0], "waiting": [None], "kv_usage": [0.1]}
    assert s["x9"]["t_s"] == []


# ----------------------------------------------------------------------------- real runs

SYNTH = "synth:arrivals=poisson,rate=20,duration=3,lengths=fixed,input=32,output=8,seed={seed}"


def _efficiency(records, run_meta, instances):
    hw = plan_allocation(instances, catalog=load_catalog(), host_cpus=2)
    return efficiency_section(records, {**run_meta, "hardware": hw})


def _entry(label, run_dir, records, meta, rows=None, instances=None, with_efficiency=True):
    if instances is not None:
        meta = {**meta, "backend": {**(meta.get("backend") or {}), "instances": instances}}
    summary = summarize(records, run_meta=meta, slos="ttft_p99=0.05s")
    summary["efficiency"] = _efficiency(records, meta, instances or [
        {"id": "stub", "pool": "baseline", "cpu_cores": [1]}]) if with_efficiency else None
    return {"label": label, "run_dir": str(run_dir), "simulated": False, "backend": summary["run"]["backend"],
            "summary": summary, "series": run_series(records, meta, rows or {})}


def build_comparison(runs: list[dict]) -> dict:
    c = lead_build(runs)
    c["notes"].append("test comparison <built by tests/test_html_report.py>")
    return c


def _stub_run(tmp: Path, label: str, ttft_ms: float, seed: int) -> dict:
    from splitbench.app.options import RunOptions
    from splitbench.app.runner import run
    res = run(RunOptions(trace=SYNTH.format(seed=seed), duration_s=None, backend="stub",
                         backend_options={"ttft_s": ttft_ms / 1e3, "tpot_s": 0.004},
                         results_dir=str(tmp), run_id=label, vocab_size=1000))
    return _entry(label, res.run_dir, R.read_records(res.run_dir), read_run_meta(res.run_dir))


def _split_run(tmp: Path) -> dict:
    """A real split run: prompt and token stubs behind the router process, scraped /metrics, merged phases."""
    from splitbench.app.options import RunOptions
    from splitbench.app.runner import run
    from splitbench.servers.phaselog import load_phase_log, merge_phases
    from splitbench.servers.router_process import RouterProcess
    from splitbench.servers.scrape import MetricsScraper, read_series
    from splitbench.servers.stub_main import run_stub_in_thread
    p_url, p_stop = run_stub_in_thread(ttft_s=0.03, tpot_s=0.004, loop="uvloop")
    t_url, t_stop = run_stub_in_thread(ttft_s=0.5, tpot_s=0.004, kv_transfer_s=0.01, loop="uvloop")
    instances = [{"id": "prompt-0", "url": p_url, "pool": "prompt", "cpu_cores": [0]},
                 {"id": "token-0", "url": t_url, "pool": "token", "cpu_cores": [1]}]
    rp = RouterProcess([{k: i[k] for k in ("id", "url", "pool")} for i in instances], "jsq",
                       phase_log=tmp / "phases.jsonl")
    scraper = MetricsScraper({i["id"]: i["url"] for i in instances}, tmp / "metrics", interval_s=0.2)
    try:
        rp.start(timeout_s=20)
        scraper.start()
        res = run(RunOptions(trace=SYNTH.format(seed=5), duration_s=None, backend="openai",
                             backend_options={"url": rp.url}, results_dir=str(tmp), run_id="split-stub",
                             vocab_size=1000))
    finally:
        scraper.stop()
        rp.stop()
        p_stop()
        t_stop()
    meta = read_run_meta(res.run_dir)
    recs = merge_phases(R.read_records(res.run_dir), load_phase_log(tmp / "phases.jsonl"), meta["t0_unix_s"])
    rows = {i["id"]: read_series(tmp / "metrics" / f"{i['id']}.jsonl") for i in instances}
    return _entry("split <stub>", res.run_dir, recs, meta, rows=rows, instances=instances)


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    runs = [_stub_run(tmp, "stub-20ms", 20, 1), _stub_run(tmp, "stub-60ms", 60, 2), _split_run(tmp)]
    runs[1]["summary"]["efficiency"] = None  # one run without hardware info
    return runs


def test_series_of_real_runs(real_runs):
    fast, slow, split = real_runs
    for entry, ttft in ((fast, 0.02), (slow, 0.06)):
        s = entry["series"]
        assert s["ttft_breakdown"] is None and s["instances"] == {}
        x = s["cdf"]["ttft_s"]["x"]
        assert len(x) == entry["summary"]["latency"]["ttft_s"]["count"] > 30
        assert ttft <= x[0]                                       # the stub's TTFT is a floor
        assert max(s["inflight"]["requests"]) >= 1
    fast_x, slow_x = fast["series"]["cdf"]["ttft_s"]["x"], slow["series"]["cdf"]["ttft_s"]["x"]
    assert fast_x[len(fast_x) // 2] < slow_x[0]                   # the 20 ms run's median is below all 60 ms ones
    b = split["series"]["ttft_breakdown"]
    assert b["requests"] == split["summary"]["counts"]["ok"] > 30
    assert b["mean_s"]["prefill"] >= 0.03                       # the prompt stub's TTFT
    assert 0.01 <= b["mean_s"]["kv_transfer_and_decode_start"] < 0.5  # token stub: kv_transfer_s, not its 0.5 s ttft_s
    assert sum(b["mean_s"].values()) == pytest.approx(split["summary"]["latency"]["ttft_s"]["mean"], abs=1e-9)
    inst = split["series"]["instances"]
    assert set(inst) == {"prompt-0", "token-0"} and inst["prompt-0"]["pool"] == "prompt"
    assert len(inst["token-0"]["t_s"]) >= 10 and max(inst["token-0"]["running"]) >= 1
    assert inst["token-0"]["t_s"][0] < 0.5  # the scraper started before the run clock's t0


def test_html_is_self_contained_and_escaped(real_runs):
    html = render_html(build_comparison(real_runs))
    assert "<script" not in html.lower() and "src=" not in html and "url(http" not in html
    assert 'href="http' not in html and "xlink:href=\"http" not in html
    assert "split &lt;stub&gt;" in html and "split <stub>" not in html
    assert "&lt;built by tests/test_html_report.py&gt;" in html
    for fid in ("plot-latency-cdf", "plot-efficiency", "plot-timeline", "plot-ttft-breakdown"):
        assert html.count(f'id="{fid}"') == 1


def _figure(html: str, fid: str) -> str:
    fig = html[html.index(f'id="{fid}"'):]
    return fig[:fig.index("</figure>")]


def test_figures_are_text_without_split_runs_or_hardware(real_runs):
    runs = [{**r, "summary": {**r["summary"], "efficiency": None}} for r in real_runs[:2]]
    html = render_html(build_comparison(runs))
    assert "<svg" not in _figure(html, "plot-ttft-breakdown") and "no TTFT breakdown" in html
    assert "<svg" not in _figure(html, "plot-efficiency") and "no efficiency plot" in html
    assert "<svg" in _figure(html, "plot-latency-cdf") and "<svg" in _figure(html, "plot-timeline")
    assert "energy estimated" not in html  # nothing is estimated without hardware information


# ----------------------------------------------------------------------------- headless Chromium

@pytest.fixture(scope="module")
def browser():
    try:   # lazy: without the optional [test] extra only the browser test fails, with this message
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"playwright is not installed ({e}): `pip install -e '.[test]'`")
    with sync_playwright() as pw:
        b = launch(pw)
        try:
            yield b
        finally:
            b.close()


def test_html_report_in_headless_chromium(real_runs, browser, tmp_path):
    path = tmp_path / "compare.html"
    atomic_write_bytes(path, render_html(build_comparison(real_runs)).encode())
    seen = check_rendered(browser, path, labels=["stub-20ms", "stub-60ms", "split <stub>"],
                          figures={"plot-latency-cdf": 20, "plot-efficiency": 10, "plot-timeline": 20,
                                   "plot-ttft-breakdown": 10}, shot=tmp_path / "compare.png")
    assert "energy estimated" in seen["text"]
    page = browser.new_page()
    page.goto(path.as_uri())
    assert page.get_by_text("energy estimated", exact=False).first.is_visible()
    assert page.locator("table#table-efficiency .est").first.is_visible()
    assert page.locator("figure#plot-efficiency figcaption .est").is_visible()
    page.close()