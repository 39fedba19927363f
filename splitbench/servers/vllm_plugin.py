"""A vLLM general plugin (entry point `vllm.general_plugins`, loaded by every vLLM process, workers included) that
asks Linux for the AMX tile-data permission when splitbench launched the server on CPU (SPLITBENCH_CPU_AMX=1).

Why: vLLM CPU's attention picks its AMX kernel when the CPU has AMX tiles, but only oneDNN's first bf16 matmul
requests the permission (arch_prctl ARCH_REQ_XCOMP_PERM). A P/D decode instance never prefills, so its first AMX
instruction is the attention kernel's and the worker dies of SIGILL (exit -4) on its first step (seen on a Xeon
with amx_tile, vLLM 0.32). Requesting the permission up front is what oneDNN would do; it changes nothing else.
"""
from __future__ import annotations

import ctypes
import os
import platform

ENV = "SPLITBENCH_CPU_AMX"
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


def register() -> None:
    """vLLM's plugin hook: act only in servers splitbench started on CPU (a CPU without AMX refuses; harmless)."""
    if os.environ.get(ENV) == "1":
        request_amx()
