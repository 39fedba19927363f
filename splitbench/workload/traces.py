"""Trace catalogue, name resolution through the search path, validated streaming CSV/Parquet parsing, and fetch.

`load_workload()` is the one entry point the runner calls: catalogue name, file path or `synth:` spec -> Workload.
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from splitbench.errors import InputError
from splitbench.workload.types import Workload

DEFAULT_COLUMNS = {"timestamp": "TIMESTAMP", "input": "ContextTokens", "output": "GeneratedTokens"}
ROLES = ("timestamp", "input", "output")
_ROLE_ALIASES = {"ts": "timestamp", "time": "timestamp", "in": "input", "out": "output"}
SHA256_MAX_BYTES = 50 * 1024 * 1024   # hash files up to this size on every load; bigger ones only on fetch
BLOCK_BYTES = 8 << 20                 # CSV bytes per streamed batch
SIDECAR_SUFFIX = ".sha256.json"       # written next to a fetched file: its hash, size and mtime
_NUMERIC = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")
_TZ = re.compile(r"(Z|[+-]\d\d:?\d\d)\s*$")


# ----------------------------------------------------------------------------- catalogue and search path

@lru_cache(maxsize=1)
def catalog() -> dict[str, dict]:
    """Named traces (package data `splitbench/data/trace_catalog.json`)."""
    return json.loads(resources.files("splitbench").joinpath("data/trace_catalog.json").read_text())


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitbench" / "traces"


def search_path(trace_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for named traces, in order: trace_dir, $SPLITBENCH_TRACE_DIR, ./traces,
    ../shared/traces (relative to the CWD), the user cache."""
    dirs = [Path(trace_dir)] if trace_dir else []
    dirs += [Path(p) for p in os.environ.get("SPLITBENCH_TRACE_DIR", "").split(os.pathsep) if p]
    return dirs + [Path("traces"), Path("..") / "shared" / "traces", cache_dir()]


def find_local(name: str, trace_dir: str | os.PathLike | None = None) -> Path | None:
    """First file of catalogue trace `name` along the search path, or None."""
    fname = catalog()[name]["file"]
    return next((d / fname for d in search_path(trace_dir) if (d / fname).is_file()), None)


def resolve_trace(spec: str, trace_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """(path, catalogue name or None) for an existing file path or a catalogue name."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p, next((n for n, e in catalog().items() if e["file"] == p.name), None)
    if spec not in catalog():
        raise InputError(f"unknown trace {spec!r}: not an existing file and not a catalogue name "
                         f"(known: {', '.join(catalog())}; or a synth: spec)")
    found = find_local(spec, trace_dir)
    if found is None:
        where = ", ".join(str(d) for d in search_path(trace_dir))
        raise InputError(f"trace {spec!r} is not available locally (searched {where}); "
                         f"run `splitbench traces fetch {spec}`")
    return found, spec


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
            return pc.cast(arr, target)
        except _CAST_ERRORS:
            i = _first_bad(arr, lambda a: pc.cast(a, target))
            self.fail(f"{what} {arr[i].as_py()!r}", base + i, role)

    def _no_nulls(self, arr: pa.Array, role: str, base: int) -> None:
        if arr.null_count:
            self.fail("empty value", base + int(np.argmax(arr.is_null().to_numpy(zero_copy_only=False))), role)

    def tokens(self, arr: pa.Array, role: str, base: int) -> np.ndarray:
        self._no_nulls(arr, role, base)
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
                or pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
            self.fail(f"column type {arr.type} is not numeric", None, role, line=1)
        v = self._cast(arr, pa.float64(), role, base, "non-numeric token count").to_numpy(zero_copy_only=False)
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
            return arr.cast(pa.timestamp("ns", tz=t.tz)).cast(pa.int64()).to_numpy(zero_copy_only=False)
        if self.mode == "s":
            v = self._cast(arr, pa.float64(), "timestamp", base, "unparseable timestamp (expected seconds)")
            v = v.to_numpy(zero_copy_only=False)
            if not np.isfinite(v).all():
                i = int(np.argmax(~np.isfinite(v)))
                self.fail(f"unparseable timestamp {arr[i].as_py()!r}", base + i, "timestamp")
            return v
        target = pa.timestamp("ns", tz="UTC" if self.mode == "tz" else None)
        hint = "with" if self.mode == "tz" else "without"
        ts = self._cast(arr, target, "timestamp", base, f"unparseable timestamp (expected a date-time {hint} UTC offset"
                        f" like the first row)")
        return ts.cast(pa.int64()).to_numpy(zero_copy_only=False)

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
    import pyarrow.csv as pcsv
    opts = dict(read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES),
                parse_options=pcsv.ParseOptions(invalid_row_handler=lambda row: "error"),
                convert_options=pcsv.ConvertOptions(include_columns=names, column_types={n: pa.string() for n in names},
                                                    strings_can_be_null=False, quoted_strings_can_be_null=False))
    try:
        yield from pcsv.open_csv(path, **opts)
    except pa.ArrowInvalid as e:
        msg = str(e).splitlines()[0][:200]
        raise InputError(msg, file=str(path), line=_bad_csv_line(path, ncols)) from None


def read_trace(path: str | os.PathLike, *, columns: dict | None = None, start_s: float = 0.0,
               duration_s: float | None = None, max_requests: int | None = None,
               name: str | None = None) -> Workload:
    """Parse + validate a CSV/Parquet trace, streaming in batches and stopping once past the window
    [start_s, start_s+duration_s) (seconds after the first row) or after max_requests kept rows.

    arrival_s is on the original timeline (0 = the trace's first row) and not yet rebased; rows after the
    stop point are neither read nor validated.
    """
    path = Path(path)
    cols = dict(DEFAULT_COLUMNS)
    for k, v in (columns or {}).items():
        k = _ROLE_ALIASES.get(k, k)
        if k not in ROLES:
            raise InputError(f"unknown column role {k!r} in column mapping (roles: {', '.join(ROLES)})")
        cols[k] = v
    is_csv = not _is_parquet(path)
    parser = _Parser(path, cols, is_csv)
    if is_csv:
        header = _csv_header(path)
    else:
        import pyarrow.parquet as pq
        pfile = pq.ParquetFile(path)
        header = pfile.schema_arrow.names
    if not header:
        parser.fail("empty file: no header line and no data rows", None, "timestamp", line=1)
    for role in ROLES:
        if cols[role] not in header:
            parser.fail(f"missing {role} column {cols[role]!r} (header has: {', '.join(header)}; "
                        f"map columns with --columns)", None, role, line=1)
    names = list(dict.fromkeys(cols[r] for r in ROLES))
    batches = (_csv_batches(path, names, len(header)) if is_csv
               else pfile.iter_batches(batch_size=1 << 20, columns=names))
    end_s = start_s + duration_s if duration_s is not None else math.inf
    parts, row0, kept, t0, prev, first_raw, stopped = [], 0, 0, None, None, None, False
    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        ts_col = batch.column(cols["timestamp"])
        t = parser.times(ts_col, row0)
        if t0 is None:
            t0, first_raw = t[0], str(ts_col[0].as_py())
        rel = parser.relative(t, t0)
        d = np.diff(rel, prepend=rel[0] if prev is None else prev)
        if (d < 0).any():
            i = int(np.argmax(d < 0))
            parser.fail(f"timestamps not sorted: {ts_col[i].as_py()!s} is earlier than the row before",
                        row0 + i, "timestamp")
        prev = rel[-1]
        inp = parser.tokens(batch.column(cols["input"]), "input", row0)
        out = parser.tokens(batch.column(cols["output"]), "output", row0)
        a, b = (int(x) for x in np.searchsorted(rel, [start_s, end_s], side="left"))
        if max_requests is not None:
            b = max(a, min(b, a + max_requests - kept))
        if b > a:
            parts.append((rel[a:b], inp[a:b], out[a:b], np.arange(row0 + a, row0 + b, dtype=np.int64)))
            kept += b - a
        row0 += n
        if rel[-1] >= end_s or (max_requests is not None and kept >= max_requests):
            stopped = True
            break
    if hasattr(batches, "close"):
        batches.close()
    if row0 == 0:
        parser.fail("no data rows (file has only a header)", 0, "timestamp")
    cat = (lambda k, dt: np.concatenate([p[k] for p in parts]) if parts else np.empty(0, dt))
    src = {"columns": cols, "first_timestamp": first_raw, "timestamp_kind": parser.mode, "rows_read": row0,
           "read_to_end": not stopped}
    if not stopped:
        src.update(rows=row0, trace_span_s=float(prev))
    return Workload(name=name or path.stem, arrival_s=cat(0, np.float64), input_tokens=cat(1, np.int64),
                    output_tokens=cat(2, np.int64), trace_index=cat(3, np.int64), source=src)


# ----------------------------------------------------------------------------- identity (sha256)

def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path, st: os.stat_result) -> dict | None:
    side = path.with_name(path.name + SIDECAR_SUFFIX)
    try:
        d = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    return d if d.get("size_bytes") == st.st_size and d.get("mtime_ns") == st.st_mtime_ns else None


def file_source(path: Path, name: str | None) -> dict:
    """Identity of a trace file: name, path, size, mtime, sha256 (or "not computed" for huge unfetched files)."""
    st = path.stat()
    src = {"name": name or path.name, "path": str(path.resolve()), "size_bytes": st.st_size,
           "mtime": st.st_mtime}
    side = _sidecar(path, st)
    if side:
        src["sha256"] = side["sha256"]
        src["sha256_source"] = "fetch, verified" if side.get("verified") else "fetch, computed (catalogue hash unverified)"
    elif st.st_size <= SHA256_MAX_BYTES:
        src["sha256"], src["sha256_source"] = sha256_file(path), "computed"
    else:
        src["sha256"] = "not computed"
        src["sha256_source"] = f"file over {SHA256_MAX_BYTES >> 20} MB and not fetched by splitbench; compare size+mtime"
    entry = catalog().get(name) if name else None
    if entry:
        src["catalog"] = name
        src["catalog_sha256"] = entry["sha256"]
        src["sha256_matches_catalog"] = None if src["sha256"] == "not computed" else src["sha256"] == entry["sha256"]
    return src


# ----------------------------------------------------------------------------- the entry point

def load_workload(trace: str, *, trace_dir: str | None = None, columns: dict | None = None, start_s: float = 0.0,
                  duration_s: float | None = None, rate_scale: float = 1.0, max_requests: int | None = None,
                  max_context_tokens: int | None = None) -> Workload:
    """Catalogue name, file path or `synth:...` spec -> validated, transformed Workload (arrival_s from 0).

    Raises InputError (one line: file, line, column) before anything could be sent.
    """
    from splitbench.workload.transforms import apply_transforms, check_transform_args, workload_digest
    check_transform_args(start_s=start_s, duration_s=duration_s, rate_scale=rate_scale,
                         max_requests=max_requests, max_context_tokens=max_context_tokens)
    if trace.startswith("synth:"):
        from splitbench.workload.synth import from_spec
        w = from_spec(trace, trace_dir=trace_dir)
    else:
        path, cat_name = resolve_trace(trace, trace_dir)
        if columns is None and cat_name:
            columns = catalog()[cat_name]["columns"]
        w = read_trace(path, columns=columns, start_s=start_s, duration_s=duration_s,
                       max_requests=max_requests, name=cat_name or path.stem)
        w.source.update(file_source(path, cat_name))
    w = apply_transforms(w, start_s=start_s, duration_s=duration_s, rate_scale=rate_scale,
                         max_requests=max_requests, max_context_tokens=max_context_tokens)
    w.source["workload_sha256"] = workload_digest(w)
    return w


# ----------------------------------------------------------------------------- fetch

def fetch_trace(name: str, *, dest: str | os.PathLike | None = None, url: str | None = None,
                progress: Callable[[int, int | None], None] | None = None, timeout_s: float = 60.0) -> dict:
    """Download catalogue trace `name` into dest (default: the user cache) via a temp file + atomic rename.

    A catalogue-verified sha256 must match (else InputError, nothing left behind); an unverified one is only
    compared and reported in the returned dict's "status" ("verified", "matches-unverified", "mismatch-unverified").
    """
    entry = catalog().get(name)
    if entry is None:
        raise InputError(f"unknown trace {name!r} (known: {', '.join(catalog())})")
    dest = Path(dest) if dest else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    url = url or entry["url"]
    target = dest / entry["file"]
    fd, tmp = tempfile.mkstemp(prefix=f".{entry['file']}.", suffix=".part", dir=dest)
    h, nbytes = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                nbytes += len(chunk)
                if progress:
                    progress(nbytes, total)
            f.flush()
            os.fsync(f.fileno())
        if total is not None and nbytes != total:
            raise InputError(f"download of {url} truncated: {nbytes} of {total} bytes; nothing was saved")
        digest, expected = h.hexdigest(), entry.get("sha256")
        if entry.get("sha256_verified") and digest != expected:
            raise InputError(f"sha256 mismatch for {url}: got {digest}, catalogue has {expected}; nothing was saved")
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise InputError(f"download of {url} failed: {e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    status = ("verified" if entry.get("sha256_verified") else
              "matches-unverified" if digest == expected else "mismatch-unverified")
    st = target.stat()
    from splitbench.schema.files import atomic_write_json
    atomic_write_json(target.with_name(target.name + SIDECAR_SUFFIX),
                      {"sha256": digest, "verified": status == "verified", "size_bytes": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "url": url, "catalog_sha256": expected})
    return {"name": name, "path": str(target), "url": url, "bytes": nbytes, "sha256": digest,
            "expected_sha256": expected, "status": status}
