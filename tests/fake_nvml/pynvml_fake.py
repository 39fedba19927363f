"""A fake NVML (same names as nvidia-ml-py's pynvml) for tests, configured by environment variables.

FAKE_NVML_GPUS="H100:300,H100:150:noenergy": one GPU per item, MODEL:WATTS[:noenergy]; name "NVIDIA MODEL (fake)".
Power is constant; the energy counter is WATTS x time.monotonic() (a fixed base shared by all processes), so a GPU
at 300 W over a 2.0 s window gains exactly 600 J. FAKE_NVML_INIT_ERROR=1 makes nvmlInit fail as on a host
without the driver; FAKE_NVML_READ_DELAY_S=0.02 makes each power read take that long. Units as in NVML: power and limits in mW, energy in mJ, memory in bytes.
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_LIBRARY_NOT_FOUND = 12
_STRINGS = {1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported", 12: "NVML Shared Library Not Found"}

_initialized = 0


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML error {self.value}")


def _gpus() -> list[dict]:
    out = []
    for i, item in enumerate(x for x in os.environ.get("FAKE_NVML_GPUS", "H100:300").split(",") if x.strip()):
        parts = item.strip().split(":")
        out.append({"index": i, "model": parts[0], "power_w": float(parts[1]),
                    "energy": "noenergy" not in parts[2:], "memory_gib": 141 if parts[0] == "H200" else 80})
    return out


def _check() -> None:
    if not _initialized:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def nvmlInit() -> None:
    global _initialized
    if os.environ.get("FAKE_NVML_INIT_ERROR"):
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    _initialized += 1


def nvmlShutdown() -> None:
    global _initialized
    _check()
    _initialized -= 1


def nvmlSystemGetDriverVersion() -> str:
    _check()
    return "555.55.fake"


def nvmlDeviceGetCount() -> int:
    _check()
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> dict:
    _check()
    gpus = _gpus()
    if not 0 <= index < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return gpus[index]


def nvmlDeviceGetName(handle: dict) -> bytes:
    _check()
    return f"NVIDIA {handle['model']} (fake)".encode()   # bytes, as older pynvml versions return


def nvmlDeviceGetUUID(handle: dict) -> str:
    _check()
    return f"GPU-fake-{handle['index']:08d}"


def nvmlDeviceGetPowerUsage(handle: dict) -> int:
    _check()
    time.sleep(float(os.environ.get("FAKE_NVML_READ_DELAY_S", "0")))
    return round(handle["power_w"] * 1000)


def nvmlDeviceGetTotalEnergyConsumption(handle: dict) -> int:
    _check()
    if not handle["energy"]:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(handle["power_w"] * time.monotonic() * 1000)   # W x s = J; x 1000 -> mJ


def nvmlDeviceGetEnforcedPowerLimit(handle: dict) -> int:
    _check()
    return 700_000


def nvmlDeviceGetMemoryInfo(handle: dict) -> SimpleNamespace:
    _check()
    total = handle["memory_gib"] * 2**30
    return SimpleNamespace(total=total, free=total, used=0)
