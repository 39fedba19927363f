"""Which Ray node runs which vLLM instance: a pure `place(instances, nodes)` over resource dicts (no ray import).
CPU and GPU counts are consumed; a custom resource (or label) named after an instance's role marks preferred nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

from splitbench.errors import InputError

ROLE_RESOURCES = ("prompt", "token", "mixed", "baseline")


@dataclass(frozen=True)
class Need:
    """What one instance asks of a node."""
    id: str
    role: str
    cpus: float = 1.0
    gpus: float = 0.0


def _rank(need: Need, resources: dict[str, float], free: dict[str, float]) -> tuple:
    """Lower is better: a node named for the role, then a neutral node, then one named for another role;
    among equals the node with the most free GPUs (GPU instances) or CPUs left, so instances spread."""
    own = resources.get(need.role, 0) > 0
    other = any(resources.get(r, 0) > 0 for r in ROLE_RESOURCES if r != need.role)
    spare = free["GPU"] if need.gpus else free["CPU"]
    return (0 if own else 2 if other else 1, -spare)


def _missing(need: Need, free: dict[str, dict[str, float]]) -> str:
    """One phrase naming what no node has enough of."""
    if not free:
        return "the Ray cluster has no alive nodes"
    best_cpu = max(f["CPU"] for f in free.values())
    best_gpu = max(f["GPU"] for f in free.values())
    fit_gpu = [f for f in free.values() if f["GPU"] >= need.gpus]
    if need.gpus and not fit_gpu:
        return f"no node has {need.gpus:g} free GPU(s) (most free: {best_gpu:g})"
    if need.gpus:
        best_cpu = max(f["CPU"] for f in fit_gpu)
        return f"no node with {need.gpus:g} free GPU(s) has {need.cpus:g} free CPU(s) (most free: {best_cpu:g})"
    return f"no node has {need.cpus:g} free CPU(s) (most free: {best_cpu:g})"


def place(instances: list[Need], nodes: dict[str, dict[str, float]]) -> dict[str, str]:
    """Instance id -> node id. `nodes`: node id -> its resources (`CPU`, `GPU`, custom ones such as `prompt`).

    Greedy in instance order, deterministic (ties go to the first node in `nodes` order); an instance that fits
    nowhere is a one-line InputError naming it and what is missing."""
    free = {n: {"CPU": float(r.get("CPU", 0)), "GPU": float(r.get("GPU", 0))} for n, r in nodes.items()}
    order = {n: k for k, n in enumerate(nodes)}
    out: dict[str, str] = {}
    for need in instances:
        fits = [n for n, f in free.items() if f["CPU"] >= need.cpus and f["GPU"] >= need.gpus]
        if not fits:
            raise InputError(f"cannot place instance {need.id} (role {need.role}, {need.cpus:g} CPU, "
                             f"{need.gpus:g} GPU) on the Ray cluster: {_missing(need, free)}")
        node = min(fits, key=lambda n: (_rank(need, nodes[n], free[n]), order[n]))
        free[node]["CPU"] -= need.cpus
        free[node]["GPU"] -= need.gpus
        out[need.id] = node
    return out


def node_resources(ray_nodes: list[dict]) -> dict[str, dict[str, float]]:
    """`ray.nodes()` rows -> {node id: resources} for alive nodes; a label whose key or value is a role name counts
    as that role's resource (`ray start --labels '{"splitbench-role": "prompt"}'` marks a prompt node)."""
    out: dict[str, dict[str, float]] = {}
    for row in ray_nodes:
        if not row.get("Alive", True):
            continue
        res = {k: float(v) for k, v in (row.get("Resources") or {}).items()}
        for key, value in (row.get("Labels") or {}).items():
            for name in (key, value):
                if name in ROLE_RESOURCES:
                    res[name] = max(res.get(name, 0.0), 1.0)
        out[row["NodeID"]] = res
    return out
