"""Fitting helpers of the simulator's performance model (perfmodel.py): pooled piecewise-linear curves and the
decode KV-read cost per context token, overall and per batch size.
"""
from __future__ import annotations

import numpy as np

# ----------------------------------------------------------------------------- piecewise-linear helpers

def median(values) -> float:
    """The median as np.median gives it (the mean of the two middle values of an even count), for the few values
    of a profile point, without np.median's array set-up for each (profile fits: 33 -> 9 ms with the plain rows
    of profiles.py). numpy.ma, which np.median imports on first use, is imported later by np.percentile anyway."""
    s = sorted(values)
    h = len(s) // 2
    return float(s[h]) if len(s) % 2 else (s[h - 1] + s[h]) / 2


def isotonic(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool adjacent violators (non-decreasing y over sorted x); each pooled block becomes one point at its
    weighted mean x, so the result is strictly increasing and keeps a positive slope for extrapolation."""
    blocks: list[list[float]] = []   # [sum w*x, sum w*y, sum w]
    for xi, yi, wi in zip(x, y, w):
        blocks.append([wi * xi, wi * yi, wi])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] >= blocks[-1][1] / blocks[-1][2]:
            b = blocks.pop()
            blocks[-1] = [blocks[-1][0] + b[0], blocks[-1][1] + b[1], blocks[-1][2] + b[2]]
    return (np.array([b[0] / b[2] for b in blocks]), np.array([b[1] / b[2] for b in blocks]))


def interp(x: np.ndarray, y: np.ndarray, v: float) -> float:
    """Piecewise linear through (x, y); below x[0]: y[0]; above x[-1]: the last segment extended."""
    if v <= x[0] or len(x) == 1:   # one point: a constant (no slope to extend)
        return float(y[0])
    if v >= x[-1]:
        return float(y[-1] + (y[-1] - y[-2]) / (x[-1] - x[-2]) * (v - x[-1]))
    return float(np.interp(v, x, y))


def base_medians(pts: list[dict], kv: float | list) -> tuple[list[int], list[float], list[int]]:
    """Per batch size: median over rows of token_time - kv(b) x b x (p + (t-2)/2) (the run's mean context), and
    the row counts; kv one number or batch_kv's points. The kv fit's guard and base(b) use this one computation."""
    bs, ys, ws = [], [], []
    for b in sorted({pt["b"] for pt in pts if pt["decode"]}):
        k = kv_of(kv, b)
        vals = [r["token_time"] / 1e3 - k * b * (pt["p"] + (pt["t"] - 2) / 2)
                for pt in pts if pt["b"] == b and pt["decode"] for r in pt["rows"]]
        bs.append(b), ys.append(median(vals)), ws.append(len(vals))
    return bs, ys, ws


def falls_with_batch(pts: list[dict], kv: float) -> bool:
    """The batch-1 context fit over-explains the batch sweep: base(b) at the largest batch below base(1) (seen on
    a CPU core, where batched decode reads its KV faster per token than one sequence does)."""
    bs, ys, _ = base_medians(pts, kv)
    return len(bs) > 1 and bs[0] == 1 and ys[-1] < ys[0]


def joint_kv(pts: list[dict]) -> float | None:
    """token_time = base + kv x C by least squares over every decode row (all batch sizes); None unless kv > 0."""
    a = np.array([[1.0, pt["b"] * (pt["p"] + (pt["t"] - 2) / 2)] for pt in pts if pt["decode"] for _ in pt["rows"]])
    y = np.array([r["token_time"] / 1e3 for pt in pts if pt["decode"] for r in pt["rows"]])
    if len(y) < 3:
        return None
    kv = float(np.linalg.lstsq(a, y, rcond=None)[0][1])
    return kv if kv > 0 else None


def batch_kv(pts: list[dict], kv1: float | None) -> list[tuple[int, float]]:
    """kv(b) where the profile measured batch b at two or more contexts: the slope of token_time over the batch's
    KV tokens b x (p + (t-2)/2), least squares over its rows (>= 0); (1, kv1) first. [] when no batch size has two
    contexts (SplitwiseSim's profiles sweep batches at one prompt size only): one kv for every batch then.
    kv1 None (batch 1's e2e fit was unusable): batch 1's own slope the same way, [] unless it and a larger batch
    have one."""
    out = []
    for b in sorted({pt["b"] for pt in pts if pt["decode"] and (pt["b"] > 1 or kv1 is None)}):
        rows = [(b * (pt["p"] + (pt["t"] - 2) / 2), r["token_time"] / 1e3)
                for pt in pts if pt["b"] == b and pt["decode"] for r in pt["rows"]]
        if len({x for x, _ in rows}) < 2:
            continue
        a = np.array([[1.0, x] for x, _ in rows])
        slope = float(np.linalg.lstsq(a, np.array([y for _, y in rows]), rcond=None)[0][1])
        out.append((b, max(slope, 0.0)))
    if kv1 is None:
        return out if len(out) > 1 and out[0][0] == 1 else []
    return [(1, float(kv1))] + out if out else []


def kv_of(kv: float | list, b: int) -> float:
    """kv at batch size b: a number as it is; batch_kv's points linear in b between them, the ends' values outside."""
    if not isinstance(kv, list):
        return kv
    bs = [x for x, _ in kv]
    return float(np.interp(b, bs, [y for _, y in kv]))
