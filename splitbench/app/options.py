"""What a run is asked to do (`RunOptions`) and the library's defaults for it, so `run(RunOptions(backend="vllm"))`
is exactly `splitbench run --backend vllm`: the CLI declares no defaults of its own."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from splitbench.errors import InputError
from splitbench.policies import parse_policy_params
from splitbench.servers.byo import DEFAULT_POLICY, from_urls, load_topology
from splitbench.workload.load import DEFAULT_TRACE, WorkloadSpec
from splitbench.workload.sessions import ThinkTime

CLUSTER_BACKENDS = ("vllm", "splitwise", "mixed")
LOCAL_CLUSTER_DURATION_S = 60.0    # a local CPU cluster's default window (trace seconds): sizing keeps its first part
DURATION_S = 60.0                  # every other backend's
POWER_MODES = ("auto", "nvml", "off")
# flags that configure servers splitbench launches: refused with instances the user started (--url, --topology, ...)
LAUNCH_FLAGS = ("model_dir", "instances", "prompt_instances", "token_instances", "connector", "kv_transfer_config",
                "gpus", "cores", "tensor_parallel", "layout", "vllm_args", "prefix_caching")


@dataclass
class RunOptions:
    """One replay's configuration; every field has the library default the CLI shows."""
    trace: str = DEFAULT_TRACE
    trace_dir: str | None = None
    columns: dict | None = None
    start_s: float = 0.0
    duration_s: float | None = None        # None: 60 s (resolve_defaults)
    rate_scale: float | str | None = None  # "auto": sized to the started backend (app/sizing.py); None: auto on a
                                           # local CPU cluster, else 1.0
    max_requests: int | None = None
    backend: str = "stub"
    backend_options: dict = field(default_factory=dict)
    api: str = "completions"
    model: str | None = None
    tokenizer: str | None = None           # tokenizer dir; default: the served model's dir when local
    vocab_size: int | None = None          # token-id range when no tokenizer is known
    seed: int = 0
    shared_prefix_tokens: int = 0
    prefix_salt: str | None = None         # prefix-hash prompts: another salt, other blocks (a cold cache again)
    block_tokens: int | None = None        # hash-id JSONL traces: tokens per hash block [catalogue's; 512]
    prefix_block_tokens: int | None = None  # rescale hash blocks to this many tokens (workload transform)
    max_context_tokens: int | None = None  # default: the server's max_model_len
    max_inflight: int | None = None
    timeout_s: float = 600.0
    grace_s: float = 10.0
    results_dir: str = "results"
    run_id: str | None = None
    slos: str | None = None
    reference: str | None = None
    fetch: bool = True                     # download a catalogue trace that is not local
    http: str = "lean"                     # replayer transport: lean | aiohttp
    machine: str | None = None             # hardware-catalog machine type (default: detected / cpu-host)
    machines: float | None = None          # machines of that type (default 1: this host; remote URL: say it)
    hardware_file: str | None = None       # user hardware catalog TOML merged over the packaged one
    power: str = "auto"                    # auto (NVML when instances hold GPUs) | nvml | off
    workers: int = 1                       # sender processes (client/workers.py); 1 = this process
    multi_turn: bool = False               # replay sessions as conversations (client/sessions.py)
    think_time: str = "trace"              # multi_turn: trace | gap | fixed:S | exp:mean=S (workload/sessions.py)


def parse_rate_scale(value: str | float | None, *, allow_auto: bool = True) -> float | str | None:
    """--rate-scale: None (not given), "auto" (where sizing applies) or a number > 0; else a one-line InputError."""
    if isinstance(value, str) and value.strip().lower() == "auto" and allow_auto:
        return "auto"
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise InputError(f"--rate-scale must be a number > 0{' or auto' if allow_auto else ''}, got {value!r}")
    return number


def workload_spec(opts) -> WorkloadSpec:
    """The workload options of RunOptions (or SimOptions: same field names); a rate scale the session has still
    to size ("auto") reads as 1."""
    return WorkloadSpec(trace=opts.trace, trace_dir=opts.trace_dir, columns=opts.columns, start_s=opts.start_s,
                        duration_s=opts.duration_s, rate_scale=1.0 if opts.rate_scale in (None, "auto") else opts.rate_scale, max_requests=opts.max_requests,
                        max_context_tokens=opts.max_context_tokens, fetch=opts.fetch,
                        block_tokens=opts.block_tokens, prefix_block_tokens=opts.prefix_block_tokens)


def local_cpu_cluster(opts: RunOptions) -> bool:
    """A cluster of vLLM CPU instances on this host (no --gpus): the embedded default's kind of backend (not
    instances the user started: their rate scale defaults to 1)."""
    o = opts.backend_options
    return opts.backend in CLUSTER_BACKENDS and not o.get("gpus") and not o.get("external")


def resolve_defaults(opts: RunOptions) -> RunOptions:
    """The options with None defaults made concrete: rate_scale None is "auto" on a local CPU cluster (the session
    sizes it to what the started cluster sustains, app/sizing.py), else 1."""
    duration = opts.duration_s
    if duration is None:
        duration = LOCAL_CLUSTER_DURATION_S if local_cpu_cluster(opts) else DURATION_S
    rate = opts.rate_scale
    if rate is None:
        rate = "auto" if local_cpu_cluster(opts) else 1.0
    return replace(opts, duration_s=duration, rate_scale=rate)


def check_options(opts: RunOptions) -> None:
    """Option values that are wrong whatever the trace or backend: one-line InputError before anything starts."""
    if opts.workers < 1:
        raise InputError(f"--workers must be >= 1, got {opts.workers}")
    if opts.power not in POWER_MODES:
        raise InputError(f"--power must be auto, nvml or off, got {opts.power!r}")
    parse_rate_scale(opts.rate_scale)
    ThinkTime.parse(opts.think_time, opts.seed)
    if opts.multi_turn and opts.api != "completions":
        raise InputError("--multi-turn needs --api completions (turns thread token ids)")


def external_options(backend: str, urls: list[str], prompt_urls: list[str], token_urls: list[str],
                     topology: str | None, cluster: dict, machine: str | None = None) -> dict:
    """Options of a cluster backend over instances the user started: {"external": [instance rows], policy...};
    a flag that launches servers is refused (one line)."""
    given = "--topology" if topology else "--prompt-url/--token-url" if prompt_urls or token_urls else "--url"
    if backend not in CLUSTER_BACKENDS:
        raise InputError(f"{given} (instances you started) is for --backend {', '.join(CLUSTER_BACKENDS)}")
    launch = [k for k in LAUNCH_FLAGS if cluster.get(k) is not None]
    if launch:
        raise InputError(f"--{launch[0].replace('_', '-')} configures servers splitbench launches: it cannot go with "
                         f"{given} (servers you started)")
    if topology and (urls or prompt_urls or token_urls):
        raise InputError("--topology names every instance: leave out --url/--prompt-url/--token-url")
    if backend == "vllm" and (prompt_urls or token_urls):
        raise InputError("--backend vllm takes co-located instances: --url U [--url U ...] (P/D: --backend splitwise)")
    if backend != "vllm" and urls:
        raise InputError(f"--backend {backend} takes --prompt-url U and --token-url U (co-located: --backend vllm)")
    insts = load_topology(topology) if topology else from_urls(prompt_urls, token_urls, urls)
    opts = {"external": [{**dataclasses.asdict(i), "machine": i.machine or machine} for i in insts],
            **{k: cluster[k] for k in ("policy", "router_cpu", "seed", "scrape_interval_s") if cluster.get(k)}}
    if cluster.get("policy_param"):
        opts["policy_params"] = parse_policy_params(cluster["policy_param"], opts.get("policy") or
                                                    DEFAULT_POLICY[backend])
    return opts


def backend_options(backend: str, *, url: str | list[str] | None = None, api_key_env: str = "OPENAI_API_KEY",
                    stub_ttft_ms: float = 20.0, stub_tpot_ms: float = 5.0, stub_max_concurrency: int | None = None,
                    prompt_url: list[str] | None = None,
                    token_url: list[str] | None = None, topology: str | None = None, machine: str | None = None,
                    **cluster) -> dict:
    """Backend constructor options from the flat flags of `run`, `locust`, `reference` and `profile`; `machine`
    (--machine) is the machine type of instances the user started where their topology names none."""
    urls = [url] if isinstance(url, str) else list(url or ())
    if prompt_url or token_url or topology or (urls and backend in CLUSTER_BACKENDS):
        return external_options(backend, urls, list(prompt_url or ()), list(token_url or ()), topology, cluster,
                                machine)
    if len(urls) > 1:
        raise InputError(f"--backend {backend} takes one --url (several co-located instances: --backend vllm "
                         "--url U --url U)")
    url = urls[0] if urls else None
    if backend == "openai":
        if cluster.get("prefix_caching") is not None:
            raise InputError("--prefix-caching is for the servers splitbench launches (the URL's server has its own)")
        if not url:
            raise InputError("--backend openai needs --url http://HOST:PORT")
        return {"url": url, "api_key_env": api_key_env}
    if url:
        raise InputError("--url is for --backend openai (an existing server)")
    if (cluster.get("launcher") not in (None, "local") or cluster.get("ray_address")) and backend not in CLUSTER_BACKENDS:
        raise InputError(f"--launcher/--ray-address are for the cluster backends ({', '.join(CLUSTER_BACKENDS)})")
    if cluster.get("policy_param") and backend not in CLUSTER_BACKENDS:
        raise InputError(f"--policy-param is for the cluster backends ({', '.join(CLUSTER_BACKENDS)})")
    if backend == "stub":
        caching = cluster.get("prefix_caching")
        return {"ttft_s": stub_ttft_ms / 1000, "tpot_s": stub_tpot_ms / 1000,
                **({"prefix_caching": caching} if caching is not None else {}),
                **({"max_concurrency": stub_max_concurrency} if stub_max_concurrency else {})}
    if backend in CLUSTER_BACKENDS:
        params = cluster.pop("policy_param", None)
        opts = {k: v for k, v in cluster.items() if v is not None}
        if params:
            opts["policy_params"] = parse_policy_params(params, opts.get("policy") or DEFAULT_POLICY[backend])
        drop = ("prompt_instances", "token_instances") if backend == "vllm" else ("instances",)
        for k in drop:
            opts.pop(k, None)
        return opts
    return {}


def new_run_id(backend: str, trace: str) -> str:
    """time-backend-trace-pid: sortable, unique per process and second."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(trace).stem)[:40]
    return f"{stamp}-{backend}-{safe}-{os.getpid() % 10000:04d}"
