"""Traces and workloads: shared Azure traces against MANIFEST.md figures, validation errors through the CLI,
transforms, synthetic workloads, Parquet column mapping, fetch over a local HTTP server, streamed big files."""
from __future__ import annotations

import csv
import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from splitbench.cli import app
from splitbench.errors import InputError
from splitbench.workload import traces as tr
from splitbench.workload.catalog import catalog
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.synth import from_spec, parse_spec, synthesize
from splitbench.workload.traces import read_trace
from splitbench.workload.transforms import workload_stats

ROOT = Path(__file__).resolve().parents[1]
# the shared data sits next to the checkout (../shared), or next to the worktrees' folder (../../shared)
SHARED = next((p for p in (ROOT.parent / "shared" / "traces", ROOT.parent.parent / "shared" / "traces")
               if p.is_dir()), ROOT.parent / "shared" / "traces")
CONV = SHARED / "AzureLLMInferenceTrace_conv.csv"
CODE = SHARED / "AzureLLMInferenceTrace_code.csv"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
needs_shared = pytest.mark.skipif(not CONV.exists(), reason="../shared/traces not present")


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def stdlib_parse(path: Path):
    """Independent reference parse (csv + datetime, 7th fractional digit dropped)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    t = np.array([datetime.strptime(r[0][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp() for r in rows])
    return t - t[0], np.array([int(r[1]) for r in rows]), np.array([int(r[2]) for r in rows])


# ----------------------------------------------------------------------------- shared traces vs MANIFEST.md

@needs_shared
@pytest.mark.parametrize("name,rows,cv,busiest,span_s,in_mean,in_p50,out_p99,out_max", [
    ("azure-conv-2023", 19366, 1.09, 16, 3501.7, 1154.7, 1020, 601, 1000),
    ("azure-code-2023", 8819, 13.2, 67, 3435.9, 2047.8, 1469, 251, 1899),
])
def test_shared_traces_match_manifest(name, rows, cv, busiest, span_s, in_mean, in_p50, out_p99, out_max):
    w = load(WorkloadSpec(name, trace_dir=str(SHARED)))   # load speed: benchmarks/workload_speed.py
    s = workload_stats(w)
    assert s["rows"] == rows == len(w)
    assert round(s["interarrival_cv"], 2 if cv < 10 else 1) == cv
    assert s["busiest_second"]["requests"] == busiest
    assert round(s["span_s"], 1) == span_s
    assert round(s["input_tokens"]["mean"], 1) == in_mean and s["input_tokens"]["p50"] == in_p50
    assert round(s["output_tokens"]["p99"]) == out_p99 and s["output_tokens"]["max"] == out_max
    assert w.source["sha256"] == catalog()[name]["sha256"] and w.source["sha256_matches_catalog"] is True
    assert w.arrival_s[0] == 0 and list(w.trace_index[:3]) == [0, 1, 2]


@needs_shared
def test_seven_digit_fractions_parsed_exactly():
    w = read_trace(CONV)
    # 18:15:46.6805900 -> 18:15:50.9951690 (MANIFEST's first rows)
    assert w.arrival_s[1] == pytest.approx(4.314579, abs=1e-9)
    assert (w.input_tokens[0], w.output_tokens[0]) == (374, 44)


@needs_shared
def test_show_cli_json():
    r = cli("traces", "show", "azure-code-2023", "--trace-dir", str(SHARED), "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["stats"]["rows"] == 8819 and d["workload"]["source"]["name"] == "azure-code-2023"


# ----------------------------------------------------------------------------- validation through the CLI

BAD_CASES = {
    "missing_column": (HEADER.replace("ContextTokens", "Prompt") + "2023-11-16 18:00:00.1,5,5\n", 1, "ContextTokens"),
    "non_numeric": (HEADER + "2023-11-16 18:00:00.1,5,5\n2023-11-16 18:00:01.2,5,abc\n", 3, "GeneratedTokens"),
    "negative": (HEADER + "2023-11-16 18:00:00.1,5,5\n2023-11-16 18:00:01.2,-4,5\n", 3, "ContextTokens"),
    "zero": (HEADER + "2023-11-16 18:00:00.1,5,5\n2023-11-16 18:00:01.2,5,5\n2023-11-16 18:00:02,5,0", 4,
             "GeneratedTokens"),
    "bad_timestamp": (HEADER + "2023-11-16 18:00:00.1,5,5\n2023-11-16 25:61:00,5,5\n", 3, "TIMESTAMP"),
    "offset_then_naive": (HEADER + "2024-05-10 00:00:00.5+00:00,5,5\n2024-05-10 00:00:01,5,5\n", 3, "TIMESTAMP"),
    "unsorted": (HEADER + "2023-11-16 18:00:00.1,5,5\n2023-11-16 18:00:02.1,5,5\n2023-11-16 18:00:01.1,5,5\n"
                 "2023-11-16 18:00:00.5,5,5\n", 4, "TIMESTAMP"),
    "header_only": (HEADER, 2, "TIMESTAMP"),
    "zero_bytes": ("", 1, "TIMESTAMP"),
    "fraction_tokens": (HEADER + "2023-11-16 18:00:00.1,5.5,5\n", 2, "ContextTokens"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_malformed_trace_is_one_line_exit_2(tmp_path, case):
    text, line, column = BAD_CASES[case]
    path = tmp_path / f"{case}.csv"
    path.write_text(text)
    r = cli("traces", "show", str(path))
    assert r.exit_code == 2
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"{path}:{line}: column '{column}'" in err, err
    assert r.stdout == ""


def test_wrong_field_count_names_line(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text(HEADER + "2023-11-16 18:00:00.1,5,5\n2023-11-16 18:00:01.1,5\n2023-11-16 18:00:02.1,5,5\n")
    r = cli("traces", "show", str(path))
    assert r.exit_code == 2 and f"{path}:3:" in r.stderr and r.stderr.count("\n") == 1


def test_error_in_real_process(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "2023-11-16 18:00:00.1,5,5\n2023-11-16 18:00:01.1,x7,5\n")
    p = subprocess.run([sys.executable, "-m", "splitbench.cli", "traces", "show", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.strip() == (
        f"error: {path}:3: column 'ContextTokens' non-numeric token count 'x7'")


def test_unknown_and_missing_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SPLITBENCH_TRACE_DIR", raising=False)
    with pytest.raises(InputError, match="azure-conv-2023.*azure-code-2024-week"):
        load(WorkloadSpec("no-such-trace"))
    r = cli("traces", "show", "azure-code-2024-week")
    assert r.exit_code == 2 and "splitbench traces fetch azure-code-2024-week" in r.stderr


def test_search_path_order(tmp_path, monkeypatch):
    fname = catalog()["azure-conv-2023"]["file"]
    dirs = {}
    for i, d in enumerate(["explicit", "env", "traces"]):
        dirs[d] = tmp_path / d
        dirs[d].mkdir()
        (dirs[d] / fname).write_text(HEADER + "".join(f"2023-11-16 18:00:0{k}.5,{10 + i},3\n" for k in range(i + 1)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("SPLITBENCH_TRACE_DIR", str(dirs["env"]))
    assert len(load(WorkloadSpec("azure-conv-2023", trace_dir=str(dirs["explicit"])))) == 1
    assert len(load(WorkloadSpec("azure-conv-2023"))) == 2
    monkeypatch.delenv("SPLITBENCH_TRACE_DIR")
    w = load(WorkloadSpec("azure-conv-2023"))
    assert len(w) == 3 and w.source["sha256_matches_catalog"] is False


# ----------------------------------------------------------------------------- transforms

@needs_shared
def test_window_against_reference_parse():
    t, inp, out = stdlib_parse(CONV)
    w = load(WorkloadSpec(str(CONV), start_s=600, duration_s=60))
    idx = np.nonzero((t >= 600) & (t < 660))[0]
    assert list(w.trace_index) == list(idx)
    assert np.allclose(w.arrival_s, t[idx] - t[idx[0]], atol=1e-5) and w.arrival_s[0] == 0
    assert np.array_equal(w.input_tokens, inp[idx]) and np.array_equal(w.output_tokens, out[idx])
    assert w.transforms["window"] == {"start_s": 600, "duration_s": 60}


@needs_shared
def test_rate_scale_doubles_rate_and_keeps_gap_shape():
    w1 = load(WorkloadSpec(str(CODE), start_s=100, duration_s=900))
    w2 = load(WorkloadSpec(str(CODE), start_s=100, duration_s=900, rate_scale=2.0))
    assert np.array_equal(w1.trace_index, w2.trace_index)
    assert np.allclose(w2.arrival_s, w1.arrival_s / 2)
    g1, g2 = np.diff(w1.arrival_s), np.diff(w2.arrival_s)
    assert np.allclose(g2 * 2, g1)
    assert workload_stats(w2)["mean_rate_rps"] == pytest.approx(2 * workload_stats(w1)["mean_rate_rps"])
    assert workload_stats(w2)["interarrival_cv"] == pytest.approx(workload_stats(w1)["interarrival_cv"])


@needs_shared
def test_max_requests_and_clipping():
    full = load(WorkloadSpec(str(CONV)))
    w = load(WorkloadSpec(str(CONV), max_requests=500))
    assert len(w) == 500 and np.array_equal(w.trace_index, full.trace_index[:500])
    _, inp, out = stdlib_parse(CONV)
    c = load(WorkloadSpec(str(CONV), max_context_tokens=2048))
    expected = sum(1 for i, o in zip(inp.tolist(), out.tolist()) if i + o > 2048)
    assert c.transforms["clip"]["clipped_requests"] == expected > 0
    assert (c.input_tokens + c.output_tokens <= 2048).all() and np.array_equal(c.output_tokens, out)
    keep = inp + out <= 2048
    assert np.array_equal(c.input_tokens[keep], inp[keep])


def test_clipping_output_alone_too_long():
    w = load(WorkloadSpec("synth:rate=10,count=4,lengths=fixed,input=100,output=5000", max_context_tokens=4096))
    assert list(w.output_tokens) == [4095] * 4 and list(w.input_tokens) == [1] * 4
    assert w.transforms["clip"]["output_clipped_requests"] == 4


@needs_shared
def test_bad_transform_args():
    with pytest.raises(InputError, match="rate-scale"):
        load(WorkloadSpec(str(CONV), rate_scale=0))
    with pytest.raises(InputError, match="no requests in the window"):
        load(WorkloadSpec(str(CONV), start_s=99999, duration_s=10))


# ----------------------------------------------------------------------------- synthetic workloads

def test_synth_reproducible_and_rate():
    spec = "synth:arrivals=poisson,rate=200,duration=30,lengths=fixed,input=128,output=32,seed=1"
    a, b, c = load(WorkloadSpec(spec)), load(WorkloadSpec(spec)), load(WorkloadSpec(spec.replace("seed=1", "seed=2")))
    assert np.array_equal(a.arrival_s, b.arrival_s) and a.source["workload_sha256"] == b.source["workload_sha256"]
    assert not np.array_equal(a.arrival_s[:100], c.arrival_s[:100])
    assert abs(len(a) - 6000) < 300 and a.arrival_s[-1] < 30
    assert workload_stats(a)["interarrival_cv"] == pytest.approx(1.0, abs=0.06)
    assert set(a.input_tokens.tolist()) == {128} and set(a.output_tokens.tolist()) == {32}


def test_synth_gamma_burstiness():
    w = from_spec("synth:arrivals=gamma,cv=2,rate=100,count=20000,seed=7")
    gaps = np.diff(w.arrival_s)
    assert len(w) == 20000 and gaps.mean() == pytest.approx(0.01, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.1)


@needs_shared
def test_synth_lengths_sampled_jointly_from_trace():
    w = load(WorkloadSpec("synth:rate=50,count=3000,lengths=azure-conv-2023,seed=3", trace_dir=str(SHARED)))
    _, inp, out = stdlib_parse(CONV)
    pairs = set(zip(inp.tolist(), out.tolist()))
    assert all(p in pairs for p in zip(w.input_tokens.tolist(), w.output_tokens.tolist()))
    assert len(set(w.input_tokens.tolist())) > 500   # actually sampled, not one row repeated


def test_synth_uniform_and_csv_roundtrip(tmp_path):
    spec = "synth:arrivals=gamma,cv=1.5,rate=40,duration=20,lengths=uniform,input=64-512,output=16-128,seed=5"
    w = from_spec(spec)
    assert w.input_tokens.min() >= 64 and w.input_tokens.max() <= 512 and w.output_tokens.max() <= 128
    out = tmp_path / "s.csv"
    r = cli("traces", "synth", spec, "--out", str(out))
    assert r.exit_code == 0, r.output
    back = load(WorkloadSpec(str(out)))
    assert np.array_equal(back.input_tokens, w.input_tokens) and np.array_equal(back.output_tokens, w.output_tokens)
    assert np.allclose(back.arrival_s, w.arrival_s, atol=1e-6)


@pytest.mark.parametrize("spec", [
    "synth:rate=abc,count=5", "synth:arrivals=weibull,rate=1,count=5", "synth:rate=1", "synth:rate=1,count=5,foo=1",
    "synth:rate=1,count=5,input=64-512", "synth:rate=1,count=5,cv=2", "synth:rate=1,count=5,seed", "synth:count=5",
    "synth:rate=1,duration=5,count=5", "synth:rate=-1,count=5",
])
def test_malformed_synth_spec(spec):
    with pytest.raises(InputError, match="synth"):
        synthesize(**parse_spec(spec))
    r = cli("traces", "show", spec)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1


# ----------------------------------------------------------------------------- other formats

def test_column_mapped_parquet_and_csv(tmp_path):
    ts = np.array([10.0, 10.5, 11.0, 13.25, 14.0])
    table = pa.table({"ts": ts, "prompt_len": [5, 6, 7, 8, 9], "gen_len": [1, 2, 3, 4, 5], "extra": ["a"] * 5})
    pq.write_table(table, tmp_path / "t.parquet")
    cols = {"timestamp": "ts", "input": "prompt_len", "output": "gen_len"}
    w = load(WorkloadSpec(str(tmp_path / "t.parquet"), columns=cols, start_s=0.5))
    assert list(w.arrival_s) == [0.0, 0.5, 2.75, 3.5] and list(w.input_tokens) == [6, 7, 8, 9]
    assert list(w.trace_index) == [1, 2, 3, 4]
    dt = pa.table({"when": pa.array(ts * 1e9, pa.int64()).cast(pa.timestamp("ns", "UTC")),
                   "p": [5, 6, 7, 8, 9], "g": [1, 2, 3, 4, 5]})
    pq.write_table(dt, tmp_path / "dt.parquet")
    w2 = load(WorkloadSpec(str(tmp_path / "dt.parquet"), columns={"timestamp": "when", "input": "p", "output": "g"}))
    assert np.allclose(w2.arrival_s, ts - 10)
    (tmp_path / "n.csv").write_text("ts,prompt_len,gen_len\n" + "".join(f"{t},{i},3\n" for i, t in enumerate(ts, 1)))
    r = cli("traces", "show", str(tmp_path / "n.csv"), "--columns", "ts=ts,in=prompt_len,out=gen_len", "--json")
    assert r.exit_code == 0, r.output
    r = cli("traces", "show", str(tmp_path / "t.parquet"), "--columns", "timestamp=ts,input=prompt,output=gen_len")
    assert r.exit_code == 2 and "column 'prompt'" in r.stderr


# ----------------------------------------------------------------------------- fetch

@pytest.fixture
def http_dir(tmp_path):
    servers = []

    def serve(directory: Path) -> str:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
        handler.log_message = lambda *a, **k: None
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"
    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


@needs_shared
def test_fetch_good_hash(tmp_path, http_dir):
    base = http_dir(SHARED)
    dest = tmp_path / "dest"
    r = cli("traces", "fetch", "azure-code-2023", "--dest", str(dest), "--url", f"{base}/{CODE.name}")
    assert r.exit_code == 0, r.output
    got = dest / CODE.name
    assert hashlib.sha256(got.read_bytes()).hexdigest() == catalog()["azure-code-2023"]["sha256"]
    assert "verified" in r.stdout
    w = load(WorkloadSpec("azure-code-2023", trace_dir=str(dest)))
    assert w.source["path"] == str(got.resolve()) and w.source["sha256_source"] == "fetch, verified"
    assert not list(dest.glob(".*part"))


def test_fetch_bad_hash_leaves_nothing(tmp_path, http_dir):
    served = tmp_path / "served"
    served.mkdir()
    (served / "AzureLLMInferenceTrace_code.csv").write_text(HEADER + "2023-11-16 18:00:00.1,5,5")
    dest = tmp_path / "dest"
    r = cli("traces", "fetch", "azure-code-2023", "--dest", str(dest),
            "--url", http_dir(served) + "/AzureLLMInferenceTrace_code.csv")
    assert r.exit_code != 0 and "sha256 mismatch" in r.stderr
    assert list(dest.iterdir()) == []
    r = cli("traces", "fetch", "azure-code-2023", "--dest", str(dest), "--url", "http://127.0.0.1:1/nothing.csv")
    assert r.exit_code == 2 and list(dest.iterdir()) == []


def test_fetch_unverified_hash_warns(tmp_path, http_dir):
    served = tmp_path / "served"
    served.mkdir()
    body = (HEADER + "2024-05-10 00:00:00.009930+00:00,2162,5\n2024-05-10 00:00:01+00:00,76,15\n").encode()
    (served / "week.csv").write_bytes(body)
    dest = tmp_path / "dest"
    r = cli("traces", "fetch", "azure-code-2024-week", "--dest", str(dest), "--url", http_dir(served) + "/week.csv")
    assert r.exit_code == 0, r.output
    assert hashlib.sha256(body).hexdigest() in r.stdout and "warning" in r.stderr
    w = load(WorkloadSpec("azure-code-2024-week", trace_dir=str(dest)))
    assert len(w) == 2 and w.source["sha256_source"].startswith("fetch, computed")


# ----------------------------------------------------------------------------- streamed big file

def _write_2024_style(path: Path, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t_us = np.arange(n, dtype=np.int64) * 10_000 + rng.integers(1, 5_000, n)   # 100 req/s, sorted
    t_us[::100] -= t_us[::100] % 1_000_000     # every 100th row on a whole second: written without fraction
    base = np.datetime64("2024-05-10T00:00:00", "us")
    s = np.datetime_as_string(base + t_us.astype("timedelta64[us]"), unit="us")
    inp, out = rng.integers(1, 8000, n), rng.integers(1, 700, n)
    lines = [(ts[:19] if ts.endswith(".000000") else ts).replace("T", " ") + f"+00:00,{i},{o}"
             for ts, i, o in zip(s.tolist(), inp.tolist(), out.tolist())]
    path.write_text(HEADER + "\n".join(lines))
    return (t_us - t_us[0]) / 1e6, inp, out


def test_streamed_window_on_big_2024_file(tmp_path, monkeypatch):
    path = tmp_path / "AzureLLMInferenceTrace_conv_1week_sample.csv"
    t, inp, out = _write_2024_style(path, 200_000)
    text = path.read_text()
    assert "+00:00," in text and any(len(l.split(",")[0]) == 25 for l in text.splitlines()[1:200])
    monkeypatch.setattr(tr, "BLOCK_BYTES", 256 << 10)   # many batches
    w = load(WorkloadSpec(str(path), start_s=500, duration_s=10))   # streaming speed: benchmarks/workload_speed.py
    idx = np.nonzero((t >= 500) & (t < 510))[0]
    assert list(w.trace_index) == list(idx) and 900 < len(idx) < 1100
    assert np.allclose(w.arrival_s, t[idx] - t[idx[0]], atol=1e-9)
    assert np.array_equal(w.input_tokens, inp[idx]) and np.array_equal(w.output_tokens, out[idx])
    assert w.source["read_to_end"] is False and w.source["rows_read"] < 200_000 / 2
    m = load(WorkloadSpec(str(path), start_s=500, max_requests=7))
    assert list(m.trace_index) == list(idx[:7])


def test_streamed_error_line_across_batches(tmp_path, monkeypatch):
    path = tmp_path / "big.csv"
    _write_2024_style(path, 50_000)
    lines = path.read_text().split("\n")
    lines[40_001] = lines[40_001].rsplit(",", 1)[0] + ",-3"
    path.write_text("\n".join(lines))
    monkeypatch.setattr(tr, "BLOCK_BYTES", 64 << 10)
    with pytest.raises(InputError) as e:
        load(WorkloadSpec(str(path)))
    assert str(e.value).startswith(f"{path}:40002: column 'GeneratedTokens'")
