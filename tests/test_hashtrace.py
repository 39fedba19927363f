"""Prefix-hash JSONL traces: parsing and every error on files written here, transforms carrying the hashes, the
real Mooncake files against MANIFEST.md, catalogue fetch of an entry without sha256."""
from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from splitbench.cli import app
from splitbench.errors import InputError
from splitbench.workload.catalog import catalog, fetch_trace
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.prefix import prefix_stats, session_stats
from splitbench.workload.traces import parse_columns, read_trace
from splitbench.workload.transforms import apply_transforms, workload_digest

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared" / "traces", ROOT.parent.parent / "shared" / "traces")
               if p.is_dir()), ROOT.parent / "shared" / "traces")
CONV = SHARED / "mooncake_conversation_trace.jsonl"
SYNTH = SHARED / "mooncake_synthetic_trace.jsonl"
needs_mooncake = pytest.mark.skipif(not CONV.exists(), reason="../shared/traces Mooncake files not present")


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def row(ts, inp, out, ids):
    return {"timestamp": ts, "input_length": inp, "output_length": out, "hash_ids": ids}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_parse_small_mooncake_file(tmp_path):
    p = write(tmp_path / "t.jsonl", [row(0, 1000, 5, [1, 2]), row(1500, 1024, 7, [1, 2]), "",
                                     row(1500, 600, 1, [9])])
    w = read_trace(p)
    assert w.arrival_s.tolist() == [0.0, 1.5, 1.5]
    assert w.input_tokens.tolist() == [1000, 1024, 600] and w.output_tokens.tolist() == [5, 7, 1]
    assert [h.tolist() for h in w.prefix_hashes] == [[1, 2], [1, 2], [9]] and w.block_tokens == 512
    assert w.source["format"] == "hash-jsonl" and w.source["rows"] == 3


def test_generic_fields_and_block_size(tmp_path):
    p = write(tmp_path / "bailian.json", [{"t": 0.0, "in": 40, "out": 3, "blocks": [7, 8, 9]},
                                          {"t": 2.5, "in": 16, "out": 3, "blocks": [7]}])
    cols = parse_columns("timestamp=t,input=in,output=out,hashes=blocks")
    with pytest.raises(InputError, match="3 hash ids, but input length 40 holds at most 1 blocks of 512"):
        read_trace(p, columns=cols)
    w = read_trace(p, columns=cols, block_tokens=16)   # sniffed by content: the name does not end in .jsonl
    assert w.block_tokens == 16 and w.arrival_s.tolist() == [0.0, 0.0025]   # ms unless the catalogue says
    w = load(WorkloadSpec(str(p), columns=cols, block_tokens=16))
    assert [h.tolist() for h in w.prefix_hashes] == [[7, 8, 9], [7]]


BAD = {
    "missing_hash_ids": ('{"timestamp": 0, "input_length": 5, "output_length": 1}', 2, "missing field 'hash_ids'"),
    "too_many_ids": (row(0, 513, 1, [1, 2, 3]), 2, "column 'hash_ids' 3 hash ids, but input length 513 holds at "
                                                   "most 2 blocks"),
    "unsorted": (row(-5, 5, 1, [1]), 2, "column 'timestamp' timestamps not sorted"),
    "fraction_input": (row(0, 5.5, 1, [1]), 2, "column 'input_length' token count must be a whole number >= 1"),
    "zero_output": (row(0, 5, 0, [1]), 2, "column 'output_length' token count must be a whole number >= 1"),
    "string_length": (row(0, "5", 1, [1]), 2, "column 'input_length' token count"),
    "not_json": ('{"timestamp": 0, "input_length": 5', 2, "not valid JSON"),
    "not_object": ("[1, 2]", 2, "expected a JSON object per line"),
    "bad_hash": (row(0, 5, 1, ["a"]), 2, "column 'hash_ids' hash id 'a' is not a 64-bit integer"),
    "hashes_not_list": (row(0, 5, 1, 3), 2, "column 'hash_ids' hash ids must be a JSON list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_lines_are_one_line_exit_2(tmp_path, case):
    bad, line, msg = BAD[case]
    p = write(tmp_path / f"{case}.jsonl", [row(0, 600, 3, [1, 2]), bad, row(10, 5, 1, [3])])
    r = cli("traces", "show", str(p))
    err = r.stderr.strip()
    assert r.exit_code == 2 and r.stdout == "" and "\n" not in err and "Traceback" not in err
    assert f"{p}:{line}:" in err and msg in err, err


def test_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(InputError, match="no data lines"):
        read_trace(p)


def test_fewer_ids_than_blocks_accepted(tmp_path):
    w = read_trace(write(tmp_path / "t.jsonl", [row(0, 2000, 1, [4]), row(1, 300, 1, [])]))
    assert [h.size for h in w.prefix_hashes] == [1, 0]


def test_transforms_carry_hashes_and_sessions(tmp_path):
    # one conversation: turn i = the full blocks 0..i, then a partial block of its own (id 100 + i)
    rows = [row(1000 * i, 512 * (i + 1) + 10, 4, list(range(i + 1)) + [100 + i]) for i in range(6)]
    w = read_trace(write(tmp_path / "t.jsonl", rows))
    assert w.turn.tolist() == [0, 1, 2, 3, 4, 5] and set(w.session_id.tolist()) == {0}
    out = apply_transforms(w, start_s=1.0, duration_s=3.0, rate_scale=2.0, max_requests=2)
    assert out.trace_index.tolist() == [1, 2] and out.turn.tolist() == [1, 2]
    assert [h.tolist() for h in out.prefix_hashes] == [[0, 1, 101], [0, 1, 2, 102]]
    clipped = apply_transforms(w, max_context_tokens=1030)      # input cut to 1026 = 3 blocks of 512
    assert clipped.input_tokens[-1] == 1026 and clipped.prefix_hashes[-1].tolist() == [0, 1, 2]
    assert clipped.prefix_hashes[0].tolist() == [0, 100]
    scaled = apply_transforms(w, prefix_block_tokens=16)
    assert scaled.block_tokens == 16 and [h.size for h in scaled.prefix_hashes] == [h.size for h in w.prefix_hashes]
    assert (-(-scaled.input_tokens // 16)).tolist() == (-(-w.input_tokens // 512)).tolist()
    assert scaled.transforms["prefix_block_tokens"]["from_block_tokens"] == 512
    other = read_trace(write(tmp_path / "u.jsonl", [dict(r, hash_ids=[h + 100 for h in r["hash_ids"]])
                                                    for r in rows]))
    assert workload_digest(other) != workload_digest(w)   # same lengths, other hashes


def test_prefix_block_tokens_needs_hashes():
    with pytest.raises(InputError, match="has no hash ids"):
        load(WorkloadSpec("synth:rate=1,count=3", prefix_block_tokens=16))
    with pytest.raises(InputError, match="--prefix-block-tokens must be"):
        WorkloadSpec("synth:rate=1,count=3", prefix_block_tokens=0).validate()


@needs_mooncake
@pytest.mark.parametrize("path,rows,blocks,distinct,reused", [
    (CONV, 12031, 288_500, 182_790, 0.366), (SYNTH, 3993, 121_877, 43_924, 0.640)])
def test_real_mooncake_matches_manifest(path, rows, blocks, distinct, reused):
    w = read_trace(path)
    st = prefix_stats(w)
    assert len(w) == rows and st["blocks"] == blocks and st["distinct_blocks"] == distinct
    assert round(st["reused_fraction"], 3) == reused
    assert (-(-w.input_tokens // 512) == [h.size for h in w.prefix_hashes]).all()   # every line: ids == blocks
    ss = session_stats(w)
    assert ss["sessions"] > 0 and ss["requests_in_sessions"] + ss["singletons"] == rows


@needs_mooncake
def test_catalogue_name_found_via_trace_dir(monkeypatch):
    monkeypatch.setenv("SPLITBENCH_TRACE_DIR", str(SHARED))
    w = load(WorkloadSpec("mooncake-synthetic", max_requests=50, fetch=False))
    assert len(w) == 50 and w.block_tokens == 512 and w.source["sha256_matches_catalog"] is True
    assert w.source["sha256_verified"] is True


def test_fetch_entry_without_sha256(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    write(served / "tool.jsonl", [row(0, 5, 1, [1])])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/tool.jsonl"
        res = fetch_trace("mooncake-toolagent", dest=tmp_path / "d", url=url)
        r = cli("traces", "fetch", "mooncake-toolagent", "--dest", str(tmp_path / "e"), "--url", url)
    finally:
        srv.shutdown()
        srv.server_close()
    assert catalog()["mooncake-toolagent"]["sha256"] is None
    assert res["status"] == "unknown-sha256" and Path(res["path"]).is_file()
    side = json.loads(Path(res["path"] + ".sha256.json").read_text())
    assert side["verified"] is False and side["sha256"] == res["sha256"]
    assert r.exit_code == 0 and "no sha256" in r.stderr
    w = load(WorkloadSpec("mooncake-toolagent", trace_dir=str(tmp_path / "d"), fetch=False))
    assert w.source["sha256_verified"] is False and w.source["sha256_matches_catalog"] is None
    assert w.source["sha256_source"].startswith("fetch, computed")
