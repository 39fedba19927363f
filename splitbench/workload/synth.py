"""Seeded synthetic workloads: Poisson or gamma (burstiness CV) arrivals; fixed, uniform or trace-sampled lengths;
optionally N system prompts, each request's first share of its input one of them (prefix hashes).

Spec strings: `synth:arrivals=gamma,cv=2,rate=50,count=1000,lengths=azure-conv-2023,seed=1,system_prompts=4,
system_share=0.5,block=16`.
"""
from __future__ import annotations

import os

import numpy as np

from splitbench.errors import InputError
from splitbench.schema.files import atomic_write_bytes
from splitbench.workload.catalog import catalog, file_source, resolve_trace
from splitbench.workload.traces import read_trace
from splitbench.workload.types import Workload

_KEYS = ("arrivals", "rate", "cv", "duration", "count", "lengths", "input", "output", "seed", "system_prompts",
         "system_share", "block")
SYNTH_BLOCK_TOKENS = 16   # hash block size of system-prompt workloads (vLLM's GPU default block size)
_EPOCH = np.datetime64("2024-01-01T00:00:00", "ns")   # first timestamp of CSVs written by write_azure_csv


def _arrivals(rng: np.random.Generator, kind: str, rate_rps: float, cv: float,
              duration_s: float | None, count: int | None) -> np.ndarray:
    def gaps(n: int) -> np.ndarray:
        if kind == "poisson":
            return rng.exponential(1.0 / rate_rps, n)
        shape = 1.0 / cv ** 2
        return rng.gamma(shape, 1.0 / (rate_rps * shape), n)   # mean gap 1/rate, CV = cv

    if count is not None:
        return np.concatenate([[0.0], np.cumsum(gaps(count - 1))])
    chunk = max(64, int(rate_rps * duration_s * 1.1) + 64)
    t = np.concatenate([[0.0], np.cumsum(gaps(chunk))])
    while t[-1] < duration_s:
        t = np.concatenate([t, t[-1] + np.cumsum(gaps(chunk))])
    return t[t < duration_s]


def _tokens_range(v, what: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        lo, hi = int(v[0]), int(v[1])
    else:
        lo = hi = int(v)
    if not 1 <= lo <= hi:
        raise InputError(f"synth: {what} tokens must satisfy 1 <= low <= high, got {lo}-{hi}")
    return lo, hi


def system_prompt_hashes(input_tokens: np.ndarray, system_prompts: int, system_share: float, block_tokens: int,
                         seed: int = 0) -> list[np.ndarray]:
    """Hash ids where each request takes one of `system_prompts` system prompts (seeded pick) for the whole blocks
    of the first `system_share` of its input, and unique blocks after. System prompt j's k-th block has one id, so
    two requests with the same system prompt share min(their system blocks) blocks exactly."""
    if system_prompts < 1:
        raise InputError(f"synth: system_prompts must be >= 1, got {system_prompts}")
    if not 0 < system_share <= 1:
        raise InputError(f"synth: system_share must be in (0, 1], got {system_share}")
    if block_tokens < 1:
        raise InputError(f"synth: block must be >= 1 token, got {block_tokens}")
    pick = np.random.default_rng([seed, 1]).integers(0, system_prompts, len(input_tokens))
    blocks = -(-input_tokens // block_tokens)
    shared = np.floor(input_tokens * system_share / block_tokens).astype(np.int64)
    stride = int(blocks.max()) + 1 if len(blocks) else 1
    out, fresh = [], system_prompts * stride
    for j, nb, ns in zip(pick.tolist(), blocks.tolist(), shared.tolist()):
        own = np.arange(fresh, fresh + nb - ns, dtype=np.int64)
        fresh += nb - ns
        out.append(np.concatenate([j * stride + np.arange(ns, dtype=np.int64), own]))
    return out


def synthesize(*, rate_rps: float, arrivals: str = "poisson", cv: float = 1.0, duration_s: float | None = None,
               count: int | None = None, lengths: str = "fixed", input_tokens: int | tuple[int, int] = 128,
               output_tokens: int | tuple[int, int] = 32, seed: int = 0, trace_dir: str | None = None,
               name: str | None = None, system_prompts: int | None = None, system_share: float = 0.5,
               block_tokens: int = SYNTH_BLOCK_TOKENS) -> Workload:
    """Synthetic workload, reproducible for a given seed (numpy default_rng).

    arrivals: "poisson" at rate_rps, or "gamma" with inter-arrival CV `cv` (shape 1/cv^2, mean gap 1/rate),
    for duration_s seconds or exactly `count` requests. lengths: "fixed" (input_tokens/output_tokens ints),
    "uniform" ((low, high) inclusive ranges), or a trace name/path whose (input, output) rows are sampled jointly.
    system_prompts=N: prefix hashes of block_tokens-token blocks (system_prompt_hashes), else none.
    """
    if arrivals not in ("poisson", "gamma"):
        raise InputError(f"synth: arrivals must be poisson or gamma, got {arrivals!r}")
    if not rate_rps > 0:
        raise InputError(f"synth: rate must be > 0 requests/s, got {rate_rps}")
    if arrivals == "gamma" and not cv > 0:
        raise InputError(f"synth: cv must be > 0, got {cv}")
    if (duration_s is None) == (count is None):
        raise InputError("synth: give exactly one of duration=SECONDS or count=N")
    if count is not None and count < 1:
        raise InputError(f"synth: count must be >= 1, got {count}")
    if duration_s is not None and not duration_s > 0:
        raise InputError(f"synth: duration must be > 0 seconds, got {duration_s}")
    rng = np.random.default_rng(seed)
    t = _arrivals(rng, arrivals, rate_rps, cv, duration_s, count)
    n = len(t)
    params = {"arrivals": arrivals, "rate_rps": rate_rps, "cv": cv if arrivals == "gamma" else 1.0,
              "duration_s": duration_s, "count": count, "lengths": lengths, "seed": seed}
    src: dict = {"name": name or "synth", "path": None, "sha256": None, "synth": params}
    if lengths == "fixed":
        (i_lo, i_hi), (o_lo, o_hi) = _tokens_range(input_tokens, "input"), _tokens_range(output_tokens, "output")
        if i_lo != i_hi or o_lo != o_hi:
            raise InputError("synth: token ranges like 64-512 need lengths=uniform")
        inp, out = np.full(n, i_lo, np.int64), np.full(n, o_lo, np.int64)
        params.update(input_tokens=i_lo, output_tokens=o_lo)
    elif lengths == "uniform":
        (i_lo, i_hi), (o_lo, o_hi) = _tokens_range(input_tokens, "input"), _tokens_range(output_tokens, "output")
        inp = rng.integers(i_lo, i_hi, n, endpoint=True, dtype=np.int64)
        out = rng.integers(o_lo, o_hi, n, endpoint=True, dtype=np.int64)
        params.update(input_tokens=[i_lo, i_hi], output_tokens=[o_lo, o_hi])
    else:
        path, cat_name = resolve_trace(lengths, trace_dir)
        cols = catalog()[cat_name]["columns"] if cat_name else None
        base = read_trace(path, columns=cols, name=cat_name or path.stem)
        rows = rng.integers(0, len(base), n)
        inp, out = base.input_tokens[rows], base.output_tokens[rows]
        fs = file_source(path, cat_name)
        src["lengths_source"] = {k: fs[k] for k in ("name", "path", "sha256")}
    w = Workload(name=name or "synth", arrival_s=t.astype(np.float64), input_tokens=inp, output_tokens=out,
                 trace_index=np.arange(n, dtype=np.int64), source=src)
    if system_prompts is not None:
        w.prefix_hashes = system_prompt_hashes(inp, system_prompts, system_share, block_tokens, seed)
        w.block_tokens = block_tokens
        params.update(system_prompts=system_prompts, system_share=system_share, block_tokens=block_tokens)
    return w


def parse_spec(spec: str) -> dict:
    """`synth:k=v,...` (prefix optional) -> keyword arguments for synthesize(). InputError on malformed specs."""
    body = spec[len("synth:"):] if spec.startswith("synth:") else spec
    raw: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, val = part.partition("=")
        key = key.strip()
        if not eq or not val.strip():
            raise InputError(f"synth spec {spec!r}: expected key=value, got {part!r}")
        if key not in _KEYS:
            raise InputError(f"synth spec {spec!r}: unknown key {key!r} (known: {', '.join(_KEYS)})")
        if key in raw:
            raise InputError(f"synth spec {spec!r}: key {key!r} given twice")
        raw[key] = val.strip()
    if "rate" not in raw:
        raise InputError(f"synth spec {spec!r}: rate=REQUESTS_PER_S is required")

    def num(key: str, conv):
        try:
            return conv(raw[key])
        except ValueError:
            raise InputError(f"synth spec {spec!r}: {key}={raw[key]!r} is not a valid "
                             f"{'integer' if conv is int else 'number'}") from None

    def tokens(key: str):
        lo, dash, hi = raw[key].partition("-")
        try:
            return (int(lo), int(hi)) if dash else int(lo)
        except ValueError:
            raise InputError(f"synth spec {spec!r}: {key}={raw[key]!r} must be N or LOW-HIGH") from None

    kw: dict = {"rate_rps": num("rate", float), "arrivals": raw.get("arrivals", "poisson"),
                "lengths": raw.get("lengths", "fixed"), "name": spec if spec.startswith("synth:") else "synth:" + spec}
    for key, arg, conv in (("cv", "cv", float), ("duration", "duration_s", float), ("count", "count", int),
                           ("seed", "seed", int), ("system_prompts", "system_prompts", int),
                           ("system_share", "system_share", float), ("block", "block_tokens", int)):
        if key in raw:
            kw[arg] = num(key, conv)
    if "cv" in raw and kw["arrivals"] != "gamma":
        raise InputError(f"synth spec {spec!r}: cv applies only to arrivals=gamma")
    for key in ("system_share", "block"):
        if key in raw and "system_prompts" not in raw:
            raise InputError(f"synth spec {spec!r}: {key} applies only with system_prompts=N")
    if "system_prompts" in raw:   # bad values fail at parse time, before anything is read
        system_prompt_hashes(np.ones(1, np.int64), kw["system_prompts"], kw.get("system_share", 0.5),
                             kw.get("block_tokens", SYNTH_BLOCK_TOKENS))
    for key in ("input", "output"):
        if key in raw:
            if kw["lengths"] not in ("fixed", "uniform"):
                raise InputError(f"synth spec {spec!r}: {key}= applies only to lengths=fixed or lengths=uniform")
            kw[key + "_tokens"] = tokens(key)
    if kw["lengths"] == "fixed" and any(isinstance(kw.get(k), tuple) for k in ("input_tokens", "output_tokens")):
        raise InputError(f"synth spec {spec!r}: ranges like 64-512 need lengths=uniform")
    return kw


def from_spec(spec: str, trace_dir: str | None = None) -> Workload:
    """The workload of a `synth:k=v,...` spec (lengths=<trace name> is looked up along trace_dir first)."""
    return synthesize(**parse_spec(spec), trace_dir=trace_dir)


def write_azure_csv(w: Workload, path: str | os.PathLike) -> None:
    """Write TIMESTAMP,ContextTokens,GeneratedTokens (Azure 2023 format, 7 fractional digits), atomically."""
    ts = _EPOCH + np.round((w.arrival_s - (w.arrival_s[0] if len(w) else 0)) * 1e6).astype(np.int64) * 1000
    s = np.char.replace(np.datetime_as_string(ts, unit="us"), "T", " ")
    lines = [f"{t}0,{i},{o}" for t, i, o in zip(s.tolist(), w.input_tokens.tolist(), w.output_tokens.tolist())]
    atomic_write_bytes(path, ("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(lines) + "\n").encode())
