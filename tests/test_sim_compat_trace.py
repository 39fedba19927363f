"""SplitwiseSim's trace CSV: read natively (also through `load`), bad rows as one-line InputErrors naming file, line
and column, and its generate_trace.py method (seeded, exactly reproducible)."""
from __future__ import annotations

import numpy as np
import pytest

from splitbench.errors import InputError
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.splitwisesim import (SPLITWISESIM_COLUMNS, generate_splitwisesim_trace,
                                              is_splitwisesim_csv, read_splitwisesim_trace,
                                              write_splitwisesim_trace)

HEADER = ",".join(SPLITWISESIM_COLUMNS)
ROWS = ["0,2,0,0.25,1,100,10", "1,2,0,0.75,1,2000,3", "2,2,0,1.5,1,7,200"]


def _csv(tmp_path, rows, name="rr_conv_70.csv", header=HEADER):
    p = tmp_path / name
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return p


def test_reads_a_splitwisesim_trace_natively_and_through_load(tmp_path):
    p = _csv(tmp_path, ROWS)
    assert is_splitwisesim_csv(p)
    w = read_splitwisesim_trace(p)
    assert w.arrival_s.tolist() == [0.0, 0.5, 1.25] and w.source["first_arrival_s"] == 0.25
    assert w.input_tokens.tolist() == [100, 2000, 7] and w.output_tokens.tolist() == [10, 3, 200]
    loaded = load(WorkloadSpec(trace=str(p), max_requests=2, fetch=False))
    assert loaded.input_tokens.tolist() == [100, 2000] and loaded.source["format"] == "splitwisesim"
    assert loaded.source["sha256"]


@pytest.mark.parametrize("row, column, why", [
    ("1,2,0,0.5,1,abc,3", "prompt_size", "whole number"),
    ("1,2,0,0.5,1,0,3", "prompt_size", ">= 1"),
    ("1,2,0,0.5,1,10,2.5", "token_size", "whole number"),
    ("1,1,0,0.5,1,10,3", "request_type", "must be 2"),
    ("1,2,3,0.5,1,10,3", "application_id", "must be 0"),
    ("1,2,0,0.5,4,10,3", "batch_size", "must be 1"),
    ("1,2,0,nan,1,10,3", "arrival_timestamp", "finite"),
    ("1,2,0,0.1,1,10,3", "arrival_timestamp", "not sorted"),
])
def test_a_bad_row_is_one_line_naming_file_line_and_column(tmp_path, row, column, why):
    p = _csv(tmp_path, [ROWS[0], row])
    with pytest.raises(InputError) as e:
        read_splitwisesim_trace(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: column {column!r}") and why in msg and "\n" not in msg


def test_short_rows_and_missing_columns_are_input_errors(tmp_path):
    with pytest.raises(InputError, match=r":3: expected 7 fields"):
        read_splitwisesim_trace(_csv(tmp_path, [ROWS[0], "1,2,0,0.5,1,10"]))
    bad = _csv(tmp_path, ROWS, name="other.csv", header=HEADER.replace("token_size", "tokens"))
    assert not is_splitwisesim_csv(bad)
    with pytest.raises(InputError, match="missing column"):
        read_splitwisesim_trace(bad)


def test_generation_follows_generate_trace_py_draw_order(tmp_path):
    lengths = tmp_path / "lengths.csv"
    lengths.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" +
                       "".join(f"2023-11-16 18:00:{k:02d}.0000000,{100 + k},{10 + k}\n" for k in range(20)))
    t = generate_splitwisesim_trace(lengths, 50.0, 2.0, seed=0, max_requests=1000)
    rs = np.random.RandomState(0)   # the same stream: 1000 gaps, 1000 prompt picks, 1000 token picks
    arr = np.cumsum(rs.standard_exponential(1000) * (1 / 50.0))
    p_idx, t_idx = rs.randint(0, 20, 1000), rs.randint(0, 20, 1000)
    n = int((arr < 2.0).sum())
    assert len(t["request_id"]) == n and 60 < n < 140
    assert t["arrival_timestamp"].tolist() == arr[:n].tolist()
    assert t["prompt_size"].tolist() == (100 + p_idx[:n]).tolist()
    assert t["token_size"].tolist() == (10 + t_idx[:n]).tolist()
    out = write_splitwisesim_trace(tmp_path / "gen.csv", t)
    back = read_splitwisesim_trace(out)
    assert (back.arrival_s + back.source["first_arrival_s"]).tolist() == pytest.approx(arr[:n].tolist(), abs=1e-12)
    assert back.input_tokens.tolist() == t["prompt_size"].tolist()
    assert generate_splitwisesim_trace(lengths, 50.0, 2.0, seed=1, max_requests=1000)["prompt_size"].tolist() != \
        t["prompt_size"].tolist()


def _profile(tmp_path):
    from splitbench.sim.profiles import COLUMNS
    lines = [",".join(COLUMNS)]
    for hw in ("a100-80gb", "h100-80gb"):
        for p, ms in ((128, 40.0), (2048, 400.0)):
            lines.append(f"bloom-176b,{hw},{p},1,64,0,0,{ms},30.0,{ms + 64 * 30},8")
    path = tmp_path / "perf_model.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_simulate_perf_model_splitwisesim_on_a_splitwisesim_csv(tmp_path):
    import json
    import subprocess
    import sys

    from splitbench.app.simrun import SimOptions, simulate_run
    rows = [f"{k},2,0,{0.05 * k + 0.01},1,{200 + 50 * k},{10 + k}" for k in range(40)]
    trace = _csv(tmp_path, rows)
    run_dir, s = simulate_run(SimOptions(cluster="splitwise-ha:1,1", trace=str(trace), perf_model="splitwisesim",
                                         policy="mixed-pool", profile=_profile(tmp_path), results_dir=str(tmp_path),
                                         run_id="c"))
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["backend"]["perf_model"] == "splitwisesim" and meta["backend"]["sim_config"]["max_batch_tokens"] == 2048
    assert meta["backend"]["machines"]["dgx-a100"]["kv_capacity_tokens"] == (8 * 80 * 2 ** 30 - 329 * 10 ** 9) // (
        2 * 14336 * 70 * 2)
    assert s["counts"]["ok"] == 40 and s["pools"]["split"]["count"] >= 10   # the rest: the long prompt queue
    assert sum(v["count"] for v in s["pools"].values()) == 40                # made the token machine mixed
    lat = s["latency"]
    assert lat["tbt_splitwisesim_s"]["mean"] < lat["mean_tbt_s"]["mean"]
    with pytest.raises(InputError, match="--first-token does not apply to --perf-model splitwisesim"):
        simulate_run(SimOptions(cluster="baseline-a100:1", trace=str(trace), perf_model="splitwisesim",
                                first_token="decode", results_dir=str(tmp_path)))
    with pytest.raises(InputError, match="--max-batch-size does not apply to --perf-model physical"):
        simulate_run(SimOptions(cluster="baseline-a100:1", trace=str(trace), max_batch_size=8,
                                results_dir=str(tmp_path)))
    bad = _csv(tmp_path, [rows[0], "1,2,0,0.5,1,-3,4"], name="bad.csv")
    p = subprocess.run([sys.executable, "-m", "splitbench.cli", "simulate", "--perf-model", "splitwisesim",
                        "--cluster", "baseline-a100:1", "--trace", str(bad), "--profile", _profile(tmp_path),
                        "--results", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"{bad}:3: column 'prompt_size'" in p.stderr and not (tmp_path / "r").exists()
