"""Measuring the prefix cache: the stub's own block cache and its usage/metrics, cached tokens parsed into records,
the summary's cache section (records and columns alike), its rendering and comparison, and the cluster flags."""
from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import numpy as np
import pytest
from rich.console import Console

from splitbench.app.options import RunOptions, backend_options
from splitbench.app.runner import run
from splitbench.backends.cluster import ClusterBackend
from splitbench.backends.stub import StubBackend
from splitbench.errors import InputError
from splitbench.metrics import columnar as C
from splitbench.metrics.cache import cache_section, ttft_fit
from splitbench.metrics.compare import build_comparison
from splitbench.render.console import render_markdown, render_summary
from splitbench.render.html import render_html
from splitbench.schema import records as R
from splitbench.schema.columns import RecordColumns
from splitbench.schema.records import RequestRecord
from splitbench.schema.summary import read_summary
from splitbench.servers.launcher import prefix_caching_of
from splitbench.servers.router import Router
from splitbench.servers.stub import PrefixCache
from splitbench.servers.stub_main import run_stub_in_thread

pytestmark = pytest.mark.timeout(120)
SPEC = "synth:arrivals=poisson,rate=40,duration=1,lengths=fixed,input=96,output=4,seed=3"


def _run(tmp, run_id, caching="on"):
    opts = RunOptions(trace=SPEC, duration_s=None, backend="stub", results_dir=str(tmp), vocab_size=1000,
                      shared_prefix_tokens=64, run_id=run_id,
                      backend_options={"ttft_s": 0.01, "tpot_s": 0.002, "cpu": -1, "prefix_caching": caching})
    return run(opts).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    return _run(tmp, "on"), _run(tmp, "off", "off")


def test_a_shared_prefix_run_on_the_stub_reports_its_cached_tokens(runs):
    on, off = runs
    recs = sorted(R.read_records(on), key=lambda r: r.actual_send_s)
    assert len(recs) > 10 and all(r.ok for r in recs)
    # 64 shared tokens = 4 stub blocks of 16; the rest of each prompt is its own: the first request warms them
    assert [r.cached_input_tokens for r in recs] == [0] + [64] * (len(recs) - 1)
    cache = read_summary(on)["cache"]
    n = len(recs)
    assert cache["requests"] == cache["ok_requests"] == n and cache["requests_hit"] == n - 1
    assert cache["prompt_tokens"] == 96 * n and cache["cached_tokens"] == 64 * (n - 1)
    assert cache["cached_fraction"] == pytest.approx(64 * (n - 1) / (96 * n))
    assert sum(b["ttft_s"]["count"] for b in cache["ttft_vs_uncached"]["bins"]) == n
    meta = json.loads((on / "run.json").read_text())
    assert meta["backend"]["prefix_caching"] == "on"
    # caching off: the server reports no cached counts, and the summary has no cache section
    assert all(r.cached_input_tokens is None for r in R.read_records(off))
    assert read_summary(off)["cache"] is None
    assert json.loads((off / "run.json").read_text())["backend"]["prefix_caching"] == "off"


def test_the_cache_section_renders_in_the_console_markdown_and_html(runs):
    on, off = runs
    s = read_summary(on)
    buf = io.StringIO()
    render_summary(s, Console(file=buf, width=160))
    text = buf.getvalue()
    assert "Prefix cache" in text and "TTFT vs uncached prompt tokens" in text and "TTFT = " in text
    assert "| cache scope |" in render_markdown(s) and "| cache scope |" not in render_markdown(read_summary(off))
    both = build_comparison([{"label": "a", "summary": s}, {"label": "b", "summary": s}])
    rows = {r["metric"]: r for r in both["rows"] if r["section"] == "cache"}
    assert rows["cached_fraction"]["values"] == [s["cache"]["cached_fraction"]] * 2
    one = build_comparison([{"label": "a", "summary": s}, {"label": "b", "summary": read_summary(off)}])
    assert not [r for r in one["rows"] if r["section"] == "cache"]   # only one run has it: nothing to compare
    page = render_html(both)
    assert 'id="table-cache"' in page and 'id="plot-ttft-uncached"' in page and "<svg" in page


def test_stub_prefix_cache_counts_whole_leading_blocks_as_vllm_does():
    c = PrefixCache(4, 100)
    a = list(range(12))
    assert c.lookup(a) == 0
    assert c.lookup(a) == 8                          # at most n - 1 tokens: the last block is recomputed
    assert c.lookup(a + [99]) == 12                  # all three blocks, one token more
    assert c.lookup([7] + a[1:]) == 0                # blocks are chained: a different first block shares nothing
    assert c.lookup(a[:6]) == 4                      # a shorter prompt hits its full blocks only
    small = PrefixCache(4, 2)
    small.lookup(a)                                  # three blocks into room for two: the first is evicted
    assert small.lookup(a + [1]) == 0


def test_split_requests_report_the_prompt_instance_hit_through_the_router():
    stops = []
    try:
        urls = []
        for kw in ({}, {"kv_transfer_s": 0.002}):
            url, stop = run_stub_in_thread(ttft_s=0.003, tpot_s=0.001, **kw)
            urls.append(url)
            stops.append(stop)
        inst = [{"id": "p0", "url": urls[0], "pool": "prompt"}, {"id": "t0", "url": urls[1], "pool": "token"}]
        body = {"model": "stub-model", "prompt": [5] * 40, "max_tokens": 3, "stream": True,
                "stream_options": {"include_usage": True}}

        async def go():
            r = Router(inst, "round-robin")
            await r.start()
            try:
                out = []
                async with aiohttp.ClientSession() as s:
                    for _ in range(2):
                        async with s.post(r.url + "/v1/completions", json=body) as resp:
                            raw = await resp.read()
                        usage = [json.loads(ln[6:]) for ln in raw.split(b"\n")
                                 if ln.startswith(b"data: {") and b'"choices":[]' in ln][-1]["usage"]
                        out.append(usage["prompt_tokens_details"]["cached_tokens"])
                    async with s.get(urls[1] + "/metrics") as resp:
                        token_metrics = await resp.text()
                return out, token_metrics
            finally:
                await r.stop()
        cached, text = asyncio.run(go())
        # the decode instance reports the prompt instance's hit (vLLM 0.32: remote_prefill_cached_tokens)
        assert cached == [0, 32]   # 40 tokens: 2 blocks of 16 are whole and below the last token
        assert 'vllm:external_prefix_cache_hits_total{model_name="stub-model"} 80' in text
    finally:
        for s in stops:
            s()


def _records(n=40, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_in = int(rng.integers(50, 3000))
        cached = None if i % 7 == 3 else int(rng.integers(0, n_in))
        ttft = 0.004 + 2e-5 * (n_in - (cached or 0))
        status = "error" if i % 11 == 5 else "ok"
        inst = f"i{i % 3}"
        out.append(RequestRecord(f"r{i}", i, 0.1 * i, n_in, 8, actual_send_s=0.1 * i,
                                 first_token_s=0.1 * i + ttft, last_token_s=0.1 * i + ttft + 0.05,
                                 end_s=0.1 * i + ttft + 0.05, status=status, actual_input_tokens=n_in,
                                 cached_input_tokens=cached,
                                 **R.placement(inst, "baseline" if i % 2 else "mixed")))
    return out


SERVER = {"i0": {"scraped": True, "counters": {"vllm:prefix_cache_queries_total": 1000.0,
                                               "vllm:prefix_cache_hits_total": 250.0,
                                               "vllm:external_prefix_cache_queries_total": 10.0,
                                               "vllm:external_prefix_cache_hits_total": 5.0}},
          "i1": {"scraped": True, "counters": {"vllm:prompt_tokens_total": 5.0}},
          "i2": {"scraped": False}}


def test_cache_section_of_records_and_of_columns_is_the_same():
    recs = _records()
    a = cache_section(recs, SERVER)
    assert a == C.cache_section(C.Frame(RecordColumns.from_records(recs)), SERVER)
    ok = [r for r in recs if r.ok and r.cached_input_tokens is not None]
    assert a["requests"] == len(ok) and a["ok_requests"] == sum(r.ok for r in recs)
    assert a["cached_tokens"] == sum(r.cached_input_tokens for r in ok)
    assert a["cached_fraction"] == sum(r.cached_input_tokens for r in ok) / sum(r.actual_input_tokens for r in ok)
    assert set(a["pools"]) == {"baseline", "mixed"} and set(a["instances"]) == {"i0", "i1", "i2"}
    assert sum(d["cached_tokens"] for d in a["instances"].values()) == a["cached_tokens"]
    fit = a["ttft_vs_uncached"]["fit"]   # the records were made as TTFT = 4 ms + 20 us x uncached
    assert fit["intercept_s"] == pytest.approx(0.004) and fit["per_token_s"] == pytest.approx(2e-5)
    assert fit["r2"] == pytest.approx(1.0) and fit["n"] == len(ok)
    for b in a["ttft_vs_uncached"]["bins"]:
        xs = [r.actual_input_tokens - r.cached_input_tokens for r in ok]
        assert b["ttft_s"]["count"] == sum(b["lo_tokens"] <= x < b["hi_tokens"] for x in xs)
    assert a["server"] == {"i0": {"queries_tokens": 1000, "hits_tokens": 250, "external_queries_tokens": 10,
                                  "external_hits_tokens": 5, "hit_rate": 0.25, "external_hit_rate": 0.5}}


def test_cache_section_is_none_without_counts_and_the_fit_needs_two_distinct_x():
    recs = [RequestRecord("a", 0, 0.0, 10, 2, status="ok")]
    assert cache_section(recs) is None and cache_section(recs, {"x": {"scraped": False}}) is None
    assert cache_section(recs, SERVER)["requests"] == 0     # counters alone make a section
    assert ttft_fit(np.array([5.0, 5.0]), np.array([0.1, 0.2])) is None
    assert ttft_fit(np.array([1.0]), np.array([0.1])) is None


def test_cluster_flags_follow_prefix_caching_and_the_users_own_win(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_VLLM_PROBE", "0")   # every flag taken as given: no vLLM import
    def args(**kw):
        b = ClusterBackend(counts={"baseline": 1}, hardware="cpu-host", cores="0", model_dir=str(tmp_path), **kw)
        return b.plan(tmp_path).instances[0].base_args
    on, off = args(), args(prefix_caching="off")
    assert "--enable-prefix-caching" in on and "--enable-prompt-tokens-details" in on
    assert "--no-enable-prefix-caching" in off and "--enable-prefix-caching" not in off
    mine = args(prefix_caching="off", vllm_args="--dtype bfloat16 --enable-prefix-caching")
    assert prefix_caching_of(mine) == "on" and mine.count("--enable-prompt-tokens-details") == 1
    with pytest.raises(InputError, match="on or off"):
        ClusterBackend(counts={"baseline": 1}, prefix_caching="maybe")
    with pytest.raises(InputError, match="on or off"):
        StubBackend(prefix_caching="yes")
    with pytest.raises(InputError, match="launches"):
        backend_options("openai", url="http://x", prefix_caching="on")
