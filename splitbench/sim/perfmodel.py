"""Performance model for the simulator: prompt and decode iteration times interpolated from a SplitwiseSim-format
profile CSV (ms), fitted per (model, hardware, tensor_parallel) group.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any


import numpy as np
from mypy_extensions import mypyc_attr

from splitbench.errors import InputError
from splitbench.ledger import _interpreted, _with_abc
from splitbench.sim.perffit import (base_medians, batch_kv, falls_with_batch, interp, isotonic, joint_kv, kv_of,
                                    median)
from splitbench.sim.profiles import cpu_profile_hardware, read_profile_rows, sha256_of
from splitbench.sim.shapes import MEMORY_BANDWIDTH_BPS, MODEL_SHAPES, ModelShape

MAX_FIT_OUTPUT_TOKENS = 1024   # PROFILES.md caveat 3: longer output-sweep runs were capped
VLLM_CPU_CHUNK_TOKENS = 2048   # vLLM CPU's max_num_batched_tokens for its API server, per rank (0.32 arg_utils)
BLOWUP_RATIO = 1.5             # e2e > 1.5 x (prompt + (n-1) x token_time): failed run (caveat 2), point dropped
CAPPED_RATIO = 0.95            # e2e < 0.95 x that: fewer tokens generated than asked; not used for the kv fit
FALL_RATIO = 0.9               # prompt_time < 0.9 x a smaller batch's (same prompt, tokens): failed run, dropped


@mypyc_attr(allow_interpreted_subclasses=True)   # the tests' closed-form models subclass it
class PerfModel:
    """Iteration times of one (model, hardware, tensor_parallel) profile group, in seconds. The simulator calls it
    natively (SimMachine.perf is typed PerfModel: 7% of a simulation's time went to generic method calls when it was
    Any, on the 19k replay); a model of another shape subclasses it and overrides the queries it answers.

    rows: dicts with prompt_size, batch_size, token_size, prompt_time, token_time, e2e_time (ms), line.
    """
    model: str
    hardware: str
    tensor_parallel: int
    shape: ModelShape | None
    _info: dict[str, Any]
    _prompt_memo: dict[int, float]
    _base_memo: dict[int, float]
    _kv_memo: dict[int, float]
    _px: Any
    _py: Any
    _bx: Any
    _by: Any
    attn_s_per_token2: float
    profile_chunk_tokens: int | None
    kv_s_per_token: float
    _kv_b: list[Any]

    def __init__(self, model: str, hardware: str, tensor_parallel: int, rows: list[dict], *,
                 source: str | None = None, sha256: str | None = None, shape: ModelShape | None = None,
                 bandwidth_bps: float | None = None, max_fit_output_tokens: int = MAX_FIT_OUTPUT_TOKENS,
                 profile_chunk_tokens: int | None = -1) -> None:
        self.model, self.hardware, self.tensor_parallel = model, hardware, int(tensor_parallel)
        # the measured server's prefill token budget: vLLM CPU's default (2048 a rank) for the catalog's CPU
        # machines, where splitbench profiles vLLM CPU; none known for GPU profiles (SplitwiseSim's are whole)
        if profile_chunk_tokens == -1:
            profile_chunk_tokens = VLLM_CPU_CHUNK_TOKENS * int(tensor_parallel) if cpu_profile_hardware(hardware) \
                else None
        self.profile_chunk_tokens = profile_chunk_tokens
        self.shape = shape or MODEL_SHAPES.get(model)
        if bandwidth_bps is None:
            bandwidth_bps = MEMORY_BANDWIDTH_BPS.get(hardware.removesuffix("-pcap"))
        self._info = {"source": source, "sha256": sha256, "group": [model, hardware, self.tensor_parallel],
                      "rows": len(rows), "notes": [], "dropped": []}
        if hardware.endswith("-pcap"):
            self._info["notes"].append("power-capped rows are SYNTHETIC in SplitwiseSim's profile (PROFILES.md "
                                       "caveat 1: prompt_time x 1.30 of the uncapped rows, token_time and e2e_time "
                                       "unchanged, so e2e - prompt_time is understated and the kv fit is biased)")
        # memos of the two interpolations, keyed by the whole-number argument: the simulator asks for the same
        # batch sizes and prompt-token totals millions of times (np.interp is ~5 us a call)
        self._prompt_memo = {}
        self._base_memo = {}
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
            m = {c: median([r[c] for r in rs]) for c in ("prompt_time", "token_time", "e2e_time")}
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
        """The dense part of a prefill iteration over batched tokens p x b: median of all rows per token count, each
        less its requests' own attention (b c p^2, the batch-1 sweep's p^2 term), made non-decreasing. A batch of
        four 512-token prompts and one 2048-token prompt do the same dense work but not the same attention."""
        self._fit_attention(pts)
        c = self.attn_s_per_token2
        x = sorted({pt["p"] * pt["b"] for pt in pts})
        ys = [median([r["prompt_time"] / 1e3 - pt["b"] * c * pt["p"] * pt["p"]
                      for pt in pts if pt["p"] * pt["b"] == v for r in pt["rows"]]) for v in x]
        ws = [sum(len(pt["rows"]) for pt in pts if pt["p"] * pt["b"] == v) for v in x]
        self._px, py = isotonic(np.array(x, float), np.maximum(np.array(ys), 0.0), np.array(ws, float))
        self._py = py
        self._info["prompt_points"] = [[round(a, 1), round(b * 1e3, 3)] for a, b in zip(self._px, py)]
        self._info["prompt_rule"] = ("dense part: piecewise linear in batched prompt tokens, each row less b c p^2 "
                                     "(pooled to non-decreasing); below the first point: the first point's time; "
                                     "above the last: last segment extended; plus attention_s per iteration")

    def _fit_attention(self, pts: list[dict]) -> None:
        """attn_s_per_token2: the p^2 coefficient of prompt_time(p) = a + b p + c p^2 over the batch-1 prompt sweep
        (least squares on the medians, c >= 0): a prompt's attention work grows with the square of its length, so a
        prefill chunk of n tokens over P tokens already in its KV costs 2 c P n more than a lone n-token prompt."""
        by: dict[Any, list[float]] = {}
        for pt in pts:
            if pt["b"] == 1:
                by.setdefault(pt["p"], []).extend(r["prompt_time"] / 1e3 for r in pt["rows"])
        c = fitted = cap = 0.0
        if len(by) >= 3:
            ps = np.array(sorted(by), float)  # type: ignore[type-var]
            ys = np.array([median(by[p]) for p in sorted(by)])
            # the measured server prefilled a prompt longer than its token budget in ceil(p / budget) iterations,
            # each with the per-iteration intercept a; the attention total is c p^2 either way
            chunks = np.ceil(ps / self.profile_chunk_tokens) if self.profile_chunk_tokens else np.ones_like(ps)
            sol, *_ = np.linalg.lstsq(np.stack([chunks, ps, ps * ps], axis=1), ys,  # type: ignore
                                      rcond=None)
            c = fitted = max(0.0, float(sol[2]))
            ratio = self.shape.attention_to_dense_flops if self.shape is not None else None
            # on a GPU, no more curvature than attention's FLOPs explain at the dense layers' rate; a CPU runs
            # attention far below its GEMM rate (tiny-llama on a core: fitted 12x the cap, and the lone 4096-token
            # prompt measured 162-177 ms where the capped fit gave 131 ms), so there the fit stands
            if ratio is not None and sol[1] > 0 and not cpu_profile_hardware(self.hardware):
                cap = float(sol[1]) * ratio / 2
                c = min(c, cap)
        self.attn_s_per_token2 = c
        self._info.update(attn_s_per_token2=c, attn_fitted_s_per_token2=fitted, attn_flops_cap_s_per_token2=cap,
                          profile_chunk_tokens=self.profile_chunk_tokens,
                          attention_rule=(
            "prompt_time(p) = a k(p) + b p + c p^2 fitted on the batch-1 prompt sweep's medians, k(p) the "
            "iterations the measured server took (ceil(p / profile_chunk_tokens), else 1) (c >= 0; 0 with fewer "
            "than 3 prompt sizes), at most b x attention/dense FLOPs / 2 when the model's shape is known and the "
            "hardware is not a CPU machine of the catalog; a chunk "
            "of n tokens over P cached tokens adds 2 c P n"))

    def attention_s(self, self_tokens2: int, cross_tokens2: int) -> float:
        """Prefill attention of one iteration, added to its dense part prompt_time_s(sum of n): c (sum of n^2 +
        2 sum of P n) over its requests' new tokens n and the tokens P already in their KV (an earlier chunk, a
        prefix-cache hit)."""
        return self.attn_s_per_token2 * (self_tokens2 + 2.0 * cross_tokens2)

    def lone_prompt_s(self, prompt_tokens: int) -> float:
        """A lone prompt prefilled in one iteration: what the profile's batch-1 prompt sweep measures."""
        return self.prompt_time_s(prompt_tokens) + self.attention_s(prompt_tokens * prompt_tokens, 0)

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
                base = base_medians(pts, fitted)[1]
                if not base or min(base) <= 0:
                    why = "fit exceeds whole measured iterations of larger batches (base time <= 0)"
        else:
            why = "fewer than 3 distinct batch-1 (prompt, tokens) points"
        tp = self.tensor_parallel
        bw = (self.shape.kv_bytes_per_token / (bandwidth_bps * tp)
              if self.shape is not None and bandwidth_bps else None)
        over = why is None or why.startswith("fit exceeds")   # a stable batch-1 fit the batch sweep contradicts
        joint = joint_kv(pts) if over and fitted and fitted > 0 and falls_with_batch(pts, fitted) else None
        if joint is not None:
            self.kv_s_per_token, src = joint, ("joint fit over every decode row: with the batch-1 fit "
                                               f"({fitted:.4g} s/token) base(b) fell with b")
        elif why is None:
            self.kv_s_per_token, src = fitted, "fitted"  # type: ignore[assignment]
        elif bw is not None:
            self.kv_s_per_token, src = bw, f"bandwidth estimate ({why})"
        else:
            self.kv_s_per_token, src = 0.0, f"zero: {why} and no model shape/bandwidth for an estimate"
        self._kv_b = batch_kv(pts, fitted) if over and fitted and fitted > 0 else []   # kv(b) needs a usable batch-1 fit
        if self._kv_b:
            self.kv_s_per_token, src = (
                fitted, "fitted per batch size (batch-1 fit, batches at two contexts)")  # type: ignore[assignment]
        elif not over and (own := batch_kv(pts, None)):   # batch 1's e2e fit unusable, but its prompt sweep is not
            self._kv_b = own
            self.kv_s_per_token, src = own[0][1], ("fitted per batch size, each its token_time over its KV tokens "
                                                   f"(batch 1 too, no usable e2e fit: {why})")
        self._info.update(kv_by_batch_s_per_token=self._kv_b or None)
        self._info.update(kv_s_per_token=self.kv_s_per_token, kv_source=src, kv_fitted_s_per_token=fitted,
                          kv_fitted_stderr=se, kv_fit_rows=len(rows), kv_bandwidth_s_per_token=bw,
                          kv_bandwidth_rule=(f"kv_bytes_per_token "  # type: ignore[union-attr]
                                             f"{self.shape.kv_bytes_per_token} / "
                                             f"({bandwidth_bps:.4g} B/s x TP {tp})") if bw else None)

    def _fit_base(self, pts: list[dict]) -> None:
        """base(b) = median over rows of token_time - kv x b x (p + (t-2)/2) (the run's mean context)."""
        bs, ys, ws = base_medians(pts, self._kv_b or self.kv_s_per_token)
        if not bs:
            raise InputError(f"profile group {self.model}/{self.hardware}/TP{self.tensor_parallel}: no point usable "
                             "for decode (need output tokens >= 2)", file=self._info["source"])
        self._bx, self._by = isotonic(np.array(bs, float), np.array(ys), np.array(ws, float))
        if self._by[0] <= 0:
            raise InputError(f"profile group {self.model}/{self.hardware}/TP{self.tensor_parallel}: decode base "
                             "time <= 0", file=self._info["source"])
        self._info["decode_base_points"] = [[round(a, 2), round(b * 1e3, 4)] for a, b in zip(self._bx, self._by)]
        self._info["decode_rule"] = ("token_time(b, C) = base(b) + kv(b) x C; base piecewise linear in b "
                                     "(pooled to non-decreasing), first value below, last segment extended above; "
                                     "kv(b) = kv_s_per_token unless kv_by_batch_s_per_token (linear in b between "
                                     "its points, the ends' values outside)")
        self._kv_memo = {}

    def kv_at(self, batch_size: int) -> float:
        """KV-read seconds per context token of a decode iteration of `batch_size` requests."""
        v = self._kv_memo.get(batch_size)
        if v is None:
            v = self._kv_memo[batch_size] = kv_of(self._kv_b, batch_size) if self._kv_b else self.kv_s_per_token
        return v

    # ---------------------------------------------------------------- queries
    def prompt_time_s(self, batched_prompt_tokens: int) -> float:
        """The dense part of one prefill iteration over `batched_prompt_tokens` tokens (0 for none); attention_s
        adds its requests' attention."""
        v = self._prompt_memo.get(batched_prompt_tokens)
        if v is None:
            v = 0.0 if batched_prompt_tokens <= 0 else interp(self._px, self._py, batched_prompt_tokens)
            self._prompt_memo[batched_prompt_tokens] = v
        return v

    def base_s(self, batch_size: int) -> float:
        v = self._base_memo.get(batch_size)
        if v is None:
            v = self._base_memo[batch_size] = 0.0 if batch_size <= 0 else interp(self._bx, self._by, batch_size)
        return v

    def token_time_s(self, batch_size: int, context_tokens: int) -> float:
        """One decode iteration of `batch_size` requests holding `context_tokens` KV tokens in total."""
        if batch_size <= 0:
            return 0.0
        return self.base_s(batch_size) + self.kv_at(batch_size) * context_tokens

    def token_iterations_s(self, batch_size: int, context_tokens: int, iterations: int) -> float:
        """Total of `iterations` decode iterations, the context growing by batch_size after each (closed form)."""
        k = int(iterations)
        if k <= 0 or batch_size <= 0:
            return 0.0
        base = self._base_memo.get(batch_size)
        if base is None:
            base = self.base_s(batch_size)
        return k * base + self.kv_at(batch_size) * (k * context_tokens + batch_size * k * (k - 1) / 2)

    def iterations_within(self, batch_size: int, context_tokens: int, duration_s: float) -> int:
        """Largest k with token_iterations_s(b, C, k) <= duration_s (quadratic root, then exact boundary fix)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not math.isfinite(duration_s):
            raise ValueError(f"duration_s must be finite, got {duration_s}")
        if duration_s <= 0:
            return 0
        b, c, kv, base = batch_size, context_tokens, self.kv_at(batch_size), self.base_s(batch_size)
        a2 = kv * b / 2
        a1 = base + kv * c - a2
        k = int(duration_s / a1) if a2 == 0 else int(2 * duration_s / (a1 + math.sqrt(a1 * a1 + 4 * a2 * duration_s)))
        # token_iterations_s(b, c, n), the same expression (so the same floats), without the calls
        def f(n: int) -> float:
            return 0.0 if n <= 0 else n * base + kv * (n * c + b * n * (n - 1) / 2)
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


# ----------------------------------------------------------------------------- loading

# the base through a name mypy does not resolve, put back by _with_abc when compiled (see ledger.Views)
_MappingBase: Any = Mapping


@_with_abc(Mapping)
@_interpreted
class Profiles(_MappingBase):
    """(model, hardware, tensor_parallel) -> PerfModel of one profile CSV; each group is fitted when first read
    (a simulation needs one or two of a file's groups: fitting all 13 of SplitwiseSim's took 0.1 s)."""

    def __init__(self, groups: dict[tuple[str, str, int], list[dict]], make):
        self._fitted: dict[Any, PerfModel] = {}
        self._groups, self._make = groups, make

    def __getitem__(self, key):
        if key not in self._fitted:
            self._fitted[key] = self._make(key, self._groups[key])
        return self._fitted[key]

    def __iter__(self):
        return iter(self._groups)

    def __len__(self) -> int:
        return len(self._groups)


def load_profiles(path: str | os.PathLike, shapes: dict[str, ModelShape] | None = None,
                  **model_options) -> Profiles:
    """Every (model, hardware, tensor_parallel) group of a profile CSV as a PerfModel (fitted on first use);
    `shapes` adds model shapes (e.g. shape_from_hf_config of a measured model) to MODEL_SHAPES."""
    rows = read_profile_rows(path)
    digest = sha256_of(path)
    known = {**MODEL_SHAPES, **(shapes or {})}
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["hardware"], r["tensor_parallel"]), []).append(r)
    return Profiles(groups, lambda k, rs: PerfModel(*k, rs, source=str(path), sha256=digest,  # type: ignore[misc]
                                                    shape=known.get(k[0]), **model_options))


def get_perf_model(profiles: Mapping[tuple[str, str, int], PerfModel], model: str, hardware: str,
                   tp: int) -> PerfModel:
    """The group's PerfModel; InputError listing the known groups otherwise."""
    try:
        return profiles[(model, hardware, int(tp))]
    except KeyError:
        known = ", ".join(f"{m}/{h}/TP{t}" for m, h, t in sorted(profiles))
        raise InputError(f"no profile for model {model!r} on {hardware!r} with tensor_parallel {tp} "
                         f"(known: {known})") from None

