"""Performance model on SplitwiseSim's real profile (PROFILES.md figures, caveats), closed-form decode sums, model
shapes and KV capacity by hand, profile CSV errors, sha256-checked fetch, and measuring real backends."""
from __future__ import annotations

import functools
import hashlib
import http.server
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from splitbench.app.profile import MIN_TOGETHER_ITERS, measure_profile, together_step_s
from splitbench.errors import InputError
from splitbench.hardware.catalog import load_catalog
from splitbench.sim import perfmodel as pm
from splitbench.sim import profiles as pf
from splitbench.sim import shapes as sh
from splitbench.sim.profiles import fetch_profile, read_profile_rows
from splitbench.schema.records import read_records
from splitbench.sim.spread import MIN_GAPS, load_spread, spread_path


def _shared_profile() -> Path:
    """SplitwiseSim's perf_model.csv: along $SPLITBENCH_PROFILE_DIR (a worktree's ../shared may not exist), else
    ../shared/profiles next to the project root."""
    dirs = [Path(d) for d in os.environ.get(pf.ENV_VAR, "").split(os.pathsep) if d]
    for d in dirs + [Path(__file__).resolve().parents[1] / ".." / "shared" / "profiles"]:
        if (d / pf.PROFILE_FILE).is_file():
            return d / pf.PROFILE_FILE
    return dirs[0] / pf.PROFILE_FILE if dirs else Path("../shared/profiles/perf_model.csv")


CSV = _shared_profile()
HEADER = ("model,hardware,prompt_size,batch_size,token_size,peak_power,average_power,prompt_time,token_time,"
          "e2e_time,tensor_parallel")
needs_profile = pytest.mark.skipif(not CSV.is_file(), reason="../shared/profiles/perf_model.csv not present")


@pytest.fixture(scope="module")
def profiles():
    if not CSV.is_file():
        pytest.skip("../shared/profiles/perf_model.csv not present")
    return pm.load_profiles(CSV)


def near(value, expected, rel):
    return abs(value - expected) <= rel * expected


# ----------------------------------------------------------------------------- the real profile

def test_groups_and_provenance(profiles):
    assert len(profiles) == 12
    assert ("llama2-70b", "h100-80gb-pcap", 4) in profiles
    d = profiles[("bloom-176b", "a100-80gb", 8)].describe()
    assert d["sha256"] == pf.PROFILE_SHA256 and d["rows"] == 105
    assert any("SYNTHETIC" in n for n in profiles[("bloom-176b", "h100-80gb-pcap", 8)].describe()["notes"])
    assert not profiles[("bloom-176b", "h100-80gb", 8)].describe()["notes"]


def test_profiles_md_sample_medians(profiles):
    """PROFILES.md: BLOOM prompt 2048 A100 540 / H100 253 ms; decode b1/b64 (prompt 512, 128 outputs) A100
    49.3/96.6, H100 36.2/63.8 ms; Llama2-70B TP8 prompt 2048 A100 274 / H100 137 ms."""
    ctx = 512 + 64   # per request, midway through 128 outputs
    for hw, p2048, d1, d64 in (("a100-80gb", 540, 49.3, 96.6), ("h100-80gb", 253, 36.2, 63.8)):
        m = profiles[("bloom-176b", hw, 8)]
        assert near(m.prompt_time_s(2048) * 1e3, p2048, 0.03)
        assert near(m.token_time_s(1, ctx) * 1e3, d1, 0.03)
        assert near(m.token_time_s(64, 64 * ctx) * 1e3, d64, 0.03)
    assert near(profiles[("llama2-70b", "a100-80gb", 8)].prompt_time_s(2048) * 1e3, 274, 0.05)
    assert near(profiles[("llama2-70b", "h100-80gb", 8)].prompt_time_s(2048) * 1e3, 137, 0.05)
    # caveat 1: the pcap prefill is 1.3x the uncapped one, decode is the same
    a, b = profiles[("bloom-176b", "h100-80gb", 8)], profiles[("bloom-176b", "h100-80gb-pcap", 8)]
    assert near(b.prompt_time_s(2048), 1.3 * a.prompt_time_s(2048), 0.01)
    assert near(b.token_time_s(16, 16 * 600), a.token_time_s(16, 16 * 600), 0.02)


def test_anomalous_tp2_batch64_dropped_and_nothing_else(profiles):
    for key, m in profiles.items():
        dropped = [(x["prompt_size"], x["batch_size"], x["token_size"]) for x in m.describe()["dropped"]]
        assert dropped == ([(512, 64, 128)] if key[0] == "llama2-70b" and key[2] == 2 else []), key
    m = profiles[("llama2-70b", "a100-80gb", 2)]
    # 64 x 512 tokens must cost more than 32 x 512 (the anomalous rows said 794 ms < 6633 ms)
    assert m.prompt_time_s(64 * 512) > m.prompt_time_s(32 * 512) > 6.0
    assert m.token_time_s(64, 0) > m.token_time_s(32, 0)


def test_long_outputs_not_used_for_the_fit(profiles):
    for m in profiles.values():
        skipped = {x["token_size"] for x in m.describe()["not_for_decode_fit"]}
        assert {2048, 4096, 8192} <= skipped


def test_prompt_time_monotone_clamped_and_extrapolated(profiles):
    tokens = np.unique(np.geomspace(1, 65536, 400).astype(int))
    for key, m in profiles.items():
        t = np.array([m.prompt_time_s(int(n)) for n in tokens])
        assert (np.diff(t) >= 0).all(), key
        assert m.prompt_time_s(0) == 0.0
        assert m.prompt_time_s(1) == m.prompt_time_s(128) > 0   # below the first point: its value
    m = profiles[("bloom-176b", "a100-80gb", 8)]
    # beyond the last point (64 x 512): the last segment extended, so equal steps add equal time
    a, b, c = (m.prompt_time_s(n) for n in (40000, 50000, 60000))
    assert b > a and math.isclose(c - b, b - a, rel_tol=1e-9)


def test_decode_grows_with_context_and_batch(profiles):
    """Not SplitwiseSim's flat decode time: more KV tokens cost more."""
    for key, m in profiles.items():
        assert m.kv_s_per_token > 0, key
        assert m.token_time_s(8, 8 * 8000) > m.token_time_s(8, 8 * 500)
        assert m.token_time_s(16, 16 * 500) >= m.token_time_s(8, 8 * 500)
        d = m.describe()
        assert d["kv_bandwidth_s_per_token"] > 0 and "kv_fitted_s_per_token" in d
        if d["kv_source"] != "fitted":
            assert m.kv_s_per_token == d["kv_bandwidth_s_per_token"]
    # bandwidth estimate by hand: BLOOM KV bytes / (2.039 TB/s x 8 GPUs)
    bloom = profiles[("bloom-176b", "a100-80gb", 8)].describe()
    assert math.isclose(bloom["kv_bandwidth_s_per_token"], (2 * 70 * 112 * 128 * 2) / (2.039e12 * 8))


@pytest.mark.parametrize("key", [("bloom-176b", "a100-80gb", 8), ("llama2-70b", "h100-80gb", 2)])
def test_closed_form_sums_and_exact_inverse(profiles, key):
    m = profiles[key]
    rng = np.random.default_rng(7)
    for _ in range(30):
        b, c, k = int(rng.integers(1, 80)), int(rng.integers(0, 200000)), int(rng.integers(0, 700))
        loop = math.fsum(m.token_time_s(b, c + i * b) for i in range(k))
        assert math.isclose(m.token_iterations_s(b, c, k), loop, rel_tol=1e-9, abs_tol=1e-12)
        total = m.token_iterations_s(b, c, k)
        assert m.iterations_within(b, c, total) == k                       # exactly at the boundary
        if k:
            assert m.iterations_within(b, c, math.nextafter(total, 0)) == k - 1   # just below it
        mid = (total + m.token_iterations_s(b, c, k + 1)) / 2
        assert m.iterations_within(b, c, mid) == k
    assert m.iterations_within(4, 100, 0.0) == 0 and m.iterations_within(4, 100, -1.0) == 0
    assert m.token_iterations_s(4, 100, 0) == 0.0


def test_closed_form_without_kv_term():
    """A group with no shape and no fit (kv 0): the sum and its inverse are linear."""
    rows = [{"prompt_size": p, "batch_size": b, "token_size": 32, "prompt_time": 10.0 + p / 100,
             "token_time": 5.0 + b, "e2e_time": 10.0 + p / 100 + 31 * (5.0 + b), "line": i + 2}
            for i, (p, b) in enumerate([(64, 1), (128, 1), (128, 4)])]
    m = pm.PerfModel("unknown-model", "unknown-hw", 1, rows)
    assert m.kv_s_per_token == 0.0 and m.describe()["kv_source"].startswith("zero")
    assert math.isclose(m.token_iterations_s(2, 999, 10), 10 * 0.007)
    assert m.iterations_within(2, 999, 0.07) == 10
    assert m.iterations_within(4, 0, 0.0899) == 9      # 9 x 9 ms fits, 10 do not


def test_generic_batch_anomaly_detection(tmp_path):
    """Prompt time falling with batch size (and e2e blowing up) is dropped whatever the TP and batch."""
    lines = [HEADER]
    for b, pt, e2e in ((1, 100, 100 + 31 * 20), (2, 200, 200 + 31 * 21), (4, 400, 400 + 31 * 22),
                       (8, 150, 90000)):
        for _ in range(3):
            lines.append(f"m,hw,512,{b},32,0,0,{pt},{20 + b / 4},{e2e},4")
    lines += [f"m,hw,{p},1,32,0,0,{p / 5},20,{p / 5 + 31 * 20},4" for p in (128, 1024)]
    f = tmp_path / "p.csv"
    f.write_text("\n".join(lines) + "\n")
    m = pm.get_perf_model(pm.load_profiles(f), "m", "hw", 4)
    dropped = m.describe()["dropped"]
    assert [(d["batch_size"], len(d["lines"])) for d in dropped] == [(8, 3)]
    assert "below a smaller batch" in dropped[0]["why"]
    assert m.prompt_time_s(8 * 512) > m.prompt_time_s(4 * 512)


def test_unknown_group_lists_known(profiles):
    with pytest.raises(InputError) as e:
        pm.get_perf_model(profiles, "llama2-70b", "a100-80gb", 16)
    assert "llama2-70b/a100-80gb/TP8" in str(e.value) and "bloom-176b/h100-80gb/TP8" in str(e.value)


# ----------------------------------------------------------------------------- shapes and memory

def test_kv_bytes_per_token_by_hand():
    assert sh.MODEL_SHAPES["bloom-176b"].kv_bytes_per_token == 2 * 70 * 112 * 128 * 2 == 4_014_080
    # GQA: 8 KV heads, not the 64 attention heads
    assert sh.MODEL_SHAPES["llama2-70b"].kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680


def test_kv_capacity_by_hand():
    bloom, llama = sh.MODEL_SHAPES["bloom-176b"], sh.MODEL_SHAPES["llama2-70b"]
    assert sh.kv_capacity_tokens(bloom, 8, 80e9) == int((0.9 * 640e9 - 352e9) // 4_014_080) == 55_803
    assert sh.kv_capacity_tokens(llama, 8, 80e9) == int((576e9 - 140e9) // 327_680)
    assert sh.kv_capacity_tokens(bloom, 4, 80e9) == 0            # weights alone do not fit
    assert sh.kv_capacity_tokens(llama, 2, 80e9, memory_fraction=1.0) == int((160e9 - 140e9) // 327_680)
    cat = load_catalog()
    assert sh.machine_kv_capacity_tokens(bloom, cat["dgx-a100"]) == 55_803
    # TP2 on a DGX: 4 instances, each with its own 140 GB of weights on 2 x 80 GB
    assert sh.machine_kv_capacity_tokens(llama, cat["dgx-h100"], tensor_parallel=2) == \
        4 * int((0.9 * 160e9 - 140e9) // 327_680)
    assert sh.machine_kv_capacity_tokens(bloom, cat["dgx-h200"]) == int((0.9 * 8 * 141e9 - 352e9) // 4_014_080)
    assert sh.machine_kv_capacity_tokens(bloom, cat["dgx-a100"], memory_bytes=40e9) == 0
    with pytest.raises(InputError):
        sh.accelerator_memory_bytes("tpu-v9")


def test_shape_from_tiny_model_config(tiny_model_dir):
    shape = sh.shape_from_hf_config(tiny_model_dir)
    assert (shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes) == (2, 2, 32, 2)  # bf16, GQA 4->2
    assert shape.kv_bytes_per_token == 2 * 2 * 2 * 32 * 2
    params = sum(a.size for f in Path(tiny_model_dir).glob("*.safetensors") for a in load_file(f).values())
    assert shape.weight_bytes == params * 2
    with pytest.raises(InputError, match="config.json"):
        sh.shape_from_hf_config(Path(tiny_model_dir).parent / "no-such-model")


def test_profile_hardware_names():
    assert pf.profile_hardware_name("dgx-h100-pcap") == "h100-80gb-pcap"
    assert pf.profile_hardware_name("dgx-a100") == "a100-80gb"
    assert pf.profile_hardware_name("dgx-h200") == "h200-141gb"
    assert pf.profile_hardware_name("cpu-host") == "cpu-host"
    with pytest.raises(InputError, match="unknown machine type"):
        pf.profile_hardware_name("dgx-z9")


# ----------------------------------------------------------------------------- malformed CSV

@pytest.mark.parametrize("body, line, column, words", [
    ("", 1, None, "empty file"),
    ("model,hardware,prompt_size\n", 1, "batch_size", "missing column"),
    (HEADER + "\n", 2, None, "no data rows"),
    (HEADER + "\nm,hw,512,1,128,0,0,abc,20,3000,8\n", 2, "prompt_time", "not a number"),
    (HEADER + "\nm,hw,512,1,128,0,0,100,20,3000,8\nm,hw,512,0,128,0,0,100,20,3000,8\n", 3, "batch_size", ">= 1"),
    (HEADER + "\nm,hw,512,1,128,0,0,100,20,3000,8\nm,hw,512,1,128,0,0,100,20\n", 3, None, "fields"),
    (HEADER + "\nm,hw,512,1.5,128,0,0,100,20,3000,8\n", 2, "batch_size", "whole number"),
    (HEADER + "\nm,,512,1,128,0,0,100,20,3000,8\n", 2, "hardware", "empty"),
    (HEADER + "\nm,hw,512,1,128,0,0,100,nan,3000,8\n", 2, "token_time", "finite"),
])
def test_malformed_csv_one_line_errors(tmp_path, body, line, column, words):
    f = tmp_path / "bad.csv"
    f.write_text(body)
    with pytest.raises(InputError) as e:
        pm.load_profiles(f)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{f}:{line}:") and words in msg
    assert e.value.line == line and e.value.column == column


def test_unusual_spellings_read_as_the_plain_ones(tmp_path):
    """Whole numbers written as floats or with spaces, exponents: the field-by-field reading accepts what the
    plain fast path does not, with the same values and types."""
    from splitbench.sim.profiles import read_profile_rows
    plain, unusual = tmp_path / "plain.csv", tmp_path / "unusual.csv"
    plain.write_text(HEADER + "\nm,hw,512,2,128,0,0,100,20,3000,8\n")
    unusual.write_text(HEADER + "\nm , hw,512.0, 2 ,1.28e2,0,0,1e2,20.0,3000,8.0\n")
    a, b = read_profile_rows(plain), read_profile_rows(unusual)
    assert a == b and [type(v) for v in a[0].values()] == [type(v) for v in b[0].values()]
    assert isinstance(a[0]["batch_size"], int) and isinstance(a[0]["prompt_time"], float)


def test_cli_list_and_bad_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(HEADER + "\nm,hw,512,1,128,0,0,100,20,3000,x\n")
    r = subprocess.run([sys.executable, "-m", "splitbench.cli", "profiles", "list", "--file", str(bad)],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert f"{bad}:2: column 'tensor_parallel'" in r.stderr
    if CSV.is_file():
        r = subprocess.run([sys.executable, "-m", "splitbench.cli", "profiles", "list", "--file", str(CSV)],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("llama2-70b") == 9 and "55,803" in r.stdout


# ----------------------------------------------------------------------------- find and fetch

def test_find_profile_search_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(pf.ENV_VAR, raising=False)
    with pytest.raises(InputError, match="profiles fetch"):
        pf.find_profile()
    cached = tmp_path / "cache" / "splitbench" / "profiles" / "perf_model.csv"
    cached.parent.mkdir(parents=True)
    cached.write_text(HEADER + "\n")
    assert pf.find_profile() == cached
    env_dir = tmp_path / "envdir"
    env_dir.mkdir()
    (env_dir / "perf_model.csv").write_text(HEADER + "\n")
    monkeypatch.setenv(pf.ENV_VAR, str(env_dir))
    assert pf.find_profile() == env_dir / "perf_model.csv"
    assert pf.find_profile(cached) == cached
    with pytest.raises(InputError, match="not found"):
        pf.find_profile(tmp_path / "nope.csv")


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@needs_profile
def test_fetch_verifies_sha256_over_http(http_dir, tmp_path):
    www, base = http_dir
    shutil.copy(CSV, www / "good.csv")
    data = CSV.read_bytes()
    (www / "tampered.csv").write_bytes(data.replace(b"bloom-176b", b"bloom-177b", 1))
    dest = tmp_path / "dest"
    with pytest.raises(InputError, match="sha256 mismatch") as e:
        fetch_profile(dest=dest, url=f"{base}/tampered.csv")
    assert "\n" not in str(e.value)
    assert list(dest.iterdir()) == []                       # nothing left behind, not even a temp file
    res = fetch_profile(dest=dest, url=f"{base}/good.csv")
    assert res["sha256"] == pf.PROFILE_SHA256 and (dest / "perf_model.csv").read_bytes() == data
    # a failed re-fetch leaves the good file as it was
    with pytest.raises(InputError):
        fetch_profile(dest=dest, url=f"{base}/tampered.csv")
    assert sorted(p.name for p in dest.iterdir()) == ["perf_model.csv"]
    assert (dest / "perf_model.csv").read_bytes() == data
    with pytest.raises(InputError, match="failed"):
        fetch_profile(dest=dest, url=f"{base}/missing.csv")


def test_fetch_file_url_and_cli(tmp_path):
    src = tmp_path / "x.csv"
    src.write_bytes(b"not the profile\n")
    r = subprocess.run([sys.executable, "-m", "splitbench.cli", "profiles", "fetch", "--dest", str(tmp_path / "d"),
                        "--url", src.as_uri()], capture_output=True, text=True)
    assert r.returncode == 2 and "sha256 mismatch" in r.stderr and r.stderr.strip().count("\n") == 0
    assert list((tmp_path / "d").iterdir()) == []
    res = fetch_profile(dest=tmp_path / "d", url=src.as_uri(),
                        expected_sha256=hashlib.sha256(src.read_bytes()).hexdigest())
    assert Path(res["path"]).read_bytes() == src.read_bytes()


# ----------------------------------------------------------------------------- measuring real backends

def test_measure_stub_profile_round_trip(tmp_path):
    """The real stub server (fixed 40 ms TTFT, 8 ms per token) measured through sockets into a CSV that
    load_profiles fits: its prefill and decode times come back."""
    out = tmp_path / "stub.csv"
    res = measure_profile("stub", {"ttft_s": 0.04, "tpot_s": 0.008}, out=out, prompt_sizes=[8, 32],
                          batch_sizes=[1, 3], output_sizes=[4, 12], repeats=1, results_dir=tmp_path / "r",
                          idle_wake_s=())
    rows = read_profile_rows(out)
    assert res["rows"] == len(rows) == 4 and res["hardware"] == "cpu-host"
    assert {(r["prompt_size"], r["batch_size"], r["token_size"]) for r in rows} == \
        {(8, 1, 12), (32, 1, 12), (32, 3, 12), (32, 1, 4)}
    assert out.read_text().splitlines()[0] == HEADER
    m = pm.get_perf_model(pm.load_profiles(out), rows[0]["model"], "cpu-host", 1)
    # no upper wall-clock bound (a busy host adds delay); lower bounds are the stub's own pacing: no first token
    # before its 40 ms TTFT, no last of 12 tokens before 40 + 11 x 8 ms
    assert all(r["prompt_time"] >= 40.0 for r in rows)
    assert all(r["e2e_time"] >= 40.0 + (r["token_size"] - 1) * 8.0 for r in rows)
    # the model gives back what was measured (its fit never leaves the measured range): prefill at 32 tokens
    # within the measured prompt times; batch-1 decode base no more than the largest measured mean TBT
    pt = [r["prompt_time"] / 1e3 for r in rows]
    assert min(pt) - 1e-9 <= m.prompt_time_s(32) <= max(pt) + 1e-9
    b1 = [r["token_time"] / 1e3 for r in rows if r["batch_size"] == 1]
    assert 0 < m.base_s(1) <= max(b1) + 1e-9 and m.token_time_s(1, 20) == m.base_s(1) + 20 * m.kv_s_per_token
    assert (Path(res["run_dir"]) / "profile.json").is_file()
    assert res["spread"] is None and not spread_path(out).exists()   # 25 timed gaps: too few for a step spread
    # a measured model's shape (here: the tiny model's) gives the bandwidth figure
    shape = sh.ModelShape("s", layers=2, kv_heads=2, head_dim=32, dtype_bytes=2, weight_bytes=1e6)
    m2 = pm.load_profiles(out, shapes={rows[0]["model"]: shape})[(rows[0]["model"], "cpu-host", 1)]
    assert m2.describe()["kv_bandwidth_s_per_token"] == 512 / sh.MEMORY_BANDWIDTH_BPS["cpu-host"]


def test_a_one_point_batch_one_grid_is_measured_with_one_warm_up(tmp_path):
    """--prompt-sizes 512 --batch-sizes 1 makes both warm-ups the same point: it is run once (it used to crash on
    its own point directory), and the grid's point is written once per repeat."""
    out = tmp_path / "one.csv"
    res = measure_profile("stub", {"ttft_s": 0.01, "tpot_s": 0.004}, out=out, prompt_sizes=[16], batch_sizes=[1],
                          output_sizes=[6], repeats=2, results_dir=tmp_path / "r", idle_wake_s=())
    rows = read_profile_rows(out)
    assert res["rows"] == len(rows) == 2       # one row per repeat
    assert {(r["prompt_size"], r["batch_size"], r["token_size"]) for r in rows} == {(16, 1, 6)}
    points = sorted(d.name for d in (Path(res["run_dir"]) / "points").iterdir())
    assert points == ["p16-b1-t6-r0", "p16-b1-t6-r1", "p16-b1-t8-rwarmup"]


def test_measured_profile_writes_its_decode_step_spread_beside_the_csv(tmp_path):
    """The stub paces tokens 8 ms apart: the batch-1 points' gaps (63 + 63 + 3) give a spread beside the CSV that
    the simulator loads, scaled to mean 1 (the host's scheduling noise is all it measures)."""
    out = tmp_path / "stub.csv"
    res = measure_profile("stub", {"ttft_s": 0.02, "tpot_s": 0.008}, out=out, prompt_sizes=[8, 32],
                          batch_sizes=[1, 2], output_sizes=[4, 64], repeats=1, results_dir=tmp_path / "r",
                          idle_wake_s=(0.05, 0.3))
    # each idle gap twice: a lone 32-token prefill after idling, then one at once (the stub's TTFT either way)
    wakes = sorted(d.name for d in (Path(res["run_dir"]) / "points").iterdir() if "-rwake" in d.name or "-rwoke" in d.name)
    assert wakes == [f"p32-b1-t8-r{k}{n}" for k in ("wake", "woke") for n in range(4)]
    # a point whose first tokens came coalesced in every attempt (a busy host) is left out of the spread
    noted = {tuple(n["point"]) for n in res["point_notes"]}
    timed = sum(t - 1 for p, b, t in {(8, 1, 64), (32, 1, 64), (32, 1, 4)} if (p, b, t) not in noted)
    if timed < 100:
        assert res["spread"] is None and not spread_path(out).exists()
        return
    sp = json.loads(spread_path(out).read_text())
    assert res["spread"]["path"] == str(spread_path(out)) and sp["gaps"] == timed == 129 and sp["requests"] == 3
    assert 0 < sp["p50"] <= sp["p90"] <= sp["p99"]
    q = load_spread(spread_path(out))
    assert sum(a + b for a, b in zip(q, q[1:])) / (2 * (len(q) - 1)) == pytest.approx(1.0)
    meta = json.loads((Path(res["run_dir"]) / "profile.json").read_text())
    assert meta["spread"]["gaps"] == 129
    assert [g for g, _ in sp["idle_wake"]] == [0.05, 0.3] and all(x >= 0 for _, x in sp["idle_wake"])
    assert len(sp["idle_wake_samples"]) == 4 and all(a >= 20.0 and b >= 20.0 for _, a, b in sp["idle_wake_samples"])
    assert meta["spread"]["idle_wake"] == sp["idle_wake"]


def test_measure_rejects_bad_grid(tmp_path):
    with pytest.raises(InputError, match="output-sizes"):
        measure_profile("stub", {}, out=tmp_path / "x.csv", output_sizes=[1], results_dir=tmp_path)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_profile_tiny_model_on_vllm(tmp_path):
    """`splitbench profile --backend vllm` on the tiny CPU model: a CSV load_profiles accepts (about a minute)."""
    out = tmp_path / "tiny.csv"
    r = subprocess.run([sys.executable, "-m", "splitbench.cli", "profile", "--backend", "vllm", "--out", str(out),
                        "--prompt-sizes", "32,512", "--batch-sizes", "1,4", "--output-sizes", "8,128",
                        "--repeats", "1", "--results", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_profile_rows(out)
    # a batch point whose 4 requests barely decoded together (a slow host) is measured again with more tokens
    meta = json.loads(next((tmp_path / "r").rglob("profile.json")).read_text())
    again = {tuple(n["point"]): n["token_size"] for n in meta["point_notes"] if "token_size" in n}
    assert set(again) <= {(512, 4, 128)} and all(t > 128 for t in again.values())
    assert {(x["prompt_size"], x["batch_size"], x["token_size"]) for x in rows} == \
        {(32, 1, 128), (512, 1, 128), (512, 4, again.get((512, 4, 128), 128)), (512, 1, 8)}
    assert {x["model"] for x in rows} == {"tiny-llama"} and {x["hardware"] for x in rows} == {"cpu-host"}
    m = pm.get_perf_model(pm.load_profiles(out), "tiny-llama", "cpu-host", 1)
    assert 0 < m.prompt_time_s(32) <= m.prompt_time_s(4 * 512)
    assert 0 < m.token_time_s(1, 600) <= m.token_time_s(4, 4 * 600)
    # a batch-1 point whose first tokens came coalesced in every attempt (a busy host) times no decode gaps; with
    # fewer than MIN_GAPS left no spread file is written (what it would hold is then not measured either)
    noted = {tuple(n["point"]) for n in meta["point_notes"]}
    timed = sum(t - 1 for p, b, t in {(32, 1, 128), (512, 1, 128), (512, 1, 8)} if (p, b, t) not in noted)
    if timed < MIN_GAPS:
        assert meta["spread"] is None and not out.with_suffix(".spread.json").exists()
    else:
        check_tiny_spread(json.loads(out.with_suffix(".spread.json").read_text()), tmp_path / "r" / meta["run_id"])
    # its prompts are none of a default run's (seed 0), which the server's prefix cache would serve in part
    run_meta = json.loads((tmp_path / "r" / meta["run_id"] / "run.json").read_text())
    assert run_meta["options"]["seed"] not in (0, None)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in ps   # the server it started is gone


def check_tiny_spread(spread: dict, run_dir: Path) -> None:
    """The tiny model's profile spread: its cold-prefill pairs and idle-wake table."""
    # (a new prompt length, the same again) pairs: lengths no grid point had, each measured twice by the server
    pairs = spread["cold_prefill_pairs"]
    assert len(pairs) == 12 and not {p for p, _, _ in pairs} & {32, 512, 2048} and all(a > 0 and b > 0 for _, a, b in pairs)
    assert spread["cold_prefill_factor"] == pytest.approx(float(np.median([a / b for _, a, b in pairs])), rel=1e-3)
    assert (run_dir / "points" / f"p{pairs[0][0]}-b1-t8-ragain").is_dir()
    assert "request_quantiles" not in spread   # 3 batch-1 requests: too few for a request spread
    # lone 512-token prefills after 0.5-4 s of idle, each then again at once, twice: the extra per gap, >= 0
    assert [g for g, _ in spread["idle_wake"]] == [0.5, 1.0, 2.0, 4.0] and len(spread["idle_wake_samples"]) == 8
    assert all(x >= 0 for _, x in spread["idle_wake"]) and all(a > 0 and b > 0 for _, a, b in spread["idle_wake_samples"])


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("nixl") is None,
                    reason="vllm or nixl is not installed")
def test_profile_of_a_pd_pair_times_a_batch_while_its_requests_decode_together(tmp_path):
    """The prompt instance prefills a batch's 2048-token prompts one after another, so with 16 output tokens the 4
    requests never decode together on the token instance: the point is measured again with enough tokens, and its
    token_time is the step while all 4 decode (a real NIXL pair, about 2 minutes)."""
    out = tmp_path / "pair.csv"
    r = subprocess.run([sys.executable, "-m", "splitbench.cli", "profile", "--backend", "splitwise", "--out", str(out),
                        "--machine", "cpu-core", "--prompt-sizes", "32,2048", "--batch-sizes", "1,4",
                        "--output-sizes", "8,16", "--repeats", "1", "--results", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {(x["prompt_size"], x["batch_size"]): x for x in read_profile_rows(out) if x["token_size"] != 8}
    longer = rows[(2048, 4)]["token_size"]
    assert longer > 16 and all(x["token_size"] == 16 for k, x in rows.items() if k[1] == 1)
    run_dir = next((tmp_path / "r").iterdir())
    notes = json.loads((run_dir / "profile.json").read_text())["point_notes"]
    assert any(n["point"] == [2048, 4, 16] and f"measured with {longer}" in n["why"] for n in notes)
    last = sorted((run_dir / "points" / f"p2048-b4-t{longer}-r0").iterdir())[-1]   # a busy host may retry
    step_s, iters = together_step_s(read_records(last))
    assert iters >= MIN_TOGETHER_ITERS
    if not any(n["point"] == [2048, 4, longer] for n in notes):   # timed by the client, not vLLM's /metrics
        assert rows[(2048, 4)]["token_time"] == pytest.approx(step_s * 1e3)


def test_a_batch1_context_fit_that_over_explains_the_batch_sweep_is_refit_on_every_decode_row():
    """CPU-core profile shape: one sequence's token time grows 1.5 us per context token, a batch's far less per
    token. With the batch-1 slope, base(b) would fall with b (pooled flat); the joint fit keeps both in range."""
    def row(i, p, b, t, token_ms):
        return {"prompt_size": p, "batch_size": b, "token_size": t, "prompt_time": 10.0 + p / 50, "line": i + 2,
                "token_time": token_ms, "e2e_time": 10.0 + p / 50 + (t - 1) * token_ms}
    pts = [(32, 1, 64), (128, 1, 64), (512, 1, 16), (512, 1, 64), (512, 1, 256), (2048, 1, 64),
           (512, 2, 64), (512, 4, 64), (512, 8, 64), (512, 16, 64)]
    token = lambda p, b, t: 4.0 + (1.5e-3 if b == 1 else 0.6e-3) * b * (p + (t - 2) / 2)   # noqa: E731  (ms)
    rows = [row(i, p, b, t, token(p, b, t)) for i, (p, b, t) in enumerate(pts)]
    m = pm.PerfModel("m", "cpu", 1, rows)
    d = m.describe()
    assert d["kv_fitted_s_per_token"] == pytest.approx(1.5e-6, rel=0.05)      # the batch-1 fit alone
    assert d["kv_source"].startswith("joint fit") and 0 < m.kv_s_per_token < 0.8 * 1.5e-6
    for p, b, t in pts:     # every measured point within 35% (the batch-1 slope alone misses b=16 by 2x)
        assert m.token_time_s(b, b * (p + (t - 2) // 2)) == pytest.approx(token(p, b, t) / 1e3, rel=0.35)


def _synthetic_rows(pts, prompt_ms, token_ms):
    return [{"prompt_size": p, "batch_size": b, "token_size": t, "prompt_time": prompt_ms(p, b), "line": i + 2,
             "token_time": token_ms(p, b, t), "e2e_time": prompt_ms(p, b) + (t - 1) * token_ms(p, b, t)}
            for i, (p, b, t) in enumerate(pts)]


def test_batches_measured_at_two_contexts_give_decode_a_kv_cost_per_batch_size():
    """splitbench profile's grid adds the batch sweep at the largest prompt: one sequence's token time grows 1.5 us
    per context token, a batch of b's 1.5/b^0.5 us; kv(b) recovers each, so every point is predicted to 2%."""
    grid = pf.profile_grid([32, 128, 512, 2048], [1, 2, 4, 8, 16], [16, 64, 256])
    assert {(2048, b, 64) for b in (1, 2, 4, 8, 16)} <= set(grid) and {(512, b, 64) for b in (2, 16)} <= set(grid)
    kv = lambda b: 1.5e-3 / b ** 0.5                                              # noqa: E731  (ms per token)
    token = lambda p, b, t: 4.0 + 0.1 * b + kv(b) * b * (p + (t - 2) / 2)        # noqa: E731
    m = pm.PerfModel("m", "cpu", 1, _synthetic_rows(grid, lambda p, b: 10.0 + p * b / 50, token))
    d = m.describe()
    assert [b for b, _ in d["kv_by_batch_s_per_token"]] == [1, 2, 4, 8, 16]
    for b in (1, 2, 4, 8, 16):
        assert m.kv_at(b) == pytest.approx(kv(b) / 1e3, rel=0.02)
    assert m.kv_at(32) == m.kv_at(16) and kv(2) / 1e3 > m.kv_at(3) > kv(4) / 1e3   # flat outside, linear between
    for p, b, t in grid:
        if t <= 256:
            assert m.token_time_s(b, b * (p + (t - 2) // 2)) == pytest.approx(token(p, b, t) / 1e3, rel=0.02)
    k = 40   # the closed-form run uses kv(b) too
    assert m.token_iterations_s(8, 9000, k) == pytest.approx(sum(m.token_time_s(8, 9000 + 8 * i) for i in range(k)))
    assert m.iterations_within(8, 9000, m.token_iterations_s(8, 9000, k)) == k


def test_a_noisy_batch1_e2e_fit_falls_back_to_each_batchs_token_time_over_its_kv_tokens():
    """The same grid, batch-1 e2e times scattered 0.3-1.9x (a busy 2-core host): that fit is refused, and
    without a bandwidth estimate kv was 0, so base(b) pooled the large prompt's slow points with the small one's.
    Now kv(b) is each batch's slope of token_time over its KV tokens, batch 1's over its prompt sweep too."""
    grid = pf.profile_grid([32, 128, 512, 2048], [1, 2, 4, 8, 16], [16, 64, 256])
    kv = lambda b: 1.0e-3 / b ** 0.5                                              # noqa: E731  (ms per token)
    token = lambda p, b, t: 4.0 + 0.1 * b + kv(b) * b * (p + (t - 2) / 2)        # noqa: E731
    rows = _synthetic_rows(grid, lambda p, b: 10.0 + p * b / 50, token)
    for i, r in enumerate(rows):
        if r["batch_size"] == 1:   # e2e alone is noisy; the mean TBT (token_time) is what the client measured well
            r["e2e_time"] = r["prompt_time"] + (r["token_size"] - 1) * r["token_time"] * (1.9, 0.5, 1.2, 0.3)[i % 4]
    m = pm.PerfModel("m", "cpu", 1, rows)
    d = m.describe()
    assert d["kv_source"].startswith("fitted per batch size, each") and "no usable e2e fit" in d["kv_source"]
    for b in (1, 2, 4, 8, 16):
        assert m.kv_at(b) == pytest.approx(kv(b) / 1e3, rel=0.05)
    for p, b, t in grid:
        if t <= 256 and b > 1:
            assert m.token_time_s(b, b * (p + (t - 2) // 2)) == pytest.approx(token(p, b, t) / 1e3, rel=0.05)


def test_a_convex_prompt_curve_gives_the_attention_cross_term_capped_by_the_models_flops():
    """prompt_time = 10 ms + 20 us p b + c p^2 b (each of a batch's b prompts attends over its own p tokens): c is
    recovered; a chunk of n tokens after P costs c (n^2 + 2 P n) over the dense part; the dense part is one curve of
    batched tokens for a lone prompt and a batch alike (2048 x 1 and 512 x 4 differ only by attention); with a known
    shape, c is at most b x attention/dense FLOPs / 2 (BLOOM's shape: far below)."""
    grid = [(p, 1, 64) for p in (32, 128, 512, 1024, 2048, 4096)] + [(512, b, 64) for b in (2, 4)]
    c_ms = 4e-6
    prompt = lambda p, b: 10.0 + 0.02 * p * b + c_ms * p * p * b                  # noqa: E731
    rows = _synthetic_rows(grid, prompt, lambda p, b, t: 5.0 + 1e-3 * (p + t / 2))
    m = pm.PerfModel("m", "cpu", 1, rows)
    assert m.attn_s_per_token2 == pytest.approx(c_ms / 1e3, rel=1e-6)
    assert m.attention_s(1000 ** 2, 2048 * 1000) == pytest.approx(c_ms / 1e3 * (1000 ** 2 + 2 * 2048 * 1000))
    for p, b in ((2048, 1), (512, 4), (4096, 1), (512, 2)):
        assert m.prompt_time_s(p * b) == pytest.approx((10.0 + 0.02 * p * b) / 1e3, rel=1e-6)
        assert m.prompt_time_s(p * b) + m.attention_s(b * p * p, 0) == pytest.approx(prompt(p, b) / 1e3, rel=1e-6)
    assert m.lone_prompt_s(4096) == pytest.approx(prompt(4096, 1) / 1e3, rel=1e-6)
    bloom = pm.PerfModel("m", "cpu", 1, rows, shape=sh.MODEL_SHAPES["bloom-176b"])
    ratio = sh.MODEL_SHAPES["bloom-176b"].attention_to_dense_flops
    assert ratio == pytest.approx(2 * 70 * 112 * 128 / 176e9)
    assert bloom.attn_s_per_token2 == pytest.approx(0.02e-3 * ratio / 2, rel=1e-6)
    assert bloom.attn_s_per_token2 < m.attn_s_per_token2
    assert pm.PerfModel("m", "cpu", 1, [r for r in rows if r["prompt_size"] in (32, 512)]).attn_s_per_token2 == 0


def test_on_a_cpu_machine_the_attention_fit_is_not_capped_by_the_models_flops(tmp_path, monkeypatch):
    """A CPU runs prefill attention far below its GEMM rate, so a convex prompt curve measured there stands whole
    (the catalog's cpu-core and cpu-host); the same rows labelled with a GPU's hardware are capped. On a CPU
    machine the fit knows vLLM CPU's 2048-token budget: a longer prompt took more iterations, each with its
    intercept. The profile directory's variable (set by users and CI) is not the hardware catalog's."""
    monkeypatch.setenv("SPLITBENCH_PROFILE_DIR", str(tmp_path))
    grid = [(p, 1, 64) for p in (32, 128, 512, 1024, 2048, 4096)] + [(512, b, 64) for b in (2, 4)]
    c_ms = 4e-6
    decode = lambda p, b, t: 5.0 + 1e-3 * (p + t / 2)  # noqa: E731
    rows = _synthetic_rows(grid, lambda p, b: 10.0 + 0.02 * p * b + c_ms * p * p * b, decode)
    # vLLM CPU prefilled the 4096-token prompt in two 2048-token iterations, each with its 10 ms intercept
    chunked = _synthetic_rows(grid, lambda p, b: 10.0 * -(-p * b // 2048) + 0.02 * p * b + c_ms * p * p * b, decode)
    bloom = sh.MODEL_SHAPES["bloom-176b"]
    for hw in ("cpu-core", "cpu-host"):
        m = pm.PerfModel("m", hw, 1, chunked, shape=bloom)
        assert m.profile_chunk_tokens == 2048 and m.attn_s_per_token2 == pytest.approx(c_ms / 1e3, rel=1e-6)
        # the simulator's two chunks of a 4096-token prompt (the second over the first's 2048 tokens) take what
        # the server took; so does the lone prompt in one iteration (--whole-prompts)
        two = m.prompt_time_s(2048) * 2 + m.attention_s(2 * 2048 ** 2, 2048 * 2048)
        measured = (20.0 + 0.02 * 4096 + c_ms * 4096 ** 2) / 1e3
        assert two == pytest.approx(measured, rel=1e-6) and m.lone_prompt_s(4096) == pytest.approx(measured, rel=1e-6)
        whole = pm.PerfModel("m", hw, 1, rows, shape=bloom, profile_chunk_tokens=None)
        assert whole.attn_s_per_token2 == pytest.approx(c_ms / 1e3, rel=1e-6)
        assert whole.lone_prompt_s(4096) == pytest.approx((10.0 + 0.02 * 4096 + c_ms * 4096 ** 2) / 1e3, rel=1e-6)
    gpu = pm.PerfModel("m", "a100-80gb", 1, rows, shape=bloom)
    assert gpu.profile_chunk_tokens is None
    assert gpu.attn_s_per_token2 == pytest.approx(0.02e-3 * bloom.attention_to_dense_flops / 2, rel=1e-6)
