"""GPU power via NVML, sampled per GPU in its own process (default 10 Hz) into DIR/power_samples.jsonl, with a
summary at the end; GPU detection. hardware/energy.py turns the samples into energy per GPU, instance and pool.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from splitbench.errors import ServerStartError
from splitbench.procs import log_tail, spawn, stop_group

SAMPLES_FILE = "power_samples.jsonl"
SUMMARY_FILE = "power_summary.json"
LOG_FILE = "power_sampler.log"


class SamplerError(Exception):
    """A start-up problem of the sampler process (no NVML, bad GPU index): printed as one line, exit code 2."""


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _load_nvml(name: str):
    # imported by name at run time, not at module top: the module is chosen per run (pynvml, or the tests' fake
    # via --nvml-module / $SPLITBENCH_NVML_MODULE) and is optional (hosts without NVIDIA GPUs lack it)
    try:
        nvml = importlib.import_module(name)
    except ImportError as e:
        raise SamplerError(f"NVML module {name!r} is not importable ({e}); install nvidia-ml-py "
                           f"(pip install 'splitbench[gpu]')") from None
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - pynvml raises NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise SamplerError(f"nvmlInit() failed: {type(e).__name__}: {_text(e)} (no NVIDIA driver on this host?)") \
            from None
    return nvml


def _try(fn: Any, err: Any, *args: Any) -> Any:
    """fn(*args), or None where NVML says the GPU does not support it (checked once per GPU, at start)."""
    try:
        return fn(*args)
    except err:
        return None


def _shutdown(nvml: Any) -> None:
    with contextlib.suppress(Exception):   # shutting down anyway
        nvml.nvmlShutdown()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _GpuState:
    """Running totals of one GPU over the sampler's life (the samples file stays the source of truth)."""

    def __init__(self, index: int, handle: Any, has_counter: bool):
        self.index, self.handle, self.has_counter = index, handle, has_counter
        self.n, self.t_first, self.t_last, self.p_last = 0, math.nan, math.nan, math.nan
        self.e_first, self.e_last, self.integrated_j, self.errors = math.nan, math.nan, 0.0, 0

    def add(self, t: float, p: float, e: float | None) -> None:
        if self.n:
            self.integrated_j += 0.5 * (p + self.p_last) * (t - self.t_last)
        else:
            self.t_first, self.e_first = t, (math.nan if e is None else e)
        self.n, self.t_last, self.p_last = self.n + 1, t, p
        self.e_last = math.nan if e is None else e

    def summary(self) -> dict[str, Any]:
        if not self.n:
            return {"energy_j": 0.0, "method": None, "samples": 0, "read_errors": self.errors}
        span = self.t_last - self.t_first if self.n > 1 else 0.0
        counter = self.e_last - self.e_first if self.has_counter else math.nan
        use_counter = math.isfinite(counter)
        energy = counter if use_counter else self.integrated_j
        return {"energy_j": energy, "method": "counter" if use_counter else "integrated",
                "counter_energy_j": counter if use_counter else None, "integrated_energy_j": self.integrated_j,
                "samples": self.n, "span_s": span, "rate_hz": (self.n - 1) / span if span > 0 else 0.0,
                "avg_power_w": energy / span if span > 0 else self.p_last, "read_errors": self.errors}


def _open_gpus(nvml: Any, err: Any, gpus: list[int] | None) -> tuple[list[_GpuState], list[dict]]:
    """One state and one header entry per sampled GPU (all when `gpus` is None); SamplerError for a bad index."""
    count = int(nvml.nvmlDeviceGetCount())
    idx = list(range(count)) if gpus is None else list(dict.fromkeys(gpus))
    bad = [g for g in idx if not 0 <= g < count]
    if bad or not idx:
        raise SamplerError(f"--gpus {','.join(map(str, gpus or []))}: this host has {count} GPU(s) (0..{count - 1})")
    states, meta = [], []
    for g in idx:
        h = nvml.nvmlDeviceGetHandleByIndex(g)
        has_counter = _try(nvml.nvmlDeviceGetTotalEnergyConsumption, err, h) is not None
        limit_mw = _try(nvml.nvmlDeviceGetEnforcedPowerLimit, err, h)
        states.append(_GpuState(g, h, has_counter))
        meta.append({"index": g, "name": _text(nvml.nvmlDeviceGetName(h)), "uuid": _text(nvml.nvmlDeviceGetUUID(h)),
                     "power_limit_w": None if limit_mw is None else limit_mw / 1000.0, "energy_counter": has_counter})
    return states, meta


def _sample_once(nvml: Any, err: Any, states: list[_GpuState], f) -> None:
    """One tick: power (and the energy counter where there is one) of every GPU, one line each."""
    for s in states:
        try:
            t = time.time()
            p = nvml.nvmlDeviceGetPowerUsage(s.handle) / 1000.0
            e = nvml.nvmlDeviceGetTotalEnergyConsumption(s.handle) / 1000.0 if s.has_counter else None
        except err as ex:
            s.errors += 1
            if s.errors == 1:
                print(f"power sampler: GPU {s.index}: read failed: {_text(ex)}", file=sys.stderr)
            continue
        s.add(t, p, e)
        f.write(json.dumps({"t_unix_s": round(t, 6), "gpu": s.index, "power_w": round(p, 3),
                            "energy_j": None if e is None else round(e, 3)}, separators=(",", ":")) + "\n")


def sample_until(tick: Callable[[], None], interval_s: float, stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic) -> int:
    """Call tick() on an absolute schedule (tick k at t0 + k x interval: no drift) until `stop` is set, then once
    more; ticks missed while behind are skipped, never bursted. Returns the number skipped. `stop` needs only
    is_set() and wait(timeout_s), so a fake clock can drive it."""
    t0, k, skipped = clock(), 0, 0
    while True:
        tick()
        if stop.is_set():
            return skipped
        k += 1
        now = clock()
        if t0 + k * interval_s < now:
            behind = math.ceil((now - t0) / interval_s)
            skipped += behind - k
            k = behind
        stop.wait(max(0.0, t0 + k * interval_s - clock()))


def run_sampler(out_dir: str | Path, gpus: list[int] | None, interval_s: float, nvml_module: str,
                stop: threading.Event) -> dict[str, Any]:
    """Sample until `stop` is set (then one last sample); write the samples file and the summary; return it."""
    if not interval_s > 0:
        raise SamplerError(f"--interval-s must be > 0, got {interval_s}")
    nvml = _load_nvml(nvml_module)
    err = getattr(nvml, "NVMLError", Exception)
    try:
        states, meta = _open_gpus(nvml, err, gpus)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        header = {"kind": "header", "unix_s": time.time(), "interval_s": interval_s, "nvml_module": nvml_module,
                  "driver": _text(nvml.nvmlSystemGetDriverVersion()), "gpus": meta}
        with open(out / SAMPLES_FILE, "w", buffering=1) as f:   # line-buffered: a crash loses at most one line
            f.write(json.dumps(header, separators=(",", ":")) + "\n")
            skipped = sample_until(lambda: _sample_once(nvml, err, states, f), interval_s, stop)
        per_gpu = {str(s.index): s.summary() for s in states}
        firsts, lasts = [s.t_first for s in states if s.n], [s.t_last for s in states if s.n]
        summary = {"start_unix_s": min(firsts, default=None), "end_unix_s": max(lasts, default=None),
                   "interval_s": interval_s, "skipped_ticks": skipped, "nvml_module": nvml_module,
                   "total_energy_j": sum(v["energy_j"] for v in per_gpu.values()), "gpus": per_gpu}
        _write_json_atomic(out / SUMMARY_FILE, summary)
        return summary
    finally:
        _shutdown(nvml)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m splitbench.hardware.power",
                                 description=f"Sample NVML power per GPU into DIR/{SAMPLES_FILE} until SIGTERM")
    ap.add_argument("--out", required=True, help="directory for the samples and the summary")
    ap.add_argument("--interval-s", type=float, default=0.1)
    ap.add_argument("--gpus", default=None, help="comma-separated GPU indices (default: all)")
    ap.add_argument("--nvml-module", default="pynvml")
    a = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        gpus = None if a.gpus in (None, "", "all") else [int(g) for g in a.gpus.split(",") if g.strip()]
    except ValueError:
        print(f"power sampler: --gpus {a.gpus!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    try:
        run_sampler(a.out, gpus, a.interval_s, a.nvml_module, stop)
    except SamplerError as e:
        print(f"power sampler: {e}", file=sys.stderr)
        return 2
    return 0


class PowerSamplerProcess:
    """The sampler in its own process group, so NVML calls and JSON writes never take the client's GIL."""

    def __init__(self, out_dir: str | Path, gpus: list[int] | None = None, interval_s: float = 0.1,
                 nvml_module: str = "pynvml", env: dict | None = None):
        self.out_dir, self.gpus, self.interval_s = Path(out_dir), (None if gpus is None else list(gpus)), interval_s
        self.nvml_module, self.env = nvml_module, dict(env or {})
        self.proc: subprocess.Popen | None = None
        self._summary: dict[str, Any] | None = None

    @property
    def samples_path(self) -> Path:
        return self.out_dir / SAMPLES_FILE

    def start(self, timeout_s: float = 10.0) -> None:
        """Spawn the sampler; return once the header and one sample per GPU are on disk (RuntimeError if not)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "splitbench.hardware.power", "--out", str(self.out_dir),
               "--interval-s", repr(float(self.interval_s)), "--nvml-module", self.nvml_module]
        if self.gpus is not None:
            cmd += ["--gpus", ",".join(map(str, self.gpus))]
        log_path = self.out_dir / LOG_FILE
        self.samples_path.unlink(missing_ok=True)
        (self.out_dir / SUMMARY_FILE).unlink(missing_ok=True)
        self.proc = spawn(cmd, log_path=log_path, env={**os.environ, **self.env})   # reaped if we die
        self._summary = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise ServerStartError(f"power sampler exited with code {rc} before its first sample: {log_tail(log_path)}")
            if self._first_tick_on_disk():
                return
            time.sleep(0.02)
        proc, self.proc = self.proc, None
        stop_group(proc)
        raise ServerStartError(f"power sampler took no sample within {timeout_s:g} s: {log_tail(log_path)}")

    def _first_tick_on_disk(self) -> bool:
        try:
            lines = self.samples_path.read_text().split("\n")[:-1]   # complete lines only
            return bool(lines) and len(lines) > len(json.loads(lines[0])["gpus"])
        except (OSError, ValueError, KeyError):
            return False

    def stop(self) -> dict[str, Any]:
        """SIGTERM: the child takes a last sample and writes power_summary.json, returned here (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_group(proc, grace_s=10.0)
        if self._summary is None:
            try:
                self._summary = json.loads((self.out_dir / SUMMARY_FILE).read_text())
            except (OSError, ValueError):
                self._summary = {}
        return self._summary

    def describe(self) -> dict[str, Any]:
        return {"samples_path": str(self.samples_path), "summary_path": str(self.out_dir / SUMMARY_FILE),
                "log_path": str(self.out_dir / LOG_FILE), "interval_s": self.interval_s, "gpus": self.gpus,
                "nvml_module": self.nvml_module}


def detect_gpus(nvml_module: str | None = None) -> list[dict]:
    """[{"index", "name", "memory_total_bytes"}] of this host's GPUs; [] when NVML is unavailable. Never raises.

    nvml_module: default $SPLITBENCH_NVML_MODULE or pynvml (as the run's power sampler)."""
    nvml_module = nvml_module or os.environ.get("SPLITBENCH_NVML_MODULE") or "pynvml"
    try:
        nvml = importlib.import_module(nvml_module)   # chosen at run time and optional: see _load_nvml
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return []
    try:
        out = []
        for i in range(int(nvml.nvmlDeviceGetCount())):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            out.append({"index": i, "name": _text(nvml.nvmlDeviceGetName(h)),
                        "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).total)})
        return out
    except Exception:  # noqa: BLE001
        return []
    finally:
        _shutdown(nvml)


if __name__ == "__main__":
    sys.exit(main())
