"""Per-request records (schema version 3): the dataclass every live and simulated run produces, its Arrow schema,
the crash-safe journal writer, and the one Parquet reader (version 1 files migrate on read).

Times are seconds on the run clock (monotonic, 0 = run start); run.json anchors it to wall time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from splitbench.errors import InputError
from splitbench.schema.files import atomic_write_table, read_json_object

SCHEMA_VERSION = 3        # records schema; stored in the Parquet metadata as VERSION_KEY
VERSION_KEY = b"splitbench_schema_version"
RECORDS_FILE = "records.parquet"
JOURNAL_FILE = "records.journal.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"

# Request statuses. Anything but "ok" is a failure of some kind; "not_sent" means the run stopped first.
OK, HTTP_ERROR, TIMEOUT, DISCONNECTED, ERROR, CANCELLED, NOT_SENT = (
    "ok", "http_error", "timeout", "disconnected", "error", "cancelled", "not_sent")
STATUSES = (OK, HTTP_ERROR, TIMEOUT, DISCONNECTED, ERROR, CANCELLED, NOT_SENT)

SPLIT = "split"  # RequestRecord.pool of a request whose prefill and decode ran on two instances


@dataclass(slots=True)
class RequestRecord:
    """One request, raw timestamps only; every metric is derived later. Placement (cluster backends; all None
    when the backend does not say): a split request has prefill_* and decode_* on two instances, pool "split"
    and instance None; a co-located one has instance = prefill_instance = decode_instance and pool =
    prefill_pool = decode_pool (the pool it ran in: mixed, baseline, ...). See `placement()`."""
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
    instance: str | None = None          # the one instance that ran the whole request (None when split)
    pool: str | None = None              # the request's pool: "split", or the co-located pool (mixed/baseline)
    prefill_instance: str | None = None  # where the prompt was prefilled
    decode_instance: str | None = None   # where the output tokens were generated
    prefill_pool: str | None = None      # pool of prefill_instance when it ran the prefill ("prompt" if split)
    decode_pool: str | None = None       # pool of decode_instance when it ran the decode ("token" if split)
    phases_s: dict[str, float] = field(default_factory=dict)  # backend phase timestamps (run clock)
    cached_input_tokens: int | None = None  # prompt tokens served from the prefix cache (server usage; simulator)
    session_id: int | None = None        # multi-turn replay: the session this request is a turn of
    turn: int | None = None              # 0, 1, ... within session_id

    @property
    def ok(self) -> bool:
        return self.status == OK


def placement(prefill_instance: str | None, prefill_pool: str | None, decode_instance: str | None = None,
              decode_pool: str | None = None) -> dict[str, str | None]:
    """The six placement fields of a RequestRecord. Co-located (no decode_instance, or the same one): instance
    and pool = the prefill ones, decode_* = prefill_*. Split: pool "split", instance None."""
    if decode_instance is None or decode_instance == prefill_instance:
        return {"instance": prefill_instance, "pool": prefill_pool, "prefill_instance": prefill_instance,
                "decode_instance": prefill_instance, "prefill_pool": prefill_pool, "decode_pool": prefill_pool}
    return {"instance": None, "pool": SPLIT, "prefill_instance": prefill_instance,
            "decode_instance": decode_instance, "prefill_pool": prefill_pool, "decode_pool": decode_pool}


def placement_from_v1(instance: str | None, pool: str | None) -> dict[str, str | None]:
    """Version 1 records named a split request instance="prompt-0>token-1", pool="prompt" (its prefill pool;
    the decode side was always the token pool)."""
    if instance is None:
        return {"instance": None, "pool": pool, "prefill_instance": None, "decode_instance": None,
                "prefill_pool": None, "decode_pool": None}
    pre, sep, dec = instance.partition(">")
    return placement(pre, pool, dec, "token") if sep else placement(instance, pool)


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
    ("prefill_instance", pa.string()),
    ("decode_instance", pa.string()),
    ("prefill_pool", pa.string()),
    ("decode_pool", pa.string()),
    ("phases_s", pa.map_(pa.string(), pa.float64())),
    ("cached_input_tokens", pa.int64()),
    ("session_id", pa.int64()),
    ("turn", pa.int64()),
], metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()})

_FIELDS = [f.name for f in fields(RequestRecord)]
_PLACEMENT = ("instance", "pool", "prefill_instance", "decode_instance", "prefill_pool", "decode_pool")
_V2_ONLY = _PLACEMENT[2:]
_V3_ONLY = ("cached_input_tokens", "session_id", "turn")   # absent from version 2 files: read as nulls


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
    out = []
    for i in range(table.num_rows):
        kw = {name: data[name][i] for name in _FIELDS if name in data}
        kw["phases_s"] = dict(kw.get("phases_s") or [])
        kw["chunk_offsets_s"] = kw.get("chunk_offsets_s") or []
        kw["chunk_tokens"] = kw.get("chunk_tokens") or []
        out.append(RequestRecord(**kw))
    return out


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
        return finalize(self.run_dir, self.run_id)


def _journal_record(path: Path, n: int, d: object) -> RequestRecord:
    """One journal line's record; a version 1 line (no prefill_instance key) gets v2 placement fields."""
    if not isinstance(d, dict):
        raise InputError(f"journal line is {type(d).__name__}, not a record object", file=str(path), line=n)
    if "instance" in d and not any(k in d for k in _V2_ONLY):
        d = {**d, **placement_from_v1(d.get("instance"), d.get("pool"))}
    try:
        return RequestRecord(**d)
    except TypeError as e:
        raise InputError(f"not a request record ({e})", file=str(path), line=n) from None


def _read_journal(path: Path) -> list[RequestRecord]:
    """Records of a journal. A torn last line (a crash mid-write) is skipped; a bad line anywhere else is an
    InputError naming the line."""
    lines = path.read_bytes().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for n, line in enumerate(lines, 1):
        try:
            d = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            if n == len(lines):
                break  # a torn last line after a crash
            raise InputError(f"corrupt record journal: line is not JSON ({e})", file=str(path), line=n) from None
        out.append(_journal_record(path, n, d))
    return out


def _journal_table(path: Path, run_id: str) -> pa.Table:
    recs = _read_journal(path)
    try:
        return records_to_table(sorted(recs, key=lambda r: r.trace_index), run_id)
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise InputError(f"corrupt record journal: {_first_line(e)}", file=str(path)) from None


def finalize(run_dir: str | os.PathLike, run_id: str | None = None) -> Path:
    """Turn the journal (if any) into records.parquet, sorted by trace index; idempotent. `run_id` defaults
    to run.json's, else the directory name."""
    run_dir = Path(run_dir)
    journal, target = run_dir / JOURNAL_FILE, run_dir / RECORDS_FILE
    if journal.exists():
        if run_id is None:
            run_id = read_json_object(run_dir / RUN_FILE, "run metadata").get("run_id") \
                if (run_dir / RUN_FILE).exists() else run_dir.name
        atomic_write_table(target, _journal_table(journal, run_id or ""))
        journal.unlink()
    elif not target.exists():
        atomic_write_table(target, ARROW_SCHEMA.empty_table())
    return target


def write_records(run_dir: str | os.PathLike, run_id: str, records: Iterable[RequestRecord]) -> Path:
    """Write a whole record set at once (simulator, phase merge, tests)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RECORDS_FILE
    atomic_write_table(path, records_to_table(records, run_id))
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {text[0]}" if text else type(e).__name__)[:300]


def _read_parquet(path: Path) -> pa.Table:
    """records.parquet as a version 2 table; InputError naming the file when it is not one we can read."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"corrupt records file, not readable Parquet ({_first_line(e)})", file=str(path)) from None
    raw = (table.schema.metadata or {}).get(VERSION_KEY, b"1")
    try:
        version = int(raw)
    except ValueError:
        raise InputError(f"records schema version {raw!r} is not a number", file=str(path)) from None
    if version > SCHEMA_VERSION:
        raise InputError(f"records schema version {version} is newer than this splitbench reads "
                         f"({SCHEMA_VERSION}): upgrade splitbench", file=str(path))
    if version < 2:
        table = _migrate_v1(table, path)
    for name in _V3_ONLY:
        if version < 3 and name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.int64()))
    missing = [n for n in ARROW_SCHEMA.names if n not in table.column_names]
    if missing:
        raise InputError("records file lacks this column", file=str(path), column=missing[0])
    try:
        return table.select(ARROW_SCHEMA.names).cast(ARROW_SCHEMA)
    except (pa.ArrowException, ValueError) as e:
        raise InputError(f"records file has a column of the wrong type ({_first_line(e)})",
                         file=str(path)) from None


def _migrate_v1(table: pa.Table, path: Path) -> pa.Table:
    """Version 1 -> 2: the "prompt>token" instance label becomes prefill_/decode_ instance and pool columns."""
    for name in ("instance", "pool"):
        if name not in table.column_names:
            raise InputError("version 1 records file lacks this column", file=str(path), column=name)
    rows = [placement_from_v1(i, p) for i, p in zip(table.column("instance").to_pylist(),
                                                     table.column("pool").to_pylist())]
    for name in _PLACEMENT:
        col = pa.array([r[name] for r in rows], type=pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, col)
        else:
            table = table.append_column(name, col)
    return table


def read_table(run_dir: str | os.PathLike) -> pa.Table:
    """Records of a run as a version 2 table (a version 1 file is migrated); falls back to the journal of a run
    that crashed before finalizing. InputError (one line, naming the file) for a missing or corrupt file."""
    run_dir = Path(run_dir)
    path = run_dir / RECORDS_FILE
    if path.exists():
        return _read_parquet(path)
    journal = run_dir / JOURNAL_FILE
    if journal.exists():
        return _journal_table(journal, run_dir.name)
    raise InputError(f"no {RECORDS_FILE} or journal: not a splitbench run directory (or no request was recorded)",
                     file=str(run_dir))


def read_records(run_dir: str | os.PathLike) -> list[RequestRecord]:
    return table_to_records(read_table(run_dir))
