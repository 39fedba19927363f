"""Profile CSV files in SplitwiseSim's format: validated reading, sha256-checked fetch of SplitwiseSim's
perf_model.csv, and measuring a real backend (e.g. the tiny CPU model on vLLM) into one.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from splitbench.errors import InputError
from splitbench.sim.perfmodel import (COLUMNS, PROFILE_FILE, PROFILE_SHA256, PROFILE_URL, REQUIRED, profile_cache_dir,
                        profile_hardware_name)

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
            if not rec or all(not x.strip() for x in rec):
                continue
            if len(rec) != len(header):
                raise InputError(f"expected {len(header)} fields, got {len(rec)}", file=p, line=line)
            row = {"line": line}
            for c in ("model", "hardware"):
                row[c] = rec[idx[c]].strip()
                if not row[c]:
                    raise InputError("empty value", file=p, line=line, column=c)
            for c in ("prompt_size", "batch_size", "token_size", "tensor_parallel"):
                row[c] = _num(rec[idx[c]], c, p, line, integer=True, minimum=1)
            for c, lo in (("prompt_time", 1e-9), ("token_time", 0), ("e2e_time", 1e-9)):
                row[c] = _num(rec[idx[c]], c, p, line, integer=False, minimum=lo)
            rows.append(row)
    if not rows:
        raise InputError("no data rows (file has only a header)", file=p, line=2)
    return rows




# ----------------------------------------------------------------------------- fetching

def fetch_profile(dest: str | os.PathLike | None = None, url: str | None = None,
                  expected_sha256: str = PROFILE_SHA256, timeout_s: float = 60.0,
                  max_bytes: int = 64 << 20) -> dict:
    """Download SplitwiseSim's perf_model.csv into dest (default: the user cache); the sha256 must match,
    else InputError and nothing is written (temp file + atomic rename)."""
    import http.client
    import tempfile
    import urllib.error
    import urllib.request
    dest = Path(dest) if dest else profile_cache_dir()
    url = url or PROFILE_URL
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / PROFILE_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{PROFILE_FILE}.", suffix=".part", dir=dest)
    h, nbytes = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            while chunk := resp.read(1 << 20):
                nbytes += len(chunk)
                if nbytes > max_bytes:
                    raise InputError(f"download of {url} exceeds {max_bytes} bytes; nothing was saved")
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        if h.hexdigest() != expected_sha256:
            raise InputError(f"sha256 mismatch for {url}: got {h.hexdigest()}, expected {expected_sha256}; "
                             "nothing was saved")
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise InputError(f"download of {url} failed: {e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return {"path": str(target), "url": url, "bytes": nbytes, "sha256": h.hexdigest(), "status": "verified"}


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
    prompt sweep at batch 1, batch sweep at the base prompt, output sweep at the base prompt and batch 1."""
    ps, bs = _sizes(prompt_sizes, "prompt-sizes", 1), _sizes(batch_sizes, "batch-sizes", 1)
    ts = _sizes(output_sizes, "output-sizes", 2)
    p0, t0 = ps[len(ps) // 2], ts[len(ts) // 2]
    return sorted({(p, 1, t0) for p in ps} | {(p0, b, t0) for b in bs} | {(p0, 1, t) for t in ts})


def _host_hardware(machine: str | None, hardware_file: str | None) -> str:
    """Profile hardware name of this host: --machine, else the detected GPUs' DGX type, else cpu-host."""
    from splitbench.hardware.catalog import get_machine, load_catalog
    catalog = load_catalog(hardware_file)
    if machine is None:
        from splitbench.hardware.power import detect_gpus, machine_type_for_gpus
        gpus = detect_gpus()
        machine = machine_type_for_gpus(gpus) if gpus else "cpu-host"
        if machine is None:
            raise InputError(f"cannot tell the machine type of this host's GPUs: give --machine "
                             f"(known: {', '.join(sorted(catalog))})")
    return profile_hardware_name(get_machine(machine, catalog))


def profile_csv_bytes(rows: list[dict]) -> bytes:
    """Rows (times in ms) as SplitwiseSim-format CSV; power columns 0.0 = not recorded."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.get(c, 0.0) for c in COLUMNS])
    return buf.getvalue().encode()


def point_row(records, model: str, hardware: str, p: int, b: int, t: int, tp: int = 1) -> dict:
    """One CSV row from the records of b simultaneous requests (ms): prompt_time = the LAST first token of the batch
    (when the whole batch is prefilled, what SplitwiseSim's prompt_time means and the simulator uses as one prompt
    iteration for b x p tokens), token_time = mean of the requests' mean TBT, e2e_time = mean E2E."""
    from splitbench.metrics.latency import e2e_s, mean_tbt_s, output_tokens, ttft_s
    bad = [r for r in records if not r.ok]
    if bad or len(records) != b:
        why = bad[0].error or bad[0].status if bad else f"{len(records)} records"
        raise InputError(f"profile point prompt {p} batch {b} tokens {t}: {len(bad)} of {b} requests failed ({why})")
    short = [output_tokens(r) for r in records if output_tokens(r) != t]
    if short:
        raise InputError(f"profile point prompt {p} batch {b} tokens {t}: the backend returned {short[0]} "
                         f"tokens instead of {t} (it must honour min_tokens/ignore_eos)")
    mean = lambda f: float(np.mean([f(r) for r in records])) * 1e3  # noqa: E731
    return {"model": model, "hardware": hardware, "prompt_size": p, "batch_size": b, "token_size": t,
            "peak_power": 0.0, "average_power": 0.0, "prompt_time": float(max(ttft_s(r) for r in records)) * 1e3,
            "token_time": mean(mean_tbt_s),
            "e2e_time": mean(e2e_s), "tensor_parallel": tp}


def measure_profile(backend_name: str, backend_options: dict, *, out: str | os.PathLike,
                    prompt_sizes=DEFAULT_PROMPT_SIZES, batch_sizes=DEFAULT_BATCH_SIZES,
                    output_sizes=DEFAULT_OUTPUT_SIZES, repeats: int = 2, model_name: str | None = None,
                    machine: str | None = None, hardware_file: str | None = None, tensor_parallel: int = 1,
                    results_dir: str | os.PathLike = "results",
                    on_status: Callable[[str], None] = lambda s: None) -> dict:
    """Measure a backend over profile_grid() x repeats (b requests sent together, max_inflight b) and write the
    profile CSV atomically; per-point records stay under results_dir/<run id>/points/."""
    from splitbench.schema import records as R
    from splitbench.backends import get_backend
    from splitbench.client.replayer import ReplayConfig
    from splitbench.workload.types import Workload
    from splitbench.app.runner import RunOptions, _prompt_source, new_run_id, replay_workload, served_model
    grid = profile_grid(prompt_sizes, batch_sizes, output_sizes)
    if int(repeats) < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}")
    hardware = _host_hardware(machine, hardware_file)
    run_id = new_run_id(backend_name, "profile")
    run_dir = Path(results_dir) / run_id
    run_dir.mkdir(parents=True)
    backend = get_backend(backend_name, **backend_options)
    rows, index, started = [], 0, time.monotonic()
    try:
        on_status(f"starting backend {backend_name}")
        backend.start(run_dir)
        headers = backend.headers() if hasattr(backend, "headers") else {}
        info = served_model(backend.endpoint(), headers)
        served = info.get("id") or "default"
        model = model_name or (Path(served).name if "/" in served else served)
        limit = info.get("max_model_len")
        if limit and max(p + t for p, _, t in grid) > int(limit):
            raise InputError(f"profile grid needs prompt + output up to {max(p + t for p, _, t in grid)} tokens "
                             f"but the server's max_model_len is {limit}")
        prompts = _prompt_source(RunOptions(), info)
        p_max, b_max = max(p for p, _, _ in grid), max(b for _, b, _ in grid)
        p0 = next(p for p, b, _ in grid if b == b_max)
        warmup = [("warmup", p_max, 1, 8), ("warmup", p0, b_max, 8)]   # first requests are slow: not recorded
        on_status(f"warm-up, then {len(grid)} points x {repeats} repeats on {hardware}")
        plan = warmup + [(k, p, b, t) for k in range(int(repeats)) for p, b, t in grid]  # repeats outermost
        for k, p, b, t in plan:
            w = Workload(name="profile-point", arrival_s=np.zeros(b), input_tokens=np.full(b, p, np.int64),
                         output_tokens=np.full(b, t, np.int64), trace_index=np.arange(index, index + b),
                         source={"name": "profile-grid", "point": [p, b, t], "repeat": k}, transforms={})
            index += b                      # fresh token ids for every request: no prefix-cache hits
            cfg = ReplayConfig(base_url=backend.endpoint(), model=served, headers=headers, max_inflight=b,
                               timeout_s=300.0, start_delay_s=0.05)
            pdir = run_dir / "points" / f"p{p}-b{b}-t{t}-r{k}"
            pdir.mkdir(parents=True)
            replay_workload(w, prompts.payload, cfg, pdir, run_id)
            row = point_row(R.read_records(pdir), model, hardware, p, b, t, tensor_parallel)
            if k == "warmup":
                continue
            rows.append(row)
            on_status(f"prompt {p} batch {b} tokens {t} (repeat {k + 1}): TTFT {rows[-1]['prompt_time']:.1f} ms, "
                      f"TBT {rows[-1]['token_time']:.2f} ms")
        description = backend.describe()
    finally:
        backend.stop()
    R.atomic_write_bytes(out, profile_csv_bytes(rows))
    meta = {"run_id": run_id, "kind": "profile", "out": str(out), "model": model, "hardware": hardware,
            "grid": grid, "repeats": int(repeats), "backend": description, "wall_s": time.monotonic() - started,
            "versions": R.package_versions(), "host": R.host_info()}
    R.atomic_write_json(run_dir / "profile.json", meta)
    return {**meta, "rows": len(rows), "run_dir": str(run_dir)}
