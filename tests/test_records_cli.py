"""A damaged run directory through the real CLI (`python -m splitbench.cli report DIR`): a corrupt records.parquet,
run.json or journal is one line on stderr and exit code 2, never a traceback; a journal's torn last line is skipped.
Run directories are built from plain files here, so the test means the same against any splitbench version."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

RUN_JSON = {"schema_version": 1, "run_id": "damaged", "status": "complete", "simulated": False,
            "t0_unix_s": 1000.0, "options": {}}


def record(i: int) -> dict:
    return {"request_id": f"r{i}", "trace_index": i, "intended_send_s": 0.1 * i, "planned_input_tokens": 10,
            "planned_output_tokens": 2, "actual_send_s": 0.1 * i, "first_token_s": 0.1 * i + 0.01,
            "last_token_s": 0.1 * i + 0.02, "end_s": 0.1 * i + 0.02, "chunk_offsets_s": [0.01, 0.02],
            "chunk_tokens": [1, 1], "actual_input_tokens": 10, "actual_output_tokens": 2, "status": "ok",
            "error": None, "http_status": 200, "instance": None, "pool": None, "phases_s": {}}


def run_dir(tmp_path, run_json: bytes | None = None, files: dict[str, bytes] | None = None):
    d = tmp_path / "damaged"
    d.mkdir()
    (d / "run.json").write_bytes(run_json if run_json is not None else json.dumps(RUN_JSON).encode())
    for name, data in (files or {}).items():
        (d / name).write_bytes(data)
    return d


def report(d) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitbench.cli", "report", str(d), "--json"],
                          capture_output=True, text=True, timeout=100)


def assert_one_line_exit_2(res: subprocess.CompletedProcess, *names: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert all(n in lines[0] for n in names), lines[0]


def test_corrupt_records_parquet_exits_2_with_one_line(tmp_path):
    d = run_dir(tmp_path, files={"records.parquet": bytes(range(256)) * 8})
    assert_one_line_exit_2(report(d), "records.parquet", "corrupt")


def test_truncated_records_parquet_exits_2_with_one_line(tmp_path):
    d = run_dir(tmp_path, files={"records.parquet": b"PAR1" + b"\x15\x04" * 100})   # a Parquet header, then nothing usable
    assert_one_line_exit_2(report(d), "records.parquet")


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00garbage", b'{"run_id": "damaged", "stat', b"[]"])
def test_corrupt_run_json_exits_2_with_one_line(tmp_path, content):
    d = run_dir(tmp_path, run_json=content)
    assert_one_line_exit_2(report(d), "run.json")


def test_journal_with_a_torn_middle_line_exits_2_naming_the_line(tmp_path):
    lines = [json.dumps(record(0)), '{"request_id": "r1", "trace_ind', json.dumps(record(2))]
    d = run_dir(tmp_path, files={"records.journal.jsonl": "\n".join(lines).encode() + b"\n"})
    assert_one_line_exit_2(report(d), "records.journal.jsonl:2")


def test_journal_torn_last_line_is_skipped(tmp_path):
    lines = [json.dumps(record(0)), json.dumps(record(1)), '{"request_id": "r2", "trace_ind']
    d = run_dir(tmp_path, files={"records.journal.jsonl": "\n".join(lines).encode()})
    res = report(d)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["counts"]["ok"] == 2
