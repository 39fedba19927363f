"""Trace parsing: validated, streamed CSV/Parquet -> Workload (hash-id JSONL: hashtrace.py), and the column
mapping (`--columns`).

Every problem is a one-line InputError naming file, line and column. Names and fetch: catalog.py; entry point: load.py.
"""
from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from splitbench.errors import InputError
from splitbench.schema import kernels
from splitbench.schema.columns import np_values   # no pandas import (to_numpy imports it: ~0.5 s of CPU)
from splitbench.workload.hashtrace import MOONCAKE_BLOCK_TOKENS, is_hash_jsonl, read_hash_trace
from splitbench.workload.types import Workload

DEFAULT_COLUMNS = {"timestamp": "TIMESTAMP", "input": "ContextTokens", "output": "GeneratedTokens"}
ROLES = ("timestamp", "input", "output")
HASH_ROLE = "hash_ids"                # a field of hash-id JSONL traces only (hashtrace.py)
_ALL_ROLES = ROLES + (HASH_ROLE,)
_ROLE_ALIASES = {"ts": "timestamp", "time": "timestamp", "in": "input", "out": "output", "hashes": HASH_ROLE}
BLOCK_BYTES = 8 << 20                 # CSV bytes per streamed batch
_NUMERIC = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
_TZ = re.compile(r"(Z|[+-]\d\d:?\d\d)\s*$")


# ----------------------------------------------------------------------------- column mapping

def column_mapping(columns: dict[str, str] | None) -> dict[str, str]:
    """Role -> column name: DEFAULT_COLUMNS overridden by `columns` (roles may be written ts/time/in/out; hash_ids
    is kept for hash-id JSONL traces)."""
    cols = dict(DEFAULT_COLUMNS)
    for key, col in (columns or {}).items():
        role = _ROLE_ALIASES.get(key, key)
        if role not in _ALL_ROLES:
            raise InputError(f"unknown column role {key!r} in column mapping (roles: {', '.join(_ALL_ROLES)})")
        if not isinstance(col, str) or not col.strip():
            raise InputError(f"column mapping: role {role!r} needs a column name, got {col!r}")
        cols[role] = col
    return cols


def parse_columns(text: str | None) -> dict[str, str] | None:
    """The `--columns` value `timestamp=COL,input=COL,output=COL[,hash_ids=FIELD]` (roles may be written
    ts/time/in/out/hashes; any subset; the rest keep their defaults) -> {role: column} with canonical role names;
    None when empty. For hash-id JSONL traces the names are JSON fields."""
    if text is None or not text.strip():
        return None
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, col = (s.strip() for s in item.partition("="))
        if not eq or not key or not col:
            raise InputError(f"--columns: expected ROLE=COLUMN (roles: {', '.join(_ALL_ROLES)}), got {item!r}")
        role = _ROLE_ALIASES.get(key, key)
        if role not in _ALL_ROLES:
            raise InputError(f"--columns: unknown role {key!r} (roles: {', '.join(_ALL_ROLES)}; or ts, in, out)")
        if role in out:
            raise InputError(f"--columns: role {role!r} given twice")
        out[role] = col
    return out or None


# ----------------------------------------------------------------------------- parsing

def _first_bad(arr: pa.Array, convert: Callable[[pa.Array], object]) -> int:
    """Index of the first element `convert` rejects (binary search over prefixes; error path only)."""
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(arr.slice(0, mid))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            hi = mid
    return hi - 1


_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


class _Parser:
    """Per-file conversion + validation state; errors name file, 1-based line (header = 1) and column."""

    def __init__(self, path: Path, cols: dict[str, str], is_csv: bool):
        self.path, self.cols, self.is_csv = path, cols, is_csv
        self.mode: str | None = None   # "s" numeric seconds, "tz"/"naive" datetime strings, "ts" arrow timestamps

    def fail(self, msg: str, row: int | None, role: str | None = None, line: int | None = None):
        col = self.cols[role] if role else None
        if self.is_csv:
            raise InputError(msg, file=str(self.path), line=line or (None if row is None else row + 2), column=col)
        where = f" (data row {row + 1})" if row is not None else ""
        raise InputError(msg + where, file=str(self.path), column=col)

    def _cast(self, arr: pa.Array, target: pa.DataType, role: str, base: int, what: str) -> pa.Array:
        try:
            return kernels.cast(arr, target)
        except _CAST_ERRORS:
            i = _first_bad(arr, lambda a: kernels.cast(a, target))
            self.fail(f"{what} {arr[i].as_py()!r}", base + i, role)

    def _no_nulls(self, arr: pa.Array, role: str, base: int) -> None:
        if arr.null_count:
            self.fail("empty value", base + int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False))), role)

    def tokens(self, arr: pa.Array, role: str, base: int) -> np.ndarray:
        self._no_nulls(arr, role, base)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
                or pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
            self.fail(f"column type {arr.type} is not numeric", None, role, line=1)
        v = np_values(self._cast(arr, pa.float64(), role, base, "non-numeric token count"))
        bad = ~(np.isfinite(v) & (v >= 1) & (v == np.floor(v)))
        if bad.any():
            i = int(np.argmax(bad))
            self.fail(f"token count must be a whole number >= 1, got {arr[i].as_py()!r}", base + i, role)
        return v.astype(np.int64)

    def times(self, arr: pa.Array, base: int) -> np.ndarray:
        """Absolute times: int64 ns for datetimes, float64 s for numeric seconds."""
        self._no_nulls(arr, "timestamp", base)
        t = arr.type
        if self.mode is None:
            if pa.types.is_timestamp(t):
                self.mode = "ts"
            elif pa.types.is_integer(t) or pa.types.is_floating(t):
                self.mode = "s"
            elif pa.types.is_string(t) or pa.types.is_large_string(t):
                v0 = arr[0].as_py()
                self.mode = "s" if _NUMERIC.match(v0) else ("tz" if _TZ.search(v0) else "naive")
            else:
                self.fail(f"column type {t} is not a timestamp or number", None, "timestamp", line=1)
        if self.mode == "ts":
            return np_values(kernels.cast(kernels.cast(arr, pa.timestamp("ns", tz=t.tz)), pa.int64()))
        if self.mode == "s":
            v = self._cast(arr, pa.float64(), "timestamp", base, "unparseable timestamp (expected seconds)")
            v = np_values(v)
            if not np.isfinite(v).all():
                i = int(np.argmax(~np.isfinite(v)))
                self.fail(f"unparseable timestamp {arr[i].as_py()!r}", base + i, "timestamp")
            return v
        target = pa.timestamp("ns", tz="UTC" if self.mode == "tz" else None)
        hint = "with" if self.mode == "tz" else "without"
        ts = self._cast(arr, target, "timestamp", base, f"unparseable timestamp (expected a date-time {hint} UTC offset"
                        f" like the first row)")
        return np_values(kernels.cast(ts, pa.int64()))

    def relative(self, t: np.ndarray, t0) -> np.ndarray:
        return (t - t0).astype(np.float64) / (1.0 if self.mode == "s" else 1e9)


def _is_parquet(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _csv_header(path: Path) -> list[str]:
    with open(path, "rb") as f:
        first = f.readline(1 << 20).decode("utf-8-sig", errors="replace").strip("\r\n")
    return next(csv.reader([first])) if first.strip() else []


def _bad_csv_line(path: Path, ncols: int) -> int | None:
    """Line of the first row whose field count differs from the header's (error path only)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        for i, row in enumerate(reader):
            if i and row and len(row) != ncols:
                return reader.line_num
    return None


def _csv_batches(path: Path, names: list[str], ncols: int) -> Iterator[pa.RecordBatch]:
    opts = dict(read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES),
                parse_options=pcsv.ParseOptions(invalid_row_handler=lambda row: "error"),
                convert_options=pcsv.ConvertOptions(include_columns=names, column_types={n: pa.string() for n in names},
                                                    strings_can_be_null=False, quoted_strings_can_be_null=False))
    try:
        yield from pcsv.open_csv(path, **opts)
    except pa.ArrowInvalid as e:
        msg = str(e).splitlines()[0][:200]
        raise InputError(msg, file=str(path), line=_bad_csv_line(path, ncols)) from None


def _batches(path: Path, parser: "_Parser") -> Iterator[pa.RecordBatch]:
    """Batches of the three mapped columns, after checking the header has them."""
    cols = parser.cols
    pfile = None if parser.is_csv else pq.ParquetFile(path)
    header = _csv_header(path) if pfile is None else pfile.schema_arrow.names
    if not header:
        parser.fail("empty file: no header line and no data rows", None, "timestamp", line=1)
    for role in ROLES:
        if cols[role] not in header:
            parser.fail(f"missing {role} column {cols[role]!r} (header has: {', '.join(header)}; "
                        f"map columns with --columns)", None, role, line=1)
    names = list(dict.fromkeys(cols[r] for r in ROLES))
    if pfile is None:
        return _csv_batches(path, names, len(header))
    return pfile.iter_batches(batch_size=1 << 20, columns=names)


class _Window:
    """Keeps the rows of [start_s, end_s) (at most max_requests) batch by batch, checking order as it goes."""

    def __init__(self, parser: "_Parser", start_s: float, end_s: float, max_requests: int | None):
        self.parser, self.start_s, self.end_s, self.max_requests = parser, start_s, end_s, max_requests
        self.parts: list[tuple] = []
        self.row0 = self.kept = 0
        self.t0 = self.prev = self.first_raw = None

    def add(self, batch: pa.RecordBatch) -> bool:
        """Take one batch; True once past the stop point (later rows need not be read)."""
        parser, cols, row0 = self.parser, self.parser.cols, self.row0
        ts_col = batch.column(cols["timestamp"])
        t = parser.times(ts_col, row0)
        if self.t0 is None:
            self.t0, self.first_raw = t[0], str(ts_col[0].as_py())
        rel = parser.relative(t, self.t0)
        d = np.diff(rel, prepend=rel[0] if self.prev is None else self.prev)
        if (d < 0).any():
            i = int(np.argmax(d < 0))
            parser.fail(f"timestamps not sorted: {ts_col[i].as_py()!s} is earlier than the row before",
                        row0 + i, "timestamp")
        self.prev = rel[-1]
        inp = parser.tokens(batch.column(cols["input"]), "input", row0)
        out = parser.tokens(batch.column(cols["output"]), "output", row0)
        a, b = (int(x) for x in np.searchsorted(rel, [self.start_s, self.end_s], side="left"))
        if self.max_requests is not None:
            b = max(a, min(b, a + self.max_requests - self.kept))
        if b > a:
            self.parts.append((rel[a:b], inp[a:b], out[a:b], np.arange(row0 + a, row0 + b, dtype=np.int64)))
            self.kept += b - a
        self.row0 += batch.num_rows
        return bool(rel[-1] >= self.end_s or (self.max_requests is not None and self.kept >= self.max_requests))

    def workload(self, name: str, stopped: bool) -> Workload:
        if self.row0 == 0:
            self.parser.fail("no data rows (file has only a header)", 0, "timestamp")
        parts = self.parts
        cat = (lambda k, dt: np.concatenate([p[k] for p in parts]) if parts else np.empty(0, dt))
        src = {"columns": self.parser.cols, "first_timestamp": self.first_raw, "timestamp_kind": self.parser.mode,
               "rows_read": self.row0, "read_to_end": not stopped}
        if not stopped:
            src.update(rows=self.row0, trace_span_s=float(self.prev))
        return Workload(name=name, arrival_s=cat(0, np.float64), input_tokens=cat(1, np.int64),
                        output_tokens=cat(2, np.int64), trace_index=cat(3, np.int64), source=src)


def read_trace(path: str | os.PathLike, *, columns: dict | None = None, start_s: float = 0.0,
               duration_s: float | None = None, max_requests: int | None = None,
               name: str | None = None, block_tokens: int | None = None, timestamp_unit: str = "ms") -> Workload:
    """Parse + validate a CSV/Parquet trace, streaming in batches and stopping once past the window
    [start_s, start_s+duration_s) (seconds after the first row) or after max_requests kept rows. A hash-id JSONL
    file (hashtrace.is_hash_jsonl) goes to hashtrace.read_hash_trace (block_tokens: default Mooncake's 512).

    arrival_s is on the original timeline (0 = the trace's first row) and not yet rebased; rows after the
    stop point are neither read nor validated.
    """
    path = Path(path)
    if is_hash_jsonl(path):
        fields = {_ROLE_ALIASES.get(k, k): v for k, v in columns.items()} if columns else None
        return read_hash_trace(path, columns=fields, block_tokens=block_tokens or MOONCAKE_BLOCK_TOKENS,
                               timestamp_unit=timestamp_unit, start_s=start_s, duration_s=duration_s,
                               max_requests=max_requests, name=name)
    if block_tokens is not None:
        raise InputError("--block-tokens is the block size of hash-id JSONL traces; this file is CSV/Parquet",
                         file=str(path))
    if columns and HASH_ROLE in columns:
        raise InputError("--columns hash_ids= maps a field of hash-id JSONL traces; CSV/Parquet carry no hash ids",
                         file=str(path))
    parser = _Parser(path, column_mapping(columns), not _is_parquet(path))
    batches = _batches(path, parser)
    window = _Window(parser, start_s, start_s + duration_s if duration_s is not None else math.inf, max_requests)
    stopped = False
    try:
        for batch in batches:
            if batch.num_rows and window.add(batch):
                stopped = True
                break
    finally:
        if hasattr(batches, "close"):
            batches.close()
    return window.workload(name or path.stem, stopped)
