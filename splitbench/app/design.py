"""Cluster design search on the simulator: for Splitwise's designs, enumerate prompt/token machine counts within an
iso-power or iso-cost budget, find each configuration's highest Poisson arrival rate meeting all nine Splitwise SLOs
(binary search), in parallel across cores; then pick the best per design by throughput, cost or power.
"""
from __future__ import annotations

import importlib
import math
import os
from dataclasses import asdict, dataclass, field

from splitbench.app.simrun import DESIGNS, build_setup, run_sim, sim_config, sim_reference
from splitbench.errors import InputError
from splitbench.hardware.catalog import load_catalog
from splitbench.metrics.latency import throughput_section
from splitbench.metrics.slo import splitwise_verdict
from splitbench.sim.config import BATCHINGS, DEFAULT_MAX_NUM_BATCHED_TOKENS, SimPool
from splitbench.workload.load import WorkloadSpec, load

OBJECTIVES = ("throughput", "cost", "power")
BUDGETS = ("iso-power", "iso-cost")


@dataclass
class DesignSpec:
    trace: str = "azure-conv-2023"
    designs: list[str] = field(default_factory=lambda: list(DESIGNS))
    objective: str = "throughput"
    budget: str = "iso-power"
    budget_design: str = "baseline-h100"   # the budget is `budget_machines` machines of this design's machine
    budget_machines: int = 40
    target_rate_rps: float | None = None   # cost/power objectives: the rate to serve [Baseline-H100's best]
    duration_s: float = 120.0              # Poisson window simulated per rate probe
    model: str = "bloom-176b"
    profile: str | None = None
    reference_machine: str = "dgx-a100"    # SLO slowdowns are against this machine's unloaded latency
    splits: int = 10                       # prompt/token splits tried per split design
    rate_precision: float = 0.03           # stop the bisection at this relative width
    seed: int = 0
    processes: int | None = None
    hardware_file: str | None = None
    batching: str = "chunked"              # baseline designs' machines: chunked (vLLM V1) or prompt-first
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    ray: bool = False                      # fan the configurations out as Ray tasks (same results)
    ray_address: str | None = None         # the Ray cluster [auto]


@dataclass
class Evaluated:
    design: str
    pools: list[tuple[str, str, int]]
    machines: int
    usd_per_hour: float
    power_w: float
    max_rate_rps: float
    probes: int
    output_tokens_per_s: float | None = None
    verdict: dict | None = None


def _budget(spec: DesignSpec, catalog) -> tuple[str, float]:
    """(catalog field the budget counts, budget): budget_machines of the budget design's machine, in W or $/h."""
    key = "server_power_w" if spec.budget == "iso-power" else "usd_per_hour"
    return key, getattr(catalog[DESIGNS[spec.budget_design][0][1]], key) * spec.budget_machines


def configurations(spec: DesignSpec, catalog) -> list[tuple[str, list[tuple[str, str, int]]]]:
    """Every (design, pools) configuration within the budget, using as much of it as whole machines allow."""
    key, budget = _budget(spec, catalog)
    out = []
    for d in spec.designs:
        pools = DESIGNS[d]
        if len(pools) == 1:
            n = int(budget // getattr(catalog[pools[0][1]], key) + 1e-9)
            if n >= 1:
                out.append((d, [(pools[0][0], pools[0][1], n)]))
            continue
        (pp, pm), (tp, tm) = pools
        up, ut = getattr(catalog[pm], key), getattr(catalog[tm], key)
        max_p = int((budget - ut) // up)
        if max_p < 1:
            continue
        step = max(1, math.ceil(max_p / spec.splits))
        for p in sorted(set(range(1, max_p + 1, step)) | {max_p}):
            t = int((budget - p * up) // ut + 1e-9)
            if t >= 1:
                out.append((d, [(pp, pm, p), (tp, tm, t)]))
    return out


def grid_configurations(spec: DesignSpec, catalog) -> list[tuple[str, list[tuple[str, str, int]]]]:
    """Configurations of every size within the budget (cost/power objectives look for the smallest that serves
    the target rate): single-pool designs 1..N machines, split designs a (prompt x token) grid of ~splits^2."""
    key, budget = _budget(spec, catalog)
    out = []
    for d in spec.designs:
        pools = DESIGNS[d]
        units = [getattr(catalog[m], key) for _, m in pools]
        if len(pools) == 1:
            out += [(d, [(pools[0][0], pools[0][1], n)]) for n in range(1, int(budget // units[0] + 1e-9) + 1)]
            continue
        max_p, max_t = int((budget - units[1]) // units[0]), int((budget - units[0]) // units[1])
        sp, st = max(1, math.ceil(max_p / spec.splits)), max(1, math.ceil(max_t / spec.splits))
        for p in range(1, max_p + 1, sp):
            for t in range(1, max_t + 1, st):
                if p * units[0] + t * units[1] <= budget + 1e-9:
                    out.append((d, [(pools[0][0], pools[0][1], p), (pools[1][0], pools[1][1], t)]))
    return out


# ----------------------------------------------------------------------------- one configuration (worker)

_SETUPS: dict = {}


def _setup(spec: DesignSpec, machines: tuple[str, ...]):
    key = (machines, spec.model, spec.profile, spec.hardware_file, spec.reference_machine)
    if key not in _SETUPS:
        setup = build_setup(list(machines) + [spec.reference_machine], model=spec.model, profile=spec.profile,
                            hardware_file=spec.hardware_file)
        _SETUPS[key] = (setup, sim_reference(setup, spec.reference_machine))
    return _SETUPS[key]


def probe(spec: DesignSpec, pools: list[tuple[str, str, int]], rate_rps: float) -> tuple[bool, dict]:
    """Simulate `duration_s` of Poisson arrivals at `rate_rps` (lengths from the trace); do all nine SLOs hold?"""
    setup, ref = _setup(spec, tuple(sorted({m for _, m, _ in pools})))
    w = load(WorkloadSpec(f"synth:arrivals=poisson,rate={rate_rps:.6g},duration={spec.duration_s:g},"
                          f"lengths={spec.trace},seed={spec.seed}", fetch=False))
    cfg = sim_config([SimPool(*p) for p in pools], seed=spec.seed, layers=setup.shape.layers, batching=spec.batching,
                     max_num_batched_tokens=spec.max_num_batched_tokens)
    res = run_sim(w, cfg, setup)
    v = splitwise_verdict(res.records, ref)
    ok = v["passed"] and all(r.ok for r in res.records)
    return ok, {"verdict": v, "throughput": throughput_section(res.records)}


def max_rate(spec: DesignSpec, pools: list[tuple[str, str, int]]) -> tuple[float, int, dict | None]:
    """Highest rate meeting the SLOs: double from a per-machine guess until it fails, then bisect."""
    n = sum(c for _, _, c in pools)
    lo, hi, probes, best = 0.0, None, 0, None
    r = max(0.05, 0.25 * n)
    while hi is None:
        ok, info = probe(spec, pools, r)
        probes += 1
        if ok:
            lo, best = r, info
            r *= 2
        else:
            hi = r
        if probes > 30:
            break
    while hi is not None and hi - lo > spec.rate_precision * max(hi, 1e-9):
        mid = (lo + hi) / 2 if lo > 0 else hi / 4
        ok, info = probe(spec, pools, mid)
        probes += 1
        if ok:
            lo, best = mid, info
        else:
            hi = mid
        if lo == 0 and hi < 1e-3:
            break
    return lo, probes, best


def _evaluate(args) -> dict:
    """(spec, design, pools, rate): rate None = search the max rate; a number = one probe at that rate."""
    spec, design, pools, at_rate = args
    cat = load_catalog(spec.hardware_file)
    if at_rate is None:
        rate, probes, info = max_rate(spec, pools)
    else:
        ok, info = probe(spec, pools, at_rate)
        rate, probes = (at_rate if ok else 0.0), 1
        info = info if ok else None
    return asdict(Evaluated(
        design=design, pools=pools, machines=sum(c for _, _, c in pools),
        usd_per_hour=sum(cat[m].usd_per_hour * c for _, m, c in pools),
        power_w=sum(cat[m].server_power_w * c for _, m, c in pools), max_rate_rps=rate, probes=probes,
        output_tokens_per_s=(info or {}).get("throughput", {}).get("output_tokens_per_s"),
        verdict=(info or {}).get("verdict")))


# ----------------------------------------------------------------------------- the search

def search(spec: DesignSpec, on_status=lambda s: None) -> dict:
    """Evaluate every configuration (parallel), pick the best per design for the objective, and compare designs."""
    if spec.objective not in OBJECTIVES:
        raise InputError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {spec.objective!r}")
    if spec.budget not in BUDGETS:
        raise InputError(f"--budget must be one of {', '.join(BUDGETS)}, got {spec.budget!r}")
    if spec.batching not in BATCHINGS:
        raise InputError(f"--batching must be one of {', '.join(BATCHINGS)}, got {spec.batching!r}")
    unknown = [d for d in spec.designs + [spec.budget_design] if d not in DESIGNS]
    if unknown:
        raise InputError(f"unknown design {unknown[0]!r} (known: {', '.join(DESIGNS)})")
    cat = load_catalog(spec.hardware_file)
    configs = configurations(spec, cat)
    _setup(spec, tuple(sorted({m for _, pools in configs for _, m, _ in pools})))  # fail fast on bad profiles
    procs = spec.processes or max(1, len(os.sched_getaffinity(0)))

    def run_all(jobs):
        if spec.ray:   # servers/ray_launcher.py is the only module that imports ray: only for --ray
            return importlib.import_module("splitbench.servers.ray_launcher").ray_map(_evaluate, jobs,
                                                                                      spec.ray_address)
        if procs > 1:
            # imported here: concurrent.futures.process (multiprocessing, socket) took 10 ms of every simulate
            # (-X importtime)
            from concurrent.futures import ProcessPoolExecutor   # noqa: PLC0415
            with ProcessPoolExecutor(procs) as ex:
                return list(ex.map(_evaluate, jobs, chunksize=max(1, len(jobs) // (8 * procs))))
        return [_evaluate(j) for j in jobs]

    if spec.objective == "throughput":
        on_status(f"{len(configs)} configurations on {'Ray tasks' if spec.ray else f'{procs} process(es)'}: "
                  "max rate of each")
        results = run_all([(spec, d, pools, None) for d, pools in configs])
    else:
        if spec.target_rate_rps is None:   # the rate to serve: the budget design's best within the budget
            ref = [(spec, d, pools, None) for d, pools in configs if d == spec.budget_design]
            top = max(run_all(ref), key=lambda r: r["max_rate_rps"])
            spec.target_rate_rps = top["max_rate_rps"]
            on_status(f"target rate {spec.target_rate_rps:.2f} req/s ({spec.budget_design} within the budget)")
        grid = grid_configurations(spec, cat)
        on_status(f"{len(grid)} configurations on {procs} process(es): which serve {spec.target_rate_rps:.2f} req/s")
        results = run_all([(spec, d, pools, spec.target_rate_rps) for d, pools in grid])
    best = pick_best(results, spec)
    return {"kind": "splitbench.app.design", "spec": asdict(spec), "evaluated": results, "best": best,
            "ratios": design_ratios(best)}


def pick_best(results: list[dict], spec: DesignSpec) -> dict[str, dict]:
    """throughput: the configuration with the highest max rate per design. cost / power: the cheapest (or least
    provisioned power) configuration whose max rate reaches the target (default: Baseline-H100's best rate)."""
    by_design: dict[str, list[dict]] = {}
    for r in results:
        by_design.setdefault(r["design"], []).append(r)
    top = {d: max(rs, key=lambda r: (r["max_rate_rps"], -r["usd_per_hour"])) for d, rs in by_design.items()}
    if spec.objective == "throughput":
        return top
    target = spec.target_rate_rps
    key = "usd_per_hour" if spec.objective == "cost" else "power_w"
    out = {}
    for d, rs in by_design.items():
        ok = [r for r in rs if r["max_rate_rps"] >= target * (1 - spec.rate_precision)]
        if ok:
            out[d] = {**min(ok, key=lambda r: r[key]), "target_rate_rps": target}
    return out


def design_ratios(best: dict[str, dict]) -> dict:
    """Headline ratios of the Splitwise paper where both designs were evaluated."""
    def ratio(a, b, key):
        if a in best and b in best and best[b][key]:
            return best[a][key] / best[b][key]
        return None
    return {"rate_splitwise_aa_over_baseline_a100": ratio("splitwise-aa", "baseline-a100", "max_rate_rps"),
            "rate_splitwise_aa_over_baseline_h100": ratio("splitwise-aa", "baseline-h100", "max_rate_rps"),
            "rate_splitwise_hhcap_over_baseline_h100": ratio("splitwise-hhcap", "baseline-h100", "max_rate_rps"),
            "power_splitwise_hhcap_over_baseline_h100": ratio("splitwise-hhcap", "baseline-h100", "power_w"),
            "cost_splitwise_aa_over_baseline_h100": ratio("splitwise-aa", "baseline-h100", "usd_per_hour")}


def plot_design(result: dict, path: str) -> None:
    """Bars per design: max rate (req/s), $/h and provisioned kW of the best configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = result["best"]
    names = list(best)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, label, scale) in zip(axes, (("max_rate_rps", "max rate meeting SLOs (req/s)", 1),
                                              ("usd_per_hour", "cost ($/h)", 1), ("power_w", "provisioned power (kW)", 1e-3))):
        ax.bar(names, [best[n][key] * scale for n in names], color="#4c72b0")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    s = result["spec"]
    fig.suptitle(f"{s['trace']}: {s['objective']}-optimal designs, {s['budget']} budget = {s['budget_machines']} "
                 f"machines of {s['budget_design']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
