"""Capacity search: the highest arrival rate (a trace's rate scale, or Poisson/gamma arrivals with its lengths) meeting
the SLOs, live (probes through one started backend, app/probers.py) or simulated, one run directory per probe; the
fit, CI and next probe are metrics/capacity.py's; an interrupted search resumes from its finished probe directories."""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from splitbench.errors import InputError
from splitbench.metrics import capacity as C
from splitbench.metrics import probe as P
from splitbench.metrics.summary import summarize
from splitbench.schema import records as R
from splitbench.schema.files import read_json_object
from splitbench.schema.records import SUMMARY_FILE
from splitbench.workload.resample import ARRIVALS, resampled
from splitbench.workload.transforms import scale_rate, workload_digest
from splitbench.workload.types import Workload

MODES = ("rate-scale",) + ARRIVALS
BUDGET_FIELDS = ("start_rate", "growth", "tolerance", "max_probes", "confidence", "bootstrap", "min_repeats", "min_rate",
                 "max_rate")


@dataclass
class SearchSpec:
    """What every probe measures and how it is judged (a resumed search must match), then the search budget."""
    arrivals: str = "rate-scale"        # rate-scale (of the trace window) | poisson | gamma (the window's lengths)
    cv: float = 1.0                     # gamma arrivals: inter-arrival CV
    probe_duration_s: float | None = None   # poisson/gamma: seconds of arrivals per probe [the window's duration]
    warmup_s: float = 0.0               # each probe's first seconds of sends are not judged
    warmup_requests: int = 0            # ... nor its first requests
    slos: str | None = None
    splitwise_slo: bool = False         # Splitwise's nine slowdown checks against the reference
    max_error_rate: float = P.DEFAULT_MAX_ERROR_RATE
    early_stop: bool = True
    seed: int = 0
    se_draws: int = 100                 # block-bootstrap draws of each probe's score
    start_rate: float | None = None     # None: a rate scale of 1, or the window's own request rate
    growth: float = 2.0
    tolerance: float = 0.05
    max_probes: int = 12
    confidence: float = 0.9
    bootstrap: int = 400
    min_repeats: int = 2                # probes at each end of the final bracket
    min_rate: float | None = None
    max_rate: float | None = None

    def check(self) -> None:
        """One-line InputErrors for values wrong whatever the workload."""
        if self.arrivals not in MODES:
            raise InputError(f"--arrivals must be one of {', '.join(MODES)}, got {self.arrivals!r}")
        checks = (("--growth", self.growth > 1), ("--tolerance", 0 < self.tolerance < 1),
                  ("--max-probes", self.max_probes >= 1), ("--confidence", 0 < self.confidence < 1),
                  ("--bootstrap", self.bootstrap >= 10), ("--warmup", self.warmup_s >= 0),
                  ("--warmup-requests", self.warmup_requests >= 0), ("--max-error-rate", 0 <= self.max_error_rate < 1),
                  ("--cv", self.cv > 0), ("--start-rate", self.start_rate is None or self.start_rate > 0),
                  ("--probe-duration", self.probe_duration_s is None or self.probe_duration_s > 0))
        for flag, ok in checks:
            if not ok:
                raise InputError(f"{flag}: value out of range ({asdict(self)[_field_of(flag)]!r})")
        if not self.slos and not self.splitwise_slo:
            raise InputError("give --slo METRIC_STAT=VALUE,... or --splitwise-slo (what the capacity must meet)")

    def measured(self) -> dict:
        """The fields that decide what a probe measures: equal on a resume."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in BUDGET_FIELDS}


def _field_of(flag: str) -> str:
    return {"--warmup": "warmup_s", "--probe-duration": "probe_duration_s"}.get(flag, flag[2:].replace("-", "_"))


def base_rate_rps(w: Workload) -> float:
    """The mean arrival rate of a workload, requests/s ((n - 1) / span)."""
    span = float(w.arrival_s[-1] - w.arrival_s[0]) if len(w) > 1 else 0.0
    return (len(w) - 1) / span if span > 0 else float(len(w))


def window_duration_s(w: Workload) -> float:
    win = (w.transforms or {}).get("window") or {}
    return float(win.get("duration_s") or (w.arrival_s[-1] - w.arrival_s[0]) or 1.0)


def search_config(spec: SearchSpec, base: Workload) -> C.SearchConfig:
    """The metrics-level config: rates are rate scales (rate-scale mode) or requests/s."""
    start = spec.start_rate or (1.0 if spec.arrivals == "rate-scale" else base_rate_rps(base))
    return C.SearchConfig(start_rate=start, growth=spec.growth, tolerance=spec.tolerance, max_probes=spec.max_probes,
                          confidence=spec.confidence, bootstrap=spec.bootstrap, min_repeats=spec.min_repeats,
                          min_rate=spec.min_rate or start / 1024, max_rate=spec.max_rate or start * 1024)


def probe_workload(base: Workload, spec: SearchSpec, rate: float) -> Workload:
    """The workload of a probe at `rate`: the window at that rate scale, or synthetic arrivals at that req/s."""
    if spec.arrivals == "rate-scale":
        w = scale_rate(base, rate)
    else:
        w = resampled(base, rate_rps=rate, duration_s=spec.probe_duration_s or window_duration_s(base),
                      arrivals=spec.arrivals, cv=spec.cv, seed=spec.seed)
    w.source = {**w.source, "workload_sha256": workload_digest(w)}
    return w


def warmup_ignored(w: Workload, spec: SearchSpec) -> frozenset:
    """trace_index of the requests a probe's verdict leaves out (P.drop_warmup's rule on the workload)."""
    if not len(w):
        return frozenset()
    skip = (np.arange(len(w)) < spec.warmup_requests) | (w.arrival_s < w.arrival_s[0] + spec.warmup_s)
    return frozenset(w.trace_index[skip].tolist())


def early_stop_for(w: Workload, spec: SearchSpec, slos, reference) -> P.EarlyStop | None:
    if not spec.early_stop:
        return None
    ignore = warmup_ignored(w, spec)
    keep = ~np.isin(w.trace_index, list(ignore)) if ignore else np.ones(len(w), bool)
    return P.EarlyStop(slos, reference, int(keep.sum()), int(w.output_tokens[keep].sum()), spec.max_error_rate,
                       ignore=ignore)


# ----------------------------------------------------------------------------- one probe's row

def _pick(d: dict | None, *keys):
    for k in keys:
        d = (d or {}).get(k)
    return d


def probe_row(run_dir: Path, meta: dict, spec: SearchSpec, slos, reference, rate: float, base_rps: float) -> dict:
    """Verdict, score and its se, and the post-warm-up throughput, latency and efficiency of one probe."""
    kept = P.drop_warmup(R.read_records(run_dir), spec.warmup_s, spec.warmup_requests)
    crit = P.criteria(kept, slos, reference, spec.max_error_rate)
    verdict = P.judge(crit)
    k = int(run_dir.name.rsplit("-", 1)[-1]) if run_dir.name.rsplit("-", 1)[-1].isdigit() else 0
    se = P.score_se(crit, np.random.default_rng([spec.seed, k]), spec.se_draws)
    s = summarize(kept, run_meta=meta, slos=slos, reference=reference)
    total = _pick(s, "efficiency", "pools", "total") or {}
    lat = s["latency"]
    tbt50 = _pick(lat, "mean_tbt_s", "p50")
    return {"dir": run_dir.name, "rate": rate, "rate_rps": rate * base_rps if spec.arrivals == "rate-scale" else rate,
            "rate_scale": rate if spec.arrivals == "rate-scale" else None, "requests": len(kept),
            "early_stop": _pick(meta, "probe", "early_stop"), "passed": verdict["passed"], "score": verdict["score"],
            "score_se": se, "failed": verdict["failed"], "items": verdict["items"],
            "throughput": {k2: s["throughput"].get(k2) for k2 in ("requests_per_s", "output_tokens_per_s",
                                                                  "input_tokens_per_s")},
            "latency": {f"{m}_{st}": _pick(lat, f"{m}_s", st) for m in ("ttft", "tbt", "e2e") for st in ("p50", "p99")},
            "per_user_tokens_per_s": 1.0 / tbt50 if tbt50 else None,
            "per_machine_tokens_per_s": (s["throughput"].get("output_tokens_per_s") / total["machines"]
                                         if total.get("machines") and s["throughput"].get("output_tokens_per_s")
                                         is not None else None),
            "efficiency": {k2: total.get(k2) for k2 in ("machines", "usd_per_hour", "provisioned_power_w",
                                                       "output_tokens_per_usd", "tokens_per_j", "avg_power_w",
                                                       "energy_estimated")}}


# ----------------------------------------------------------------------------- the search loop

def finished_probe(run_dir: Path) -> dict | None:
    """run.json of a probe that ran to its end (complete, with a summary), else None."""
    if not (run_dir / "run.json").exists() or not (run_dir / SUMMARY_FILE).exists():
        return None
    meta = read_json_object(run_dir / "run.json", "probe run metadata")
    return meta if meta.get("status") == "complete" and isinstance(meta.get("probe"), dict) else None


def resume_rows(config_dir: Path, spec: SearchSpec, slos, reference, base_rps: float) -> list[dict]:
    """The finished probes of an earlier (interrupted) search of this configuration, in order; the first
    unfinished probe directory (and any after it) is removed: it is measured again."""
    rows, k = [], 0
    while (d := config_dir / f"probe-{k:03d}").exists():
        meta = finished_probe(d)
        if meta is None:
            for later in sorted(config_dir.glob("probe-*")):
                if later.name >= d.name:
                    shutil.rmtree(later)
            break
        rows.append(probe_row(d, meta, spec, slos, reference, float(meta["probe"]["rate"]), base_rps))
        k += 1
    return rows


def points_of(rows: list[dict]) -> list[C.Point]:
    return [C.Point(r["rate"], r["score"], r["score_se"], r["passed"]) for r in rows]


def capacity_section(analysis: dict, spec: SearchSpec, base_rps: float, rows: list[dict]) -> dict:
    """The boundary and CI in req/s (and as rate scales), the stop reason, and the best passing probe's efficiency
    (capacity per $/h and per provisioned kW)."""
    to_rps = (lambda x: None if x is None else x * base_rps) if spec.arrivals == "rate-scale" else (lambda x: x)
    b, ci = analysis.get("boundary") or {}, analysis.get("ci") or {}
    est = b.get("estimate")
    passing = [r for r in rows if r["passed"]]
    best = max(passing, key=lambda r: r["rate"]) if passing else None
    eff = (best or {}).get("efficiency") or {}
    cap = to_rps(est)
    usd, watts = eff.get("usd_per_hour"), eff.get("provisioned_power_w")
    return {"rps": cap, "ci_lo_rps": to_rps(ci.get("lo")), "ci_hi_rps": to_rps(ci.get("hi")),
            "rate_scale": est if spec.arrivals == "rate-scale" else None, "censored": b.get("censored"),
            "bracket_rps": [to_rps(b.get("lo")), to_rps(b.get("hi"))], "stop": analysis.get("stop"),
            "probes": len(rows), "best_passing_probe": (best or {}).get("dir"),
            "output_tokens_per_s": _pick(best, "throughput", "output_tokens_per_s"),
            "output_tokens_per_usd": eff.get("output_tokens_per_usd"), "tokens_per_j": eff.get("tokens_per_j"),
            "energy_estimated": eff.get("energy_estimated"),
            "rps_per_usd_per_hour": cap / usd if cap is not None and usd else None,
            "rps_per_kw": cap / (watts / 1000.0) if cap is not None and watts else None}


def search_config_dir(config_dir: Path, label: str, config: dict, prober, base: Workload, spec: SearchSpec, slos,
                      reference, on_update: Callable[[dict], None], on_status: Callable[[str], None]) -> dict:
    """One configuration's search: resume its finished probes, then probe until the stop rule; on_update(result)
    after every probe (search.json is rewritten). Raises KeyboardInterrupt-like InterruptedSearch on Ctrl-C."""
    cfg = search_config(spec, base)
    base_rps = base_rate_rps(base)
    config_dir.mkdir(parents=True, exist_ok=True)
    rows = resume_rows(config_dir, spec, slos, reference, base_rps)
    if rows:
        on_status(f"{label}: reusing {len(rows)} finished probe(s) in {config_dir}")
    while True:
        points = points_of(rows)
        analysis = C.analyse(points, cfg, np.random.default_rng([spec.seed, len(points)]))
        result = {"label": label, "config": config, "dir": config_dir.name, "base_rate_rps": base_rps,
                  "points": rows, "analysis": analysis, "capacity": capacity_section(analysis, spec, base_rps, rows),
                  "pareto": C.pareto_front([r["per_user_tokens_per_s"] for r in rows], [r["per_machine_tokens_per_s"] for r in rows])}
        on_update(result)
        if analysis["stop"]:
            return result
        rate = analysis["next_rate"]
        run_dir = config_dir / f"probe-{len(rows):03d}"
        w = probe_workload(base, spec, rate)
        on_status(f"{label}: probe {len(rows)} at {'rate scale ' if spec.arrivals == 'rate-scale' else ''}"
                  f"{rate:.4g}{'' if spec.arrivals != 'rate-scale' else f' ({rate * base_rps:.3g} req/s)'}, "
                  f"{len(w)} requests")
        meta, interrupted = prober.probe(run_dir, w, {"rate": rate, "arrivals": spec.arrivals, "label": label},
                                         early_stop_for(w, spec, slos, reference))
        if interrupted:
            raise InterruptedSearch(result)
        rows.append(probe_row(run_dir, meta, spec, slos, reference, rate, base_rps))
        on_status(f"{label}: probe {len(rows) - 1} {'passed' if rows[-1]['passed'] else 'failed'} (score "
                  f"{rows[-1]['score']:+.3f} +- {rows[-1]['score_se']:.3f}"
                  f"{', stopped early: ' + str(rows[-1]['early_stop']) if rows[-1]['early_stop'] else ''})")


class InterruptedSearch(Exception):
    """Ctrl-C/SIGTERM during a probe: the search so far (finished probes) is in `result`."""

    def __init__(self, result: dict):
        super().__init__("search interrupted")
        self.result = result
