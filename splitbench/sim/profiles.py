"""Profile CSV files in SplitwiseSim's format: where they are found, validated reading, writing, the sha256-checked
fetch of perf_model.csv, and the measuring grid.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import math
import os
from pathlib import Path

from splitbench.errors import InputError
from splitbench.hardware.catalog import ENV_VAR as HARDWARE_ENV_VAR
from splitbench.hardware.catalog import MachineType, get_machine, load_catalog
from splitbench.workload.download import download_checked

PROFILE_FILE = "perf_model.csv"
PROFILE_URL = ("https://raw.githubusercontent.com/Mutinifni/splitwise-sim/"
               "8f99e7dc9b407f4ce2488d03dd44c0b8b946dab0/data/perf_model.csv")
PROFILE_SHA256 = "dbbe505d1d64fc4bd1ec03c50edf944643586de4f68a81e94cbd55dd5bdfbf41"
ENV_VAR = "SPLITBENCH_PROFILE_DIR"
COLUMNS = ("model", "hardware", "prompt_size", "batch_size", "token_size", "peak_power", "average_power",
           "prompt_time", "token_time", "e2e_time", "tensor_parallel")
REQUIRED = ("model", "hardware", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time",
            "e2e_time", "tensor_parallel")

COUNT_COLUMNS = ("prompt_size", "batch_size", "token_size", "tensor_parallel")   # whole numbers >= 1
TIME_MINIMUMS = (("prompt_time", 1e-9), ("token_time", 0), ("e2e_time", 1e-9))  # finite ms >= these

DEFAULT_PROMPT_SIZES = (32, 128, 512, 2048)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
DEFAULT_OUTPUT_SIZES = (16, 64, 256)


# ----------------------------------------------------------------------------- reading

def _num(value: str, col: str, path: str, line: int, *, integer: bool, minimum: float) -> float:
    try:
        v = float(value)
    except ValueError:
        raise InputError(f"not a number: {value!r}", file=path, line=line, column=col) from None
    if not math.isfinite(v) or v < minimum or (integer and v != int(v)):
        kind = "a whole number" if integer else "a finite number"
        raise InputError(f"must be {kind} >= {minimum:g}, got {value!r}", file=path, line=line, column=col)
    return int(v) if integer else v


def _plain_row(rec: list[str], idx: dict[str, int], line: int) -> dict:
    """A row whose fields are plain (names, whole numbers, finite times in range); ValueError otherwise. The fast
    path of read_profile_rows (SplitwiseSim's 1,260-row profile: 8.8 -> 6.1 ms, against a checked call per field)."""
    row = {"line": line, "model": rec[idx["model"]].strip(), "hardware": rec[idx["hardware"]].strip()}
    if not row["model"] or not row["hardware"]:
        raise ValueError
    for c in COUNT_COLUMNS:
        v = row[c] = int(rec[idx[c]])
        if v < 1:
            raise ValueError
    for c, lo in TIME_MINIMUMS:
        v = row[c] = float(rec[idx[c]])
        if not lo <= v < math.inf:
            raise ValueError
    return row


def _checked_row(rec: list[str], idx: dict[str, int], p: str, line: int) -> dict:
    """A row checked field by field: InputError names the first bad field."""
    row = {"line": line}
    for c in ("model", "hardware"):
        row[c] = rec[idx[c]].strip()
        if not row[c]:
            raise InputError("empty value", file=p, line=line, column=c)
    for c in COUNT_COLUMNS:
        row[c] = _num(rec[idx[c]], c, p, line, integer=True, minimum=1)
    for c, lo in TIME_MINIMUMS:
        row[c] = _num(rec[idx[c]], c, p, line, integer=False, minimum=lo)
    return row


def read_profile_rows(path: str | os.PathLike) -> list[dict]:
    """Validated rows of a profile CSV (times in ms as in the file); InputError names file, line and column."""
    p = str(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise InputError(f"cannot read profile: {e.strerror or e}", file=p) from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise InputError("empty file: no header line", file=p, line=1)
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise InputError(f"missing column(s) {', '.join(missing)} (header has: {', '.join(header)})",
                             file=p, line=1, column=missing[0])
        idx = {c: header.index(c) for c in REQUIRED}
        rows = []
        for rec in reader:
            line = reader.line_num
            if not rec or (not rec[0].strip() and all(not x.strip() for x in rec)):
                continue
            if len(rec) != len(header):
                raise InputError(f"expected {len(header)} fields, got {len(rec)}", file=p, line=line)
            try:
                rows.append(_plain_row(rec, idx, line))
            except ValueError:   # anything unusual: the field-by-field check, which names what is wrong
                rows.append(_checked_row(rec, idx, p, line))
    if not rows:
        raise InputError("no data rows (file has only a header)", file=p, line=2)
    return rows


# ----------------------------------------------------------------------------- finding

def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def profile_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitbench" / "profiles"


def profile_search_path() -> list[Path]:
    """$SPLITBENCH_PROFILE_DIR (os.pathsep-separated), ../shared/profiles (from the CWD), the user cache."""
    dirs = [Path(x) for x in os.environ.get(ENV_VAR, "").split(os.pathsep) if x]
    return dirs + [Path("..") / "shared" / "profiles", profile_cache_dir()]


def find_profile(path: str | os.PathLike | None = None) -> Path:
    """An explicit profile file, else the first perf_model.csv along profile_search_path()."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError("profile file not found", file=str(p))
        return p
    for d in profile_search_path():
        if (d / PROFILE_FILE).is_file():
            return d / PROFILE_FILE
    where = ", ".join(str(d) for d in profile_search_path())
    raise InputError(f"no {PROFILE_FILE} found (searched {where}); run `splitbench profiles fetch`")


def cpu_profile_hardware(hardware: str) -> bool:
    """A profile `hardware` that names a CPU machine of the catalog (profile_hardware_name gives CPU machines their
    own name, GPUs their accelerator's)."""
    return hardware in _cpu_machines(os.environ.get(HARDWARE_ENV_VAR) or None)


@functools.lru_cache(maxsize=8)
def _cpu_machines(user_file: str | None) -> frozenset[str]:
    """The catalog's machines without accelerators, read once per user file (1.2 ms a read, once per fitted group)."""
    return frozenset(name for name, mt in load_catalog(user_file).items() if mt.accelerators == 0)


def profile_hardware_name(machine_type: str | MachineType, catalog: dict | None = None) -> str:
    """Catalog machine -> profile `hardware`: its accelerator (+ "-pcap" when power-capped); CPU hosts: own name."""
    if isinstance(machine_type, str):
        machine_type = get_machine(machine_type, catalog if catalog is not None else load_catalog())
    if machine_type.accelerators == 0:
        return machine_type.name
    return machine_type.accelerator + ("-pcap" if machine_type.power_cap_fraction is not None else "")


# ----------------------------------------------------------------------------- fetching

def fetch_profile(dest: str | os.PathLike | None = None, url: str | None = None,
                  expected_sha256: str = PROFILE_SHA256, timeout_s: float = 60.0,
                  max_bytes: int = 64 << 20) -> dict:
    """Download SplitwiseSim's perf_model.csv into dest (default: the user cache); the sha256 must match,
    else InputError and nothing is written (temp file + atomic rename)."""
    dest = Path(dest) if dest else profile_cache_dir()
    url = url or PROFILE_URL
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / PROFILE_FILE
    digest, nbytes = download_checked(url, target, timeout_s=timeout_s, must_match=expected_sha256,
                                      max_bytes=max_bytes)
    return {"path": str(target), "url": url, "bytes": nbytes, "sha256": digest, "status": "verified"}


# ----------------------------------------------------------------------------- measuring

def _sizes(values, what: str, minimum: int) -> list[int]:
    out = []
    for v in values:
        try:
            n = int(v)
        except (TypeError, ValueError):
            raise InputError(f"--{what}: expected whole numbers, got {v!r}") from None
        if n < minimum or n != float(v):
            raise InputError(f"--{what}: every size must be a whole number >= {minimum}, got {v!r}")
        out.append(n)
    if not out:
        raise InputError(f"--{what}: give at least one size")
    return sorted(set(out))


def profile_grid(prompt_sizes, batch_sizes, output_sizes) -> list[tuple[int, int, int]]:
    """SplitwiseSim's three sweeps around the base point (middle prompt size, batch 1, middle output size):
    prompt sweep at batch 1, batch sweep at the base prompt, output sweep at the base prompt and batch 1; and a
    second batch sweep at the largest prompt size, so decode's KV cost per token is measured per batch size
    (perffit.batch_kv: batched decode reads KV faster per token than one sequence on a CPU core)."""
    ps, bs = _sizes(prompt_sizes, "prompt-sizes", 1), _sizes(batch_sizes, "batch-sizes", 1)
    ts = _sizes(output_sizes, "output-sizes", 2)
    p0, t0 = ps[len(ps) // 2], ts[len(ts) // 2]
    return sorted({(p, 1, t0) for p in ps} | {(p0, b, t0) for b in bs} | {(p0, 1, t) for t in ts}
                  | {(ps[-1], b, t0) for b in bs})


def profile_csv_bytes(rows: list[dict]) -> bytes:
    """Rows (times in ms) as SplitwiseSim-format CSV; power columns 0.0 = not recorded."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.get(c, 0.0) for c in COLUMNS])
    return buf.getvalue().encode()
