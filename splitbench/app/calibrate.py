"""Client capacity calibration: ramp an open-loop rate against the built-in stub (its own core) until the client
loses fidelity, store the ceiling per host (user cache), and describe each run's peak offered rate against it.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from typing import Callable

import numpy as np

from splitbench.app.options import RunOptions
from splitbench.app.session import RunSession
from splitbench.client.probe import http_get
from splitbench.hardware.ceiling import host_id, save_result, store_path
from splitbench.schema import records as R
from splitbench.schema.runmeta import host_info

CRITERIA = {"min_rate_ratio": 0.95, "ttft_p99_error_s": 0.005, "lag_p99_s": 0.002}
RAMP_RPS = (250, 500, 1000, 1500, 2000, 3000, 4000, 6000, 8000, 12000, 16000, 24000, 32000)   # past 8000: workers
WORKLOAD = {"ttft_s": 0.02, "tpot_s": 0.005, "input_tokens": 128, "output_tokens": 32}
WARMUP_S = 1.0   # the first second of each point is not scored (connections, caches)


# ----------------------------------------------------------------------------- scoring

def score_point(records: list[R.RequestRecord], target_rps: float, ttft_s: float, cpu_s: float,
                warmup_s: float = WARMUP_S, criteria: dict | None = None) -> dict:
    """Fidelity of one calibration point (records after warmup_s): achieved rate, TTFT p99 error against the
    stub's configured TTFT, schedule lag p99, tokens/s, CPU per request; `pass` by the criteria."""
    crit = {**CRITERIA, **(criteria or {})}
    sent = [r for r in records if r.actual_send_s is not None and r.intended_send_s >= warmup_s]
    ok = [r for r in sent if r.ok and r.first_token_s is not None]
    if len(sent) < 2 or not ok:
        return {"target_rps": target_rps, "pass": False, "reason": "no requests completed"}
    sends = np.sort([r.actual_send_s for r in sent])
    achieved = (len(sends) - 1) / (sends[-1] - sends[0]) if sends[-1] > sends[0] else 0.0
    intended = np.sort([r.intended_send_s for r in sent])
    planned = (len(intended) - 1) / (intended[-1] - intended[0]) if intended[-1] > intended[0] else target_rps
    lag = np.array([r.actual_send_s - r.intended_send_s for r in sent])
    err = np.array([r.first_token_s - r.actual_send_s - ttft_s for r in ok])
    span = max(r.end_s or 0 for r in ok) - min(r.actual_send_s for r in ok)
    toks = sum(r.actual_output_tokens or 0 for r in ok)
    p = {"target_rps": target_rps, "planned_rps": planned, "achieved_rps": achieved,
         "rate_ratio": achieved / planned if planned else None, "requests": len(sent), "ok": len(ok),
         "lag_p99_s": float(np.percentile(lag, 99)), "ttft_p99_error_s": float(np.percentile(err, 99)),
         "ttft_p50_error_s": float(np.percentile(err, 50)),
         "tokens_per_s": toks / span if span > 0 else None,
         "cpu_s_per_request": cpu_s / len(records) if records else None}
    reasons = []
    if p["rate_ratio"] is None or p["rate_ratio"] < crit["min_rate_ratio"] or len(ok) < len(sent):
        reasons.append(f"achieved {achieved:.0f} of {planned:.0f} req/s ({len(sent) - len(ok)} failed)")
    if p["ttft_p99_error_s"] > crit["ttft_p99_error_s"]:
        reasons.append(f"TTFT p99 error {p['ttft_p99_error_s'] * 1e3:.2f} ms")
    if p["lag_p99_s"] > crit["lag_p99_s"]:
        reasons.append(f"lag p99 {p['lag_p99_s'] * 1e3:.2f} ms")
    p["pass"], p["reason"] = not reasons, "; ".join(reasons)
    return p


def next_rate(points: list[dict], ramp: tuple = RAMP_RPS, resolution: float = 0.1) -> float | None:
    """The search: climb the ramp while points pass; after the first failure bisect between the best pass and
    the lowest failure until they are within `resolution` (relative). None = done."""
    passed = [p["target_rps"] for p in points if p["pass"]]
    failed = [p["target_rps"] for p in points if not p["pass"]]
    lo = max(passed, default=0.0)
    if not failed:
        higher = [r for r in ramp if r > lo]
        return float(higher[0]) if higher else None
    hi = min(f for f in failed)
    if lo == 0.0:
        return None if hi <= ramp[0] / 4 else hi / 2
    if hi <= lo * (1 + resolution):
        return None
    return round((lo + hi) / 2, 1)


# ----------------------------------------------------------------------------- measuring

def _cpu_s() -> float:
    """CPU seconds of this (the sending) process; the stub child is not counted."""
    t = os.times()
    return t.user + t.system


def _stub_lateness_p99_s(base_url: str) -> float | None:
    """The stub's own chunk lateness p99 from its /metrics (separates server from client effects), if exposed."""
    try:
        status, body = http_get(base_url.rstrip("/") + "/metrics", timeout_s=2.0)
    except OSError:
        return None
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    m = re.search(r'^splitbench_stub_chunk_lateness_seconds\{quantile="0\.99"\}\s+(\S+)', text, re.M)
    return float(m.group(1)) if status == 200 and m else None


def point_options(rate_rps: float, duration_s: float, workers: int, stub_cpu: int | None, http: str,
                  results_dir: str, stub_cpus: list[int] | None = None) -> RunOptions:
    """One calibration point: a Poisson synth trace of the fixed WORKLOAD against a fresh stub on its own core (or
    len(stub_cpus) stubs sharing one port, one core each)."""
    w = WORKLOAD
    spec = (f"synth:arrivals=poisson,rate={rate_rps},duration={duration_s + WARMUP_S},lengths=fixed,"
            f"input={w['input_tokens']},output={w['output_tokens']},seed=1")
    return RunOptions(trace=spec, rate_scale=1.0, backend="stub", workers=workers, http=http, vocab_size=32000,
                      backend_options={"ttft_s": w["ttft_s"], "tpot_s": w["tpot_s"], "cpu": stub_cpu,
                                       "processes": len(stub_cpus) if stub_cpus else 1, "cpus": stub_cpus},
                      results_dir=results_dir, run_id="calibrate", power="off")


def measure_point(rate_rps: float, duration_s: float, workers: int = 1, stub_cpu: int | None = None,
                  http: str = "lean", stub_cpus: list[int] | None = None) -> dict:
    """One open-loop run at rate_rps against a fresh stub through a RunSession (one process or `workers`);
    scored by score_point (client CPU only), plus the stub's own chunk lateness p99."""
    with tempfile.TemporaryDirectory(prefix="splitbench-calibrate-") as tmp:
        with RunSession(point_options(rate_rps, duration_s, workers, stub_cpu, http, tmp, stub_cpus)) as session:
            conn = session.start()
            c0 = _cpu_s()
            session.replay()
            cpu = _cpu_s() - c0
            lateness = _stub_lateness_p99_s(conn.base_url)
        recs = R.read_records(session.run_dir)
    p = score_point(recs, rate_rps, WORKLOAD["ttft_s"], cpu)
    p["stub_lateness_p99_s"] = lateness
    p["loadavg_1m"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if workers > 1:   # the senders are child processes; their CPU is not measured apart from the stub's
        p["cpu_s_per_request"] = None
    return p


def _badness(p: dict) -> float:
    """How far a point is from passing: the worst criterion as a multiple of its limit (pass <= 1)."""
    if "achieved_rps" not in p:
        return float("inf")
    c = CRITERIA
    return max(p["ttft_p99_error_s"] / c["ttft_p99_error_s"], p["lag_p99_s"] / c["lag_p99_s"],
               c["min_rate_ratio"] / max(p["rate_ratio"] or 1e-9, 1e-9))


def stub_layout(workers: int, stubs: int, ncpu: int) -> tuple[set[int] | None, list[int] | None]:
    """(client cores, stub cores): stubs on the last `stubs` cores, senders on the first ones (None: unpinned,
    a host with too few cores)."""
    if ncpu < 2:
        return None, None
    stubs = min(stubs, ncpu - 1)
    return set(range(min(workers, ncpu - stubs))), list(range(ncpu - stubs, ncpu))


def calibrate(duration_s: float = 10.0, workers: int = 1, client_cpus: set[int] | None = None,
              stub_cpu: int | None = None, max_points: int = 12, http: str = "lean",
              on_point: Callable[[dict], None] = lambda p: None, save: bool = True, retries: int = 1,
              stubs: int = 1, ramp_from_rps: float = 0.0) -> dict:
    """Find this client's ceiling (see CRITERIA), store it (save=True) and return it. A failed point is measured
    again up to `retries` times (another process on the host can only make a point worse); it passes if any
    attempt does. stubs > 1: that many stub processes on one port, each on its own core, so at several workers
    the stub is not the limit. ramp_from_rps: start the ramp there (a known neighbourhood saves points)."""
    ncpu = os.cpu_count() or 1
    cores, stub_cpus = stub_layout(workers, stubs, ncpu)
    if stub_cpu is None and stub_cpus:
        stub_cpu = stub_cpus[-1]
    if client_cpus is None:
        client_cpus = cores
    stub_cpus = stub_cpus if stubs > 1 else None
    stubs = len(stub_cpus) if stub_cpus else 1
    old = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    points: list[dict] = []
    ramp = tuple(r for r in RAMP_RPS if r >= ramp_from_rps) or RAMP_RPS[-1:]
    try:
        if client_cpus and old is not None:
            os.sched_setaffinity(0, client_cpus)
        rate = next_rate(points, ramp)
        while rate is not None and len(points) < max_points:
            p = measure_point(rate, duration_s, workers, stub_cpu, http, stub_cpus)
            for attempt in range(retries):   # a shared host's noise only ever hurts: re-measure a failure
                if p["pass"]:
                    break
                on_point({**p, "retrying": True})
                q = measure_point(rate, duration_s, workers, stub_cpu, http, stub_cpus)
                p = {**(q if q["pass"] or _badness(q) < _badness(p) else p), "attempts": attempt + 2}
            points.append(p)
            on_point(p)
            rate = next_rate(points, ramp)
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)
    good = [p for p in points if p["pass"]]
    best = max(good, key=lambda p: p["target_rps"]) if good else None
    result = {"workers": workers, "http": http, "created_unix_s": time.time(), "criteria": CRITERIA,
              "workload": {**WORKLOAD, "arrivals": "poisson", "duration_s": duration_s},
              "client_cpus": sorted(client_cpus) if client_cpus else None, "stub_cpu": stub_cpu,
              "stubs": stubs, "stub_cpus": stub_cpus,
              "ceiling_rps": best["achieved_rps"] if best else 0.0,
              "tokens_per_s": best["tokens_per_s"] if best else None,
              "cpu_s_per_request": best["cpu_s_per_request"] if best else None,
              "points": points, "host": host_info(), "host_id": host_id()}
    if save:
        result["path"] = str(store_path())
        save_result(result)
    return result
