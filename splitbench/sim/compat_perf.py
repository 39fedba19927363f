"""SplitwiseSim's performance, memory and transfer model for the compat mode (`--perf-model splitwisesim`): batch
iteration times interpolated over batch tokens, its model/machine figures, KV bytes without GQA, transfer time.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from splitbench.errors import InputError
from splitbench.sim.perffit import median
from splitbench.sim.profiles import read_profile_rows

# SplitwiseSim's model repo (configs/model_repo/architectures/*.yaml, sizes/*-fp16.yaml): layers, hidden size,
# weight bytes, bytes per value. Its KV size (request.py estimate_kv_cache_size) uses the hidden size, not
# the KV heads, so Llama-2-70B's GQA is ignored there (8x the real KV bytes).
SPLITWISESIM_MODELS = {
    "bloom-176b": (70, 14336, 329_000_000_000, 2),
    "llama2-70b": (80, 8192, 135_000_000_000, 2),
}
# SplitwiseSim's hardware repo (configs/hardware_repo/skus, processors): machine -> (profile hardware name,
# GPUs per machine, bytes per GPU = 80 GiB).
SPLITWISESIM_MACHINES = {
    "dgx-a100": ("a100-80gb", 8, 85_899_345_920),
    "dgx-h100": ("h100-80gb", 8, 85_899_345_920),
    "dgx-h100-pcap": ("h100-80gb-pcap", 8, 85_899_345_920),
}
MIXED_BATCH_FACTOR = 1.1   # performance_model.py get_iteration_duration: a prompt+decode batch = prompt time x 1.1
GIB = 1024 ** 3


@dataclass(frozen=True)
class CompatModel:
    """What SplitwiseSim knows of a model: enough for its KV size and machine memory."""
    name: str
    layers: int
    hidden: int
    weight_bytes: int
    dtype_bytes: int = 2

    def kv_bytes(self, tokens: int) -> int:
        """request.py estimate_kv_cache_size: 2 (K and V) x tokens x hidden x layers x bytes (batch size 1)."""
        return 2 * int(tokens) * self.hidden * self.layers * self.dtype_bytes


def compat_model(name: str) -> CompatModel:
    if name not in SPLITWISESIM_MODELS:
        raise InputError(f"--perf-model splitwisesim knows the models {', '.join(SPLITWISESIM_MODELS)}, "
                         f"not {name!r}", column="model")
    return CompatModel(name, *SPLITWISESIM_MODELS[name])


def compat_machine(name: str, tensor_parallel: int | None = None) -> tuple[str, int, int, int]:
    """(profile hardware, tensor parallelism, instances per machine, memory bytes per instance) of a SplitwiseSim
    machine: one instance on every `tensor_parallel` GPUs (start_state.py; default all of them), holding their
    memory (instance.py max_memory)."""
    if name not in SPLITWISESIM_MACHINES:
        raise InputError(f"--perf-model splitwisesim knows the machines {', '.join(SPLITWISESIM_MACHINES)}, "
                         f"not {name!r}", column="pools")
    hw, gpus, gpu_bytes = SPLITWISESIM_MACHINES[name]
    tp = tensor_parallel or gpus
    if tp < 1 or gpus % tp:
        raise InputError(f"--tensor-parallel {tp} does not divide the {gpus} GPUs of {name}")
    return hw, tp, gpus // tp, tp * gpu_bytes


def transfer_time_s(prompt_tokens: int, model: CompatModel, bandwidth_bytes_per_s: float) -> float:
    """scheduler.py add_kv_cache_transfer + interconnect.py DummyLink: the prompt's KV (prompt tokens, not + 1)
    over a link of its own per request (no contention)."""
    return model.kv_bytes(prompt_tokens) / bandwidth_bytes_per_s


class _Linear:
    """scipy interp1d(kind="linear", fill_value="extrapolate") over sorted distinct x: the bracketing segment
    inside the range, the first or last segment extended outside it."""

    __slots__ = ("x", "y")

    def __init__(self, x: list[float], y: list[float]):
        if len(x) < 2:
            raise ValueError("need at least two points")
        self.x, self.y = x, y

    def __call__(self, v: float) -> float:
        x, y = self.x, self.y
        hi = min(max(int(np.searchsorted(x, v, side="left")), 1), len(x) - 1)
        lo = hi - 1
        slope = (y[hi] - y[lo]) / (x[hi] - x[lo])
        return slope * (v - x[lo]) + y[lo]


def _medians(rows: list[dict], column: str) -> tuple[list[float], list[float]]:
    """Median of `column` (ms -> s first) per batch tokens = prompt_size x batch_size, sorted by batch tokens."""
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(r["prompt_size"] * r["batch_size"], []).append(r[column] / 1000)
    xs = sorted(by)
    return [float(v) for v in xs], [median(by[v]) for v in xs]


class SplitwiseSimPerf:
    """performance_model.py DatabasePerformanceModel for one (model, hardware, tensor_parallel) group: two
    predictors over *batch tokens* (a prompt adds its size, a decode 1) fitted on medians per prompt_size x
    batch_size. All-prompt batch: prompt predictor; all-decode: token predictor; mixed: prompt predictor x 1.1."""

    def __init__(self, model: str, hardware: str, tensor_parallel: int, rows: list[dict], source: str | None = None):
        self.key = (model, hardware, int(tensor_parallel))
        if len({r["prompt_size"] * r["batch_size"] for r in rows}) < 2:
            raise InputError(f"profile group {model}/{hardware}/TP{tensor_parallel}: needs rows at two or more "
                             "batch-token counts", file=source)
        self.prompt = _Linear(*_medians(rows, "prompt_time"))
        self.token = _Linear(*_medians(rows, "token_time"))
        self._cache: dict[tuple[int, int], float] = {}

    def iteration_s(self, batch_tokens: int, prompts: int, decodes: int) -> float:
        """One iteration of a batch of `prompts` prompt tasks and `decodes` decode tasks (batch_tokens in all)."""
        kind = 0 if decodes == 0 else (1 if prompts == 0 else 2)
        key = (kind, batch_tokens)
        t = self._cache.get(key)
        if t is None:
            t = float(self.token(batch_tokens) if kind == 1 else self.prompt(batch_tokens))
            if kind == 2:
                t *= MIXED_BATCH_FACTOR
            if not (t > 0 and math.isfinite(t)):   # performance_model.py asserts > 0
                raise InputError(f"profile group {'/'.join(map(str, self.key))}: iteration time {t!r} s at "
                                 f"{batch_tokens} batch tokens ({prompts} prompts, {decodes} decodes) is not > 0")
            self._cache[key] = t
        return t

    def describe(self) -> dict:
        return {"group": list(self.key), "rule": "SplitwiseSim DatabasePerformanceModel: linear in batch tokens "
                "(interp1d extrapolate), mixed batch = prompt x 1.1",
                "prompt_points_s": [[a, b] for a, b in zip(self.prompt.x, self.prompt.y)],
                "token_points_s": [[a, b] for a, b in zip(self.token.x, self.token.y)]}


def load_splitwisesim_perf(path: str | os.PathLike, model: str, hardware: str,
                           tensor_parallel: int) -> SplitwiseSimPerf:
    """The group (model, hardware, tensor_parallel) of a profile CSV (SplitwiseSim's perf_model.csv format)."""
    rows = [r for r in read_profile_rows(path) if (r["model"], r["hardware"], r["tensor_parallel"]) ==
            (model, hardware, int(tensor_parallel))]
    if not rows:
        raise InputError(f"no profile rows for model {model!r}, hardware {hardware!r}, tensor_parallel "
                         f"{tensor_parallel}", file=str(path))
    return SplitwiseSimPerf(model, hardware, tensor_parallel, rows, source=str(path))
