"""The client-ceiling store: per host, the open-loop rate this client sustained in `splitbench calibrate` (one JSON
file per host in the user cache), and run.json's `client` section that sets a run's peak offered rate against it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from splitbench.errors import InputError
from splitbench.metrics.fidelity import peak_rate_rps
from splitbench.schema.files import atomic_write_json
from splitbench.schema.runmeta import host_info


def host_id(host: dict | None = None) -> str:
    """A file-name-safe id of this machine: hostname + a short hash of what makes its client core what it is."""
    h = host or host_info()
    model = ""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1) if m else ""
    except OSError:
        pass
    key = f"{h.get('hostname')}|{h.get('cpu_count')}|{h.get('platform')}|{model}"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", str(h.get("hostname") or "host"))[:40]
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def store_dir() -> Path:
    """$SPLITBENCH_CACHE/calibration, else $XDG_CACHE_HOME (or ~/.cache)/splitbench/calibration."""
    base = os.environ.get("SPLITBENCH_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME")
                                                               or os.path.expanduser("~/.cache"), "splitbench")
    return Path(base) / "calibration"


def store_path() -> Path:
    return store_dir() / f"{host_id()}.json"


def load_store(path: Path | None = None) -> dict:
    """This host's calibration file ({} when there is none); InputError when it cannot be read or is not one."""
    path = path or store_path()
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"unreadable calibration file ({e}); delete it or run `splitbench calibrate` again",
                         file=str(path)) from None
    if not isinstance(data, dict) or not isinstance(data.get("ceilings", {}), dict):
        raise InputError("unreadable calibration file (not a calibration object); delete it or run "
                         "`splitbench calibrate` again", file=str(path))
    return data


def save_result(result: dict, path: Path | None = None) -> Path:
    """Store one calibration (keyed by its worker count) in this host's file, atomically."""
    path = path or store_path()
    data = load_store(path) or {"host_id": host_id(), "host": host_info(), "ceilings": {}}
    data["host"] = host_info()
    data.setdefault("ceilings", {})[str(result["workers"])] = result
    atomic_write_json(path, data)
    return path


def stored_ceiling(workers: int = 1, path: Path | None = None) -> dict | None:
    """The stored calibration for `workers` sending processes, or None."""
    return (load_store(path).get("ceilings") or {}).get(str(workers))


def client_section(arrival_s: np.ndarray, workers: int = 1, path: Path | None = None) -> dict:
    """run.json's `client`: peak offered rate vs the stored ceiling; headroom = ceiling / peak (< 1: over it).
    An unreadable store is reported in "error", never raised: the run goes on without a ceiling."""
    peak = peak_rate_rps(arrival_s) or 0.0
    try:
        cal = stored_ceiling(workers, path)
    except InputError as e:
        cal, err = None, str(e)
    else:
        err = None
    out = {"workers": workers, "peak_offered_rps": peak, "ceiling_rps": None, "headroom": None,
           "calibration": None}
    if cal:
        try:
            c = float(cal["ceiling_rps"])
        except (KeyError, TypeError, ValueError):
            out["error"] = f"stored calibration for {workers} worker(s) has no ceiling_rps; run `splitbench calibrate`"
            return out
        lags = [p["lag_p99_s"] for p in cal.get("points") or [] if p.get("lag_p99_s") is not None]
        out.update(ceiling_rps=c, headroom=(c / peak) if peak > 0 else None,
                   calibration={**{k: cal.get(k) for k in ("created_unix_s", "tokens_per_s", "cpu_s_per_request",
                                                            "workload", "path")},
                                "lag_p99_median_s": float(np.median(lags)) if lags else None})
    elif err:
        out["error"] = err
    return out
