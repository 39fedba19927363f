"""A vLLM general plugin (entry point `vllm.general_plugins`, loaded by every vLLM process, workers included) that
asks Linux for the AMX tile-data permission when splitbench launched the server on CPU (SPLITBENCH_CPU_AMX=1).

Why: vLLM CPU's attention picks its AMX kernel when the CPU has AMX tiles, but only oneDNN's first bf16 matmul
requests the permission (arch_prctl ARCH_REQ_XCOMP_PERM). A P/D decode instance never prefills, so its first AMX
instruction is the attention kernel's and the worker dies of SIGILL (exit -4) on its first step (seen on a Xeon
with amx_tile, vLLM 0.32). Requesting the permission up front is what oneDNN would do; it changes nothing else.

On an instance pinned to its own cores (SPLITBENCH_CPU_CORES, set by the launcher) it also keeps NixlConnector on
those cores: vLLM's CPU NIXL worker moves its main thread (the one that runs the model) to the host's last core of
each NUMA node, whatever the process's affinity, so a prompt instance pinned to core 0 prefilled on the token
instance's core 1; and NIXL's progress thread (pthrDelay 0) spun a whole core of each instance while idle. Both made
a split pair's decode steps about 3x a plain instance's on a 2-core host (docs/sim-vs-live.md, 2026-12-07).
SPLITBENCH_NIXL_PROGRESS_THREAD=1 keeps the progress thread.
"""
from __future__ import annotations

import ctypes
import os
import platform

ENV = "SPLITBENCH_CPU_AMX"
BEHAVIOUR = 2   # raised when what this plugin changes in a launched server changes (2: NIXL on the instance's cores)
CORES_ENV = "SPLITBENCH_CPU_CORES"          # "0,1": the cores the launcher pinned this instance to
PROGRESS_ENV = "SPLITBENCH_NIXL_PROGRESS_THREAD"
_SYS_ARCH_PRCTL = 158           # x86_64
_ARCH_GET_XCOMP_PERM = 0x1022
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def amx_permission() -> bool | None:
    """Whether this process may use AMX tile data (None: not Linux x86_64 or the call is unsupported)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None
    bits = ctypes.c_ulong(0)
    if ctypes.CDLL(None, use_errno=True).syscall(_SYS_ARCH_PRCTL, _ARCH_GET_XCOMP_PERM, ctypes.byref(bits)) != 0:
        return None
    return bool(bits.value >> _XFEATURE_XTILEDATA & 1)


def request_amx() -> bool:
    """Ask for the AMX tile-data permission; True when this process holds it afterwards."""
    if amx_permission() is None:
        return False
    ctypes.CDLL(None, use_errno=True).syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    return bool(amx_permission())


def own_numa_groups(groups: list[list[int]], own: set[int]) -> list[list[int]]:
    """The NUMA core groups as a pinned process sees them: each group cut to its own cores, empty groups left out."""
    return [g for g in ([c for c in grp if c in own] for grp in groups) if g]


def keep_nixl_on_own_cores() -> None:
    """vLLM's CPU NIXL worker pins its model thread to max(group) of discover_numa_topology(): cut the groups to this
    process's affinity, so that core is one of its own."""
    try:
        from vllm.platforms.cpu import CpuPlatform
        discover = CpuPlatform.discover_numa_topology.__func__
    except (ImportError, AttributeError):   # a vLLM without it does not move NIXL's thread either
        return

    def own_topology(cls) -> list[list[int]]:
        return own_numa_groups(discover(cls), set(os.sched_getaffinity(0)))
    CpuPlatform.discover_numa_topology = classmethod(own_topology)


def without_progress_thread(config_cls: type) -> type:
    """nixl_agent_config with enable_pthread forced off (transfers then progress when vLLM polls them, which it does
    every step); patched once."""
    init = config_cls.__init__
    if not getattr(init, "splitbench", False):
        def init_without_thread(self, *args, **kwargs) -> None:
            init(self, *args, **kwargs)
            self.enable_pthread = False
        init_without_thread.splitbench = True
        config_cls.__init__ = init_without_thread
    return config_cls


def no_nixl_progress_thread() -> bool:
    """NIXL agents vLLM makes in this process run without a progress thread. Lazy: vLLM loads nixl only when a NIXL
    connector starts (importing it costs ~1 s), so its loader is wrapped; False when this vLLM has no such loader."""
    try:
        from vllm.distributed import nixl_utils
    except ImportError:
        return False
    load = getattr(nixl_utils, "_load_nixl_attr", None)
    if load is None:
        return False
    if getattr(load, "splitbench", False):
        return True

    def load_patched(name: str):
        value = load(name)
        return without_progress_thread(value) if name == "nixl_agent_config" and value is not None else value
    load_patched.splitbench = True
    nixl_utils._load_nixl_attr = load_patched
    return True


def register() -> None:
    """vLLM's plugin hook: act only in servers splitbench started on CPU (a CPU without AMX refuses; harmless)."""
    if os.environ.get(ENV) == "1":
        request_amx()
    if os.environ.get(CORES_ENV):
        keep_nixl_on_own_cores()
        if os.environ.get(PROGRESS_ENV) != "1":
            no_nixl_progress_thread()
