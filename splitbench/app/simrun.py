"""Simulated runs: a cluster spec + a workload -> the discrete-event simulator -> a run directory with the same
record schema as a live run (run.json `simulated: true`), so report, compare and the HTML report work unchanged.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitbench.app.options import new_run_id, workload_spec
from splitbench.errors import InputError
from splitbench.hardware.catalog import get_machine, load_catalog, whole_machine_allocation
from splitbench.metrics.slo import fit_reference, parse_slos
from splitbench.metrics.summary import summarize
from splitbench.schema.columns import write_columns
from splitbench.schema.runmeta import host_info, package_versions, write_run_meta
from splitbench.schema.summary import write_summary
from splitbench.sim.cluster import simulate
from splitbench.sim.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, SimConfig, SimPool
from splitbench.sim.perfmodel import get_perf_model, load_profiles
from splitbench.sim.profiles import find_profile, profile_hardware_name
from splitbench.sim.shapes import MODEL_SHAPES, machine_kv_capacity_tokens, shape_from_hf_config
from splitbench.sim.spread import (load_cold_prefill, load_idle_wake, load_prefill_spread, load_request_spread,
                                   load_spread)
from splitbench.workload.load import load
from splitbench.workload.types import Workload

# Splitwise's cluster designs (paper §VI): pool -> machine type; counts come from the search or the user.
DESIGNS: dict[str, list[tuple[str, str]]] = {
    "baseline-a100": [("baseline", "dgx-a100")],
    "baseline-h100": [("baseline", "dgx-h100")],
    "splitwise-aa": [("prompt", "dgx-a100"), ("token", "dgx-a100")],
    "splitwise-hh": [("prompt", "dgx-h100"), ("token", "dgx-h100")],
    "splitwise-ha": [("prompt", "dgx-h100"), ("token", "dgx-a100")],
    "splitwise-hhcap": [("prompt", "dgx-h100"), ("token", "dgx-h100-pcap")],
}
CPU_KV_CACHE_BYTES = 1 << 30   # VLLM_CPU_KVCACHE_SPACE=1 (GiB), as the live CPU clusters run


def parse_cluster(spec: str):
    """'prompt=dgx-h100:35,token=dgx-a100:35' or a design with counts, 'splitwise-ha:35,35' / 'baseline-a100:40'
    -> [SimPool]. One-line InputError naming the bad item."""
    spec = (spec or "").strip()
    name, colon, rest = spec.partition(":")
    if name.lower() in DESIGNS:
        pools = DESIGNS[name.lower()]
        try:
            counts = [int(x) for x in rest.replace("+", ",").split(",")] if colon else []
        except ValueError:
            counts = []
        if len(counts) != len(pools) or any(c < 1 for c in counts):
            raise InputError(f"--cluster {spec!r}: {name} needs {len(pools)} machine count(s) >= 1, e.g. "
                             f"{name}:{','.join(['4'] * len(pools))}")
        return [SimPool(p, m, c) for (p, m), c in zip(pools, counts)]
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        pool, eq, rhs = item.partition("=")
        machine, colon, count = rhs.partition(":")
        if not eq or not colon or pool not in ("prompt", "token", "mixed", "baseline"):
            raise InputError(f"--cluster item {item!r}: expected POOL=MACHINE:COUNT with POOL one of prompt, token, "
                             f"mixed, baseline (or a design: {', '.join(DESIGNS)} with counts)")
        try:
            n = int(count)
        except ValueError:
            n = 0
        if n < 1:
            raise InputError(f"--cluster item {item!r}: COUNT must be a whole number >= 1")
        out.append(SimPool(pool, machine.strip(), n))
    if not out:
        raise InputError("--cluster is empty (e.g. prompt=dgx-a100:2,token=dgx-a100:2 or splitwise-aa:2,2)")
    return out


@dataclass
class SimSetup:
    """What the simulator needs per machine type, built once and reused across many simulations."""
    model: str
    shape: Any                       # perfmodel.ModelShape
    perf: dict[str, Any]             # machine type -> PerfModel
    kv_capacity_tokens: dict[str, int]
    catalog: dict
    profile_path: str
    describe: dict = field(default_factory=dict)


def build_setup(machines: list[str], *, model: str = "bloom-176b", model_dir: str | None = None,
                profile: str | None = None, tensor_parallel: int | None = None, hardware_file: str | None = None,
                kv_capacity_tokens: int | None = None, memory_fraction: float = 0.9) -> SimSetup:
    catalog = load_catalog(hardware_file)
    if model_dir:
        shape = shape_from_hf_config(model_dir)
    elif model in MODEL_SHAPES:
        shape = MODEL_SHAPES[model]
    else:
        raise InputError(f"unknown model shape {model!r} (known: {', '.join(MODEL_SHAPES)}; or give --model-dir)")
    path = find_profile(profile)
    profiles = load_profiles(path, shapes={model: shape})
    perf, cap, desc = {}, {}, {}
    for name in dict.fromkeys(machines):
        mt = get_machine(name, catalog)
        tp = tensor_parallel or max(1, mt.accelerators)
        pm = get_perf_model(profiles, model, profile_hardware_name(mt), tp)
        perf[name] = pm
        if kv_capacity_tokens is not None:
            cap[name] = int(kv_capacity_tokens)
        elif mt.accelerators == 0:
            cap[name] = int(CPU_KV_CACHE_BYTES // shape.kv_bytes_per_token)
        else:
            cap[name] = machine_kv_capacity_tokens(shape, mt, memory_fraction=memory_fraction)
        desc[name] = {"profile_hardware": profile_hardware_name(mt), "tensor_parallel": tp,
                      "kv_capacity_tokens": cap[name], "perf_model": pm.describe()}
    return SimSetup(model=model, shape=shape, perf=perf, kv_capacity_tokens=cap, catalog=catalog,
                    profile_path=str(path), describe=desc)


def sim_config(pools, *, policy: str = "jsq", seed: int = 0, max_prompt_batch_tokens: int = 2048,
               kv_transfer: str = "layerwise", link_gbps: float | None = None, layers: int | None = None,
               policy_params: dict | None = None, max_decode_batch: int | None = None, first_token: str = "prefill",
               batching: str = "chunked", max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
               prefix_cache: bool = True, step_spread: tuple[float, ...] | None = None,
               prompt_chunked_prefill: bool = False, neighbour_busy_factor: float = 1.0,
               prefill_spread: tuple[float, ...] | None = None, cold_prefill_factor: float = 1.0,
               request_spread: tuple[tuple[float, ...], float] | None = None,
               idle_wake: tuple[tuple[float, float], ...] | None = None):
    kw: dict[str, Any] = dict(pools=list(pools), policy=policy, seed=seed, policy_params=dict(policy_params or {}),
                              max_prompt_batch_tokens=max_prompt_batch_tokens, kv_transfer=kv_transfer,
                              max_decode_batch=max_decode_batch, first_token=first_token, batching=batching,
                              max_num_batched_tokens=max_num_batched_tokens, prefix_cache=prefix_cache,
                              step_spread=step_spread, prompt_chunked_prefill=prompt_chunked_prefill,
                              neighbour_busy_factor=neighbour_busy_factor, prefill_spread=prefill_spread,
                              cold_prefill_factor=cold_prefill_factor, idle_wake=idle_wake)
    if request_spread is not None:
        kw["request_spread"], kw["request_spread_s"] = request_spread
    if link_gbps is not None:
        kw["link_bytes_per_s"] = link_gbps * 1e9 / 8
    if layers is not None:
        kw["layers"] = layers
    return SimConfig(**kw)


def run_sim(workload: Workload, cfg, setup: SimSetup):
    return simulate(workload, cfg, setup.perf, setup.kv_capacity_tokens, setup.shape.kv_bytes_per_token)


# ----------------------------------------------------------------------------- unloaded reference

def sim_reference(setup: SimSetup, machine: str, sizes=(64, 256, 1024, 2048, 4096, 8192), output_tokens: int = 32):
    """Splitwise's SLO reference from the simulator itself: each prompt size alone (arrivals far apart) on one
    baseline machine of `machine`, fitted exactly as `splitbench reference` fits live records. Prompt-first
    batching whatever the run's: a lone prompt as one prefill iteration is what the profile measured, so every
    batching model is judged against the same thresholds (docs/sim-models.md)."""
    n = len(sizes)
    w = Workload(name="reference-grid", arrival_s=np.arange(n) * 1000.0,
                 input_tokens=np.asarray(sizes, dtype=np.int64), output_tokens=np.full(n, output_tokens, np.int64),
                 trace_index=np.arange(n, dtype=np.int64), source={"name": "reference-grid"}, transforms={})
    res = run_sim(w, sim_config([SimPool("baseline", machine, 1)], batching="prompt-first"), setup)
    return fit_reference(res.records)


# ----------------------------------------------------------------------------- the performance model's options

PERF_MODELS = ("physical", "splitwisesim")


# options of one mode that the other ignores: (SimOptions field, its default, the flag)
PHYSICAL_ONLY = (("first_token", "prefill", "--first-token"), ("kv_transfer", "layerwise", "--kv-transfer"),
                 ("link_gbps", None, "--link-gbps"), ("max_decode_batch", None, "--max-decode-batch"),
                 ("kv_capacity_tokens", None, "--kv-capacity-tokens"), ("model_dir", None, "--model-dir"),
                 ("max_prompt_batch_tokens", 2048, "--max-prompt-batch-tokens"), ("step_spread", None, "--step-spread"),
                 ("prompt_chunked_prefill", False, "--prompt-chunked-prefill"),
                 ("neighbour_busy_factor", 1.0, "--neighbour-busy-factor"), ("cold_prefills", False, "--cold-prefills"),
                 ("request_spread", False, "--request-spread"), ("idle_wake", False, "--idle-wake"))
COMPAT_ONLY = (("max_batch_size", 512, "--max-batch-size"), ("max_batch_tokens", 2048, "--max-batch-tokens"),
               ("max_preemptions", 4, "--max-preemptions"),
               ("transfer_bandwidth_gib_per_s", 200.0, "--transfer-bandwidth-gib-per-s"))


def cold_factor(opts) -> float:
    """--cold-prefills: the cold-prefill factor of the --step-spread file (1 where it has none)."""
    if not opts.cold_prefills:
        return 1.0
    if not opts.step_spread:
        raise InputError("--cold-prefills needs --step-spread (the spread file holds the measured factor)")
    return load_cold_prefill(opts.step_spread)


def request_spread(opts) -> tuple[tuple[float, ...], float] | None:
    """--request-spread: the request quantiles and request_spread_s of the --step-spread file."""
    if not opts.request_spread:
        return None
    if not opts.step_spread:
        raise InputError("--request-spread needs --step-spread (the spread file holds the measured quantiles)")
    return load_request_spread(opts.step_spread)


def idle_wake(opts) -> tuple[tuple[float, float], ...] | None:
    """--idle-wake: the idle-wake table of the --step-spread file; InputError where it has none."""
    if not opts.idle_wake:
        return None
    if not opts.step_spread:
        raise InputError("--idle-wake needs --step-spread (the spread file holds the measured table)")
    table = load_idle_wake(opts.step_spread)
    if table is None:
        raise InputError("has no idle_wake table (a profile from before it was measured): profile again",
                         file=opts.step_spread, column="idle_wake")
    return table


def check_perf_model(opts) -> str:
    """The performance model of SimOptions `opts`; InputError for an unknown one or for an option it ignores."""
    name = opts.perf_model
    if name not in PERF_MODELS:
        raise InputError(f"--perf-model must be one of {', '.join(PERF_MODELS)}, got {name!r}")
    ignored = PHYSICAL_ONLY if name == "splitwisesim" else COMPAT_ONLY
    for field_name, default, flag in ignored:
        if getattr(opts, field_name) != default:
            raise InputError(f"{flag} does not apply to --perf-model {name}")
    return name


# ----------------------------------------------------------------------------- a simulated run directory

@dataclass
class SimOptions:
    cluster: str
    trace: str = "azure-conv-2023"
    trace_dir: str | None = None
    columns: dict | None = None
    start_s: float = 0.0
    duration_s: float | None = None
    rate_scale: float = 1.0
    max_requests: int | None = None
    max_context_tokens: int | None = None  # clip input+output as a live run clips to the server's max_model_len
    block_tokens: int | None = None        # hash-id JSONL traces: tokens per hash block
    prefix_block_tokens: int | None = None  # rescale hash blocks to this many tokens
    model: str = "bloom-176b"
    model_dir: str | None = None
    profile: str | None = None
    tensor_parallel: int | None = None
    policy: str = "jsq"
    seed: int = 0
    max_prompt_batch_tokens: int = 2048
    max_decode_batch: int | None = None
    first_token: str = "prefill"            # prefill (Splitwise) | decode (vLLM P/D: the token machine streams it)
    batching: str = "chunked"               # baseline/mixed machines: chunked (vLLM V1) | prompt-first
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS   # chunked machines' token budget per iteration
    prefix_cache: bool = True               # prefix-hash workloads: per prompt machine LRU prefix cache (sim/cluster.py)
    prompt_chunked_prefill: bool = False    # prompt machines chunk prompts under max_num_batched_tokens (vLLM V1)
    step_spread: str | None = None          # a decode step spread file (sim/spread.py; `profile` writes X.spread.json)
    neighbour_busy_factor: float = 1.0      # machines sharing a host: decode-only iterations x this while one is busy
    cold_prefills: bool = False             # prefills of a token count new to a machine x the spread's cold factor
    request_spread: bool = False            # each machine's decode x a draw from the spread's request quantiles
    idle_wake: bool = False                 # a prefill on a machine that idled + the spread's idle-wake extra
    kv_transfer: str = "layerwise"
    link_gbps: float | None = None
    kv_capacity_tokens: int | None = None
    hardware_file: str | None = None
    slos: str | None = None
    # Splitwise verdict vs this machine's simulated unloaded latency; "auto": dgx-a100 when the profile has the
    # model on A100s (Splitwise's reference), else the first pool's machine; None: no verdict
    reference_machine: str | None = "auto"
    results_dir: str = "results"
    run_id: str | None = None
    fetch: bool = True
    policy_params: dict = field(default_factory=dict)
    # "physical" (default: splitbench's model) or "splitwisesim" (SplitwiseSim's own semantics, app/simcompat.py);
    # the next four are SplitwiseSim's instance and scheduler settings (start_state/*.yaml, schedulers/*.yaml)
    perf_model: str = "physical"
    max_batch_size: int = 512
    max_batch_tokens: int = 2048
    max_preemptions: int = 4
    transfer_bandwidth_gib_per_s: float = 200.0


def _physical(workload: Workload, pools: list, opts: SimOptions) -> dict:
    """The physical performance model's simulation (the default) and its run.json sections."""
    def setup_with(ref_machine):
        return build_setup([p.machine for p in pools] + ([ref_machine] if ref_machine else []), model=opts.model,
                           model_dir=opts.model_dir, profile=opts.profile, tensor_parallel=opts.tensor_parallel,
                           hardware_file=opts.hardware_file, kv_capacity_tokens=opts.kv_capacity_tokens)
    ref_machine = opts.reference_machine
    if ref_machine == "auto":
        try:
            ref_machine, setup = "dgx-a100", setup_with("dgx-a100")
        except InputError:
            ref_machine, setup = pools[0].machine, setup_with(None)
    else:
        setup = setup_with(ref_machine)
    cfg = sim_config(pools, policy=opts.policy, seed=opts.seed, policy_params=opts.policy_params, max_prompt_batch_tokens=opts.max_prompt_batch_tokens,
                     kv_transfer=opts.kv_transfer, link_gbps=opts.link_gbps, layers=setup.shape.layers,
                     max_decode_batch=opts.max_decode_batch, first_token=opts.first_token, batching=opts.batching,
                     max_num_batched_tokens=opts.max_num_batched_tokens, prefix_cache=opts.prefix_cache,
                     step_spread=load_spread(opts.step_spread) if opts.step_spread else None,
                     prefill_spread=load_prefill_spread(opts.step_spread) if opts.step_spread else None,
                     cold_prefill_factor=cold_factor(opts), request_spread=request_spread(opts),
                     idle_wake=idle_wake(opts),
                     prompt_chunked_prefill=opts.prompt_chunked_prefill,
                     neighbour_busy_factor=opts.neighbour_busy_factor)
    t = time.perf_counter()
    res = run_sim(workload, cfg, setup)
    sim_wall_s = time.perf_counter() - t
    reference = sim_reference(setup, ref_machine) if ref_machine else None
    return {"result": res, "reference": reference, "ref_machine": ref_machine, "sim_wall_s": sim_wall_s,
            "backend": {"perf_model": "physical", "sim_config": asdict(cfg), "machines": setup.describe,
                        "profile": setup.profile_path},
            "model": {"id": opts.model, "shape": asdict(setup.shape),
                      "kv_bytes_per_token": setup.shape.kv_bytes_per_token},
            "hardware": whole_machine_allocation(res.instances, setup.catalog)}


def _splitwisesim(workload: Workload, pools: list, opts: SimOptions) -> dict:
    """The SplitwiseSim-compatible mode's simulation (app/simcompat.py) and its run.json sections."""
    ref_machine = "dgx-a100" if opts.reference_machine == "auto" else opts.reference_machine
    t = time.perf_counter()
    # imported here, not at the top: the compat mode's modules took 11 ms of every default (physical) simulate
    # (-X importtime)
    from splitbench.app.simcompat import run_compat
    out = run_compat(workload, pools, opts, ref_machine)
    sim_wall_s = time.perf_counter() - t
    return {"result": out["result"], "reference": out["reference"], "ref_machine": ref_machine,
            "sim_wall_s": sim_wall_s,
            "backend": {"perf_model": "splitwisesim", "sim_config": asdict(out["config"]),
                        "machines": out["describe"]["machines"], "profile": out["describe"]["profile"]},
            "model": out["model"], "hardware": out["hardware"]}


def _fresh_run_id(results_dir: str, trace: str) -> str:
    """A new run id (time-sim-trace-pid, as live runs name theirs) that no run directory has yet: a simulation can
    take less than the second the time stamp tells apart."""
    base = run_id = new_run_id("sim", trace)
    k = 1
    while (Path(results_dir) / run_id).exists():
        k += 1
        run_id = f"{base}-{k}"
    return run_id


def simulate_run(opts: SimOptions, workload: Workload | None = None, extra_meta: dict | None = None
                 ) -> tuple[Path, dict]:
    """Simulate and write results/<run-id>/ (records.parquet, run.json, summary.json); returns (dir, summary).
    workload: simulate this one instead of opts' trace (capacity search probes); extra_meta: more run.json keys."""
    check_perf_model(opts)
    workload = load(workload_spec(opts)) if workload is None else workload
    pools = parse_cluster(opts.cluster)
    run_id = opts.run_id or _fresh_run_id(opts.results_dir, opts.trace)
    run_dir = Path(opts.results_dir) / run_id
    if run_dir.exists():
        raise InputError("run directory exists already: choose another --run-id or remove it", file=str(run_dir))
    slos = parse_slos(opts.slos) if opts.slos else None
    out = (_splitwisesim if opts.perf_model == "splitwisesim" else _physical)(workload, pools, opts)
    res, reference = out["result"], out["reference"]
    run_dir.mkdir(parents=True)
    instances = [{**i, "role": i["pool"]} for i in res.instances]
    now = time.time()
    meta = {"run_id": run_id, "status": "complete", "simulated": True,
            "created_unix_s": now, "t0_unix_s": now, "options": asdict(opts), "workload": workload.describe(),
            "backend": {"backend": "simulator", "cluster": opts.cluster, "pools": [asdict(p) for p in pools],
                        "policy": opts.policy, "instances": instances, **out["backend"], "stats": res.stats,
                        "sim_wall_s": out["sim_wall_s"]},
            "model": out["model"], "hardware": out["hardware"],
            "reference": asdict(reference) if reference is not None else None, "reference_machine": out["ref_machine"],
            "versions": package_versions(("splitbench", "numpy", "pyarrow")), "host": host_info(), **(extra_meta or {})}
    write_columns(run_dir, run_id, res.columns)
    write_run_meta(run_dir, meta)
    summary = summarize(res.columns, run_meta=meta, slos=slos, reference=reference)
    write_summary(run_dir, summary)
    return run_dir, summary
