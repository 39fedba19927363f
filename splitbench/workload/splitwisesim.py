"""SplitwiseSim's trace CSV (`request_id,request_type,application_id,arrival_timestamp,batch_size,prompt_size,
token_size`): the validated native reader, and its generate_trace.py method re-implemented (no code copied).

Generation as SplitwiseSim's generate_trace.py generate_trace_from_prompt_token_size_distributions does it, drawing
from one numpy RandomState seeded `seed` in its order: `max_requests` exponential gaps of mean 1 / rate (cumulated
into arrivals), then `max_requests` row positions for the prompt sizes and as many for the token sizes (uniform with
replacement over the lengths trace's rows, as pandas' Series.sample), then the arrivals before `end_s` kept.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np

from splitbench.errors import InputError
from splitbench.workload.traces import read_trace
from splitbench.workload.types import Workload

SPLITWISESIM_COLUMNS = ("request_id", "request_type", "application_id", "arrival_timestamp", "batch_size",
                        "prompt_size", "token_size")
GENERATIVE_LLM = 2   # request.py RequestType.GENERATIVE_LLM, the only request type SplitwiseSim runs
MAX_REQUESTS = 1_000_000   # generate_trace.py __main__: max_requests


def is_splitwisesim_csv(path: str | os.PathLike) -> bool:
    """True when the file's header is SplitwiseSim's trace header (any column order)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader([f.readline(1 << 16)]), [])
    except (OSError, UnicodeDecodeError):
        return False
    return sorted(h.strip() for h in header) == sorted(SPLITWISESIM_COLUMNS)


def _whole(value: str, col: str, path: str, line: int, minimum: int) -> int:
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v != int(v) or v < minimum:
        raise InputError(f"must be a whole number >= {minimum}, got {value!r}", file=path, line=line, column=col)
    return int(v)


def _row(rec: list[str], idx: dict[str, int], path: str, line: int) -> tuple[float, int, int]:
    """(arrival_timestamp, prompt_size, token_size) of one data row, every field checked."""
    get = {c: rec[i].strip() for c, i in idx.items()}
    _whole(get["request_id"], "request_id", path, line, 0)
    if _whole(get["request_type"], "request_type", path, line, 0) != GENERATIVE_LLM:
        raise InputError(f"request_type must be {GENERATIVE_LLM} (generative LLM, the only type SplitwiseSim runs), "
                         f"got {get['request_type']!r}", file=path, line=line, column="request_type")
    if _whole(get["application_id"], "application_id", path, line, 0) != 0:
        raise InputError(f"application_id must be 0 (SplitwiseSim's one application), got {get['application_id']!r}",
                         file=path, line=line, column="application_id")
    if _whole(get["batch_size"], "batch_size", path, line, 1) != 1:
        raise InputError(f"batch_size must be 1 (pre-batched requests are not supported), got {get['batch_size']!r}",
                         file=path, line=line, column="batch_size")
    try:
        t = float(get["arrival_timestamp"])
    except ValueError:
        t = math.nan
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"must be a finite number of seconds >= 0, got {get['arrival_timestamp']!r}", file=path,
                         line=line, column="arrival_timestamp")
    return t, _whole(get["prompt_size"], "prompt_size", path, line, 1), _whole(get["token_size"], "token_size",
                                                                                path, line, 1)


def read_splitwisesim_trace(path: str | os.PathLike, name: str | None = None) -> Workload:
    """Every row of a SplitwiseSim trace CSV as a Workload: arrival_s on the trace's timeline from its first row
    (source first_arrival_s keeps the offset), prompt_size -> input, token_size -> output, trace_index = data row.
    One-line InputError naming file, line and column for the first bad field or an arrival earlier than the last."""
    p = str(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"cannot read trace: {e.strerror or e}", file=p) from None
    with f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in SPLITWISESIM_COLUMNS if c not in header]
        if missing:
            raise InputError(f"not a SplitwiseSim trace: missing column(s) {', '.join(missing)}", file=p, line=1,
                             column=missing[0])
        idx = {c: header.index(c) for c in SPLITWISESIM_COLUMNS}
        times, ins, outs, prev = [], [], [], -math.inf
        for rec in reader:
            line = reader.line_num
            if not rec or all(not x.strip() for x in rec):
                continue
            if len(rec) != len(header):
                raise InputError(f"expected {len(header)} fields, got {len(rec)}", file=p, line=line)
            t, n_in, n_out = _row(rec, idx, p, line)
            if t < prev:
                raise InputError(f"arrivals not sorted: {rec[idx['arrival_timestamp']]!r} is earlier than the row "
                                 "before", file=p, line=line, column="arrival_timestamp")
            prev = t
            times.append(t)
            ins.append(n_in)
            outs.append(n_out)
    if not times:
        raise InputError("no data rows (file has only a header)", file=p, line=2)
    arr = np.asarray(times, dtype=np.float64)
    source = {"format": "splitwisesim",
              "columns": {"timestamp": "arrival_timestamp", "input": "prompt_size", "output": "token_size"},
              "first_arrival_s": float(arr[0]), "rows": len(times), "trace_span_s": float(arr[-1] - arr[0]),
              "read_to_end": True}
    return Workload(name=name or Path(p).stem, arrival_s=arr - arr[0], input_tokens=np.asarray(ins, dtype=np.int64),
                    output_tokens=np.asarray(outs, dtype=np.int64), trace_index=np.arange(len(times), dtype=np.int64),
                    source=source)


def generate_splitwisesim_trace(lengths: str | os.PathLike, rate_rps: float, end_s: float | None, *, seed: int = 0,
                                max_requests: int = MAX_REQUESTS, columns: dict | None = None) -> dict[str, np.ndarray]:
    """SplitwiseSim's generate_trace.py method (module docstring) on a lengths trace (default columns
    ContextTokens -> prompt_size, GeneratedTokens -> token_size): the trace's columns as arrays."""
    if not (rate_rps > 0 and math.isfinite(rate_rps)):
        raise InputError(f"rate must be > 0 requests/s, got {rate_rps}")
    if max_requests < 1:
        raise InputError(f"max_requests must be >= 1, got {max_requests}")
    src = read_trace(lengths, columns=columns)
    rs = np.random.RandomState(seed)
    arrivals = np.cumsum(rs.standard_exponential(max_requests) * (1.0 / rate_rps))
    prompt = src.input_tokens[rs.randint(0, len(src), size=max_requests)]
    token = src.output_tokens[rs.randint(0, len(src), size=max_requests)]
    n = max_requests if end_s is None else int(np.searchsorted(arrivals, end_s, side="left"))
    ones = np.ones(n, dtype=np.int64)
    return {"request_id": np.arange(n, dtype=np.int64), "request_type": ones * GENERATIVE_LLM,
            "application_id": ones * 0, "arrival_timestamp": arrivals[:n], "batch_size": ones,
            "prompt_size": prompt[:n].astype(np.int64), "token_size": token[:n].astype(np.int64)}


def write_splitwisesim_trace(path: str | os.PathLike, trace: dict[str, np.ndarray]) -> Path:
    """A generated trace as SplitwiseSim's CSV (floats in shortest round-trip form, as pandas writes them)."""
    path = Path(path)
    cols = [trace[c].tolist() for c in SPLITWISESIM_COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(SPLITWISESIM_COLUMNS)
        w.writerows(zip(*cols))
    return path
