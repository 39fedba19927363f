"""Self-sizing (app/sizing.py): the decisions and arithmetic on synthetic inputs, the per-host cache, and the probe
and a sized run against the real stub (its configured TTFT/TPOT are the ground truth; no wall-clock thresholds)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from splitbench.app import sizing as S
from splitbench.app.options import RunOptions, parse_rate_scale, resolve_defaults
from splitbench.app.runner import run
from splitbench.backends.stub import StubBackend
from splitbench.client.probe import http_get
from splitbench.errors import InputError, ServerStartError
from splitbench.metrics.slo import Reference
from splitbench.schema import records as R
from splitbench.schema.files import atomic_write_json
from splitbench.schema.records import RequestRecord
from splitbench.servers import vllm_plugin
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.prompts import TokenIdPrompts
from splitbench.workload.types import Workload

REF = Reference(ttft_intercept_s=0.1, ttft_per_token_s=0.0, tbt_s=0.01)


def _window(n=11, span_s=10.0, ins=(100, 300), outs=(50, 150)) -> Workload:
    k = np.arange(n)
    return Workload(name="w", arrival_s=np.linspace(0, span_s, n), input_tokens=np.array(ins)[k % 2],
                    output_tokens=np.array(outs)[k % 2], trace_index=k)


# ----------------------------------------------------------------------------- decisions

def _sized(backend: str, rate_scale=None, **backend_options):
    return resolve_defaults(RunOptions(backend=backend, rate_scale=rate_scale, backend_options=backend_options)
                            ).rate_scale == "auto"


def test_rate_scale_flag_and_when_sizing_applies():
    assert parse_rate_scale(None) is None and parse_rate_scale("AUTO") == "auto"
    assert parse_rate_scale("0.25") == 0.25 and parse_rate_scale(2) == 2
    for bad in ("0", "-1", "fast", "nan", "inf"):
        with pytest.raises(InputError, match="--rate-scale"):
            parse_rate_scale(bad)
    with pytest.raises(InputError, match="--rate-scale"):
        parse_rate_scale("auto", allow_auto=False)
    for backend in ("vllm", "splitwise", "mixed"):          # local CPU clusters: sized unless told otherwise
        assert _sized(backend) and not _sized(backend, gpus="0,1")
        assert not _sized(backend, 0.5)                     # an explicit --rate-scale wins
    assert not _sized("stub") and not _sized("openai")
    assert _sized("openai", "auto") and _sized("vllm", "auto", gpus="0")


def test_offered_load_and_rate_scale_arithmetic():
    w = _window(n=11, span_s=10.0)
    assert S.offered_rps(w) == pytest.approx(1.0)           # 10 gaps in 10 s
    assert S.offered_rps(_window(n=1)) is None
    assert S.choose_rate_scale(4.0, 1.0, 0.5) == 2.0
    assert S.choose_rate_scale(1.234, 1.0, 0.5) == 0.62     # two significant digits
    assert S.choose_rate_scale(0.345, 1.0, 1.0) == 0.34 and S.choose_rate_scale(12.3, 1.0, 1.0) == 12.0
    assert S.choose_rate_scale(1e6, 1.0) == S.SCALE_BOUNDS[1] and S.choose_rate_scale(1e-9, 1.0) == S.SCALE_BOUNDS[0]
    with pytest.raises(ValueError):
        S.choose_rate_scale(0.0, 1.0)
    # one at a time: mean unloaded E2E of the mix = mean(0.1 + 49 * 0.01, 0.1 + 149 * 0.01) = 1.09 s
    assert S.unloaded_rps(REF, w) == pytest.approx(1 / np.mean([0.59] * 6 + [1.59] * 5))


def _streaming(send_s, ttft, gap_s, n_tokens, status=R.OK, i=0, prompt=100):
    r = RequestRecord(f"r{i}", i, 0.0, prompt, n_tokens, actual_send_s=send_s, status=status)
    r.chunk_offsets_s = [ttft + k * gap_s for k in range(n_tokens)]
    r.chunk_tokens = [1] * n_tokens
    r.first_token_s = send_s + ttft
    r.end_s = r.last_token_s = send_s + r.chunk_offsets_s[-1]
    return r


def test_a_slow_cluster_replays_the_windows_first_requests_for_about_replay_s():
    assert S.replay_requests(500, 2.0) == math.ceil(S.REPLAY_S * 2.0)            # 120 s worth at 2 req/s
    assert S.replay_requests(500, 0.5) == S.MIN_REQUESTS                          # at least 100 for the tails
    assert S.replay_requests(500, 0.05) == math.floor(S.LONGEST_S * 0.05)          # unless 100 would take > 300 s
    assert S.replay_requests(30, 5.0) == 30 and S.replay_requests(500, 1e-4) == 2
    w = _window(n=201, span_s=40.0)                                                # offers 5 req/s
    measured = {"reference": vars(REF), "points": [_pt(2, 0.4, True), _pt(8, 0.62, False)], "probe_s": 9.0}
    s = S.decide(measured, w, target=0.5)              # capacity = one at a time (REF), half of it offered
    expected = s.offered_rps * s.rate_scale
    n = s.max_requests
    assert s.window_requests == 201 and n == S.replay_requests(201, expected) and S.MIN_REQUESTS <= n < 201
    assert f"first {n} of 201 requests" in s.message() and s.warning is None
    out = S.scaled(w, s.rate_scale, n)
    assert len(out) == n and out.transforms["max_requests"] == n
    assert out.arrival_s[-1] == pytest.approx((n - 1) / 5.0 / s.rate_scale)


def test_point_stats_counts_tokens_inside_the_window_and_p50_slowdowns():
    # 4 requests streaming one token every 20 ms (2x the reference TBT) from 0.3 s after send at t=0;
    # the window [1, 5] holds 201 chunks of each -> 804 tokens in 4 s -> 201 tokens/s
    recs = [_streaming(0.0, 0.3, 0.02, 400, i=i) for i in range(4)]
    p = S.point_stats(recs, REF, 4, window=(1.0, 5.0))
    share = REF.ttft_s(100) / REF.e2e_s(100, 400)          # the prefill's part of a request's unloaded time
    assert p["output_tokens"] == 4 * 201 and p["throughput_rps"] == pytest.approx(4 * (1 - share) * 201 / 399 / 4)
    assert p["tbt_slowdown_p50"] == pytest.approx(2.0)
    assert p["ttft_slowdown_p50"] is None and p["first_tokens"] == 0    # first tokens came before the window
    assert not p["within"]
    late = [_streaming(1.5, 0.15, 0.011, 100, i=i) for i in range(3)]   # TTFT 1.5x, TBT 1.1x: within the limits
    q = S.point_stats(late, REF, 3, window=(1.0, 5.0))
    assert q["ttft_slowdown_p50"] == pytest.approx(1.5) and q["tbt_slowdown_p50"] == pytest.approx(1.1)
    assert q["throughput_rps"] == pytest.approx(3 / 4)      # three whole requests (prefill + decode) in 4 s
    assert q["within"] and q["failed"] == 0
    cancelled = _streaming(1.5, 0.15, 0.011, 100, status=R.CANCELLED, i=9)   # cut at the deadline: no failure
    failed = _streaming(1.5, 0.15, 0.011, 100, status=R.HTTP_ERROR, i=10)
    assert S.point_stats(late + [cancelled], REF, 4, (1.0, 5.0))["within"]
    assert not S.point_stats(late + [failed], REF, 4, (1.0, 5.0))["within"]


def _pt(c, x, within):
    return {"concurrency": c, "throughput_rps": x, "within": within}


def test_capacity_is_the_best_point_within_the_limits_never_below_one_at_a_time():
    cap, why = S.capacity([_pt(2, 1.0, True), _pt(4, 1.8, True), _pt(8, 2.5, False)], floor_rps=0.5)
    assert cap == 1.8 and "concurrency 4" in why
    cap, why = S.capacity([_pt(2, 1.0, True), _pt(4, 1.8, True)], floor_rps=0.5)
    assert cap == 1.8 and "at least" in why                  # the ladder never left the limits
    cap, why = S.capacity([_pt(2, 0.9, False)], floor_rps=0.5)
    assert cap == 0.5 and "one request at a time" in why and "concurrency 2" in why
    assert S.capacity([], floor_rps=0.7)[0] == 0.7
    assert S.capacity([_pt(2, 0.4, True)], floor_rps=0.5)[0] == 0.5


def test_decide_records_what_was_chosen_and_why():
    w = _window(n=11, span_s=10.0)
    measured = {"reference": vars(REF), "points": [_pt(2, 1.0, True), _pt(4, 3.0, True), _pt(8, 3.2, False)],
                "probe_s": 12.5, "measured_unix_s": 1.0}
    s = S.decide(measured, w, target=0.5)
    assert s.capacity_rps == 3.0 and s.offered_rps == pytest.approx(1.0) and s.rate_scale == 1.5
    d = json.loads(json.dumps(s.describe()))
    assert d["expected_rps"] == pytest.approx(1.5) and d["expected_utilisation"] == pytest.approx(0.5)
    assert d["method_version"] == S.METHOD_VERSION and d["reference"]["tbt_s"] == 0.01
    msg = s.message()
    assert "rate scale 1.5" in msg and "50%" in msg and "3.00 req/s" in msg and "--rate-scale" in msg
    assert s.warning is None and "\n" not in msg                           # one line when all is well
    slow = S.decide({**measured, "points": [_pt(2, 0.1, True)]}, _window(n=1001, span_s=1.0))  # 1000 req/s
    assert slow.rate_scale == S.SCALE_BOUNDS[0] and slow.utilisation > 0.5      # the floor binds: said plainly
    assert "too slow or busy" in slow.warning and "expect the Splitwise verdict to fail" in slow.message()
    crowded = {**_pt(2, 2.0, False), "ttft_slowdown_p50": 1.4, "tbt_slowdown_p50": 2.3}
    cannot = S.decide({**measured, "points": [crowded]}, w)
    assert cannot.capacity_rps == cannot.unloaded_rps                     # capacity falls back to one at a time
    assert "cannot pass here at any load" in cannot.warning and "TBT 2.30x > 1.25x" in cannot.warning
    assert "TTFT" not in cannot.warning.split("(")[1]                     # only the slowdown that is past its limit
    with pytest.raises(InputError, match="two requests"):
        S.decide(measured, _window(n=1))


def test_probe_mix_and_reference_grid_never_reuse_the_replays_prompts():
    w = _window(n=5)
    m = S.mix(w, 12)
    assert len(m) == 12 and np.all(m.arrival_s == 0)
    assert m.input_tokens.tolist() == [w.input_tokens[i % 5] for i in range(12)]
    assert m.trace_index.min() >= S.PROBE_INDEX_BASE and len(set(m.trace_index.tolist())) == 12
    assert S.reference_sizes(w) == [100, 300]
    assert S.probe_requests(4, 5.0, REF, w) >= 4 * 5.0 * S.unloaded_rps(REF, w)


def test_a_cached_measurement_is_reused_and_keyed_by_layout_and_mix(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path))
    w = _window()
    parts = S.key_parts("splitwise", {"cores": "0,1"}, {"id": "tiny", "root": str(tmp_path)}, "completions")
    full = {**parts, "mix": S.mix_digest(w), "method_version": S.METHOD_VERSION}
    path = S.cache_path(full)
    assert path.parent == tmp_path / "sizing" and path.name.startswith(S.host_id() + "-")
    assert S.cache_path({**full, "options": {"cores": "0"}}) != path          # another layout
    assert S.cache_path({**full, "mix": S.mix_digest(_window(n=7))}) != path  # another request mix
    # servers the vLLM plugin changed (2: NIXL kept on a pinned instance's cores, 3x faster pair) are sized anew
    current = vllm_plugin.BEHAVIOUR
    monkeypatch.setattr(vllm_plugin, "BEHAVIOUR", current - 1)
    older = S.key_parts("splitwise", {"cores": "0,1"}, {"id": "tiny", "root": str(tmp_path)}, "completions")
    monkeypatch.setattr(vllm_plugin, "BEHAVIOUR", current)
    assert S.cache_path({**older, "mix": S.mix_digest(w), "method_version": S.METHOD_VERSION}) != path
    atomic_write_json(path, {"method_version": S.METHOD_VERSION, "reference": vars(REF),
                               "points": [_pt(4, 2.0, True)], "probe_s": 20.0})
    never = S.Probe("http://127.0.0.1:9", "m", lambda i, n: {"prompt": [1] * n}, out_dir=tmp_path / "x")
    s = S.size_run(never, w, parts)                     # a hit: the unreachable endpoint is never asked
    assert s.cache_hit and s.cache_path == str(path) and "cached" in s.message()
    assert s.rate_scale == pytest.approx(S.TARGET_UTILISATION * 2.0 / s.offered_rps)
    path.write_text("{broken")
    assert S.load_cached(path) is None                  # unreadable -> measured again, not a crash


# ----------------------------------------------------------------------------- against the real stub

def _stub_requests(url: str) -> int:
    _status, body = http_get(url + "/metrics", timeout_s=5.0)
    line = next(ln for ln in body.decode().splitlines() if ln.startswith("splitbench_stub_requests_total"))
    return int(float(line.split()[-1]))


def test_probe_against_the_stub_measures_its_reference_and_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(S, "CONCURRENCIES", (2, 4))
    stub = StubBackend(ttft_s=0.02, tpot_s=0.005, cpu=-1)
    stub.start(tmp_path)
    try:
        w = load(WorkloadSpec("synth:arrivals=poisson,rate=4,count=40,lengths=uniform,input=20-400,output=10-60,seed=3"))
        probe = S.Probe(stub.endpoint(), stub.cfg.model, TokenIdPrompts(vocab_size=1000, seed=0).payload,
                        out_dir=tmp_path / "records")
        parts = S.key_parts("stub", {}, {"id": stub.cfg.model}, "completions")
        s = S.size_run(probe, w, parts, point_s=2.0)
        served = _stub_requests(stub.endpoint())
        again = S.size_run(probe, w, parts, point_s=2.0)
        assert _stub_requests(stub.endpoint()) == served    # the second sizing sent nothing
    finally:
        stub.stop()
    ref = s.reference                                       # the stub cannot be faster than it is configured
    assert ref.tbt_s >= 0.005 * 0.95 and ref.ttft_s(200) >= 0.02 * 0.95 and ref.n_requests == 2 * len(S.reference_sizes(w))
    assert [p["concurrency"] for p in s.points] == [2, 4] and all(p["failed"] == 0 for p in s.points)
    assert all(p["output_tokens"] > 0 for p in s.points) and s.capacity_rps >= s.unloaded_rps
    assert s.rate_scale == S.choose_rate_scale(s.capacity_rps, S.offered_rps(w), S.TARGET_UTILISATION)
    assert not s.cache_hit and again.cache_hit and again.rate_scale == s.rate_scale
    for phase in ("warmup", "reference", "probe-c2", "probe-c4"):    # raw records of every request kept
        recs = R.read_records(tmp_path / "records" / phase)
        assert recs and all(r.status in (R.OK, R.CANCELLED, R.NOT_SENT) for r in recs)
    assert min(r.trace_index for r in R.read_records(tmp_path / "records" / "probe-c2")) >= S.PROBE_INDEX_BASE


def test_a_sized_run_replays_the_window_at_the_chosen_rate_and_judges_it_by_its_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(S, "CONCURRENCIES", (2,))
    monkeypatch.setattr(S, "POINT_S", 2.0)
    spec = "synth:arrivals=poisson,rate=20,count=30,lengths=uniform,input=20-200,output=4-20,seed=5"
    res = run(RunOptions(trace=spec, duration_s=None, rate_scale="auto", backend="stub", vocab_size=1000,
                         results_dir=str(tmp_path / "r"), backend_options={"cpu": -1}))
    meta = json.loads((res.run_dir / R.RUN_FILE).read_text())
    sz = meta["sizing"]
    assert meta["status"] == "complete" and meta["options"]["rate_scale"] == "auto"
    assert sz["rate_scale"] == meta["workload"]["transforms"]["rate_scale"] and not sz["cache_hit"]
    assert sz["cache_path"].startswith(str(tmp_path / "cache" / "sizing"))
    same = load(WorkloadSpec(spec, rate_scale=sz["rate_scale"]))          # == `--rate-scale <chosen>`
    assert meta["workload"]["source"]["workload_sha256"] == same.source["workload_sha256"]
    assert res.summary["splitwise"]["reference"] == sz["reference"] == meta["reference"]
    assert len(R.read_records(res.run_dir)) == 30 and (res.run_dir / "sizing" / "reference").is_dir()


def test_a_given_max_requests_replays_that_many_where_sizing_would_cut_the_window(tmp_path, monkeypatch):
    """Sizing keeps the window's first REPLAY_S worth (here 2 requests, at least MIN_REQUESTS = 4); --max-requests
    given says how many: the run replays them all, at the sized rate (its own mix, so measured anew)."""
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(S, "CONCURRENCIES", (2,))
    monkeypatch.setattr(S, "POINT_S", 2.0)
    monkeypatch.setattr(S, "REPLAY_S", 1e-3)
    monkeypatch.setattr(S, "MIN_REQUESTS", 4)
    spec = "synth:arrivals=poisson,rate=20,count=30,lengths=uniform,input=20-200,output=4-20,seed=5"
    replayed = {}
    for n in (None, 25):
        res = run(RunOptions(trace=spec, duration_s=None, rate_scale="auto", backend="stub", vocab_size=1000,
                             max_requests=n, results_dir=str(tmp_path / f"r{n}"), backend_options={"cpu": -1}))
        meta = json.loads((res.run_dir / R.RUN_FILE).read_text())
        assert meta["workload"]["transforms"]["rate_scale"] == meta["sizing"]["rate_scale"]   # at the sized rate
        replayed[n] = (len(R.read_records(res.run_dir)), meta["sizing"]["max_requests"])
    assert replayed == {None: (4, 4), 25: (25, None)}


def test_sizing_against_a_failing_server_says_the_server_failed_not_that_the_host_is_busy(tmp_path, monkeypatch):
    # a crashed P/D decode instance answered every sizing request with an error; sizing blamed a busy host
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "cache"))
    stub = StubBackend(ttft_s=0.01, tpot_s=0.002, cpu=-1, fail_rate=1.0)
    stub.start(tmp_path)
    try:
        w = load(WorkloadSpec("synth:arrivals=poisson,rate=4,count=20,lengths=uniform,input=20-100,output=5-20,seed=3"))
        probe = S.Probe(stub.endpoint(), stub.cfg.model, TokenIdPrompts(vocab_size=1000, seed=0).payload,
                        out_dir=tmp_path / "records")
        with pytest.raises(ServerStartError, match=r"sizing: \d+ of \d+ warm-up requests failed \(http_error"):
            S.size_run(probe, w, S.key_parts("stub", {}, {"id": stub.cfg.model}, "completions"), point_s=1.0)
    finally:
        stub.stop()
