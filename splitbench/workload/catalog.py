"""Trace catalogue: named traces, the search path that finds them, their identity (sha256) and fetch.

The lowest workload module besides types: parsing (traces.py), synth.py and load.py build on it.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Callable

from splitbench.errors import InputError
from splitbench.schema.files import atomic_write_json
from splitbench.workload.download import download_checked

SHA256_MAX_BYTES = 50 * 1024 * 1024   # hash files up to this size on every load; bigger ones only on fetch
SIDECAR_SUFFIX = ".sha256.json"       # written next to a fetched file: its hash, size and mtime


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
        known = src["sha256"] != "not computed" and entry["sha256"] is not None
        src["catalog"] = name
        src["catalog_sha256"] = entry["sha256"]
        src["sha256_matches_catalog"] = src["sha256"] == entry["sha256"] if known else None
        src["sha256_verified"] = bool(entry.get("sha256_verified") and src["sha256_matches_catalog"])
    return src


# ----------------------------------------------------------------------------- fetch

def fetch_trace(name: str, *, dest: str | os.PathLike | None = None, url: str | None = None,
                progress: Callable[[int, int | None], None] | None = None, timeout_s: float = 60.0) -> dict:
    """Download catalogue trace `name` into dest (default: the user cache) via a temp file + atomic rename.

    A catalogue-verified sha256 must match (else InputError, nothing left behind); an unverified one is only
    compared and reported in the returned dict's "status" ("verified", "matches-unverified", "mismatch-unverified",
    or "unknown-sha256" for an entry without any sha256: saved, its sidecar records verified false).
    """
    entry = catalog().get(name)
    if entry is None:
        raise InputError(f"unknown trace {name!r} (known: {', '.join(catalog())})")
    dest = Path(dest) if dest else cache_dir()
    dest.mkdir(parents=True, exist_ok=True)
    url = url or entry["url"]
    target = dest / entry["file"]
    expected = entry.get("sha256")
    digest, nbytes = download_checked(url, target, timeout_s=timeout_s, progress=progress,
                                      must_match=expected if entry.get("sha256_verified") else None)
    status = ("verified" if entry.get("sha256_verified") else "unknown-sha256" if expected is None else
              "matches-unverified" if digest == expected else "mismatch-unverified")
    st = target.stat()
    atomic_write_json(target.with_name(target.name + SIDECAR_SUFFIX),
                      {"sha256": digest, "verified": status == "verified", "size_bytes": st.st_size,
                       "mtime_ns": st.st_mtime_ns, "url": url, "catalog_sha256": expected})
    return {"name": name, "path": str(target), "url": url, "bytes": nbytes, "sha256": digest,
            "expected_sha256": expected, "status": status}


def ensure_local(trace: str, trace_dir: str | os.PathLike | None = None,
                 on_status: Callable[[str], None] = lambda s: None) -> Path | None:
    """A catalogue name that is not on the search path is downloaded (sha256-verified) into the user cache;
    returns the downloaded file, or None when nothing had to be fetched (a path, a synth: spec, a local name)."""
    if trace not in catalog() or Path(trace).is_file() or find_local(trace, trace_dir) is not None:
        return None
    on_status(f"trace {trace} not found locally: downloading it")
    res = fetch_trace(trace)
    on_status(f"fetched {res['path']} ({res['status']})")
    return Path(res["path"])
