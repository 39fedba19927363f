"""Typed, versioned run.json and summary.json (one writer, one loader each, version 1 migrated, one-line errors) and
`splitbench.open_run`: a run read once, records as a pandas DataFrame — on a real stub run."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import splitbench
from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.errors import InputError
from splitbench.metrics.latency import e2e_s, ttft_s
from splitbench.metrics.summary import summarize
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord, placement
from splitbench.schema.runmeta import RUN_META_VERSION, RunMeta, read_run_meta, write_run_meta
from splitbench.schema.summary import SUMMARY_VERSION, read_summary, write_summary

pytestmark = pytest.mark.timeout(120)


def meta(**kw) -> dict:
    return {"run_id": "r1", "kind": "run", "status": "complete", "simulated": False, "created_unix_s": 1000.5,
            "t0_unix_s": 1001, "options": {"trace": "x"}, "hardware": None, **kw}


def one_line(e: pytest.ExceptionInfo, path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


# ---------------------------------------------------------------- run.json

def test_run_meta_round_trip_stamps_the_version_and_leaves_the_argument_alone(tmp_path):
    m = meta(sizing={"rate_scale": 0.5})
    path = write_run_meta(tmp_path, m)
    assert path == tmp_path / R.RUN_FILE and "schema_version" not in m
    assert json.loads(path.read_text())["schema_version"] == RUN_META_VERSION
    assert read_run_meta(tmp_path) == {**m, "schema_version": RUN_META_VERSION}


def test_run_meta_declares_every_key_and_the_writer_refuses_others(tmp_path):
    assert set(RunMeta.__annotations__) >= {"run_id", "status", "t0_unix_s", "options", "workload", "backend",
                                            "hardware", "client", "replay_stats", "versions", "host", "sizing"}
    with pytest.raises(ValueError, match="'bogus' is not declared"):
        write_run_meta(tmp_path, meta(bogus=1))
    with pytest.raises(ValueError, match="'t0_unix_s': expected int or float, got str"):
        write_run_meta(tmp_path, meta(t0_unix_s="soon"))
    with pytest.raises(ValueError, match="'status'"):
        write_run_meta(tmp_path, meta(status="done"))
    assert not (tmp_path / R.RUN_FILE).exists()


def test_version_1_run_json_is_migrated(tmp_path):
    # what splitbench <= 0.1 wrote: schema_version 1 (the records version), no kind
    v1 = {"schema_version": 1, "run_id": "old", "status": "complete", "simulated": True, "t0_unix_s": 5.0}
    (tmp_path / R.RUN_FILE).write_text(json.dumps(v1))
    assert read_run_meta(tmp_path) == {**v1, "schema_version": 2, "kind": "run"}
    (tmp_path / R.RUN_FILE).write_text(json.dumps({"run_id": "older", "kind": "reference"}))
    assert read_run_meta(tmp_path)["kind"] == "reference"


@pytest.mark.parametrize("content, what", [
    (b"\x00\x9f garbage \xff", "unreadable run metadata"),
    (b'{"run_id": "r1", "status": "compl', "corrupt run metadata: not JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'{"schema_version": 2, "status": "complete"}', "column 'run_id'"),
    (b'{"schema_version": 2, "run_id": "r1", "simulated": "yes"}', "column 'simulated'"),
    (b'{"schema_version": 2, "run_id": "r1", "t0_unix_s": true}', "column 't0_unix_s'"),
    (b'{"schema_version": 9, "run_id": "r1"}', "version 9 is newer"),
    (b'{"schema_version": "2", "run_id": "r1"}', "schema_version must be a whole number"),
])
def test_bad_run_json_is_a_one_line_error_naming_file_and_field(tmp_path, content, what):
    (tmp_path / R.RUN_FILE).write_bytes(content)
    with pytest.raises(InputError) as e:
        read_run_meta(tmp_path)
    assert what in one_line(e, tmp_path / R.RUN_FILE)


def test_missing_run_json(tmp_path):
    with pytest.raises(InputError, match="missing run metadata"):
        read_run_meta(tmp_path)


# ---------------------------------------------------------------- summary.json

def records() -> list[RequestRecord]:
    out = []
    for i in range(6):
        where = placement("p0", "prompt", "t0", "token") if i % 2 else placement("m0", "mixed")
        out.append(RequestRecord(f"r{i}", i, 0.1 * i, 50, 4, actual_send_s=0.1 * i + 0.001,
                                 first_token_s=0.1 * i + 0.03, last_token_s=0.1 * i + 0.09, end_s=0.1 * i + 0.1,
                                 chunk_offsets_s=[0.029, 0.05, 0.07, 0.089], chunk_tokens=[1, 1, 1, 1],
                                 status="ok" if i != 4 else "timeout", **where))
    return out


def test_summary_round_trip_and_pools_by_request_pool(tmp_path):
    s = summarize(records(), run_meta=meta())
    assert set(s["pools"]) == {"split", "mixed"} and s["pools"]["split"]["count"] == 3
    write_summary(tmp_path, s)
    assert read_summary(tmp_path) == s and read_summary(tmp_path / R.SUMMARY_FILE)["version"] == SUMMARY_VERSION
    with pytest.raises(ValueError, match="'latency'"):
        write_summary(tmp_path / "other.json", {k: v for k, v in s.items() if k != "latency"})


def test_version_1_summary_is_migrated(tmp_path):
    s = summarize(records(), run_meta=meta())
    v1 = {**s, "version": 1, "pools": {"prompt": s["pools"]["split"], "mixed": s["pools"]["mixed"]}}
    (tmp_path / R.SUMMARY_FILE).write_text(json.dumps(v1))
    assert read_summary(tmp_path) == s


@pytest.mark.parametrize("content, what", [
    (b"\xff\xfe\x00 not json", "unreadable summary"),
    (b'{"kind": "splitbench.summary", "version": 2, "run": {', "corrupt summary: not JSON"),
    (b'{"kind": "something-else", "version": 2}', "not a splitbench summary"),
    (b'{"kind": "splitbench.summary", "version": 2, "run": {}, "counts": {}, "throughput": {}}', "'latency'"),
    (b'{"kind": "splitbench.summary", "version": 7}', "version 7 is newer"),
])
def test_bad_summary_json_is_a_one_line_error(tmp_path, content, what):
    (tmp_path / R.SUMMARY_FILE).write_bytes(content)
    with pytest.raises(InputError) as e:
        read_summary(tmp_path)
    assert what in one_line(e, tmp_path / R.SUMMARY_FILE)


# ---------------------------------------------------------------- open_run on a real run

@pytest.fixture(scope="module")
def stub_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    spec = "synth:arrivals=poisson,rate=40,duration=1,lengths=fixed,input=16,output=5,seed=2"
    opts = RunOptions(trace=spec, duration_s=None, backend="stub", results_dir=str(tmp), vocab_size=1000,
                      backend_options={"ttft_s": 0.01, "tpot_s": 0.002, "cpu": -1}, run_id="stub-run")
    return run(opts).run_dir


def test_open_run_reads_a_real_run_once(stub_run):
    r = splitbench.open_run(stub_run)
    assert isinstance(r, splitbench.Run) and r.run_id == "stub-run" and r.meta["status"] == "complete"
    df = r.records
    recs = r.record_list()
    assert isinstance(df, pd.DataFrame) and len(df) == len(recs) == r.meta["workload"]["requests"] > 10
    assert list(df.columns[:len(R.ARROW_SCHEMA.names)]) == R.ARROW_SCHEMA.names
    assert df["trace_index"].tolist() == [x.trace_index for x in recs] and (df["status"] == "ok").all()
    assert df["ttft_s"].to_numpy() == pytest.approx(np.array([ttft_s(x) for x in recs]))
    assert df["e2e_s"].to_numpy() == pytest.approx(np.array([e2e_s(x) for x in recs]))
    assert df["lag_s"].to_numpy() == pytest.approx(np.array([x.actual_send_s - x.intended_send_s for x in recs]))
    assert df["prefill_instance"].isna().all()   # the stub is no cluster: placement unknown
    assert r.summary["counts"]["ok"] == len(recs) and r.summary["run"]["run_id"] == "stub-run"
    assert r.records is df and r.record_list() is recs and r.summary is r.summary   # read once, cached


def test_failed_requests_have_no_ttft_or_e2e(tmp_path):
    recs = records()
    write_run_meta(tmp_path, meta())
    R.write_records(tmp_path, "r1", recs)
    df = splitbench.open_run(tmp_path).records
    assert df.loc[4, "status"] == "timeout" and np.isnan(df.loc[4, "ttft_s"]) and np.isnan(df.loc[4, "e2e_s"])
    assert df.loc[1, "pool"] == "split" and df.loc[1, "decode_instance"] == "t0" and df.loc[0, "instance"] == "m0"
    assert df.groupby("prefill_pool")["ttft_s"].count().to_dict() == {"mixed": 2, "prompt": 3}
    assert df.loc[1, "phases_s"] == {} and list(df.loc[1, "chunk_tokens"]) == [1, 1, 1, 1]


def test_open_run_errors_are_one_line(tmp_path):
    with pytest.raises(InputError, match="not a run directory"):
        splitbench.open_run(tmp_path / "nope")
    with pytest.raises(InputError, match="missing run metadata"):
        splitbench.open_run(tmp_path)
    write_run_meta(tmp_path, meta())
    r = splitbench.open_run(tmp_path)
    with pytest.raises(InputError, match="missing summary"):
        r.summary
    (tmp_path / R.RECORDS_FILE).write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="corrupt records file"):
        r.records
