"""Which catalog machine type this host is: its GPUs' NVML names and count -> a machine type and how many of it.

Pure: takes hardware.power.detect_gpus()'s list and a catalog; 8 H200s are one DGX-H200, 1 is one 1x-h200.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from splitbench.hardware.catalog import MachineType

# NVML device name -> catalog accelerator kind. SXM parts only: PCIe/NVL boards have other power and prices.
# Real names: "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB" (40GB A100s: other memory).
_NOT_SXM = re.compile(r"PCIE|\bNVL\b")
_ACCELERATORS = ((re.compile(r"\bH200\b"), "h200-141gb", 0),
                 (re.compile(r"\bH100\b"), "h100-80gb", 0),
                 (re.compile(r"\bA100\b"), "a100-80gb", 70 * 2**30))


@dataclass(frozen=True)
class HostMachine:
    """This host as catalog machines: `machines` x `machine`; `note` says when the GPU count has no exact type."""
    machine: str
    machines: float
    gpus: int
    gpu_name: str
    note: str | None = None

    def describe(self) -> dict:
        return asdict(self)


def accelerator_of(gpu: dict) -> str | None:
    """Catalog accelerator kind of one detect_gpus() entry ({"name", "memory_total_bytes"?}); None if unknown."""
    name = str(gpu.get("name", "")).upper()
    if _NOT_SXM.search(name):
        return None
    for pattern, kind, min_memory_bytes in _ACCELERATORS:
        if pattern.search(name):
            big = "80GB" in name or int(gpu.get("memory_total_bytes") or 0) >= min_memory_bytes
            return kind if big else None
    return None


def _types_of(accelerator: str, catalog: dict[str, MachineType]) -> dict[int, str]:
    """GPUs per machine -> machine type name, for the uncapped catalog types with this accelerator."""
    out: dict[int, str] = {}
    for name in sorted(catalog):
        mt = catalog[name]
        if mt.accelerator == accelerator and mt.accelerators > 0 and mt.power_cap_fraction is None:
            out.setdefault(mt.accelerators, name)
    return out


def host_machine(gpus: list[dict], catalog: dict[str, MachineType]) -> HostMachine | None:
    """The catalog machines this host's GPUs make: N GPUs -> the N-GPU type (8 -> DGX, 1 -> 1x-...), else the
    largest type whose size divides N, N / size of them (with a note). None: no GPUs, mixed or unknown models."""
    kinds = {accelerator_of(g) for g in gpus}
    if not gpus or len(kinds) != 1 or None in kinds:
        return None
    accelerator, count = kinds.pop(), len(gpus)
    sizes = _types_of(accelerator, catalog)
    fits = [k for k in sizes if count % k == 0]
    if not fits:
        return None
    size = max(fits)
    note = None
    if size != count:
        note = (f"no {count}-GPU {accelerator} machine type in the catalog: this host is costed as "
                f"{count // size} x {sizes[size]}")
    return HostMachine(sizes[size], float(count // size), count, str(gpus[0].get("name", "")), note)
