"""The option groups that several commands share, each declared once: workload, prompts and client, results and
SLOs, backend (the clusters' flags), hardware. Defaults come from the library (RunOptions, SimOptions, ...)."""
from __future__ import annotations

from typing import Optional

from splitbench.cli.common import Opt
from splitbench.workload.sessions import THINK_HELP

WORKLOAD = (
    Opt("trace", str, "Trace name, CSV/Parquet path, or 'synth:...' spec."),
    Opt("trace_dir", Optional[str], "Directory searched first for named traces."),
    Opt("columns", Optional[str], "Column mapping for other files: timestamp=COL,input=COL,output=COL."),
    Opt("start_s", float, "Window start, seconds after the trace's first request.", ("--start",)),
    Opt("duration_s", Optional[float], "Window length in seconds of trace time [run: 60 (a sized replay keeps "
        "its first part); simulate/traces: the whole trace].", ("--duration",)),
    Opt("rate_scale", Optional[str], "Multiply the arrival rate, keeping the burst shape, or 'auto' (run: measure "
        "the started backend and load it to 50% of what it sustains) [1; local CPU clusters: auto].",
        ("--rate-scale",)),
    Opt("max_requests", Optional[int], "Replay at most this many requests."),
    Opt("max_context_tokens", Optional[int], "Clip requests to this context (run: default the server's "
        "max_model_len).", ("--max-context", "--max-context-tokens")),
    Opt("block_tokens", Optional[int], "Hash-id JSONL traces: tokens per hash block [catalogue's; Mooncake 512; "
        "Qwen-Bailian 16]."),
    Opt("prefix_block_tokens", Optional[int], "Prefix-hash traces: make every hash block N tokens (input scaled "
        "by N/block, same blocks, same reuse) to fit small models."),
)
SESSIONS = (
    Opt("multi_turn", bool, "Replay the trace's sessions as conversations: open loop across sessions, closed within "
        "one (a turn waits for the previous answer); turn k+1's prompt = turn k's prompt + the streamed output token "
        "ids + new user tokens; X-Session-ID on every turn."),
    Opt("think_time", str, f"--multi-turn: when a session's next turn goes: {THINK_HELP}."),
)
FETCH = (Opt("fetch", bool, "Download a catalogue trace that is not found locally (sha256-checked)."),)
PROMPTS = (
    Opt("api", str, "completions (token-id prompts) or chat."),
    Opt("model", Optional[str], "Model name to send (default: first of /v1/models)."),
    Opt("tokenizer", Optional[str], "Tokenizer dir (default: the served model's dir if local)."),
    Opt("vocab_size", Optional[int], "Token-id range when no tokenizer is known."),
    Opt("seed", int, "Seed for prompt synthesis."),
    Opt("shared_prefix_tokens", int, "Tokens of prompt prefix shared by all requests (prefix caching).",
        ("--shared-prefix",)),
    Opt("prefix_salt", Optional[str], "Prefix-hash prompts: salt (text or number) for the hash blocks, so a "
        "repeated play misses the cache the first one warmed [none]."),
)
CLIENT = (
    Opt("max_inflight", Optional[int], "Explicit cap on concurrent requests (per sender; reported when it binds)."),
    Opt("timeout_s", float, "Per-request timeout, seconds.", ("--timeout",)),
    Opt("grace_s", float, "On Ctrl-C/SIGTERM: wait this long for in-flight requests.", ("--grace",)),
    Opt("http", str, "Client HTTP transport: lean (default) or aiohttp."),
)
RESULTS = (
    Opt("results_dir", str, "Directory for run output.", ("--results",)),
    Opt("run_id", Optional[str], "Run id (default: time-backend-trace); an existing one is refused."),
    Opt("slos", Optional[str], "SLOs, e.g. ttft_p99=2s,tbt_p99=100ms,e2e_p50=10s.", ("--slo",)),
    Opt("reference", Optional[str], "Reference JSON from `splitbench reference` (Splitwise SLO verdict)."),
)
HARDWARE = (
    Opt("machine", Optional[str], "Hardware-catalog machine type for cost/power (default: the host's GPUs' type, "
        "or cpu-host)."),
    Opt("machines", Optional[float], "Machines of that type (default 1, this host; for --backend openai: what "
        "serves the URL)."),
    Opt("hardware_file", Optional[str], "User hardware catalog TOML merged over the packaged one "
        "[$SPLITBENCH_HARDWARE].", ("--hardware",)),
    Opt("power", str, "Power sampling: auto (NVML when instances hold GPUs), nvml, off."),
)
BACKEND = (
    Opt("backend", str, "Backend: openai (an existing URL), stub (built-in fake server), vllm (co-located "
        "baseline), splitwise (prompt/token pools), mixed (Splitwise + mixed-pool borrowing)."),
    Opt("url", Optional[list[str]], "Base URL of an OpenAI-compatible server (--backend openai); --backend vllm: "
        "a vLLM server you started (repeatable: co-located instances behind the router, JSQ).", default=None),
    Opt("prompt_url", Optional[list[str]], "splitwise/mixed: a prompt (prefill) vLLM server you started, with a KV "
        "connector (repeatable).", default=None),
    Opt("token_url", Optional[list[str]], "splitwise/mixed: a token (decode) vLLM server you started, with a KV "
        "connector (repeatable).", default=None),
    Opt("topology", Optional[str], "TOML/JSON file of servers you started: [[instance]] url=, pool=prompt|token|"
        "baseline, machine=, machines=, id=.", default=None),
    Opt("api_key_env", str, "Env var holding the API key (never written to results).", default="OPENAI_API_KEY"),
    Opt("stub_ttft_ms", float, "Stub backend: time to first token, ms.", default=20.0),
    Opt("stub_tpot_ms", float, "Stub backend: time per output token, ms.", default=5.0),
    Opt("stub_max_concurrency", Optional[int], "Stub backend: requests served at once (FIFO slots, later ones "
        "queue; capacity = K / (TTFT + (output - 1) x TPOT)) [no limit].", default=None),
    Opt("model_dir", Optional[str], "Model for cluster backends (default: the cached tiny model).", default=None),
)
CLUSTER = (
    Opt("instances", Optional[int], "vllm backend: co-located instances (>1: behind the router, JSQ).", default=None),
    Opt("prompt_instances", Optional[int], "splitwise/mixed: prompt (prefill) instances [1].", default=None),
    Opt("token_instances", Optional[int], "splitwise/mixed: token (decode) instances [1].", default=None),
    Opt("connector", Optional[str], "KV connector for splitwise/mixed: nixl (default) or example.", default=None),
    Opt("kv_transfer_config", Optional[str], "Raw vLLM --kv-transfer-config JSON (LMCache, Mooncake, ...).",
        default=None),
    Opt("gpus", Optional[str], "GPU ids for cluster backends, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES per instance).",
        default=None),
    Opt("cores", Optional[str], "CPU cores for CPU-build instances, e.g. 0,1.", default=None),
    Opt("tensor_parallel", Optional[int], "Tensor-parallel size per instance (GPU).", default=None),
    Opt("layout", Optional[str], "'splitwiser': a prompt and a token instance share each GPU.", default=None),
    Opt("policy", Optional[str], "Router policy: jsq (default), round-robin, mixed-pool.", default=None),
    Opt("policy_param", Optional[list[str]], "Policy parameter KEY=VALUE (repeatable), e.g. mixed-pool thresholds.",
        default=None),
    Opt("vllm_args", Optional[str], "Extra arguments for every vLLM server (quoted string).", default=None),
    Opt("launcher", Optional[str], "Where cluster instances run: local (this host's process groups) or ray (one "
        "Ray actor per instance on a node picked by CPUs/GPUs and `prompt`/`token` node resources) [local].",
        default=None),
    Opt("ray_address", Optional[str], "--launcher ray: the Ray cluster to join (HOST:PORT; default auto: "
        "$RAY_ADDRESS or the one running here; none starts: no cluster is an error).", default=None),
    Opt("prefix_caching", Optional[str], "Prefix caching of launched servers (vllm/splitwise/mixed: vLLM's "
        "--enable-prefix-caching / --no-enable-prefix-caching; stub: its own block cache): on or off [on]; cached "
        "prompt tokens are reported either way (--enable-prompt-tokens-details).", default=None),
)
BACKEND_FLAGS = tuple(o.name for o in BACKEND + CLUSTER if o.name != "backend")
