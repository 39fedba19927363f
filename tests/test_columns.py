"""RecordColumns: the columnar record set is the same records as RequestRecord lists (round trip, Arrow table,
streamed Parquet), and nothing on its path imports pandas."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from splitbench.schema import records as R
from splitbench.schema.columns import RecordColumns, write_columns


def random_records(seed: int, n: int = 300) -> list[R.RequestRecord]:
    """Records with every kind of value: None times, failures, chunk lists of unequal length, phases (in one order,
    as RecordColumns keeps them), placement."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        send = rng.uniform(0, 100)
        k = rng.choice([0, 1, 2, 5])
        offs = sorted(rng.uniform(0, 3) for _ in range(k))
        toks = [rng.randint(0, 4) for _ in range(k + rng.choice([0, 0, 0, -1, 1]) if k else 0)]
        status = rng.choice([R.OK] * 6 + [R.ERROR, R.HTTP_ERROR, R.NOT_SENT, "weird"])
        split = rng.random() < 0.5
        where = R.placement(f"p{rng.randint(0, 3)}", "prompt" if split else "baseline",
                            f"t{rng.randint(0, 3)}" if split else None, "token" if split else None)
        out.append(R.RequestRecord(
            request_id=f"q{i}", trace_index=rng.randint(0, 10**6), intended_send_s=send,
            planned_input_tokens=rng.randint(1, 5000), planned_output_tokens=rng.randint(1, 500),
            actual_send_s=None if status == R.NOT_SENT else send + rng.uniform(0, 0.01),
            first_token_s=send + offs[0] if offs and status == R.OK else None,
            last_token_s=send + offs[-1] if offs and rng.random() < 0.9 else None,
            end_s=send + 4 if rng.random() < 0.9 else None, chunk_offsets_s=offs, chunk_tokens=toks,
            actual_input_tokens=rng.choice([None, rng.randint(1, 5000)]),
            actual_output_tokens=rng.choice([None, sum(toks)]), status=status,
            error=None if status == R.OK else rng.choice([None, "ConnectionResetError: x"]),
            http_status=503 if status == R.HTTP_ERROR else None, **(where if rng.random() < 0.9 else {}),
            phases_s={k: send + j for j, k in enumerate(["router_recv", "sent", "done"]) if rng.random() < 0.7}))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_columns_round_trip_and_table_equal_the_record_lists(seed, tmp_path):
    recs = random_records(seed)
    cols = RecordColumns.from_records(recs)
    assert cols.records() == recs
    want = R.records_to_table(recs, "run-x")
    assert cols.table("run-x").equals(want)
    assert cols.table("run-x", 10, 50).equals(want.slice(10, 40))
    write_columns(tmp_path, "run-x", cols)
    assert R.read_records(tmp_path) == recs
    assert RecordColumns.from_records([]).records() == [] and len(RecordColumns.from_records([]).table("e")) == 0


def test_simulator_request_ids_come_from_the_trace_index():
    cols = RecordColumns.from_records(random_records(3, 20))
    cols.request_id = None
    assert [r.request_id for r in cols.records()] == [f"r{t}" for t in cols.trace_index.tolist()]
    assert cols.table("r").column("request_id").to_pylist() == [f"r{t}" for t in cols.trace_index.tolist()]


def test_writing_columns_never_imports_pandas(tmp_path):
    code = ("import sys; from tests.test_columns import random_records; "
            "from splitbench.schema.columns import RecordColumns, write_columns; "
            f"write_columns({str(tmp_path)!r}, 'r', RecordColumns.from_records(random_records(0, 50))); "
            "print('pandas' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
