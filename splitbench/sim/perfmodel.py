"""Performance model for the simulator: prompt and decode iteration times interpolated from a SplitwiseSim-format
profile CSV (ms), model shapes for KV-memory accounting, and finding/fetching the profile (sha256-checked).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitbench.errors import InputError
from splitbench.hardware.catalog import MachineType

PROFILE_FILE = "perf_model.csv"
PROFILE_URL = ("https://raw.githubusercontent.com/Mutinifni/splitwise-sim/"
               "8f99e7dc9b407f4ce2488d03dd44c0b8b946dab0/data/perf_model.csv")
PROFILE_SHA256 = "dbbe505d1d64fc4bd1ec03c50edf944643586de4f68a81e94cbd55dd5bdfbf41"
ENV_VAR = "SPLITBENCH_PROFILE_DIR"
COLUMNS = ("model", "hardware", "prompt_size", "batch_size", "token_size", "peak_power", "average_power",
           "prompt_time", "token_time", "e2e_time", "tensor_parallel")
REQUIRED = ("model", "hardware", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time",
            "e2e_time", "tensor_parallel")
MAX_FIT_OUTPUT_TOKENS = 1024   # PROFILES.md caveat 3: longer output-sweep runs were capped
BLOWUP_RATIO = 1.5             # e2e > 1.5 x (prompt + (n-1) x token_time): failed run (caveat 2), point dropped
CAPPED_RATIO = 0.95            # e2e < 0.95 x that: fewer tokens generated than asked; not used for the kv fit
FALL_RATIO = 0.9               # prompt_time < 0.9 x a smaller batch's (same prompt, tokens): failed run, dropped

# Accelerator memory as NVIDIA states it (decimal GB) and HBM bandwidth (NVIDIA A100/H100 SXM/H200 SXM datasheets).
ACCELERATOR_MEMORY_BYTES = {"a100-80gb": 80e9, "h100-80gb": 80e9, "h200-141gb": 141e9}
MEMORY_BANDWIDTH_BPS = {"a100-80gb": 2.039e12, "h100-80gb": 3.35e12, "h200-141gb": 4.8e12,
                        "cpu-host": 20e9}  # cpu-host: ESTIMATE for a small VM's DRAM bandwidth
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8_e4m3fn": 1,
                "float8_e5m2": 1, "int8": 1, "uint8": 1, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1,
                "F8_E5M2": 1, "I8": 1, "U8": 1, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "BOOL": 1}


# ----------------------------------------------------------------------------- model shapes and KV memory

@dataclass(frozen=True)
class ModelShape:
    """What KV-memory accounting needs: KV bytes per token and the weights' bytes."""
    name: str
    layers: int
    kv_heads: int      # key/value heads (GQA/MQA: fewer than attention heads)
    head_dim: int
    dtype_bytes: int   # of the KV cache (= the weights' dtype here)
    weight_bytes: float

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes   # K and V


MODEL_SHAPES = {
    # huggingface.co/bigscience/bloom config.json: n_layer 70, n_head 112 (MHA), hidden_size 14336 -> head dim 128;
    # 176B parameters (model card), fp16.
    "bloom-176b": ModelShape("bloom-176b", layers=70, kv_heads=112, head_dim=128, dtype_bytes=2,
                             weight_bytes=176e9 * 2),
    # huggingface.co/meta-llama/Llama-2-70b-hf config.json: num_hidden_layers 80, num_attention_heads 64,
    # num_key_value_heads 8 (GQA), hidden_size 8192 -> head dim 128; 70B parameters, torch_dtype float16.
    "llama2-70b": ModelShape("llama2-70b", layers=80, kv_heads=8, head_dim=128, dtype_bytes=2,
                             weight_bytes=70e9 * 2),
}


def _safetensors_params(path: Path) -> int:
    """Parameter count of one .safetensors file from its header (8-byte length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")


def shape_from_hf_config(model_dir: str | os.PathLike) -> ModelShape:
    """ModelShape of a local HF model dir: config.json + the safetensors headers (weights at the config dtype)."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read model config: {e}", file=str(cfg_path)) from None
    cfg = {**cfg.get("text_config", {}), **cfg}

    def get(*keys):
        for k in keys:
            if cfg.get(k) is not None:
                return cfg[k]
        raise InputError(f"config has none of {', '.join(keys)}", file=str(cfg_path), column=keys[0])
    layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
    heads = int(get("num_attention_heads", "n_head"))
    kv_heads = int(cfg.get("num_key_value_heads") or (1 if cfg.get("multi_query") else heads))
    head_dim = int(cfg.get("head_dim") or get("hidden_size", "n_embed") // heads)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    if dtype not in _DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}", file=str(cfg_path), column="torch_dtype")
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise InputError(f"{d}: no *.safetensors files to size the weights from")
    params = sum(_safetensors_params(f) for f in files)
    return ModelShape(d.name, layers, kv_heads, head_dim, _DTYPE_BYTES[dtype], float(params * _DTYPE_BYTES[dtype]))


def accelerator_memory_bytes(accelerator: str, override: float | None = None) -> float:
    """Memory of one accelerator: `override` when given, else ACCELERATOR_MEMORY_BYTES (InputError if unknown)."""
    if override is not None:
        return float(override)
    try:
        return ACCELERATOR_MEMORY_BYTES[accelerator]
    except KeyError:
        raise InputError(f"memory of accelerator {accelerator!r} is unknown (known: "
                         f"{', '.join(ACCELERATOR_MEMORY_BYTES)}); give it explicitly") from None


def kv_capacity_tokens(shape: ModelShape, accelerators: int, accelerator_memory_bytes: float,
                       memory_fraction: float = 0.9) -> int:
    """KV tokens that fit on `accelerators` devices holding one copy of the weights (>= 0)."""
    if accelerators < 1 or accelerator_memory_bytes <= 0 or not 0 < memory_fraction <= 1:
        raise InputError(f"kv capacity needs accelerators >= 1, memory > 0 and 0 < fraction <= 1, got "
                         f"{accelerators}, {accelerator_memory_bytes}, {memory_fraction}")
    free = memory_fraction * accelerators * accelerator_memory_bytes - shape.weight_bytes
    return max(0, int(free // shape.kv_bytes_per_token))


def machine_kv_capacity_tokens(shape: ModelShape, machine: MachineType, memory_bytes: float | None = None,
                               memory_fraction: float = 0.9, tensor_parallel: int | None = None) -> int:
    """KV tokens on one catalog machine: accelerators // tensor_parallel instances (default: one instance over
    all accelerators), each holding its own copy of the weights."""
    tp = int(tensor_parallel or machine.accelerators)
    if tp < 1 or tp > machine.accelerators:
        raise InputError(f"tensor_parallel {tp} does not fit machine {machine.name!r} "
                         f"({machine.accelerators} accelerators)")
    mem = accelerator_memory_bytes(machine.accelerator, memory_bytes)
    return (machine.accelerators // tp) * kv_capacity_tokens(shape, tp, mem, memory_fraction)


def profile_hardware_name(machine_type: str | MachineType, catalog: dict | None = None) -> str:
    """Catalog machine -> profile `hardware`: its accelerator (+ "-pcap" when power-capped); CPU hosts: own name."""
    if isinstance(machine_type, str):
        from splitbench.hardware.catalog import get_machine, load_catalog
        machine_type = get_machine(machine_type, catalog if catalog is not None else load_catalog())
    if machine_type.accelerators == 0:
        return machine_type.name
    return machine_type.accelerator + ("-pcap" if machine_type.power_cap_fraction is not None else "")


# ----------------------------------------------------------------------------- piecewise-linear helpers

def _isotonic(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool adjacent violators (non-decreasing y over sorted x); each pooled block becomes one point at its
    weighted mean x, so the result is strictly increasing and keeps a positive slope for extrapolation."""
    blocks: list[list[float]] = []   # [sum w*x, sum w*y, sum w]
    for xi, yi, wi in zip(x, y, w):
        blocks.append([wi * xi, wi * yi, wi])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            b = blocks.pop()
            blocks[-1] = [blocks[-1][0] + b[0], blocks[-1][1] + b[1], blocks[-1][2] + b[2]]
    return (np.array([b[0] / b[2] for b in blocks]), np.array([b[1] / b[2] for b in blocks]))


def _interp(x: np.ndarray, y: np.ndarray, v: float) -> float:
    """Piecewise linear through (x, y); below x[0]: y[0]; above x[-1]: the last segment extended."""
    if v <= x[0] or len(x) == 1:   # one point: a constant (no slope to extend)
        return float(y[0])
    if v >= x[-1]:
        return float(y[-1] + (y[-1] - y[-2]) / (x[-1] - x[-2]) * (v - x[-1]))
    return float(np.interp(v, x, y))


# ----------------------------------------------------------------------------- the model

def _base_medians(pts: list[dict], kv: float) -> tuple[list[int], list[float], list[int]]:
    """Per batch size: median over rows of token_time - kv x b x (p + (t-2)/2) (the run's mean context), and the
    row counts. The kv fit's guard and base(b) use this one computation."""
    bs, ys, ws = [], [], []
    for b in sorted({pt["b"] for pt in pts if pt["decode"]}):
        vals = [r["token_time"] / 1e3 - kv * b * (pt["p"] + (pt["t"] - 2) / 2)
                for pt in pts if pt["b"] == b and pt["decode"] for r in pt["rows"]]
        bs.append(b), ys.append(float(np.median(vals))), ws.append(len(vals))
    return bs, ys, ws


class PerfModel:
    """Iteration times of one (model, hardware, tensor_parallel) profile group, in seconds.

    rows: dicts with prompt_size, batch_size, token_size, prompt_time, token_time, e2e_time (ms), line.
    """

    def __init__(self, model: str, hardware: str, tensor_parallel: int, rows: list[dict], *,
                 source: str | None = None, sha256: str | None = None, shape: ModelShape | None = None,
                 bandwidth_bps: float | None = None, max_fit_output_tokens: int = MAX_FIT_OUTPUT_TOKENS):
        self.model, self.hardware, self.tensor_parallel = model, hardware, int(tensor_parallel)
        self.shape = shape or MODEL_SHAPES.get(model)
        if bandwidth_bps is None:
            bandwidth_bps = MEMORY_BANDWIDTH_BPS.get(hardware.removesuffix("-pcap"))
        self._info = {"source": source, "sha256": sha256, "group": [model, hardware, self.tensor_parallel],
                      "rows": len(rows), "notes": [], "dropped": []}
        if hardware.endswith("-pcap"):
            self._info["notes"].append("power-capped rows are SYNTHETIC in SplitwiseSim's profile (PROFILES.md "
                                       "caveat 1: prompt_time x 1.30 of the uncapped rows, token_time and e2e_time "
                                       "unchanged, so e2e - prompt_time is understated and the kv fit is biased)")
        pts = self._points(rows, max_fit_output_tokens)
        self._fit_prompt(pts)
        self._fit_kv(pts, bandwidth_bps)
        self._fit_base(pts)

    # ---------------------------------------------------------------- fitting
    def _points(self, rows: list[dict], max_out: int) -> list[dict]:
        """Medians per (prompt, batch, tokens) point; flags anomalous (dropped) and decode-unusable points."""
        by: dict[tuple, list[dict]] = {}
        for r in rows:
            by.setdefault((r["prompt_size"], r["batch_size"], r["token_size"]), []).append(r)
        pts = []
        for (p, b, t), rs in sorted(by.items()):
            m = {c: float(np.median([r[c] for r in rs])) for c in ("prompt_time", "token_time", "e2e_time")}
            expected = m["prompt_time"] + (t - 1) * m["token_time"]
            pts.append({"p": p, "b": b, "t": t, "rows": rs, **m, "e2e_ratio": m["e2e_time"] / expected,
                        "drop": None, "decode": t >= 2 and t <= max_out})
        drops = self._info["dropped"]
        for pt in pts:   # caveat 2, detected generically: e2e blows up, or prompt time falls as the batch grows
            prev = [q for q in pts if (q["p"], q["t"]) == (pt["p"], pt["t"]) and q["b"] < pt["b"] and not q["drop"]]
            why = []
            if pt["e2e_ratio"] > BLOWUP_RATIO:
                why.append(f"e2e {pt['e2e_ratio']:.1f}x prompt_time + (tokens-1) x token_time")
            if prev and pt["prompt_time"] < FALL_RATIO * max(q["prompt_time"] for q in prev):
                why.append(f"prompt_time {pt['prompt_time']:.0f} ms below a smaller batch's")
            if why:
                pt["drop"], pt["decode"] = "; ".join(why), False
                drops.append({"prompt_size": pt["p"], "batch_size": pt["b"], "token_size": pt["t"],
                              "rows": len(pt["rows"]), "lines": [r.get("line") for r in pt["rows"]],
                              "why": pt["drop"] + " (anomalous run, caveat 2)"})
            elif pt["decode"] and pt["e2e_ratio"] < CAPPED_RATIO:
                pt["capped"] = True   # its mean TBT still counts for base(b); its e2e is useless for the kv fit
        kept = [pt for pt in pts if not pt["drop"]]
        self._info["not_for_decode_fit"] = (
            [{"prompt_size": q["p"], "batch_size": q["b"], "token_size": q["t"],
              "why": f"token_size > {max_out} (caveat 3)"} for q in kept if q["t"] > max_out] +
            [{"prompt_size": q["p"], "batch_size": q["b"], "token_size": q["t"],
              "why": f"e2e only {q['e2e_ratio']:.2f}x the requested tokens' time: output capped (not in the kv fit)"}
             for q in kept if q.get("capped")])
        self._info.update(points_used=len(kept), rows_used=sum(len(q["rows"]) for q in kept))
        if not kept:
            raise InputError(f"profile group {self.model}/{self.hardware}/TP{self.tensor_parallel}: every point "
                             "was dropped as anomalous", file=self._info["source"])
        return kept

    def _fit_prompt(self, pts: list[dict]) -> None:
        """prompt time over batched tokens p x b: median of all rows per token count, made non-decreasing."""
        x = sorted({pt["p"] * pt["b"] for pt in pts})
        ys = [np.median([r["prompt_time"] for pt in pts if pt["p"] * pt["b"] == v for r in pt["rows"]]) for v in x]
        ws = [sum(len(pt["rows"]) for pt in pts if pt["p"] * pt["b"] == v) for v in x]
        self._px, py = _isotonic(np.array(x, float), np.array(ys) / 1e3, np.array(ws, float))
        self._py = py
        self._info["prompt_points"] = [[round(a, 1), round(b * 1e3, 3)] for a, b in zip(self._px, py)]
        self._info["prompt_rule"] = ("piecewise linear in batched prompt tokens (pooled to non-decreasing); below "
                                     "the first point: the first point's time; above the last: last segment extended")

    def _fit_kv(self, pts: list[dict], bandwidth_bps: float | None) -> None:
        """e2e = prompt + sum of n = tokens-1 iterations at contexts p .. p+n-1, over batch-1 rows; divided by n
        (weighted least squares: a run's noise grows with its length): (e2e - prompt)/n = base1 + kv (p + (n-1)/2)."""
        rows = [(pt["p"], pt["t"] - 1, r) for pt in pts
                if pt["b"] == 1 and pt["decode"] and not pt.get("capped") for r in pt["rows"]]
        fitted, se, why = None, None, None
        if len({(p, n) for p, n, _ in rows}) >= 3:
            a = np.array([[1.0, p + (n - 1) / 2] for p, n, _ in rows])
            y = np.array([(r["e2e_time"] - r["prompt_time"]) / 1e3 / n for _, n, r in rows])
            sol, *_ = np.linalg.lstsq(a, y, rcond=None)
            fitted = float(sol[1])
            if len(y) > 2:
                cov = np.linalg.pinv(a.T @ a) * float(np.sum((y - a @ sol) ** 2)) / (len(y) - 2)
                se = float(math.sqrt(max(cov[1, 1], 0.0)))
            if fitted <= 0:
                why = "fit is non-positive"
            elif se is None or se > 0.5 * fitted:
                why = "fit is unstable (standard error > 50% of the value)"
            else:   # the context term may not explain more than the batch sweep's measured iterations
                base = _base_medians(pts, fitted)[1]
                if not base or min(base) <= 0:
                    why = "fit exceeds whole measured iterations of larger batches (base time <= 0)"
        else:
            why = "fewer than 3 distinct batch-1 (prompt, tokens) points"
        tp = self.tensor_parallel
        bw = (self.shape.kv_bytes_per_token / (bandwidth_bps * tp)
              if self.shape is not None and bandwidth_bps else None)
        if why is None:
            self.kv_s_per_token, src = fitted, "fitted"
        elif bw is not None:
            self.kv_s_per_token, src = bw, f"bandwidth estimate ({why})"
        else:
            self.kv_s_per_token, src = 0.0, f"zero: {why} and no model shape/bandwidth for an estimate"
        self._info.update(kv_s_per_token=self.kv_s_per_token, kv_source=src, kv_fitted_s_per_token=fitted,
                          kv_fitted_stderr=se, kv_fit_rows=len(rows), kv_bandwidth_s_per_token=bw,
                          kv_bandwidth_rule=(f"kv_bytes_per_token {self.shape.kv_bytes_per_token} / "
                                             f"({bandwidth_bps:.4g} B/s x TP {tp})") if bw else None)

    def _fit_base(self, pts: list[dict]) -> None:
        """base(b) = median over rows of token_time - kv x b x (p + (t-2)/2) (the run's mean context)."""
        bs, ys, ws = _base_medians(pts, self.kv_s_per_token)
        if not bs:
            raise InputError(f"profile group {self.model}/{self.hardware}/TP{self.tensor_parallel}: no point usable "
                             "for decode (need output tokens >= 2)", file=self._info["source"])
        self._bx, self._by = _isotonic(np.array(bs, float), np.array(ys), np.array(ws, float))
        if self._by[0] <= 0:
            raise InputError(f"profile group {self.model}/{self.hardware}/TP{self.tensor_parallel}: decode base "
                             "time <= 0", file=self._info["source"])
        self._info["decode_base_points"] = [[round(a, 2), round(b * 1e3, 4)] for a, b in zip(self._bx, self._by)]
        self._info["decode_rule"] = ("token_time(b, C) = base(b) + kv_s_per_token x C; base piecewise linear in b "
                                     "(pooled to non-decreasing), first value below, last segment extended above")

    # ---------------------------------------------------------------- queries
    def prompt_time_s(self, batched_prompt_tokens: int) -> float:
        """One prefill iteration over `batched_prompt_tokens` tokens (0 for none)."""
        if batched_prompt_tokens <= 0:
            return 0.0
        return _interp(self._px, self._py, batched_prompt_tokens)

    def base_s(self, batch_size: int) -> float:
        return 0.0 if batch_size <= 0 else _interp(self._bx, self._by, batch_size)

    def token_time_s(self, batch_size: int, context_tokens: int) -> float:
        """One decode iteration of `batch_size` requests holding `context_tokens` KV tokens in total."""
        if batch_size <= 0:
            return 0.0
        return self.base_s(batch_size) + self.kv_s_per_token * context_tokens

    def token_iterations_s(self, batch_size: int, context_tokens: int, iterations: int) -> float:
        """Total of `iterations` decode iterations, the context growing by batch_size after each (closed form)."""
        k = int(iterations)
        if k <= 0 or batch_size <= 0:
            return 0.0
        return k * self.base_s(batch_size) + self.kv_s_per_token * (k * context_tokens +
                                                                      batch_size * k * (k - 1) / 2)

    def iterations_within(self, batch_size: int, context_tokens: int, duration_s: float) -> int:
        """Largest k with token_iterations_s(b, C, k) <= duration_s (quadratic root, then exact boundary fix)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not math.isfinite(duration_s):
            raise ValueError(f"duration_s must be finite, got {duration_s}")
        if duration_s <= 0:
            return 0
        a2 = self.kv_s_per_token * batch_size / 2
        a1 = self.base_s(batch_size) + self.kv_s_per_token * context_tokens - a2
        k = int(duration_s / a1) if a2 == 0 else int(2 * duration_s / (a1 + math.sqrt(a1 * a1 + 4 * a2 * duration_s)))
        f = lambda n: self.token_iterations_s(batch_size, context_tokens, n)  # noqa: E731
        while f(k + 1) <= duration_s:
            k += 1
        while k > 0 and f(k) > duration_s:
            k -= 1
        return k

    def describe(self) -> dict:
        d = dict(self._info)
        if self.shape is not None:
            d["model_shape"] = {**self.shape.__dict__, "kv_bytes_per_token": self.shape.kv_bytes_per_token}
        return d


# ----------------------------------------------------------------------------- loading, finding, fetching

def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def load_profiles(path: str | os.PathLike, shapes: dict[str, ModelShape] | None = None,
                  **model_options) -> dict[tuple[str, str, int], PerfModel]:
    """Every (model, hardware, tensor_parallel) group of a profile CSV fitted into a PerfModel; `shapes` adds
    model shapes (e.g. shape_from_hf_config of a measured model) to MODEL_SHAPES for the bandwidth estimate."""
    from splitbench.sim.profiles import read_profile_rows
    rows = read_profile_rows(path)
    digest = sha256_of(path)
    known = {**MODEL_SHAPES, **(shapes or {})}
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["hardware"], r["tensor_parallel"]), []).append(r)
    return {k: PerfModel(*k, rs, source=str(path), sha256=digest, shape=known.get(k[0]), **model_options)
            for k, rs in groups.items()}


def get_perf_model(profiles: dict[tuple[str, str, int], PerfModel], model: str, hardware: str,
                   tp: int) -> PerfModel:
    """The group's PerfModel; InputError listing the known groups otherwise."""
    try:
        return profiles[(model, hardware, int(tp))]
    except KeyError:
        known = ", ".join(f"{m}/{h}/TP{t}" for m, h, t in sorted(profiles))
        raise InputError(f"no profile for model {model!r} on {hardware!r} with tensor_parallel {tp} "
                         f"(known: {known})") from None


def profile_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "splitbench" / "profiles"


def profile_search_path() -> list[Path]:
    """$SPLITBENCH_PROFILE_DIR (os.pathsep-separated), ../shared/profiles (from the CWD), the user cache."""
    dirs = [Path(x) for x in os.environ.get(ENV_VAR, "").split(os.pathsep) if x]
    return dirs + [Path("..") / "shared" / "profiles", profile_cache_dir()]


def find_profile(path: str | os.PathLike | None = None) -> Path:
    """An explicit profile file, else the first perf_model.csv along profile_search_path()."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError("profile file not found", file=str(p))
        return p
    for d in profile_search_path():
        if (d / PROFILE_FILE).is_file():
            return d / PROFILE_FILE
    where = ", ".join(str(d) for d in profile_search_path())
    raise InputError(f"no {PROFILE_FILE} found (searched {where}); run `splitbench profiles fetch`")
