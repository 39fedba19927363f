"""Cluster spec -> instances: roles, pools, ports, CPU cores or GPUs, KV-connector config and vLLM args.

Pure planning (no processes): `plan_cluster()` returns a `ClusterSpec` that the launcher starts and run.json records;
flag and connector names follow the host's vLLM when its features (servers/vllm_features.py) are given.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from splitbench.errors import InputError
from splitbench.servers.launcher import free_port
from splitbench.servers.vllm_features import UNKNOWN, VllmFeatures, adapt_args

ROLES = ("prompt", "token", "mixed", "baseline")
CONNECTORS = ("nixl", "example")
LAYOUTS = ("separate", "splitwiser")
# Splitwiser layout: a prompt and a token instance share one GPU (set); their memory fractions.
SPLITWISER_SHARES = (0.45, 0.45)


@dataclass
class InstanceSpec:
    id: str
    role: str                      # prompt | token | mixed | baseline
    port: int
    host: str = "127.0.0.1"
    cpu_cores: list[int] | None = None
    gpu_ids: list[int] | None = None
    tensor_parallel: int = 1
    gpu_memory_utilization: float | None = None
    kv_transfer_config: dict | None = None
    side_channel_port: int | None = None   # NIXL handshake port (VLLM_NIXL_SIDE_CHANNEL_PORT)
    env: dict[str, str] = field(default_factory=dict)
    base_args: list[str] = field(default_factory=list)
    features: VllmFeatures = field(default=UNKNOWN, repr=False, compare=False)   # the host's vLLM

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pool(self) -> str:
        """The router pool (splitbench.policies.POOLS): the role itself."""
        return self.role

    def vllm_args(self) -> list[str]:
        """Args after --model/--host/--port (VllmServer adds those and --tensor-parallel-size)."""
        args = list(self.base_args)
        if self.gpu_memory_utilization is not None:
            flag = self.features.flag("--gpu-memory-utilization")
            if flag is None:
                raise InputError(f"vLLM {self.features.version} has no --gpu-memory-utilization (nor an alias): "
                                 "the memory split of --layout splitwiser cannot be set")
            args += [flag, f"{self.gpu_memory_utilization:g}"]
        if self.kv_transfer_config is not None:
            args += ["--kv-transfer-config", json.dumps(self.kv_transfer_config, separators=(",", ":"))]
        return args

    def environment(self) -> dict[str, str]:
        env = dict(self.env)
        if self.side_channel_port is not None:
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(self.side_channel_port)
            env.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", self.host)
        return env

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "pool": self.pool, "url": self.url,
                "cpu_cores": self.cpu_cores, "gpu_ids": self.gpu_ids, "tensor_parallel": self.tensor_parallel,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "kv_transfer_config": self.kv_transfer_config, "side_channel_port": self.side_channel_port}


@dataclass
class ClusterSpec:
    model_dir: str
    hardware: str                  # "cpu-host" | "gpu-host"
    layout: str
    connector: str | None          # "nixl" | "example" | "custom" | None
    instances: list[InstanceSpec]
    features: VllmFeatures = field(default=UNKNOWN, repr=False, compare=False)
    arg_notes: list[str] = field(default_factory=list)   # flags renamed or dropped for the host's vLLM

    def by_role(self, *roles: str) -> list[InstanceSpec]:
        return [i for i in self.instances if i.role in roles]

    @property
    def disaggregated(self) -> bool:
        return any(i.role in ("prompt", "token") for i in self.instances)

    def describe(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "hardware": self.hardware, "layout": self.layout,
                "connector": self.connector, "instances": [i.describe() for i in self.instances],
                "vllm": self.features.describe(), "arg_notes": list(self.arg_notes)}


# ----------------------------------------------------------------------------- connectors

def connector_config(connector: str | None, *, hardware: str, shared_dir: str | os.PathLike | None = None,
                     raw: str | dict | None = None, features: VllmFeatures = UNKNOWN) -> dict | None:
    """The --kv-transfer-config dict for a connector name; `raw` JSON (LMCache, Mooncake, ...) passes through.

    nixl: NixlConnector, kv_both, KV buffer on "cpu" on CPU hosts and "cuda" on GPU hosts.
    example: ExampleConnector, kv_both, KV files under `shared_dir` (both instances must see it); named as the
    host's vLLM names it (`features`: SharedStorageConnector before 0.11).
    """
    if raw is not None:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError as e:
                raise InputError(f"--kv-transfer-config is not valid JSON: {e}") from None
        if not isinstance(raw, dict) or "kv_connector" not in raw:
            raise InputError("--kv-transfer-config must be a JSON object with a 'kv_connector' key")
        return {"kv_role": "kv_both", **raw}
    if connector is None or connector == "none":
        return None
    if connector == "nixl":
        return {"kv_connector": "NixlConnector", "kv_role": "kv_both",
                "kv_buffer_device": "cpu" if hardware == "cpu-host" else "cuda"}
    if connector == "example":
        if shared_dir is None:
            raise ValueError("the example connector needs a shared directory")
        return {"kv_connector": features.connector("ExampleConnector"), "kv_role": "kv_both",
                "kv_connector_extra_config": {"shared_storage_path": str(shared_dir)}}
    raise InputError(f"unknown connector {connector!r} (known: {', '.join(CONNECTORS)}; "
                     "or pass --kv-transfer-config JSON)")


# ----------------------------------------------------------------------------- hardware

def detect_hardware() -> str:
    """'gpu-host' when nvidia-smi lists a GPU, else 'cpu-host'."""
    if not shutil.which("nvidia-smi"):
        return "cpu-host"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "cpu-host"
    return "gpu-host" if "GPU" in out else "cpu-host"


def parse_id_list(value: str | list[int] | None, what: str) -> list[int] | None:
    """'0,1,2' or [0, 1, 2] -> [0, 1, 2]; None stays None."""
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(x) for x in str(value).replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise InputError(f"--{what} must be comma-separated integers like 0,1, got {value!r}") from None


def assign_cores(n: int, cores: list[int]) -> list[list[int]]:
    """Split cores into n contiguous groups (instance 0 first); fewer cores than instances: share round-robin."""
    if n <= 0:
        return []
    if not cores:
        raise InputError("no CPU cores to pin instances to")
    if len(cores) < n:
        return [[cores[i % len(cores)]] for i in range(n)]
    per = len(cores) // n
    return [cores[i * per:(i + 1) * per] for i in range(n)]


def assign_gpus(roles: list[str], gpus: list[int], tensor_parallel: int, layout: str) -> list[list[int]]:
    """GPU ids per instance; splitwiser puts prompt i and token i on the same GPU set."""
    if layout == "splitwiser":
        prompts = [k for k, r in enumerate(roles) if r == "prompt"]
        tokens = [k for k, r in enumerate(roles) if r == "token"]
        if len(prompts) != len(tokens) or len(prompts) != len(roles) // 2 or not prompts:
            raise InputError("--layout splitwiser needs equal numbers of prompt and token instances")
        need = len(prompts) * tensor_parallel
        if len(gpus) < need:
            raise InputError(f"--layout splitwiser needs {need} GPUs, only {len(gpus)} given")
        out: list[list[int]] = [[] for _ in roles]
        for pair, (p, t) in enumerate(zip(prompts, tokens)):
            out[p] = out[t] = gpus[pair * tensor_parallel:(pair + 1) * tensor_parallel]
        return out
    need = len(roles) * tensor_parallel
    if len(gpus) < need:
        raise InputError(f"{len(roles)} instances x tensor parallel {tensor_parallel} need {need} GPUs, "
                         f"only {len(gpus)} given")
    return [gpus[k * tensor_parallel:(k + 1) * tensor_parallel] for k in range(len(roles))]


# ----------------------------------------------------------------------------- plan

def _roles(prompt: int, token: int, mixed: int, baseline: int, layout: str, tensor_parallel: int) -> list[str]:
    """The role of each instance, in plan order; InputError for impossible shapes."""
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    counts = {"prompt": prompt, "token": token, "mixed": mixed, "baseline": baseline}
    for role, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise InputError(f"number of {role} instances must be a whole number >= 0, got {n!r}")
    if (prompt == 0) != (token == 0):
        raise InputError(f"disaggregated serving needs prompt and token instances (got {prompt} prompt, {token} token)")
    if tensor_parallel < 1:
        raise InputError(f"tensor parallel must be >= 1, got {tensor_parallel}")
    roles = [r for r, n in counts.items() for _ in range(n)]
    if not roles:
        raise InputError("a cluster needs at least one instance")
    return roles


def _placement(roles: list[str], hardware: str, gpu_list: list[int] | None, cores: str | list[int] | None,
               tensor_parallel: int, layout: str) -> tuple[list[list[int] | None], list[list[int] | None]]:
    """(CPU cores, GPU ids) per instance: GPUs on a gpu-host, else this process's cores split among them."""
    if hardware == "gpu-host":
        if gpu_list is None:
            n_prompt = roles.count("prompt")
            n_gpu = len(roles) * tensor_parallel if layout == "separate" else n_prompt * tensor_parallel
            gpu_list = list(range(n_gpu))
        return [None] * len(roles), list(assign_gpus(roles, gpu_list, tensor_parallel, layout))
    core_list = parse_id_list(cores, "cores") or sorted(os.sched_getaffinity(0))
    placement_cores = list(assign_cores(len(roles), core_list))
    if tensor_parallel > 1 and any(len(c) % tensor_parallel for c in placement_cores):
        raise InputError(f"tensor parallel {tensor_parallel} needs cores per instance divisible by it")
    return placement_cores, [None] * len(roles)


def plan_cluster(model_dir: str | os.PathLike, *, prompt: int = 0, token: int = 0, baseline: int = 0,
                 mixed: int = 0, connector: str | None = None, kv_transfer_config: str | dict | None = None,
                 hardware: str | None = None, gpus: str | list[int] | None = None,
                 cores: str | list[int] | None = None, tensor_parallel: int = 1, layout: str | None = None,
                 base_args: list[str] | None = None, shared_dir: str | os.PathLike | None = None,
                 gpu_memory_shares: tuple[float, float] = SPLITWISER_SHARES, host: str = "127.0.0.1",
                 port_fn: Callable[[], int] | None = None, features: VllmFeatures = UNKNOWN,
                 strict_args: bool = True) -> ClusterSpec:
    """Instances in order prompt-*, token-*, mixed-*, baseline-*; each gets a port (and a NIXL side-channel port).
    `base_args` are spelled for the host's vLLM (`features`); strict_args: a flag it lacks is an InputError, else
    only splitbench's optional defaults may be dropped (vllm_features.adapt_args)."""
    port_fn = port_fn or free_port
    layout = layout or "separate"
    roles = _roles(prompt, token, mixed, baseline, layout, tensor_parallel)
    gpu_list = parse_id_list(gpus, "gpus")
    hardware = hardware or ("gpu-host" if gpu_list else detect_hardware())
    if hardware not in ("cpu-host", "gpu-host"):
        raise InputError(f"hardware must be cpu-host or gpu-host, got {hardware!r}")
    if layout == "splitwiser" and hardware != "gpu-host":
        raise InputError("--layout splitwiser shares one GPU between a prompt and a token instance: needs GPUs")
    kv = connector_config(connector, hardware=hardware, shared_dir=shared_dir, raw=kv_transfer_config,
                          features=features)
    base_args, notes = adapt_args(list(base_args or []), features, strict=strict_args)
    if prompt and kv is None:
        raise InputError("prompt/token instances need a KV connector (--connector nixl|example or --kv-transfer-config)")
    name = "custom" if kv_transfer_config is not None else connector if kv is not None else None
    placement_cores, placement_gpus = _placement(roles, hardware, gpu_list, cores, tensor_parallel, layout)
    seen: dict[str, int] = {}
    instances = []
    for k, role in enumerate(roles):
        idx = seen[role] = seen.get(role, -1) + 1
        share = None
        if layout == "splitwiser":
            share = gpu_memory_shares[0] if role == "prompt" else gpu_memory_shares[1]
        nixl = kv is not None and kv.get("kv_connector") == "NixlConnector"
        instances.append(InstanceSpec(
            id=f"{role}-{idx}", role=role, port=port_fn(), host=host, cpu_cores=placement_cores[k],
            gpu_ids=placement_gpus[k], tensor_parallel=tensor_parallel, gpu_memory_utilization=share,
            kv_transfer_config=kv if role != "baseline" or kv_transfer_config is not None else None,
            side_channel_port=port_fn() if nixl and role != "baseline" else None,
            base_args=list(base_args), features=features))
    return ClusterSpec(model_dir=str(Path(model_dir)), hardware=hardware, layout=layout, connector=name,
                       instances=instances, features=features, arg_notes=notes)
