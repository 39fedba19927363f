"""`splitbench simulate`, `design`, `profiles` and `profile`: the simulator and its performance profiles."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from splitbench.app.design import DesignSpec, plot_design, search
from splitbench.app.options import parse_rate_scale
from splitbench.app.simrun import SimOptions, simulate_run
from splitbench.cli.common import Opt, console, err_console, int_list, seconds_list, user_errors, with_options
from splitbench.cli.groups import FETCH, RESULTS, WORKLOAD
from splitbench.errors import InputError
from splitbench.hardware.catalog import load_catalog
from splitbench.policies import parse_policy_params
from splitbench.schema.files import atomic_write_json
from splitbench.sim.perfmodel import load_profiles
from splitbench.sim.config import DEFAULT_MAX_NUM_BATCHED_TOKENS
from splitbench.sim.profiles import fetch_profile, find_profile, profile_hardware_name
from splitbench.sim.shapes import MODEL_SHAPES, machine_kv_capacity_tokens, shape_from_hf_config
from splitbench.workload.traces import parse_columns


@user_errors
def profiles_fetch(dest: Optional[str] = typer.Option(None, "--dest", help="Directory (default: the user cache)."),
                   url: Optional[str] = typer.Option(None, "--url", help="Download from here instead (sha256 still "
                                                     "checked against SplitwiseSim's file).")):
    """Download SplitwiseSim's perf_model.csv (pinned commit), sha256-verified; nothing is kept on mismatch."""
    res = fetch_profile(dest=dest, url=url)
    console.print(f"fetched {res['path']} ({res['bytes']} bytes, sha256 {res['sha256']}, {res['status']})",
                  markup=False, highlight=False)


_KV_LABEL = {"fitted": "fit", "bandwidth": "bw", "zero:": "zero"}
BATCHING_HELP = ("Baseline/mixed machines: chunked (vLLM V1: decodes first, FCFS prefill chunks under "
                 "--max-num-batched-tokens) or prompt-first (whole prompts first, decodes wait). Prompt/token "
                 "machines are the same in both.")
BUDGET_HELP = "Chunked machines: tokens per iteration, decodes' + prefill chunks' (vLLM's max_num_batched_tokens)."


@user_errors
def profiles_list(file: Optional[str] = typer.Option(None, "--file", help="Profile CSV (default: found along "
                                                     "$SPLITBENCH_PROFILE_DIR, ../shared/profiles, the user cache)."),
                  hardware_file: Optional[str] = typer.Option(None, "--hardware", help="User hardware catalog TOML."),
                  model_dir: Optional[str] = typer.Option(None, "--model-dir", help="HF model dir whose shape "
                                                          "(named after the dir) a measured profile's model has."),
                  json_out: bool = typer.Option(False, "--json", help="Print every group's describe() as JSON.")):
    """Profile groups with their fitted figures (decode at 512 prompt + 64 generated tokens per request)."""


    path = find_profile(file)
    shapes = {}
    if model_dir:
        shape = shape_from_hf_config(model_dir)
        shapes[shape.name] = shape
    profiles = load_profiles(path, shapes=shapes)
    if json_out:
        print(json.dumps([m.describe() for m in profiles.values()], indent=2, default=str))
        return
    # per profile hardware name the machine with the most accelerators (a DGX, not its 1-GPU sibling)
    machines = {profile_hardware_name(m): m for m in sorted(load_catalog(hardware_file).values(),
                                                             key=lambda m: m.accelerators)}
    # lazy: rich.table (22M instructions) is not needed by `simulate --json`
    from rich.table import Table   # noqa: PLC0415
    table = Table("model", "hardware", "TP", "prefill ms\n512 | 2048", "decode ms\nb1 | b64", "kv us/token\n(used)",
                  "kv fitted\n(+-1 se)", "kv bw est.", "dropped\npoints", "KV tokens\nper DGX (*)")
    us = lambda v: "-" if v is None else f"{v * 1e6:.3f}"  # noqa: E731
    for (model, hw, tp), m in sorted(profiles.items()):
        d, shape, mt = m.describe(), shapes.get(model) or MODEL_SHAPES.get(model), machines.get(hw)
        ok = shape and mt and 0 < tp <= mt.accelerators
        cap = f"{machine_kv_capacity_tokens(shape, mt, tensor_parallel=tp):,}" if ok else "-"
        fit = us(d["kv_fitted_s_per_token"]) + (f" +-{us(d['kv_fitted_stderr'])}" if d["kv_fitted_stderr"] else "")
        table.add_row(model, hw, str(tp), f"{m.lone_prompt_s(512) * 1e3:.1f} | {m.lone_prompt_s(2048) * 1e3:.1f}",
                      f"{m.token_time_s(1, 576) * 1e3:.2f} | {m.token_time_s(64, 64 * 576) * 1e3:.2f}",
                      f"{us(m.kv_s_per_token)} {_KV_LABEL[d['kv_source'].split(' ')[0]]}", fit,
                      us(d["kv_bandwidth_s_per_token"]), str(len(d["dropped"])), cap)
    console.print(f"profile: {path}", markup=False, highlight=False)
    console.print(table)
    console.print("decode at 512 prompt + 64 generated tokens per request; kv: microseconds per KV token per "
                  "iteration (fit: from batch-1 e2e; bw: kv bytes / (HBM bandwidth x TP)); (*) 8 / TP instances, "
                  "each with its own weights, 90% of GPU memory; --json for every detail",
                  markup=False, highlight=False)


@user_errors
def profile(backend: str = typer.Option("vllm", help="Backend to measure: vllm (local server), splitwise (a prompt + "
                                        "token pair behind the router, KV connector active), openai (--url), stub."),
            model_dir: Optional[str] = typer.Option(None, help="--backend vllm: model dir (default: the tiny model)."),
            url: Optional[str] = typer.Option(None, help="--backend openai: base URL."),
            api_key_env: str = typer.Option("OPENAI_API_KEY", help="Env var holding the API key."),
            out: Path = typer.Option(Path("profile.csv"), help="Profile CSV to write (SplitwiseSim's columns)."),
            prompt_sizes: str = typer.Option("32,128,512,2048", help="Prompt sweep (batch 1), tokens."),
            batch_sizes: str = typer.Option("1,2,4,8,16", help="Batch sweep at the middle prompt size."),
            output_sizes: str = typer.Option("16,64,256", help="Output sweep at the middle prompt size, batch 1."),
            repeats: int = typer.Option(2, help="Repeats of every point."),
            model: Optional[str] = typer.Option(None, help="Model name for the CSV (default: served name's last part)."),
            machine: Optional[str] = typer.Option(None, help="Hardware-catalog machine type of this host "
                                                  "(default: the detected GPUs' type, or cpu-host)."),
            hardware: Optional[str] = typer.Option(None, help="User hardware catalog TOML."),
            results: str = typer.Option("results", help="Directory for the measurement's per-point records."),
            cores: Optional[str] = typer.Option(None, help="--backend vllm on CPU: pin the instance to these cores "
                                                "(e.g. 1, as one instance of the local clusters holds)."),
            gpus: Optional[str] = typer.Option(None, help="--backend vllm on GPU hosts: GPU ids of the instance."),
            connector: Optional[str] = typer.Option(None, help="--backend splitwise: KV connector (nixl, example)."),
            layout: Optional[str] = typer.Option(None, help="--backend splitwise: 'splitwiser' (one GPU for both)."),
            vllm_args: Optional[str] = typer.Option(None, help="Extra arguments for every vLLM server (quoted)."),
            idle_wake_s: str = typer.Option("0.5,1,2,4", help="Idle gaps (s) before lone prefills that measure the "
                                            "step spread's idle_wake table ('' for none; simulate --idle-wake).")):
    """Measure a real backend into a profile CSV that `load_profiles` (and the simulator) accepts. --backend
    splitwise measures a prompt + token pair with the connector active: prompt_time is then the split TTFT
    (prefill, KV transfer, first token), token_time the token instance's TBT."""
    # imported here, not at the top: app.profile brings the run session (aiohttp, matplotlib, the backends), about
    # 1 s of CPU that `splitbench simulate` (this module's other commands) would pay for nothing (-X importtime)
    from splitbench.app.profile import measure_profile   # noqa: PLC0415
    if backend in ("vllm", "splitwise"):
        given = {"model_dir": model_dir, "cores": cores, "gpus": gpus, "vllm_args": vllm_args}
        if backend == "splitwise":
            given.update(connector=connector or "nixl", layout=layout)
        opts = {**({"instances": 1} if backend == "vllm" else {}), **{k: v for k, v in given.items() if v}}
    elif backend == "openai":
        if not url:
            raise InputError("--backend openai needs --url http://HOST:PORT")
        opts = {"url": url, "api_key_env": api_key_env}
    else:
        opts = {}
    res = measure_profile(backend, opts, out=out, prompt_sizes=int_list(prompt_sizes, "--prompt-sizes"),
                          batch_sizes=int_list(batch_sizes, "--batch-sizes"),
                          output_sizes=int_list(output_sizes, "--output-sizes"), repeats=repeats, model_name=model,
                          machine=machine, hardware_file=hardware, results_dir=results,
                          idle_wake_s=seconds_list(idle_wake_s, "--idle-wake-s"),
                          on_status=lambda s: err_console.log(s))
    console.print(f"profile written to {out}: {res['rows']} rows, model {res['model']}, hardware {res['hardware']} "
                  f"({res['wall_s']:.0f} s; records in {res['run_dir']})", markup=False, highlight=False)
    if sp := res.get("spread"):
        pre = (f"; prefill / fit p50 {sp['prefill_p50']:.2f}, p90 {sp['prefill_p90']:.2f} over {sp['prefills']} "
               "prefills") if "prefills" in sp else ""
        if "cold_prefill_factor" in sp:
            pre += f"; a new prompt length's prefill x{sp['cold_prefill_factor']:.2f}"
        if "idle_wake" in sp:
            pre += "; after idling " + ", ".join(f"{g:g} s +{x * 1e3:.1f} ms" for g, x in sp["idle_wake"])
        if "request_mean" in sp:
            pre += f"; a request's mean gap / fit: mean {sp['request_mean']:.2f}, p90 {sp['request_p90']:.2f}"
        console.print(f"step spread written to {sp['path']}: decode step / mean p50 {sp['p50']:.2f}, p90 "
                      f"{sp['p90']:.2f}, p99 {sp['p99']:.2f} over {sp['gaps']} tokens{pre} (simulate --step-spread)",
                      markup=False, highlight=False)


def _sim_fields(a: dict) -> dict:
    """`simulate`'s own options as SimOptions fields (policy parameters parsed, --reference-machine '' = none)."""
    f = {k: v for k, v in a.items() if k not in ("opts", "policy_param", "as_json", "hardware")}
    f["policy_params"] = parse_policy_params(a["policy_param"] or [],
                                             a["policy"] if a["perf_model"] == "physical" else None)
    f["reference_machine"] = a["reference_machine"] or None
    f["hardware_file"] = a["hardware"]
    caching = str(f.pop("prefix_caching")).strip().lower()
    if caching not in ("on", "off"):
        raise InputError(f"--prefix-caching must be on or off, got {caching!r}")
    f["prefix_cache"] = caching == "on"
    return f


# simulate's options of how closely machines act as the vLLM instances of a live cluster
VLLM_LIKE = (
    Opt("prompt_chunked_prefill", bool, "Prompt machines chunk prompts as vLLM V1 instances do, under "
        "--max-num-batched-tokens (default: whole prompts, as Splitwise's)."),
    Opt("step_spread", Optional[str], "Step spread JSON (`profile --out X.csv` writes X.spread.json): each "
        "decode iteration takes the profile's time x a draw from its decode table, each iteration with prompt "
        "tokens x a draw from its prefill table (where it has one), seeded by --seed (default: exactly the "
        "profile's)."),
    Opt("neighbour_busy_factor", float, "Machines sharing one host (cpu-core instances on a VM): a decode-only "
        "iteration takes this x its time while another machine is busy (benchmarks/neighbour_factor.py measures "
        "it; default 1: independent machines)."),
    Opt("cold_prefills", bool, "A prefill iteration of a token count the machine has not run before takes the "
        "--step-spread file's cold_prefill_factor x its time (`profile` measures it; vLLM on CPU prepares its "
        "kernels per new shape)."),
    Opt("request_spread", bool, "Each machine's decode iterations take a factor drawn from the --step-spread "
        "file's request quantiles (how whole requests ran over the profile's fit, `profile` measures them: a shared "
        "host's speed changes for seconds), a new draw once one has held request_spread_s."),
    Opt("idle_wake", bool, "An iteration with prompt tokens on a machine that was idle for g seconds takes the "
        "--step-spread file's idle_wake extra for g (`profile` measures it: a shared VM's first work after idling "
        "runs cold)."),
)


@user_errors
@with_options(WORKLOAD, FETCH, RESULTS[:3], VLLM_LIKE, target=SimOptions)
def simulate(
    opts: dict,
    cluster: str = typer.Option(..., help="Cluster: POOL=MACHINE:COUNT,... (pools prompt, token, mixed, baseline; "
                                "machines from `splitbench hardware`) or a Splitwise design with counts, e.g. "
                                "splitwise-ha:35,35 or baseline-a100:40."),
    model: str = typer.Option("bloom-176b", help="Model: the profile's model name (shape: bloom-176b, llama2-70b, "
                              "or --model-dir)."),
    model_dir: Optional[str] = typer.Option(None, help="HF model dir to read the KV shape from (config.json)."),
    profile: Optional[str] = typer.Option(None, help="Profile CSV (SplitwiseSim columns) [../shared/profiles, cache]."),
    tensor_parallel: Optional[int] = typer.Option(None, help="Profile group's tensor parallelism [GPUs per machine]."),
    policy: str = typer.Option("jsq", help="Cluster policy: jsq, round-robin, mixed-pool, prefix (the router's objects)."),
    policy_param: Optional[list[str]] = typer.Option(None, help="Policy parameter KEY=VALUE (repeatable)."),
    seed: int = typer.Option(0, help="Seed for the policy's tie-breaks (and --step-spread's draws)."),
    max_prompt_batch_tokens: int = typer.Option(2048, help="Prompt machines (and prompt-first baseline/mixed "
                                                "ones): batched prompt tokens cap."),
    max_decode_batch: Optional[int] = typer.Option(None, help="Requests per decode batch (vLLM's max_num_seqs) "
                                                   "[KV memory only; chunked machines: the token budget]."),
    batching: str = typer.Option("chunked", help=BATCHING_HELP),
    max_num_batched_tokens: int = typer.Option(DEFAULT_MAX_NUM_BATCHED_TOKENS, help=BUDGET_HELP),
    prefix_caching: str = typer.Option("on", help="Prefix-hash traces: an LRU prefix cache per prompt machine, a "
                                       "cached prompt prefills its uncached part: on or off (as run's flag)."),
    kv_transfer: str = typer.Option("layerwise", help="KV transfer: layerwise (overlapped) or serialized."),
    first_token: str = typer.Option("prefill", help="Split requests' first token: prefill (Splitwise: the prompt "
                                    "machine streams it) or decode (vLLM P/D: after the token machine's 1st step)."),
    link_gbps: Optional[float] = typer.Option(None, help="KV link bandwidth per machine, Gb/s."),
    kv_capacity_tokens: Optional[int] = typer.Option(None, help="Override KV capacity per machine (tokens)."),
    hardware: Optional[str] = typer.Option(None, help="User hardware catalog TOML."),
    reference_machine: Optional[str] = typer.Option("auto", help="Splitwise SLO verdict against this machine's "
                                                    "simulated unloaded latency [auto: dgx-a100 if profiled, else "
                                                    "the first pool's machine; '' to skip]."),
    as_json: bool = typer.Option(False, "--json", help="Print only the summary as JSON (the run directory goes to "
                                 "stderr)."),
    perf_model: str = typer.Option("physical", help="physical (splitbench's model) or splitwisesim (SplitwiseSim's "
                                   "own batching, scheduling, KV and transfer semantics; --policy jsq = its "
                                   "token_jsq, mixed-pool = its mixed_pool)."),
    max_batch_size: int = typer.Option(512, help="splitwisesim: requests per batch (its max_batch_size; vLLM's "
                                       "max_num_seqs)."),
    max_batch_tokens: int = typer.Option(2048, help="splitwisesim: batch tokens, a prompt counts its size and a "
                                         "decode 1 (its max_batch_tokens; vLLM's max_num_batched_tokens)."),
    max_preemptions: int = typer.Option(4, help="splitwisesim: a task passed over this often goes first (its "
                                        "max_preemptions)."),
    transfer_bandwidth_gib_per_s: float = typer.Option(200.0, help="splitwisesim: KV transfer bandwidth per "
                                                       "request, GiB/s (its transfer_bandwidth)."),
):
    """Replay a trace on a simulated cluster; writes a run directory like `run` does (marked simulated)."""
    fields = _sim_fields(locals())
    opts["columns"] = parse_columns(opts["columns"])
    opts["rate_scale"] = parse_rate_scale(opts["rate_scale"], allow_auto=False) or 1.0
    sim = SimOptions(**opts, **fields)
    run_dir, summary = simulate_run(sim)
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        print(f"run directory: {run_dir}", file=sys.stderr)
    else:
        # lazy: its rich.table (22M instructions) is not needed by `simulate --json`
        from splitbench.render.console import render_summary   # noqa: PLC0415
        render_summary(summary, console)
        console.print(f"run directory: {run_dir}")


@user_errors
def design(
    trace: str = typer.Option("azure-conv-2023", help="Trace whose request lengths drive Poisson arrivals."),
    objective: str = typer.Option("throughput", help="throughput (max rate in budget), cost or power (cheapest / "
                                  "least power serving --target-rate)."),
    budget: str = typer.Option("iso-power", help="iso-power or iso-cost: every design gets the same provisioned "
                               "power or $/h."),
    budget_machines: int = typer.Option(40, help="Budget = this many machines of --budget-design."),
    budget_design: str = typer.Option("baseline-h100", help="Design whose machine sets the budget unit."),
    designs: str = typer.Option(",".join(["baseline-a100", "baseline-h100", "splitwise-aa", "splitwise-hh",
                                          "splitwise-ha", "splitwise-hhcap"]), help="Designs to search."),
    target_rate: Optional[float] = typer.Option(None, help="cost/power objectives: req/s to serve [Baseline-H100's best]."),
    duration: float = typer.Option(120.0, help="Seconds of Poisson arrivals simulated per rate probe."),
    model: str = typer.Option("bloom-176b", help="Model of the profile (bloom-176b, llama2-70b)."),
    profile: Optional[str] = typer.Option(None, help="Profile CSV [../shared/profiles or the cache]."),
    reference_machine: str = typer.Option("dgx-a100", help="SLO slowdowns against this machine's unloaded latency."),
    splits: int = typer.Option(10, help="Prompt/token splits tried per Splitwise design."),
    processes: Optional[int] = typer.Option(None, help="Worker processes [all cores]."),
    seed: int = typer.Option(0, help="Seed of arrivals and policy tie-breaks."),
    batching: str = typer.Option("chunked", help=BATCHING_HELP),
    max_num_batched_tokens: int = typer.Option(DEFAULT_MAX_NUM_BATCHED_TOKENS, help=BUDGET_HELP),
    out: Path = typer.Option(Path("results") / "design", help="Directory for design.json and design.png."),
    ray: bool = typer.Option(False, "--ray", help="Simulate the configurations as Ray tasks on a running Ray "
                             "cluster (same results as without)."),
    ray_address: Optional[str] = typer.Option(None, help="--ray: the cluster's HOST:PORT [auto]."),
):
    """Search Splitwise's cluster designs: highest rate meeting all nine Splitwise SLOs within a budget."""


    spec = DesignSpec(trace=trace, designs=[d.strip() for d in designs.split(",") if d.strip()], objective=objective,
                      budget=budget, budget_design=budget_design, budget_machines=budget_machines,
                      target_rate_rps=target_rate, duration_s=duration, model=model, profile=profile,
                      reference_machine=reference_machine, splits=splits, seed=seed, processes=processes,
                      batching=batching, max_num_batched_tokens=max_num_batched_tokens, ray=ray,
                      ray_address=ray_address)
    result = search(spec, on_status=lambda s: err_console.log(s))
    # lazy: rich.table (22M instructions) is not needed by `simulate --json`
    from rich.table import Table   # noqa: PLC0415
    t = Table(title=f"{trace}: {objective}-optimal, {budget} ({budget_machines} x {budget_design} machines)")
    for col in ("design", "prompt", "token", "machines", "max req/s", "out tok/s", "$/h", "kW"):
        t.add_column(col, justify="left" if col == "design" else "right", no_wrap=col == "design")
    for d, r in result["best"].items():
        counts = {p: f"{c}x {m.replace('dgx-', '')}" for p, m, c in r["pools"]}
        t.add_row(d, counts.get("prompt", counts.get("baseline", "-")), counts.get("token", "-"), str(r["machines"]),
                  f"{r['max_rate_rps']:.2f}", f"{r['output_tokens_per_s'] or 0:.0f}", f"{r['usd_per_hour']:.0f}",
                  f"{r['power_w'] / 1e3:.0f}")
    console.print(t)
    for k, v in result["ratios"].items():
        if v is not None:
            console.print(f"{k}: {v:.2f}x", highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "design.json", result)
    plot_design(result, str(out / "design.png"))
    console.print(f"written: {out / 'design.json'}, {out / 'design.png'}")


def register(app: typer.Typer) -> None:
    profiles_app = typer.Typer(no_args_is_help=True, help="Performance profiles for the simulator: fetch and list.")
    app.add_typer(profiles_app, name="profiles")
    profiles_app.command("fetch")(profiles_fetch)
    profiles_app.command("list")(profiles_list)
    app.command("profile")(profile)
    app.command()(simulate)
    app.command()(design)
