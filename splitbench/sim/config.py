"""Simulated cluster configuration: machine pools, scheduling and KV-transfer settings, the result type, and the
one-line checks of a configuration before a simulation starts.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitbench.errors import InputError
from splitbench.policies import POOLS, policy_params
from splitbench.schema.columns import RecordColumns
from splitbench.schema.records import RequestRecord

# Per-machine network bandwidth for KV transfer. Splitwise's machines are DGX boxes with one InfiniBand NIC per
# GPU; a DGX-A100 has 8 x 200 Gb/s HDR = 1.6 Tb/s = 200e9 B/s (a DGX-H100 has 8 x 400 Gb/s = 400e9 B/s). We
# default to the smaller (A100) figure, the conservative choice for a mixed A100/H100 catalog.
DEFAULT_LINK_BYTES_PER_S = 200e9
DEFAULT_LAYERS = 80   # Llama-2-70B, Splitwise's main model; pass the real model's layer count
# Preemption cap of mixed/baseline machines: at most this many prompt iterations in a row while decodes wait.
# Not a Splitwise number (it prioritizes prompts); 4 keeps TBT bounded yet favours TTFT.
DEFAULT_MAX_CONSECUTIVE_PROMPT_ITERATIONS = 4
KV_TRANSFERS = ("layerwise", "serialized")
# How baseline/mixed machines batch (prompt and token machines of split designs are the same in both):
# "chunked" = vLLM V1 (continuous batching, decodes first, FCFS prefill chunks under max_num_batched_tokens; the
# physical default, sim/batching.py); "prompt-first" = whole prompts as separate iterations first, up to
# mixed_max_consecutive_prompt_iterations in a row while decodes wait (the simulator's model before issue 14).
BATCHINGS = ("chunked", "prompt-first")
# vLLM V1's max_num_batched_tokens for an OpenAI server on A100-class GPUs (engine/arg_utils.py
# get_batch_defaults; 8192 on >= 70 GiB GPUs other than A100, e.g. H100).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass(frozen=True)
class SimPool:
    pool: str      # prompt | token | mixed | baseline
    machine: str   # machine type name (hardware catalog); keys perf and kv_capacity_tokens
    count: int


@dataclass
class SimConfig:
    pools: list[SimPool]
    policy: str = "jsq"
    policy_params: dict = field(default_factory=dict)   # policies.policy_params(policy, ...): e.g. mixed-pool thresholds
    seed: int = 0
    max_prompt_batch_tokens: int = 2048   # prompt machines and prompt-first baseline/mixed machines: prompt batch cap
    kv_transfer: str = "layerwise"
    link_bytes_per_s: float = DEFAULT_LINK_BYTES_PER_S
    layers: int = DEFAULT_LAYERS
    mixed_max_consecutive_prompt_iterations: int = DEFAULT_MAX_CONSECUTIVE_PROMPT_ITERATIONS
    max_decode_batch: int | None = None   # requests per decode batch (vLLM's max_num_seqs); None: KV memory only
    # True: one token chunk per fast-forwarded decode run (TBT gaps = run duration / tokens of the run; ~100
    # chunks a request at 250 req/s, ~0.8 GB for 150k records). False: just the first token and one chunk of the
    # other n-1 at the last token (TBT gaps = the request's mean TBT), for design sweeps that only need that.
    record_token_chunks: bool = True
    # who streams a split request's first token: "prefill" (Splitwise: the prompt machine, at the end of the prefill)
    # or "decode" (vLLM's P/D: the prompt instance's token is dropped; the token machine generates all n tokens,
    # the first at the end of its first decode iteration after the KV arrived)
    first_token: str = "prefill"
    batching: str = "chunked"   # baseline/mixed machines: chunked (vLLM V1) or prompt-first (see BATCHINGS)
    # chunked machines: tokens per iteration (1 per decode + prefill chunks), vLLM's max_num_batched_tokens
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    # prefix-hash workloads: each prompt machine keeps an LRU prefix cache of whole blocks (capacity: its KV tokens /
    # block tokens); a prompt's cached leading blocks are not prefilled (at least one token is). False: no cache
    prefix_cache: bool = True
    # prompt machines chunk prompts as vLLM V1 instances do (sim/batching.py, the same max_num_batched_tokens budget:
    # a prompt longer than it takes several iterations, the next prompts fill the last one's rest). False: FCFS
    # whole-prompt batches under max_prompt_batch_tokens, a longer prompt alone in one iteration (Splitwise)
    prompt_chunked_prefill: bool = False
    # decode step spread (sim/spread.py): quantiles of iteration time / its mean at evenly spaced probabilities, scaled
    # to mean 1; every decode-only iteration then runs alone, its time the profile's times a draw from them (RNG
    # seeded by `seed`). None: decode iterations take exactly the profile's time (and runs are fast-forwarded)
    step_spread: tuple[float, ...] | None = None
    # the same for iterations with prompt tokens: quantiles of a lone prefill's time / the profile's fit (sim/spread.py
    # measure_prefill_spread), each such iteration's time the model's times a draw. None: exactly the model's time
    prefill_spread: tuple[float, ...] | None = None
    # machines sharing one host's caches and memory (cpu-core instances on one VM): a decode-only iteration takes
    # this times its time when another machine of the cluster is not idle as it starts (benchmarks/neighbour_factor.py
    # measures it); every decode-only iteration then runs alone. 1.0: independent machines (GPUs)
    neighbour_busy_factor: float = 1.0
    # a prefill iteration whose token count the machine has not run before takes this times its time (vLLM on CPU
    # prepares its kernels per new shape; `splitbench profile` measures it: sim/spread.py measure_cold_prefill).
    # 1.0: every length costs the same
    cold_prefill_factor: float = 1.0
    # how a request as a whole runs slower or faster than the profile's fit on a shared host (sim/spread.py
    # measure_request_spread: quantiles, not scaled to mean 1): each machine draws a factor for request_spread_s at
    # its first decode iteration after the last draw ran out; every decode-only iteration takes it. None: no factor
    request_spread: tuple[float, ...] | None = None
    request_spread_s: float = 1.0
    # a prefill iteration starting on a machine idle for g seconds takes extra seconds, linear between the measured
    # ((g, extra s), ...) and the last one's beyond it (a shared VM's first work after idling runs cold: sim/spread.py
    # measure_idle_wake). None: no extra
    idle_wake: tuple[tuple[float, float], ...] | None = None


class SimResult:
    """A simulation's records (as RecordColumns, or RequestRecords made from them on first use), its instances
    ({"id", "pool", "machine"} in cluster order) and its counters."""

    def __init__(self, records: list[RequestRecord] | None = None, instances: list[dict] | None = None,
                 stats: dict | None = None, *, columns: RecordColumns | None = None):
        self._records, self._columns = records, columns
        self.instances, self.stats = list(instances or []), dict(stats or {})

    @property
    def records(self) -> list[RequestRecord]:
        if self._records is None:
            self._records = self._columns.records()
        return self._records

    @property
    def columns(self) -> RecordColumns:
        if self._columns is None:
            self._columns = RecordColumns.from_records(self._records)
        return self._columns


def validate_config(cfg: SimConfig, perf: Mapping[str, Any], kv_capacity_tokens: Mapping[str, int],
                    kv_bytes_per_token: int) -> None:
    """InputError (one line naming the field) for anything the simulation cannot run with."""
    if not cfg.pools:
        raise InputError("no machine pools configured", column="pools")
    for p in cfg.pools:
        if p.pool not in POOLS:
            raise InputError(f"pool must be one of {', '.join(POOLS)}, got {p.pool!r}", column="pools")
        if p.count < 0:
            raise InputError(f"{p.pool} pool: machine count must be >= 0, got {p.count}", column="pools")
        for what, table in (("performance model", perf), ("KV capacity", kv_capacity_tokens)):
            if p.machine not in table:
                raise InputError(f"machine type {p.machine!r} has no {what}", column="pools")
        if int(kv_capacity_tokens[p.machine]) < 1:
            raise InputError(f"machine type {p.machine!r}: KV capacity must be >= 1 token", column="pools")
    if cfg.max_prompt_batch_tokens < 1:
        raise InputError("max_prompt_batch_tokens must be >= 1", column="max_prompt_batch_tokens")
    if cfg.kv_transfer not in KV_TRANSFERS:
        raise InputError(f"kv_transfer must be one of {', '.join(KV_TRANSFERS)}, got {cfg.kv_transfer!r}",
                         column="kv_transfer")
    if cfg.first_token not in ("prefill", "decode"):
        raise InputError(f"first_token must be prefill or decode, got {cfg.first_token!r}", column="first_token")
    if cfg.batching not in BATCHINGS:
        raise InputError(f"batching must be one of {', '.join(BATCHINGS)}, got {cfg.batching!r}", column="batching")
    if cfg.max_num_batched_tokens < 1:
        raise InputError("max_num_batched_tokens must be >= 1", column="max_num_batched_tokens")
    if cfg.batching == "chunked" and (cfg.max_decode_batch or 0) > cfg.max_num_batched_tokens:
        raise InputError(f"max_num_batched_tokens ({cfg.max_num_batched_tokens}) must be >= max_decode_batch "
                         f"({cfg.max_decode_batch}), as vLLM requires of max_num_seqs", column="max_num_batched_tokens")
    if not cfg.link_bytes_per_s > 0:
        raise InputError("link_bytes_per_s must be > 0", column="link_bytes_per_s")
    if cfg.layers < 1:
        raise InputError("layers must be >= 1", column="layers")
    if cfg.mixed_max_consecutive_prompt_iterations < 1:
        raise InputError("mixed_max_consecutive_prompt_iterations must be >= 1",
                         column="mixed_max_consecutive_prompt_iterations")
    if kv_bytes_per_token < 0:
        raise InputError("kv_bytes_per_token must be >= 0", column="kv_bytes_per_token")
    for name in ("step_spread", "prefill_spread", "request_spread"):
        q = getattr(cfg, name)
        if q is not None and (len(q) < 2 or any(b < a for a, b in zip(q, q[1:])) or q[0] < 0 or not q[-1] > 0):
            raise InputError(f"{name} must be at least 2 non-decreasing quantiles >= 0, not all 0", column=name)
    if not (0 < cfg.cold_prefill_factor < float("inf")):
        raise InputError(f"cold_prefill_factor must be a finite number > 0, got {cfg.cold_prefill_factor}",
                         column="cold_prefill_factor")
    if cfg.idle_wake is not None:
        gaps = [g for g, _ in cfg.idle_wake]
        if not gaps or gaps[0] <= 0 or any(b <= a for a, b in zip(gaps, gaps[1:])) or any(
                not (0 <= x < float("inf")) for _, x in cfg.idle_wake):
            raise InputError("idle_wake must be (idle s, extra s) pairs, idle times > 0 increasing, extras finite >= 0",
                             column="idle_wake")
    if not (0 < cfg.request_spread_s < float("inf")):
        raise InputError(f"request_spread_s must be a finite number > 0, got {cfg.request_spread_s}",
                         column="request_spread_s")
    if not (0 < cfg.neighbour_busy_factor < float("inf")):
        raise InputError(f"neighbour_busy_factor must be a finite number > 0, got {cfg.neighbour_busy_factor}",
                         column="neighbour_busy_factor")
    policy_params(cfg.policy, cfg.policy_params)   # unknown policy, parameter or value: one line naming it
