"""GPU energy from the power sampler's samples file: reading it, energy per GPU over a window (counter or
integrated power), and attributing it to instances and pools. Pure apart from reading the file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from splitbench.errors import InputError


def load_power_samples(path: str | Path) -> dict[str, Any]:
    """Read a samples file -> {"header", "samples": {gpu: {"t_unix_s", "power_w", "energy_j" (array or None)}}}.

    A torn last line (the sampler was killed mid-write) is skipped; any other bad line raises InputError."""
    path = Path(path)
    lines = path.read_text(errors="replace").split("\n")
    header, rows = None, {}
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if header is None:
                if obj.get("kind") != "header":
                    raise InputError("first line is not the sampler header", file=str(path), line=i)
                header = obj
                continue
            rows.setdefault(int(obj["gpu"]), []).append((float(obj["t_unix_s"]), float(obj["power_w"]),
                                                          math.nan if obj["energy_j"] is None else obj["energy_j"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if i == len(lines):   # torn last line: the only one without a trailing newline
                continue
            raise InputError(f"bad power sample ({type(e).__name__}: {e})", file=str(path), line=i) from None
    if header is None:
        raise InputError("no sampler header", file=str(path), line=1)
    counters = {g["index"]: g.get("energy_counter", False) for g in header.get("gpus", [])}
    samples = {}
    for g, r in sorted(rows.items()):
        a = np.array(sorted(r), dtype=float).reshape(-1, 3)
        e = a[:, 2] if counters.get(g, True) and np.isfinite(a[:, 2]).any() else None
        samples[g] = {"t_unix_s": a[:, 0], "power_w": a[:, 1], "energy_j": e}
    return {"header": header, "samples": samples}


def _energy_one(t: np.ndarray, p: np.ndarray, e: np.ndarray | None, start: float, end: float) -> dict[str, Any]:
    t_lo, t_hi = float(t[0]), float(t[-1])
    covered = max(0.0, min(end, t_hi) - max(start, t_lo))
    dur = end - start
    inside = (t >= start) & (t <= end)
    n_in = int(inside.sum())
    span_in = float(t[inside][-1] - t[inside][0]) if n_in > 1 else 0.0
    if e is not None and np.isfinite(e).all():
        def counter_at(x: float) -> float:   # interpolated inside, extrapolated at the nearest sample's power outside
            if x < t_lo:
                return float(e[0] - p[0] * (t_lo - x))
            if x > t_hi:
                return float(e[-1] + p[-1] * (x - t_hi))
            return float(np.interp(x, t, e))
        energy, method = counter_at(end) - counter_at(start), "counter"
    else:
        grid = np.concatenate(([start], t[(t > start) & (t < end)], [end]))
        pg = np.interp(grid, t, p)   # clamps to the first/last sample's power outside the samples
        energy, method = float(np.sum(0.5 * (pg[1:] + pg[:-1]) * np.diff(grid))), "integrated"
    return {"energy_j": energy, "method": method,
            "avg_power_w": energy / dur if dur > 0 else float(np.interp(start, t, p)),
            "samples": n_in, "rate_hz": (n_in - 1) / span_in if span_in > 0 else 0.0,
            "coverage": covered / dur if dur > 0 else float(t_lo <= start <= t_hi),
            "extrapolated_s": dur - covered, "start_unix_s": start, "end_unix_s": end}


def energy_by_gpu(samples: dict, start_unix_s: float, end_unix_s: float) -> dict[int, dict]:
    """Energy of each GPU over exactly [start, end] (accepts load_power_samples()'s result or its "samples").

    Per GPU: energy_j, method ("counter": the total-energy counter interpolated at both ends; "integrated":
    trapezoid over power_w with interpolated edges), avg_power_w, samples (in the window), rate_hz, coverage
    (fraction of the window between the first and last sample) and extrapolated_s. Parts of the window outside the
    samples are extrapolated at the nearest sample's power, never silently: coverage < 1 says so.
    The counter wins where present: on Hopper, NVML's power_w is a 1 s moving average (measured on an H200: ~5 %
    low over a 10 s load phase), while the counter steps at once."""
    if end_unix_s < start_unix_s:
        raise ValueError(f"energy window ends ({end_unix_s}) before it starts ({start_unix_s})")
    per = samples["samples"] if "samples" in samples and "header" in samples else samples
    out = {}
    for g, s in per.items():
        t = np.asarray(s["t_unix_s"], dtype=float)
        if t.size == 0:
            continue
        e = s.get("energy_j")
        out[int(g)] = _energy_one(t, np.asarray(s["power_w"], dtype=float),
                                  None if e is None else np.asarray(e, dtype=float), start_unix_s, end_unix_s)
    return out


def attribute_energy(per_gpu: dict[int, dict], instances: list[dict]) -> dict[str, Any]:
    """Split each GPU's energy_j equally among the instances holding it; sum per instance and per pool.

    instances: [{"id", "pool", "gpu_ids"}] as in run.json's backend.instances. GPUs sampled but held by no
    instance are "unattributed" (idle capacity, still in total_energy_j); a held GPU that was not sampled is listed
    in the instance's "unsampled_gpus" and adds nothing."""
    energy = {int(g): float(v["energy_j"]) for g, v in per_gpu.items()}
    holders: dict[int, list[str]] = {}
    for inst in instances:
        for g in dict.fromkeys(int(x) for x in inst.get("gpu_ids") or []):
            holders.setdefault(g, []).append(str(inst["id"]))
    by_inst: dict[str, dict[str, Any]] = {}
    pools: dict[str, dict[str, Any]] = {}
    for inst in instances:
        iid, gids = str(inst["id"]), list(dict.fromkeys(int(x) for x in inst.get("gpu_ids") or []))
        e = sum(energy[g] / len(holders[g]) for g in gids if g in energy)
        by_inst[iid] = {"energy_j": e, "gpus": gids, "unsampled_gpus": [g for g in gids if g not in energy]}
        pool = pools.setdefault(str(inst.get("pool", "")), {"energy_j": 0.0, "gpus": []})
        pool["energy_j"] += e
        pool["gpus"] = sorted(set(pool["gpus"]) | {g for g in gids if g in energy})
    free = sorted(g for g in energy if g not in holders)
    return {"instances": by_inst, "pools": pools,
            "unattributed": {"energy_j": sum(energy[g] for g in free), "gpus": free},
            "total_energy_j": sum(energy.values())}
