"""WorkloadSpec + load(): one option set, validated before anything is read or downloaded; a missing catalogue trace
is fetched (sha256-verified, over a real local HTTP server); the `--columns` parser; workload modules import one way."""
from __future__ import annotations

import functools
import http.server
import json
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from splitbench.errors import InputError
from splitbench.workload.catalog import catalog
from splitbench.workload.load import DEFAULT_TRACE, WorkloadSpec, load
from splitbench.workload.traces import parse_columns

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared" / "traces", ROOT.parent.parent / "shared" / "traces")
               if p.is_dir()), ROOT.parent / "shared" / "traces")
CODE = SHARED / "AzureLLMInferenceTrace_code.csv"
needs_shared = pytest.mark.skipif(not CODE.exists(), reason="../shared/traces not present")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No trace on the search path: empty CWD, cache and $SPLITBENCH_TRACE_DIR."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("SPLITBENCH_TRACE_DIR", raising=False)
    return tmp_path / "cache" / "splitbench" / "traces"


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(directory: Path) -> tuple[str, list[str]]:
        hits: list[str] = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a):
                hits.append(self.path)
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", hits
    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


# ----------------------------------------------------------------------------- --columns

def test_parse_columns_roles_aliases_and_subsets():
    assert parse_columns("timestamp=ts,input=prompt_len,output=gen_len") == {
        "timestamp": "ts", "input": "prompt_len", "output": "gen_len"}
    assert parse_columns(" ts = when , in=p,out=g, ") == {"timestamp": "when", "input": "p", "output": "g"}
    assert parse_columns("time=t") == {"timestamp": "t"}
    assert parse_columns("") is None and parse_columns(None) is None and parse_columns(" , ") is None


@pytest.mark.parametrize("text,needle", [
    ("timestamp", "expected ROLE=COLUMN"), ("input=", "expected ROLE=COLUMN"), ("=col", "expected ROLE=COLUMN"),
    ("prompt=p", "unknown role 'prompt'"), ("ts=a,timestamp=b", "'timestamp' given twice"),
])
def test_parse_columns_errors_name_the_item(text, needle):
    with pytest.raises(InputError, match=needle) as e:
        parse_columns(text)
    assert "\n" not in str(e.value)


def test_parsed_columns_read_a_file_with_other_names(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("when,p,g,extra\n10.0,5,1,x\n10.5,6,2,y\n12.0,7,3,z\n")
    w = load(WorkloadSpec(str(path), columns=parse_columns("ts=when,in=p,out=g"), rate_scale=2.0))
    assert list(w.arrival_s) == [0.0, 0.25, 1.0]
    assert list(w.input_tokens) == [5, 6, 7] and list(w.output_tokens) == [1, 2, 3]
    assert w.source["columns"] == {"timestamp": "when", "input": "p", "output": "g"}
    with pytest.raises(InputError, match=r"missing input column 'ContextTokens'"):   # unmapped roles keep defaults
        load(WorkloadSpec(str(path), columns=parse_columns("ts=when")))


# ----------------------------------------------------------------------------- validation up front

@pytest.mark.parametrize("kw,needle", [
    ({"rate_scale": 0}, "--rate-scale"), ({"rate_scale": float("nan")}, "--rate-scale"),
    ({"start_s": -1}, "--start"), ({"duration_s": 0}, "--duration"), ({"max_requests": 0}, "--max-requests"),
    ({"max_requests": 2.5}, "--max-requests must be a whole number"), ({"max_context_tokens": 1}, "--max-context"),
    ({"start_s": "10"}, "--start must be a number"), ({"trace": ""}, "--trace"),
    ({"columns": {"prompt": "x"}}, "unknown column role 'prompt'"), ({"columns": "ts=a"}, "mapping"),
    ({"trace": "synth:rate=1,count=3", "columns": {"input": "x"}}, "does not apply to a synth"),
    ({"trace": "synth:rate=1"}, "synth"), ({"trace_dir": "/no/such/dir"}, "--trace-dir /no/such/dir"),
])
def test_every_option_is_checked_before_any_download(isolated, serve, monkeypatch, kw, needle):
    base, hits = serve(SHARED if SHARED.is_dir() else isolated.parent)
    monkeypatch.setitem(catalog()[DEFAULT_TRACE], "url", f"{base}/AzureLLMInferenceTrace_conv.csv")
    spec = WorkloadSpec(**kw)
    assert spec.trace == kw.get("trace", DEFAULT_TRACE) and spec.fetch   # a catalogue name that is not local
    with pytest.raises(InputError, match=needle) as e:
        load(spec)
    assert "\n" not in str(e.value)
    assert hits == [] and not isolated.exists()   # nothing was requested, nothing written


def test_spec_fields_and_describe_are_the_documented_set():
    names = [f.name for f in fields(WorkloadSpec)]
    assert names == ["trace", "trace_dir", "columns", "start_s", "duration_s", "rate_scale", "max_requests",
                     "max_context_tokens", "fetch", "block_tokens", "prefix_block_tokens"]
    d = WorkloadSpec("synth:rate=5,count=3", duration_s=1.0).describe()
    assert json.loads(json.dumps(d)) == d and d["trace"] == "synth:rate=5,count=3" and d["fetch"] is True


# ----------------------------------------------------------------------------- fetch on load

@needs_shared
def test_missing_catalogue_trace_is_fetched_verified_then_read(isolated, serve, monkeypatch):
    base, hits = serve(SHARED)
    monkeypatch.setitem(catalog()["azure-code-2023"], "url", f"{base}/{CODE.name}")
    status: list[str] = []
    w = load(WorkloadSpec("azure-code-2023", start_s=100, duration_s=900), on_status=status.append)
    assert hits == [f"/{CODE.name}"] and (isolated / CODE.name).read_bytes() == CODE.read_bytes()
    assert w.source["sha256_source"] == "fetch, verified" and w.source["sha256_matches_catalog"] is True
    assert status[0] == "trace azure-code-2023 not found locally: downloading it" and "verified" in status[1]
    direct = load(WorkloadSpec(str(CODE), start_s=100, duration_s=900))
    assert np.array_equal(w.trace_index, direct.trace_index) and len(w) > 0
    assert w.source["workload_sha256"] == direct.source["workload_sha256"]
    load(WorkloadSpec("azure-code-2023"))          # now local: no second download
    assert len(hits) == 1


def test_fetch_off_or_bad_hash_is_one_line_and_leaves_nothing(isolated, serve, monkeypatch, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    (served / "code.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00.1,5,5\n")
    base, hits = serve(served)
    monkeypatch.setitem(catalog()["azure-code-2023"], "url", f"{base}/code.csv")
    with pytest.raises(InputError, match="not available locally.*splitbench traces fetch azure-code-2023"):
        load(WorkloadSpec("azure-code-2023", fetch=False))
    assert hits == []
    with pytest.raises(InputError, match="sha256 mismatch") as e:
        load(WorkloadSpec("azure-code-2023"))
    assert "\n" not in str(e.value) and hits == ["/code.csv"]
    assert list(isolated.iterdir()) == []          # the temp file is gone, nothing saved


@needs_shared
def test_synth_lengths_trace_is_fetched_too(isolated, serve, monkeypatch):
    base, hits = serve(SHARED)
    monkeypatch.setitem(catalog()["azure-code-2023"], "url", f"{base}/{CODE.name}")
    w = load(WorkloadSpec("synth:rate=20,count=200,lengths=azure-code-2023,seed=2"))
    assert len(w) == 200 and hits == [f"/{CODE.name}"]
    assert w.source["lengths_source"]["sha256"] == catalog()["azure-code-2023"]["sha256"]


# ----------------------------------------------------------------------------- one-way modules

def test_workload_modules_import_one_way():
    """catalog < traces < synth < load: importing a lower module never loads a higher one."""
    code = ("import sys, importlib; order = ['catalog', 'traces', 'synth', 'load']\n"
            "for i, m in enumerate(order):\n"
            "    importlib.import_module('splitbench.workload.' + m)\n"
            "    above = [n for n in order[i + 1:] if 'splitbench.workload.' + n in sys.modules]\n"
            "    assert not above, (m, above)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
