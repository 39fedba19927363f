"""A record set as arrays (RecordColumns: one row per request, the RequestRecord fields), its Arrow table in the
records schema and a streamed records.parquet, and numpy <-> Arrow conversions that never import pandas.

pyarrow imports pandas (about 0.5 s of CPU) on the first `pa.array`, `pa.scalar` or `to_numpy` call; the
simulator's whole command is meant to take about a second, so arrays here go through raw buffers instead, and
compute kernels through `splitbench.schema.kernels` (not pyarrow.compute, which costs 0.05-0.09 s to import).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa

from splitbench.schema import kernels
from splitbench.schema.files import atomic_write_tables
from splitbench.schema.records import ARROW_SCHEMA, RECORDS_FILE, STATUSES, RequestRecord

_NP = {pa.float64(): np.float64, pa.int64(): np.int64, pa.int32(): np.int32, pa.int8(): np.int8}
PLACEMENT = ("instance", "pool", "prefill_instance", "decode_instance", "prefill_pool", "decode_pool")
TIMES = ("actual_send_s", "first_token_s", "last_token_s", "end_s")
COUNTS = ("cached_input_tokens", "session_id", "turn")   # optional whole-number columns (schema v3)
ROWS_PER_GROUP = 131072   # rows of one Parquet row group (and one block of the table build)


def np_values(arr: pa.Array) -> np.ndarray:
    """The values of a fixed-width Arrow array with no nulls, zero-copy."""
    dt = np.dtype(_NP[arr.type])
    return np.frombuffer(arr.buffers()[1], dt, count=len(arr), offset=arr.offset * dt.itemsize)


def arrow_values(values: np.ndarray, type_: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """An Arrow array of `values` (cast to the type's numpy dtype); rows where `valid` is False are null."""
    v = np.ascontiguousarray(values, dtype=_NP[type_])
    return pa.Array.from_buffers(type_, len(v), [_validity(valid), pa.py_buffer(v)],
                                 null_count=0 if valid is None else int(len(v) - np.count_nonzero(valid)))


def _validity(valid: np.ndarray | None):
    if valid is None or valid.all():
        return None
    return pa.py_buffer(np.packbits(valid.astype(bool), bitorder="little"))


def arrow_strings(values: Sequence[str | None]) -> pa.Array:
    """A string array of Python strings (None = null)."""
    enc = [b"" if v is None else v.encode() for v in values]
    offsets = np.zeros(len(enc) + 1, np.int32)
    np.cumsum(np.fromiter(map(len, enc), np.int64, len(enc)), out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), bool, len(enc))
    return pa.Array.from_buffers(pa.string(), len(enc), [_validity(valid), pa.py_buffer(offsets),
                                                         pa.py_buffer(b"".join(enc))],
                                 null_count=int(len(enc) - np.count_nonzero(valid)))


def _coded(names: pa.Array, codes: np.ndarray) -> pa.Array:
    """names[codes] as a string array; code -1 = null."""
    return kernels.take(names, arrow_values(np.maximum(codes, 0), pa.int32(), codes >= 0))


def _lists(starts: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(arrow_values(starts - starts[0], pa.int32()), arrow_values(values, type_))


def _merged_order(dicts) -> list[str]:
    """Every key, each new one placed right after the key before it in the first dict that has it (the one order
    of all rows when their orders agree)."""
    names: list[str] = []
    for d in dicts:
        at = -1
        for k in d:
            if k in names:
                at = names.index(k)
            else:
                at += 1
                names.insert(at, k)
    return names


@dataclass
class RecordColumns:
    """Rows of RequestRecord fields. None is NaN in float columns and -1 in count and code columns; record i's
    chunks are chunk_offsets_s[offsets_at[i]:offsets_at[i + 1]] and chunk_tokens[tokens_at[i]:tokens_at[i + 1]];
    strings are codes into `statuses` / `names`; a row's phases are phase_names (in order) whose value is set."""
    trace_index: np.ndarray
    intended_send_s: np.ndarray
    planned_input_tokens: np.ndarray
    planned_output_tokens: np.ndarray
    times: dict[str, np.ndarray]          # TIMES -> float64
    offsets_at: np.ndarray
    chunk_offsets_s: np.ndarray
    tokens_at: np.ndarray
    chunk_tokens: np.ndarray
    actual_input_tokens: np.ndarray
    actual_output_tokens: np.ndarray
    status: np.ndarray                    # int8 codes into statuses
    placement: dict[str, np.ndarray]      # PLACEMENT -> int32 codes into names
    phases: dict[str, np.ndarray]         # phase name -> float64, in the order rows list them
    statuses: tuple[str, ...] = STATUSES
    names: tuple[str, ...] = ()
    error: dict[int, str] = field(default_factory=dict)
    http_status: dict[int, int] = field(default_factory=dict)
    request_id: list[str] | None = None   # None: "r<trace_index>", the simulator's ids
    counts: dict[str, np.ndarray] = field(default_factory=dict)   # COUNTS -> int64, -1 = None; absent = all None

    def __len__(self) -> int:
        return len(self.trace_index)

    def request_ids(self, lo: int = 0, hi: int | None = None) -> pa.Array:
        if self.request_id is not None:
            return arrow_strings(self.request_id[lo:hi])
        ti = kernels.cast(arrow_values(self.trace_index[lo:hi], pa.int64()), pa.string())
        n = len(ti)
        fill = lambda text: pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(  # noqa: E731
            np.arange(n + 1, dtype=np.int32) * len(text)), pa.py_buffer(text.encode() * n)])
        return kernels.binary_join_element_wise(fill("r"), ti, fill(""))

    @classmethod
    def from_records(cls, records: Sequence[RequestRecord]) -> "RecordColumns":
        """The columns of a list of records (one pass in Python)."""
        n = len(records)
        f64 = lambda get: np.fromiter((np.nan if (v := get(r)) is None else v for r in records), np.float64, n)  # noqa: E731
        i64 = lambda get: np.fromiter((-1 if (v := get(r)) is None else v for r in records), np.int64, n)  # noqa: E731
        statuses = list(STATUSES) + sorted({r.status for r in records} - set(STATUSES))
        names = sorted({getattr(r, k) for r in records for k in PLACEMENT} - {None})
        code = {s: k for k, s in enumerate(names)}
        phase_names = _merged_order(r.phases_s for r in records)
        lens_o = np.fromiter((len(r.chunk_offsets_s) for r in records), np.int64, n)
        lens_t = np.fromiter((len(r.chunk_tokens) for r in records), np.int64, n)
        return cls(
            request_id=[r.request_id for r in records], trace_index=i64(lambda r: r.trace_index),
            intended_send_s=f64(lambda r: r.intended_send_s),
            planned_input_tokens=i64(lambda r: r.planned_input_tokens),
            planned_output_tokens=i64(lambda r: r.planned_output_tokens),
            times={k: f64(lambda r, k=k: getattr(r, k)) for k in TIMES},
            offsets_at=np.concatenate([[0], np.cumsum(lens_o)]),
            chunk_offsets_s=np.fromiter((v for r in records for v in r.chunk_offsets_s), np.float64, int(lens_o.sum())),
            tokens_at=np.concatenate([[0], np.cumsum(lens_t)]),
            chunk_tokens=np.fromiter((v for r in records for v in r.chunk_tokens), np.int64, int(lens_t.sum())),
            actual_input_tokens=i64(lambda r: r.actual_input_tokens),
            actual_output_tokens=i64(lambda r: r.actual_output_tokens),
            status=np.fromiter((statuses.index(r.status) for r in records), np.int8, n),
            placement={k: np.fromiter((code.get(getattr(r, k), -1) for r in records), np.int32, n)
                       for k in PLACEMENT},
            phases={p: f64(lambda r, p=p: r.phases_s.get(p)) for p in phase_names},
            statuses=tuple(statuses), names=tuple(names),
            error={i: r.error for i, r in enumerate(records) if r.error is not None},
            http_status={i: r.http_status for i, r in enumerate(records) if r.http_status is not None},
            counts={k: i64(lambda r, k=k: getattr(r, k)) for k in COUNTS})

    def records(self) -> list[RequestRecord]:
        """The rows as RequestRecords (Python values throughout)."""
        lists = {k: v.tolist() for k, v in (("trace_index", self.trace_index), ("ia", self.actual_input_tokens),
                                            ("oa", self.actual_output_tokens), ("pi", self.planned_input_tokens),
                                            ("po", self.planned_output_tokens), ("send", self.intended_send_s))}
        none = lambda v: None if v != v else v  # noqa: E731   (NaN -> None)
        times = {k: [none(v) for v in a.tolist()] for k, a in self.times.items()}
        place = {k: [None if c < 0 else self.names[c] for c in a.tolist()] for k, a in self.placement.items()}
        phases = {k: a.tolist() for k, a in self.phases.items()}
        offs, toks = self.chunk_offsets_s.tolist(), self.chunk_tokens.tolist()
        oat, tat, status = self.offsets_at.tolist(), self.tokens_at.tolist(), self.status.tolist()
        ids = self.request_id or [f"r{t}" for t in lists["trace_index"]]
        counts = {k: [None if v < 0 else v for v in a.tolist()] for k, a in self.counts.items()}
        out = []
        for i in range(len(self)):
            out.append(RequestRecord(
                request_id=ids[i], trace_index=lists["trace_index"][i],
                intended_send_s=lists["send"][i], planned_input_tokens=lists["pi"][i],
                planned_output_tokens=lists["po"][i], **{k: v[i] for k, v in times.items()},
                chunk_offsets_s=offs[oat[i]:oat[i + 1]], chunk_tokens=toks[tat[i]:tat[i + 1]],
                actual_input_tokens=None if lists["ia"][i] < 0 else lists["ia"][i],
                actual_output_tokens=None if lists["oa"][i] < 0 else lists["oa"][i],
                status=self.statuses[status[i]], error=self.error.get(i), http_status=self.http_status.get(i),
                **{k: v[i] for k, v in place.items()},
                phases_s={k: v[i] for k, v in phases.items() if v[i] == v[i]},
                **{k: v[i] for k, v in counts.items()}))
        return out

    def table(self, run_id: str, lo: int = 0, hi: int | None = None) -> pa.Table:
        """Rows [lo, hi) as a table of the records schema."""
        hi = len(self) if hi is None else hi
        n, s = hi - lo, slice(lo, hi)
        times = {k: arrow_values(a[s], pa.float64(), a[s] == a[s]) for k, a in self.times.items()}
        names = arrow_strings(list(self.names))
        cols = {
            "run_id": kernels.take(arrow_strings([run_id]), arrow_values(np.zeros(n), pa.int32())),
            "request_id": self.request_ids(lo, hi),
            "trace_index": arrow_values(self.trace_index[s], pa.int64()),
            "intended_send_s": arrow_values(self.intended_send_s[s], pa.float64()),
            "planned_input_tokens": arrow_values(self.planned_input_tokens[s], pa.int64()),
            "planned_output_tokens": arrow_values(self.planned_output_tokens[s], pa.int64()), **times,
            "chunk_offsets_s": _lists(self.offsets_at[lo:hi + 1],
                                      self.chunk_offsets_s[self.offsets_at[lo]:self.offsets_at[hi]], pa.float64()),
            "chunk_tokens": _lists(self.tokens_at[lo:hi + 1],
                                   self.chunk_tokens[self.tokens_at[lo]:self.tokens_at[hi]], pa.int32()),
            "actual_input_tokens": arrow_values(self.actual_input_tokens[s], pa.int64(),
                                                self.actual_input_tokens[s] >= 0),
            "actual_output_tokens": arrow_values(self.actual_output_tokens[s], pa.int64(),
                                                 self.actual_output_tokens[s] >= 0),
            "status": _coded(arrow_strings(list(self.statuses)), self.status[s].astype(np.int32)),
            "error": arrow_strings([self.error.get(i) for i in range(lo, hi)] if self.error else [None] * n),
            "http_status": arrow_values(np.array([self.http_status.get(i, 0) for i in range(lo, hi)]), pa.int32(),
                                        np.array([i in self.http_status for i in range(lo, hi)], bool))
            if self.http_status else arrow_values(np.zeros(n), pa.int32(), np.zeros(n, bool)),
            **{k: _coded(names, a[s]) for k, a in self.placement.items()},
            "phases_s": self._phases(lo, hi),
            **{k: self._count(k, s, n) for k in COUNTS},
        }
        return pa.Table.from_arrays([cols[c] for c in ARROW_SCHEMA.names], schema=ARROW_SCHEMA)

    def _count(self, name: str, s: slice, n: int) -> pa.Array:
        """One COUNTS column of rows s (nulls where -1, all nulls when the column was never set)."""
        a = self.counts.get(name)
        return pa.nulls(n, pa.int64()) if a is None else arrow_values(a[s], pa.int64(), a[s] >= 0)

    def _phases(self, lo: int, hi: int) -> pa.Array:
        """The phases map column: per row, the set phases in phase_names order."""
        keys = list(self.phases)
        if not keys:
            return pa.MapArray.from_arrays(arrow_values(np.zeros(hi - lo + 1), pa.int32()),
                                           arrow_strings([]), arrow_values(np.zeros(0), pa.float64()))
        vals = np.stack([self.phases[k][lo:hi] for k in keys], axis=1)   # rows x keys
        has = vals == vals
        offsets = np.zeros(hi - lo + 1, np.int64)
        np.cumsum(has.sum(axis=1), out=offsets[1:])
        key_codes = np.broadcast_to(np.arange(len(keys), dtype=np.int32), has.shape)[has]
        return pa.MapArray.from_arrays(arrow_values(offsets, pa.int32()), _coded(arrow_strings(keys), key_codes),
                                       arrow_values(vals[has], pa.float64()))

    def tables(self, run_id: str, rows: int = ROWS_PER_GROUP) -> Iterator[pa.Table]:
        for lo in range(0, max(len(self), 1), rows):
            yield self.table(run_id, lo, min(lo + rows, len(self)))


def write_columns(run_dir: str | os.PathLike, run_id: str, cols: RecordColumns) -> Path:
    """records.parquet of a whole column set, streamed by row group (zstd, written atomically)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RECORDS_FILE
    atomic_write_tables(path, ARROW_SCHEMA, cols.tables(run_id))
    return path
