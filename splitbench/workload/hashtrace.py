"""Prefix-hash JSONL traces (Mooncake FAST'25, Qwen-Bailian and the like): one request per line with its prompt's
block hash ids; validated line by line (one-line InputError naming file, line and field), streamed to the window.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from splitbench.errors import InputError
from splitbench.workload.prefix import infer_sessions
from splitbench.workload.types import Workload

MOONCAKE_BLOCK_TOKENS = 512
HASH_FIELDS = {"timestamp": "timestamp", "input": "input_length", "output": "output_length", "hash_ids": "hash_ids"}
TIMESTAMP_UNITS = {"ms": 1e-3, "s": 1.0, "us": 1e-6}
_INT64 = (-(1 << 63), (1 << 63) - 1)


def is_hash_jsonl(path: str | os.PathLike) -> bool:
    """A .jsonl/.ndjson file, or any file whose first non-blank byte opens a JSON object."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    with open(p, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"{")


def field_mapping(columns: dict[str, str] | None) -> dict[str, str]:
    """Role -> JSON field: HASH_FIELDS (Mooncake's names) overridden by `columns` (canonical roles, see
    traces.parse_columns; `hash_ids` is a role only here)."""
    fields = dict(HASH_FIELDS)
    for role, name in (columns or {}).items():
        if role not in fields:
            raise InputError(f"unknown field role {role!r} for a hash-id JSONL trace (roles: {', '.join(fields)})")
        fields[role] = name
    return fields


class _Line:
    """Validation of one parsed line; every error names file, line and field."""

    def __init__(self, path: Path, fields: dict[str, str], block_tokens: int):
        self.path, self.fields, self.block_tokens = str(path), fields, block_tokens

    def fail(self, msg: str, line: int, role: str | None = None):
        raise InputError(msg, file=self.path, line=line, column=self.fields[role] if role else None)

    def get(self, obj: dict, role: str, line: int):
        name = self.fields[role]
        if name not in obj:
            self.fail(f"missing field {name!r} (line has: {', '.join(obj) or 'no fields'}; map fields with "
                      f"--columns {role}=FIELD)", line)
        return obj[name]

    def tokens(self, obj: dict, role: str, line: int) -> int:
        v = self.get(obj, role, line)
        whole = isinstance(v, int) or (isinstance(v, float) and math.isfinite(v) and v.is_integer())
        if isinstance(v, bool) or not whole or v < 1:
            self.fail(f"token count must be a whole number >= 1, got {v!r}", line, role)
        return int(v)

    def timestamp(self, obj: dict, line: int) -> float:
        v = self.get(obj, "timestamp", line)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(f"timestamp must be a number, got {v!r}", line, "timestamp")
        return float(v)

    def hashes(self, obj: dict, input_tokens: int, line: int) -> np.ndarray:
        v = self.get(obj, "hash_ids", line)
        if not isinstance(v, list):
            self.fail(f"hash ids must be a JSON list of integers, got {type(v).__name__}", line, "hash_ids")
        for h in v:
            if isinstance(h, bool) or not isinstance(h, int) or not _INT64[0] <= h <= _INT64[1]:
                self.fail(f"hash id {h!r} is not a 64-bit integer", line, "hash_ids")
        most = -(-input_tokens // self.block_tokens)
        if len(v) > most:
            self.fail(f"{len(v)} hash ids, but input length {input_tokens} holds at most {most} blocks of "
                      f"{self.block_tokens} tokens (wrong --block-tokens?)", line, "hash_ids")
        return np.asarray(v, dtype=np.int64)


def read_hash_trace(path: str | os.PathLike, *, columns: dict | None = None,
                    block_tokens: int = MOONCAKE_BLOCK_TOKENS, timestamp_unit: str = "ms", start_s: float = 0.0,
                    duration_s: float | None = None, max_requests: int | None = None,
                    name: str | None = None) -> Workload:
    """Parse + validate a hash-id JSONL trace up to the end of the window [start_s, start_s+duration_s) (seconds
    after the first line) or max_requests kept lines; arrival_s on the original timeline, not yet rebased.

    Sessions are inferred (prefix.infer_sessions) over every line read, so turns before the window count.
    Accepted: fewer hash ids than ceil(input/block) (the rest of the prompt is unique); rejected: more.
    """
    path = Path(path)
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise InputError(f"--block-tokens must be a whole number >= 1, got {block_tokens!r}")
    if timestamp_unit not in TIMESTAMP_UNITS:
        raise InputError(f"timestamp unit must be one of {', '.join(TIMESTAMP_UNITS)}, got {timestamp_unit!r}")
    chk = _Line(path, field_mapping(columns), block_tokens)
    scale = TIMESTAMP_UNITS[timestamp_unit]
    end_s = start_s + duration_s if duration_s is not None else math.inf
    rows: list[tuple] = []
    t0 = prev = None
    kept, stopped, first_line = 0, False, None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                chk.fail(f"not valid JSON ({e.msg} at column {e.colno})", line_no)
            if not isinstance(obj, dict):
                chk.fail(f"expected a JSON object per line, got {type(obj).__name__}", line_no)
            t = chk.timestamp(obj, line_no)
            if t0 is None:
                t0, first_line = t, line_no
            rel = (t - t0) * scale
            if rel >= end_s or (max_requests is not None and kept >= max_requests):
                stopped = True
                break
            if prev is not None and t < prev:
                chk.fail(f"timestamps not sorted: {obj[chk.fields['timestamp']]!r} is earlier than the line before",
                         line_no, "timestamp")
            prev = t
            inp = chk.tokens(obj, "input", line_no)
            out = chk.tokens(obj, "output", line_no)
            rows.append((rel, inp, out, chk.hashes(obj, inp, line_no), len(rows)))
            kept += rel >= start_s
    if t0 is None:
        raise InputError("no data lines (empty file)", file=str(path))
    return _workload(rows, start_s, name or path.stem, block_tokens, {
        "format": "hash-jsonl", "fields": chk.fields, "block_tokens": block_tokens, "timestamp_unit": timestamp_unit,
        "first_line": first_line, "rows_read": len(rows), "read_to_end": not stopped,
        **({} if stopped else {"rows": len(rows), "trace_span_s": float(rows[-1][0])})})


def _workload(rows: list[tuple], start_s: float, name: str, block_tokens: int, source: dict) -> Workload:
    """Workload of the rows from start_s on, with sessions inferred over all rows read."""
    arrival = np.fromiter((r[0] for r in rows), np.float64, len(rows))
    hashes = [r[3] for r in rows]
    full = Workload(name=name, arrival_s=arrival, input_tokens=np.fromiter((r[1] for r in rows), np.int64, len(rows)),
                    output_tokens=np.fromiter((r[2] for r in rows), np.int64, len(rows)),
                    trace_index=np.arange(len(rows), dtype=np.int64), source=source, prefix_hashes=hashes,
                    block_tokens=block_tokens)
    full.session_id, full.turn = infer_sessions(full)
    a = int(np.searchsorted(arrival, start_s, side="left"))
    if a == 0:
        return full
    return Workload(name=name, arrival_s=arrival[a:], input_tokens=full.input_tokens[a:],
                    output_tokens=full.output_tokens[a:], trace_index=full.trace_index[a:], source=source,
                    prefix_hashes=hashes[a:], block_tokens=block_tokens, session_id=full.session_id[a:],
                    turn=full.turn[a:])
