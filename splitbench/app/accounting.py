"""Run-level hardware accounting: which share of which catalog machine each instance holds (run.json "hardware"),
the NVML power sampler of a run, and measured energy per pool from its samples.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from splitbench.errors import InputError
from splitbench.hardware.catalog import get_machine, load_catalog, plan_allocation
from splitbench.hardware.detect import host_machine
from splitbench.hardware.energy import attribute_energy, energy_by_gpu, load_power_samples
from splitbench.hardware.power import PowerSamplerProcess, detect_gpus
from splitbench.metrics.latency import window_s


def backend_instances(desc: dict) -> list[dict]:
    """The serving instances a backend description names: [{"id", "pool", "gpu_ids", "cpu_cores"}]."""
    if desc.get("instances"):
        return [{"id": i["id"], "pool": i.get("pool") or i.get("role"), "gpu_ids": i.get("gpu_ids"),
                 "cpu_cores": i.get("cpu_cores"),
                 **({k: i.get(k) for k in ("external", "machine", "machines")} if i.get("external") else {})}
                for i in desc["instances"]]
    if desc.get("backend") == "stub":
        return [{"id": "stub", "pool": "baseline", "cpu_cores": [desc["cpu"]] if desc.get("cpu") is not None
                 else None, "gpu_ids": None}]
    return [{"id": "remote", "pool": "remote", "gpu_ids": None, "cpu_cores": None}]


def hardware_for(opts, instances: list[dict]) -> dict | None:
    """run.json "hardware": machine type and the share of it each instance (pool) holds."""
    catalog = load_catalog(opts.hardware_file)
    if instances and all(i.get("external") for i in instances):
        hw = external_allocation(instances, catalog, opts.machine, opts.machines)
        if hw is not None:
            hw["catalog"] = opts.hardware_file or os.environ.get("SPLITBENCH_HARDWARE") or "packaged"
        return hw
    host = None
    if any(i.get("gpu_ids") for i in instances) and opts.machine is None:
        host = host_machine(detect_gpus(), catalog)
    hw = plan_allocation(instances, catalog=catalog, machine=opts.machine, machines=opts.machines,
                         detected_machine=host.machine if host else None,
                         detected_machines=host.machines if host else None)
    if hw is not None:
        hw["catalog"] = opts.hardware_file or os.environ.get("SPLITBENCH_HARDWARE") or "packaged"
        if host is not None:
            hw["detected"] = host.describe()
    return hw


def external_allocation(instances: list[dict], catalog: dict, machine: str | None,
                        machines: float | None) -> dict | None:
    """run.json "hardware" for servers the user started: each instance holds its topology's `machines` (default
    --machines, else 1) of its `machine` (default --machine); None when no instance says what it runs on."""
    rows = [{**i, "machine": i.get("machine") or machine, "machines": i.get("machines") or machines or 1.0}
            for i in instances]
    if not any(r["machine"] for r in rows):
        return None
    missing = next((r["id"] for r in rows if not r["machine"]), None)
    if missing:
        raise InputError(f"instance {missing} has no machine type: give --machine or machine= in the topology")
    types = {r["machine"]: asdict(get_machine(r["machine"], catalog)) for r in rows}
    alloc = [{"instance": r["id"], "pool": r["pool"], "machine": r["machine"], "machines": float(r["machines"]),
              "units": []} for r in rows]
    return {"machine": rows[0]["machine"], "machines": sum(a["machines"] for a in alloc), "unit": "machine",
            "units_per_machine": 1, "types": types, "allocations": alloc, "unallocated_machines": 0.0}


def start_power(opts, instances: list[dict], run_dir: Path):
    """An NVML power sampler over the GPUs the instances hold (power auto) or all GPUs (power nvml); None if off."""
    gpus = sorted({g for i in instances for g in i.get("gpu_ids") or []})
    if opts.power == "off" or (opts.power == "auto" and not gpus):
        return None
    # 20 Hz: >= 10 Hz with margin. $SPLITBENCH_NVML_MODULE names another NVML binding (tests use a fake one).
    sampler = PowerSamplerProcess(run_dir / "power", gpus=gpus or None, interval_s=0.05,
                                  nvml_module=os.environ.get("SPLITBENCH_NVML_MODULE") or "pynvml")
    sampler.start()
    return sampler


def measured_energy(run_dir: Path, meta: dict, records) -> dict | None:
    """Energy per pool over the throughput window from run_dir/power samples; None when nothing was sampled."""
    path = run_dir / "power" / "power_samples.jsonl"
    start, end = window_s(records)
    if not path.exists() or start is None or meta.get("t0_unix_s") is None:
        return None
    samples = load_power_samples(path)
    t0 = meta["t0_unix_s"]
    per_gpu = energy_by_gpu(samples, t0 + start, t0 + end)
    if not per_gpu:
        return None
    att = attribute_energy(per_gpu, backend_instances(meta.get("backend") or {}))
    pools = {p: v["energy_j"] for p, v in att["pools"].items()}
    if att["unattributed"]["energy_j"]:
        pools["unallocated"] = pools.get("unallocated", 0.0) + att["unattributed"]["energy_j"]
    return {"method": "measured-nvml", "pools": pools, "total_energy_j": att["total_energy_j"],
            "coverage": min(v.get("coverage", 1.0) for v in per_gpu.values()),
            "note": "MEASURED: GPU energy from NVML (GPUs only; CPU, memory, network not included)",
            "gpus": {str(g): v for g, v in per_gpu.items()}}
