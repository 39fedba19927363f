"""Records schema version 2: explicit prefill/decode placement columns, the reader for version 1 Parquet files and
journals, and one-line errors (never a traceback) for corrupt records files and journals."""
from __future__ import annotations

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from splitbench.errors import InputError
from splitbench.hardware.catalog import load_catalog, plan_allocation
from splitbench.metrics.gate import samples
from splitbench.metrics.summary import summarize
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord, placement

SPLIT = placement("prompt-0", "prompt", "token-1", "token")
COLOCATED = placement("mixed-0", "mixed")

# The version 1 records schema exactly as splitbench <= 0.1 wrote it (split requests: instance "p>t", pool prompt).
V1_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("request_id", pa.string()), ("trace_index", pa.int64()),
    ("intended_send_s", pa.float64()), ("planned_input_tokens", pa.int64()), ("planned_output_tokens", pa.int64()),
    ("actual_send_s", pa.float64()), ("first_token_s", pa.float64()), ("last_token_s", pa.float64()),
    ("end_s", pa.float64()), ("chunk_offsets_s", pa.list_(pa.float64())), ("chunk_tokens", pa.list_(pa.int32())),
    ("actual_input_tokens", pa.int64()), ("actual_output_tokens", pa.int64()), ("status", pa.string()),
    ("error", pa.string()), ("http_status", pa.int32()), ("instance", pa.string()), ("pool", pa.string()),
    ("phases_s", pa.map_(pa.string(), pa.float64())),
], metadata={"splitbench_schema_version": "1"})


def v1_row(i: int, instance: str | None, pool: str | None, status: str = "ok") -> dict:
    return {"run_id": "old", "request_id": f"r{i}", "trace_index": i, "intended_send_s": 0.1 * i,
            "planned_input_tokens": 100 + i, "planned_output_tokens": 8, "actual_send_s": 0.1 * i + 0.001,
            "first_token_s": 0.1 * i + 0.05, "last_token_s": 0.1 * i + 0.2, "end_s": 0.1 * i + 0.21,
            "chunk_offsets_s": [0.049, 0.199], "chunk_tokens": [1, 7], "actual_input_tokens": 100 + i,
            "actual_output_tokens": 8, "status": status, "error": None, "http_status": 200,
            "instance": instance, "pool": pool, "phases_s": [("router_recv", 0.1 * i + 0.002)]}


def write_v1(run_dir, rows) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=V1_SCHEMA)
    pq.write_table(table, run_dir / R.RECORDS_FILE)


def rec(i: int, **kw) -> RequestRecord:
    return RequestRecord(f"r{i}", i, 0.1 * i, 100, 8, actual_send_s=0.1 * i, first_token_s=0.1 * i + 0.05,
                         end_s=0.1 * i + 0.3, status="ok", **kw)


# ---------------------------------------------------------------- version 2

def test_placement_of_split_and_colocated_requests():
    assert SPLIT == {"instance": None, "pool": "split", "prefill_instance": "prompt-0", "decode_instance": "token-1",
                     "prefill_pool": "prompt", "decode_pool": "token"}
    assert COLOCATED == {"instance": "mixed-0", "pool": "mixed", "prefill_instance": "mixed-0",
                         "decode_instance": "mixed-0", "prefill_pool": "mixed", "decode_pool": "mixed"}
    assert placement("b0", "baseline", "b0", "baseline") == placement("b0", "baseline")


def test_parquet_round_trip_keeps_the_placement_and_cache_columns(tmp_path):
    recs = [rec(0, **SPLIT), rec(1, **COLOCATED, cached_input_tokens=512, session_id=7, turn=2), rec(2)]
    R.write_records(tmp_path, "run-a", recs)
    table = pq.read_table(tmp_path / R.RECORDS_FILE)
    assert table.schema.metadata[R.VERSION_KEY] == b"3"
    assert table.column("cached_input_tokens").to_pylist() == [None, 512, None]
    assert table.column("turn").to_pylist() == [None, 2, None]
    assert table.column("prefill_instance").to_pylist() == ["prompt-0", "mixed-0", None]
    assert table.column("decode_pool").to_pylist() == ["token", "mixed", None]
    assert table.column("pool").to_pylist() == ["split", "mixed", None]
    assert R.read_records(tmp_path) == recs


def test_v2_parquet_reads_with_null_cache_and_session_columns(tmp_path):
    recs = [rec(0, **SPLIT), rec(1)]
    R.write_records(tmp_path, "run-a", recs)
    path = tmp_path / R.RECORDS_FILE
    t = pq.read_table(path)
    t = t.drop_columns(["cached_input_tokens", "session_id", "turn"]).replace_schema_metadata({R.VERSION_KEY: b"2"})
    pq.write_table(t, path)
    back = R.read_records(tmp_path)
    assert back == recs and all(r.cached_input_tokens is None and r.session_id is None for r in back)


# ---------------------------------------------------------------- version 1 reader

def test_v1_parquet_loads_into_v2_records(tmp_path):
    write_v1(tmp_path, [v1_row(0, "prompt-0>token-1", "prompt"), v1_row(1, "mixed-0", "mixed"),
                        v1_row(2, None, None, status="timeout"), v1_row(3, "token-2", "mixed")])
    table = R.read_table(tmp_path)
    assert table.schema.equals(R.ARROW_SCHEMA, check_metadata=False)
    split, mixed, none, borrowed = R.read_records(tmp_path)
    assert (split.prefill_instance, split.decode_instance, split.prefill_pool, split.decode_pool) == \
        ("prompt-0", "token-1", "prompt", "token")
    assert (split.instance, split.pool) == (None, "split")
    assert (mixed.instance, mixed.pool, mixed.prefill_instance, mixed.decode_instance, mixed.decode_pool) == \
        ("mixed-0", "mixed", "mixed-0", "mixed-0", "mixed")
    assert (borrowed.instance, borrowed.decode_instance, borrowed.pool) == ("token-2", "token-2", "mixed")
    assert none.status == "timeout" and none.prefill_instance is None and none.pool is None
    # everything else comes through unchanged
    assert split.chunk_tokens == [1, 7] and split.phases_s == {"router_recv": pytest.approx(0.002)}
    assert split.actual_input_tokens == 100 and borrowed.trace_index == 3


def test_v1_journal_lines_of_a_crashed_run_load_as_v2(tmp_path):
    lines = [orjson.dumps({k: v for k, v in v1_row(i, inst, "prompt").items() if k != "run_id"} |
                          {"phases_s": {}}) for i, inst in enumerate(["p0>t0", "p1>t0"])]
    (tmp_path / R.JOURNAL_FILE).write_bytes(b"\n".join(lines) + b"\n")
    a, b = R.read_records(tmp_path)
    assert (a.prefill_instance, a.decode_instance, a.pool, b.prefill_instance) == ("p0", "t0", "split", "p1")


def test_newer_records_version_is_a_one_line_error(tmp_path):
    table = R.records_to_table([rec(0)], "x")
    pq.write_table(table.replace_schema_metadata({R.VERSION_KEY: str(R.SCHEMA_VERSION + 1).encode()}),
                   tmp_path / R.RECORDS_FILE)
    with pytest.raises(InputError, match=f"version {R.SCHEMA_VERSION + 1} is newer"):
        R.read_records(tmp_path)


def test_records_file_missing_a_column_names_it(tmp_path):
    table = R.records_to_table([rec(0)], "x").drop_columns(["decode_pool"])
    pq.write_table(table, tmp_path / R.RECORDS_FILE)
    with pytest.raises(InputError, match="'decode_pool'") as e:
        R.read_table(tmp_path)
    assert str(tmp_path / R.RECORDS_FILE) in str(e.value)


# ---------------------------------------------------------------- corrupt files: one line, naming the file

def one_line(e: pytest.ExceptionInfo, path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and len(msg) < 500
    return msg


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_records_parquet_is_one_line_input_error(tmp_path, damage):
    path = R.write_records(tmp_path, "x", [rec(i, **SPLIT) for i in range(50)])
    data = path.read_bytes()
    path.write_bytes({"garbage": bytes(range(256)) * 4, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(InputError) as e:
        R.read_records(tmp_path)
    assert "corrupt records file" in one_line(e, path)


def test_journal_torn_last_line_is_skipped(tmp_path):
    w = R.RecordWriter(tmp_path, "x")
    for i in range(3):
        w.add(rec(i, **SPLIT))
    w.flush()
    with open(tmp_path / R.JOURNAL_FILE, "ab") as f:
        f.write(b'{"request_id": "r3", "trace_ind')   # the crash came mid-write
    assert [r.trace_index for r in R.read_records(tmp_path)] == [0, 1, 2]
    w.close()   # finalize skips it too
    assert not (tmp_path / R.JOURNAL_FILE).exists()
    assert [r.trace_index for r in R.read_records(tmp_path)] == [0, 1, 2]


@pytest.mark.parametrize("bad, what", [(b'{"request_id": "r1", "trace_in', "line is not JSON"),
                                       (b"[1, 2, 3]", "not a record object"),
                                       (b'{"request_id": "r1", "bogus_field": 1}', "not a request record")])
def test_journal_with_a_bad_line_before_the_end_is_an_error_naming_the_line(tmp_path, bad, what):
    good = orjson.dumps(rec(0))
    path = tmp_path / R.JOURNAL_FILE
    path.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    with pytest.raises(InputError, match=what) as e:
        R.read_records(tmp_path)
    assert f"{path}:2:" in one_line(e, path)
    with pytest.raises(InputError):   # finalize() does not turn it into a half records.parquet either
        R.finalize(tmp_path, "x")
    assert not (tmp_path / R.RECORDS_FILE).exists() and path.exists()


def test_journal_with_a_value_of_the_wrong_type_is_one_line_error(tmp_path):
    path = tmp_path / R.JOURNAL_FILE
    path.write_bytes(orjson.dumps(rec(0)).replace(b'"trace_index":0', b'"trace_index":"zero"') + b"\n" +
                     orjson.dumps(rec(1)) + b"\n")
    with pytest.raises(InputError, match="corrupt record journal") as e:
        R.read_records(tmp_path)
    one_line(e, path)


def test_no_records_at_all_says_so(tmp_path):
    with pytest.raises(InputError, match="not a splitbench run directory"):
        R.read_records(tmp_path)


# ---------------------------------------------------------------- consumers: work per machine pool

def test_efficiency_and_gate_put_split_work_on_the_prefill_and_decode_instances_pools():
    hw = plan_allocation([{"id": "prompt-0", "pool": "prompt", "gpu_ids": [0, 1]},
                          {"id": "token-1", "pool": "token", "gpu_ids": [2, 3]},
                          {"id": "mixed-0", "pool": "mixed", "gpu_ids": [4, 5]}],
                         catalog=load_catalog(), machine="dgx-h100")
    recs = [rec(0, **SPLIT, actual_input_tokens=100, actual_output_tokens=8),
            rec(1, **COLOCATED, actual_input_tokens=40, actual_output_tokens=3)]
    s = summarize(recs, run_meta={"hardware": hw})
    pools = s["efficiency"]["pools"]
    assert {p: (pools[p]["input_tokens"], pools[p]["output_tokens"]) for p in ("prompt", "token", "mixed")} == \
        {"prompt": (100, 0), "token": (0, 8), "mixed": (40, 3)}
    t = samples(recs, s, hw).tokens
    assert (t["prompt.in"].tolist(), t["token.out"].tolist(), t["mixed.in"].tolist(), t["mixed.out"].tolist()) == \
        ([100, 0], [8, 0], [0, 40], [0, 3])
    assert set(s["pools"]) == {"split", "mixed"}   # latency per request pool
