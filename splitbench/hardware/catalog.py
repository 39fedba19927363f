"""Hardware catalog: machine types with price ($/h) and provisioned power (W), from package data + user TOML.

Pure cost/energy helpers turn (machine type, machine count, wall time) into dollars and provisioned joules.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from splitbench.errors import InputError

ENV_VAR = "SPLITBENCH_HARDWARE"
REQUIRED_KEYS = ("accelerator", "accelerators", "usd_per_hour", "accelerator_power_w", "server_power_w")
OPTIONAL_KEYS = ("power_cap_fraction", "description", "source", "estimated")
ALLOWED_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS


@dataclass(frozen=True)
class MachineType:
    """One rentable machine: `accelerators` x `accelerator` at `usd_per_hour`; power figures are provisioned (TDP)."""
    name: str
    accelerator: str
    accelerators: int
    usd_per_hour: float
    accelerator_power_w: float  # per accelerator
    server_power_w: float       # whole server, provisioned
    power_cap_fraction: float | None = None
    description: str = ""
    source: str = ""
    estimated: bool = False


def packaged_catalog_path() -> Path:
    """Path of the catalog shipped with the package."""
    return Path(str(resources.files("splitbench") / "data" / "hardware.toml"))


def _key_line(text: str, name: str, key: str | None) -> int | None:
    """Best-effort 1-based line of `[name]` (key None) or of `key = ...` inside that table; None if not found."""
    header = re.compile(r"^\s*\[\s*(?:\"%s\"|'%s'|%s)\s*\]" % ((re.escape(name),) * 3))
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if header.match(ln)), None)
    if start is None:
        return None
    if key is None:
        return start + 1
    key_re = re.compile(r"^\s*(?:\"%s\"|'%s'|%s)\s*=" % ((re.escape(key),) * 3))
    for i in range(start + 1, len(lines)):
        if re.match(r"^\s*\[", lines[i]):
            break
        if key_re.match(lines[i]):
            return i + 1
    return start + 1


def _parse(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("hardware catalog file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read hardware catalog: {e}", file=str(path)) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise InputError(f"invalid TOML: {e}", file=str(path), line=int(m.group(1)) if m else None) from None


def _check_value(key: str, value: Any, where: str, fail) -> Any:
    """Validate one key's value; returns the normalised value or calls fail(message)."""
    if key in ("accelerator", "description", "source"):
        if not isinstance(value, str):
            fail(f"{where}: must be a string, got {value!r}")
        return value
    if key == "estimated":
        if not isinstance(value, bool):
            fail(f"{where}: must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(f"{where}: must be a finite number, got {value!r}")
    if key == "accelerators":
        if not isinstance(value, int) and not float(value).is_integer():
            fail(f"{where}: must be a whole number, got {value!r}")
        if value < 0:
            fail(f"{where}: must be >= 0, got {value!r}")
        return int(value)
    if key == "power_cap_fraction":
        if not 0 < value <= 1:
            fail(f"{where}: must be in (0, 1], got {value!r}")
        return float(value)
    if value < 0:
        fail(f"{where}: must be >= 0, got {value!r}")
    return float(value)


def _merge(catalog: dict[str, MachineType], path: Path, *, packaged: bool) -> dict[str, MachineType]:
    """Merge the machine types of one TOML file into `catalog` (by name); returns a new dict."""
    data, text = _parse(path)
    out = dict(catalog)
    for name, entry in data.items():
        def fail(msg: str, key: str | None = None, _name: str = name) -> None:
            raise InputError(msg, file=str(path), line=_key_line(text, _name, key))
        if not isinstance(entry, dict):
            fail(f"{name}: expected a [{name}] table of machine-type keys, got {entry!r}")
        unknown = sorted(set(entry) - set(ALLOWED_KEYS))
        if unknown:
            fail(f"{name}.{unknown[0]}: unknown key (allowed: {', '.join(ALLOWED_KEYS)})", unknown[0])
        values = {k: _check_value(k, v, f"{name}.{k}", lambda m, _k=k: fail(m, _k)) for k, v in entry.items()}
        base = out.get(name)
        if base is None:
            missing = [k for k in REQUIRED_KEYS if k not in values]
            if missing:
                fail(f"{name}: new machine type is missing required key(s) {', '.join(missing)} "
                     f"(known types: {', '.join(sorted(out)) or 'none'})")
            if packaged and not values.get("source"):
                fail(f"{name}.source: every packaged machine type must cite a source", "source")
            if not values.get("source"):
                values["source"] = f"user-defined in {path}"
            out[name] = MachineType(name=name, **values)
        else:
            if "source" not in values:
                changed = sorted(k for k in values if k not in ("description", "estimated"))
                if changed:
                    values["source"] = f"{base.source}; overridden by {path} ({', '.join(changed)})"
            out[name] = replace(base, **values)
    return out


def load_catalog(user_file: str | Path | None = None) -> dict[str, MachineType]:
    """Packaged catalog, then overrides merged by name from `user_file` (or $SPLITBENCH_HARDWARE when None).

    A user entry may override some keys of a known type or define a new type with all of REQUIRED_KEYS.
    Raises InputError (one line: file, line, key path) on unreadable/invalid TOML, unknown keys, bad values.
    """
    catalog = _merge({}, packaged_catalog_path(), packaged=True)
    if user_file is None:
        user_file = os.environ.get(ENV_VAR) or None
    if user_file is not None:
        catalog = _merge(catalog, Path(user_file), packaged=False)
    return catalog


def get_machine(name: str, catalog: dict[str, MachineType]) -> MachineType:
    """The machine type called `name`; InputError listing the known names otherwise."""
    try:
        return catalog[name]
    except KeyError:
        raise InputError(f"unknown machine type {name!r} (known: {', '.join(sorted(catalog))})") from None


def _check_usage(machines: int, wall_s: float) -> None:
    if machines < 0 or wall_s < 0 or not math.isfinite(wall_s):
        raise ValueError(f"machines and wall_s must be >= 0 and finite, got {machines}, {wall_s}")


def cost_usd(machine: MachineType, machines: int, wall_s: float) -> float:
    """Rental cost: usd_per_hour x machines x wall_s / 3600."""
    _check_usage(machines, wall_s)
    return machine.usd_per_hour * machines * wall_s / 3600.0


def provisioned_energy_j(machine: MachineType, machines: int, wall_s: float) -> float:
    """ESTIMATED energy when no GPU power was measured: provisioned server_power_w x machines x wall_s (joules).

    An upper bound (servers rarely draw their provisioned power); report it labelled as estimated.
    """
    _check_usage(machines, wall_s)
    return machine.server_power_w * machines * wall_s



# ----------------------------------------------------------------------------- allocation (run.json "hardware")

def _shares(instances: list[dict], key: str) -> dict[str, float]:
    """Units (GPUs or cores) per instance; a unit held by k instances counts 1/k for each."""
    holders: dict[int, int] = {}
    for inst in instances:
        for u in inst.get(key) or []:
            holders[u] = holders.get(u, 0) + 1
    return {inst["id"]: sum(1.0 / holders[u] for u in inst.get(key) or []) for inst in instances}


def plan_allocation(instances: list[dict], *, catalog: dict[str, MachineType], machine: str | None = None,
                    machines: float | None = None, host_cpus: int | None = None,
                    detected_machine: str | None = None, detected_machines: float | None = None) -> dict | None:
    """Which share of which machine type each instance (and so each pool) holds: run.json's "hardware".

    instances: [{"id", "pool", "gpu_ids"?, "cpu_cores"?}]. GPU instances: share = GPUs held / accelerators per
    machine; CPU-pinned instances: cores held / host cores; neither (a remote URL): `machines` whole machines
    of `machine` for the one pool. The host's share no instance holds is pool "unallocated" (idle capacity,
    still paid for). `detected_machine` x `detected_machines` (hardware.detect.host_machine) is what a GPU host
    is when `machine` is not given. Returns None when nothing says what hardware a remote URL runs on.
    """
    uses_gpus = any(i.get("gpu_ids") for i in instances)
    uses_cores = not uses_gpus and any(i.get("cpu_cores") for i in instances)
    name = machine or (detected_machine if uses_gpus else "cpu-host" if uses_cores else None)
    if machines is None and machine is None and uses_gpus:
        machines = detected_machines
    if name is None:
        if uses_gpus:
            raise InputError("cannot tell the machine type of these GPUs: give --machine (known: "
                             f"{', '.join(sorted(catalog))})")
        return None
    mt = get_machine(name, catalog)
    if uses_gpus or uses_cores:
        key = "gpu_ids" if uses_gpus else "cpu_cores"
        per_machine = mt.accelerators if uses_gpus else (host_cpus or os.cpu_count() or 1)
        if per_machine <= 0:
            raise InputError(f"machine type {name!r} has no accelerators; GPU instances need a GPU machine type")
        shares = _shares(instances, key)
        n_machines = float(machines) if machines is not None else 1.0
        alloc = [{"instance": i["id"], "pool": i.get("pool") or i.get("role") or "baseline", "machine": name,
                  "machines": shares[i["id"]] / per_machine, "units": list(i.get(key) or [])} for i in instances]
        unit, units = ("gpu" if uses_gpus else "core"), per_machine
    else:
        n_machines = float(machines) if machines is not None else 1.0
        pool = (instances[0].get("pool") if instances else None) or "remote"
        alloc = [{"instance": instances[0]["id"] if instances else "remote", "pool": pool, "machine": name,
                  "machines": n_machines, "units": []}]
        unit, units = "machine", 1
    if n_machines <= 0:
        raise InputError(f"--machines must be > 0, got {machines}")
    used = sum(a["machines"] for a in alloc)
    if used > n_machines + 1e-9:
        raise InputError(f"instances hold {used:g} machines of {name!r} but only {n_machines:g} are given")
    return {"machine": name, "machines": n_machines, "unit": unit, "units_per_machine": units,
            "types": {name: asdict(mt)}, "allocations": alloc,
            "unallocated_machines": max(0.0, n_machines - used)}


def whole_machine_allocation(instances: list[dict], catalog: dict[str, MachineType]) -> dict:
    """run.json "hardware" for clusters where every instance is one whole machine of its own type (simulated
    clusters): instances [{"id", "pool", "machine"}]; nothing unallocated."""
    types = {i["machine"]: asdict(get_machine(i["machine"], catalog)) for i in instances}
    return {"machine": instances[0]["machine"] if instances else None, "machines": float(len(instances)),
            "unit": "machine", "units_per_machine": 1, "types": types,
            "allocations": [{"instance": i["id"], "pool": i["pool"], "machine": i["machine"], "machines": 1.0,
                             "units": []} for i in instances],
            "unallocated_machines": 0.0}
