"""Simulated runs in the SplitwiseSim-compatible mode (`--perf-model splitwisesim`): its performance model per
machine type, its configuration from SimOptions, the unloaded reference, and the run.json sections it records.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from splitbench.errors import InputError
from splitbench.hardware.catalog import load_catalog, whole_machine_allocation
from splitbench.metrics.slo import fit_reference
from splitbench.sim.compat_cluster import CompatConfig, simulate_compat
from splitbench.sim.compat_perf import compat_machine, compat_model, load_splitwisesim_perf
from splitbench.sim.config import SimPool
from splitbench.sim.profiles import find_profile
from splitbench.splitwisesim_policies import compat_policy_params
from splitbench.workload.types import Workload

def compat_config(opts, pools: list[SimPool]) -> CompatConfig:
    """SimOptions -> CompatConfig (the policy named in compat vocabulary: jsq = token_jsq, mixed-pool)."""
    return CompatConfig(pools=list(pools), model=opts.model, policy=opts.policy,
                        policy_params=compat_policy_params(opts.policy, opts.policy_params), seed=opts.seed,
                        max_batch_size=opts.max_batch_size, max_batch_tokens=opts.max_batch_tokens,
                        max_preemptions=opts.max_preemptions,
                        transfer_bandwidth_gib_per_s=opts.transfer_bandwidth_gib_per_s,
                        tensor_parallel=opts.tensor_parallel)


def compat_perf(machines: list[str], model: str, profile: str | None, tensor_parallel: int | None) -> tuple[dict, dict]:
    """(machine type -> SplitwiseSimPerf, machine type -> run.json description) from the profile CSV."""
    path = find_profile(profile)
    m = compat_model(model)
    perf, desc = {}, {}
    for name in dict.fromkeys(machines):
        hw, tp, per_machine, mem_bytes = compat_machine(name, tensor_parallel)
        perf[name] = load_splitwisesim_perf(path, model, hw, tp)
        desc[name] = {"profile_hardware": hw, "tensor_parallel": tp, "instances_per_machine": per_machine,
                      "memory_bytes_per_instance": mem_bytes, "weight_bytes": m.weight_bytes,
                      "kv_capacity_tokens": (mem_bytes - m.weight_bytes) // m.kv_bytes(1),
                      "perf_model": perf[name].describe()}
    return perf, {"profile": str(path), "machines": desc}


def compat_reference(perf: dict, cfg: CompatConfig, machine: str, sizes=(64, 256, 1024, 2048, 4096, 8192),
                     output_tokens: int = 32):
    """The Splitwise SLO reference from the compat mode itself: each prompt size alone on one baseline machine."""
    n = len(sizes)
    w = Workload(name="reference-grid", arrival_s=np.arange(n) * 1000.0,
                 input_tokens=np.asarray(sizes, dtype=np.int64), output_tokens=np.full(n, output_tokens, np.int64),
                 trace_index=np.arange(n, dtype=np.int64), source={"name": "reference-grid"}, transforms={})
    one = CompatConfig(pools=[SimPool("baseline", machine, 1)], model=cfg.model, tensor_parallel=cfg.tensor_parallel,
                       max_batch_size=cfg.max_batch_size, max_batch_tokens=cfg.max_batch_tokens,
                       max_preemptions=cfg.max_preemptions)
    return fit_reference(simulate_compat(w, one, perf).records)


def run_compat(workload: Workload, pools: list[SimPool], opts, ref_machine: str | None) -> dict[str, Any]:
    """Simulate in the compat mode: the result, the reference and the run.json sections that differ from physical."""
    cfg = compat_config(opts, pools)
    machines = [p.machine for p in pools] + ([ref_machine] if ref_machine else [])
    perf, described = compat_perf(machines, opts.model, opts.profile, opts.tensor_parallel)
    res = simulate_compat(workload, cfg, perf)
    reference = compat_reference(perf, cfg, ref_machine) if ref_machine else None
    m = compat_model(opts.model)
    hardware = whole_machine_allocation(res.instances, load_catalog(opts.hardware_file))
    per = {k: v["instances_per_machine"] for k, v in described["machines"].items()}
    for a in hardware["allocations"]:
        a["machines"] = 1.0 / per[a["machine"]]
    hardware["machines"] = float(sum(a["machines"] for a in hardware["allocations"]))
    return {"result": res, "reference": reference, "config": cfg, "describe": described, "hardware": hardware,
            "model": {"id": opts.model, "splitwisesim_model": asdict(m), "kv_bytes_per_token": m.kv_bytes(1)}}
