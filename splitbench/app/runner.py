"""Library API for a run: load the workload, start the backend, replay, stream records, summarise, tear down.

The CLI is a thin layer over `run()`, `measure_reference()` and `report()`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from splitbench.schema import records as R
from splitbench.app import sizing
from splitbench.app.accounting import backend_instances, hardware_for, measured_energy, start_power
from splitbench.backends import get_backend
from splitbench.client.probe import served_model
from splitbench.client.replay import replay_workload
from splitbench.workload.prompts import prompt_source
from splitbench.errors import InputError
from splitbench.client.replayer import ReplayConfig, Replayer, ReplayStats
from splitbench.workload.types import Workload

DEFAULT_TRACE = "azure-conv-2023"


@dataclass
class RunOptions:
    trace: str = DEFAULT_TRACE
    trace_dir: str | None = None
    columns: dict | None = None
    start_s: float = 0.0
    duration_s: float | None = 60.0
    rate_scale: float | str = 1.0          # "auto": sized against the started backend (app/sizing.py)
    max_requests: int | None = None
    backend: str = "stub"
    backend_options: dict = field(default_factory=dict)
    api: str = "completions"
    model: str | None = None
    tokenizer: str | None = None          # tokenizer dir; default: the served model's dir when local
    vocab_size: int | None = None         # token-id range when no tokenizer is known
    seed: int = 0
    shared_prefix_tokens: int = 0
    max_context_tokens: int | None = None  # default: the server's max_model_len
    max_inflight: int | None = None
    timeout_s: float = 600.0
    grace_s: float = 10.0
    results_dir: str = "results"
    run_id: str | None = None
    slos: str | None = None
    reference: str | None = None
    fetch: bool = True                     # download a catalogue trace that is not local
    http: str = "lean"                     # replayer transport: lean | aiohttp
    machine: str | None = None             # hardware-catalog machine type (default: detected / cpu-host)
    machines: float | None = None          # machines of that type (default 1: this host; remote URL: say it)
    hardware_file: str | None = None       # user hardware catalog TOML merged over the packaged one
    power: str = "auto"                    # auto (NVML when instances hold GPUs) | nvml | off
    workers: int = 1                       # sender processes (client/workers.py); 1 = this process


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    interrupted: bool
    stats: ReplayStats


# ----------------------------------------------------------------------------- helpers

def connect(opts: RunOptions, backend, workload: Workload):
    """After backend.start(): (base_url, headers, model_info, model, workload, prompts) -- the served model, the
    workload clipped to its max_model_len (clipping is the last transform and leaves arrivals alone) and the
    prompt source. Shared by run() and the Locust launcher."""
    base_url = backend.endpoint()
    headers = backend.headers() if hasattr(backend, "headers") else {}
    model_info = served_model(base_url, headers)
    model = opts.model or model_info.get("id") or "default"
    if opts.max_context_tokens is None and model_info.get("max_model_len"):
        from splitbench.workload.transforms import clip_context, workload_digest
        workload = clip_context(workload, int(model_info["max_model_len"]))
        workload.source["workload_sha256"] = workload_digest(workload)
    return base_url, headers, model_info, model, workload, prompt_source(model_info, api=opts.api, tokenizer=opts.tokenizer, vocab_size=opts.vocab_size,
                                       seed=opts.seed, shared_prefix_tokens=opts.shared_prefix_tokens)


def new_run_id(backend: str, trace: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(trace).stem)[:40]
    return f"{stamp}-{backend}-{safe}-{os.getpid() % 10000:04d}"


def ensure_trace(opts: RunOptions, on_status: Callable[[str], None] = lambda s: None) -> None:
    """A catalogue trace that is not local is downloaded (sha256-verified) into the user cache."""
    from splitbench.workload.traces import catalog, fetch_trace, find_local
    if not opts.fetch or opts.trace not in catalog() or Path(opts.trace).is_file():
        return
    if find_local(opts.trace, opts.trace_dir) is None:
        on_status(f"trace {opts.trace} not found locally: downloading it")
        res = fetch_trace(opts.trace)
        on_status(f"fetched {res.get('path')} ({res.get('status')})")


def load(opts: RunOptions) -> Workload:
    from splitbench.workload.traces import load_workload
    return load_workload(opts.trace, trace_dir=opts.trace_dir, columns=opts.columns, start_s=opts.start_s,
                         duration_s=opts.duration_s, rate_scale=1.0 if opts.rate_scale == "auto" else opts.rate_scale,
                         max_requests=opts.max_requests, max_context_tokens=opts.max_context_tokens)


# ----------------------------------------------------------------------------- run

def run(opts: RunOptions, on_progress: Callable[[Replayer], None] | None = None,
        on_status: Callable[[str], None] = lambda s: None) -> RunResult:
    from splitbench.metrics.summary import save_summary, summarize
    ensure_trace(opts, on_status)
    workload = load(opts)  # bad input fails here, before anything starts
    slos = None
    if opts.slos:
        from splitbench.metrics.slo import parse_slos
        slos = parse_slos(opts.slos)
    reference = None
    if opts.reference:
        from splitbench.metrics.slo import load_reference
        reference = load_reference(opts.reference)

    run_id = opts.run_id or new_run_id(opts.backend, opts.trace)
    if opts.workers < 1:
        raise InputError(f"--workers must be >= 1, got {opts.workers}")
    run_dir = Path(opts.results_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    if opts.power not in ("auto", "nvml", "off"):
        raise InputError(f"--power must be auto, nvml or off, got {opts.power!r}")
    if opts.hardware_file or opts.machine:  # a bad catalog or machine name fails before anything starts
        from splitbench.hardware.catalog import get_machine, load_catalog
        catalog = load_catalog(opts.hardware_file)
        if opts.machine:
            get_machine(opts.machine, catalog)
    backend = get_backend(opts.backend, **opts.backend_options)
    sampler = None
    meta: dict[str, Any] = {
        "schema_version": R.SCHEMA_VERSION, "run_id": run_id, "status": "starting", "simulated": False,
        "created_unix_s": time.time(), "options": asdict(opts),
        "versions": R.package_versions(), "host": R.host_info(),
    }
    R.atomic_write_json(run_dir / R.RUN_FILE, meta)
    try:
        on_status(f"starting backend {opts.backend}")
        backend.start(run_dir)
        base_url, headers, model_info, model, workload, prompts = connect(opts, backend, workload)
        if opts.rate_scale == "auto":
            sized, workload = sizing.size_session(opts.backend, opts.backend_options, model_info, sizing.Probe(
                base_url, model, prompts.payload, headers, opts.api, run_dir / "sizing"), workload, on_status)
            meta["sizing"] = sized.describe()
            if reference is None:   # the run is judged against its own unloaded reference
                reference = sized.reference
                meta["reference"] = asdict(reference)
        instances = backend_instances(backend.describe())
        meta["hardware"] = hardware_for(opts, instances)
        sampler = start_power(opts, instances, run_dir)
        if sampler is not None:
            meta["power"] = sampler.describe()
        cfg = ReplayConfig(base_url=base_url, model=model, api=opts.api, headers=headers, http=opts.http,
                           max_inflight=opts.max_inflight, timeout_s=opts.timeout_s, grace_s=opts.grace_s)
        from splitbench.app.calibrate import client_section
        meta["client"] = client_section(workload.arrival_s, opts.workers)
        meta.update(status="running", workload=workload.describe(), backend=backend.describe(),
                    model={"id": model, **{k: model_info[k] for k in ("root", "max_model_len") if k in model_info}},
                    prompts=prompts.describe(), replay=cfg.describe())
        R.atomic_write_json(run_dir / R.RUN_FILE, meta)
        on_status(f"replaying {len(workload)} requests against {base_url}")
        if opts.workers > 1:
            from splitbench.client.workers import SHARDING, replay_workers
            meta["client"]["sharding"] = SHARDING
            stats, interrupted = replay_workers(workload, prompts.payload, cfg, run_dir, run_id, opts.workers,
                                                on_status)
        else:
            replayer, interrupted = replay_workload(workload, prompts.payload, cfg, run_dir, run_id, on_progress)
            stats = replayer.stats
    except BaseException as e:
        meta.update(status="failed", error=f"{type(e).__name__}: {e}")
        R.atomic_write_json(run_dir / R.RUN_FILE, meta)
        raise
    finally:
        if sampler is not None:
            try:
                meta["power"] = {**meta.get("power", {}), "summary": sampler.stop()}
            except Exception as e:  # a power sampler that failed must not lose the run's records
                meta["power"] = {**meta.get("power", {}), "error": f"{type(e).__name__}: {e}"}
        on_status("stopping backend")
        backend.stop()
    final = {k: v for k, v in backend.describe().items() if v is not None}  # e.g. metrics summary after stop
    meta.update(status="interrupted" if interrupted else "complete", t0_unix_s=stats.t0_unix_s,
                replay_stats=asdict(stats), backend={**meta["backend"], **final})
    R.atomic_write_json(run_dir / R.RUN_FILE, meta)
    merge_router_phases(run_dir, meta)
    records = R.read_records(run_dir)
    summary = summarize(records, run_meta=meta, slos=slos, reference=reference,
                        fidelity_limits=client_limits(meta), measured_energy=measured_energy(run_dir, meta, records))
    save_summary(summary, run_dir / R.SUMMARY_FILE)
    return RunResult(run_dir, summary, interrupted, stats)


def client_limits(meta: dict) -> dict | None:
    """The fidelity verdict's extra input: the calibrated client ceiling recorded in run.json and the median lag
    p99 of that calibration's points (what this host's client does; gates may judge lag by it), if any."""
    client = meta.get("client") or {}
    c, lag = client.get("ceiling_rps"), (client.get("calibration") or {}).get("lag_p99_median_s")
    out = {**({"ceiling_rps": c} if c else {}), **({"host_lag_p99_s": lag} if lag is not None else {})}
    return out or None


def merge_router_phases(run_dir: Path, meta: dict) -> int:
    """Fill instance, pool and phases_s of the run's records from the router's phase log, if there is one."""
    log = (meta.get("backend") or {}).get("phase_log")
    if not log or not Path(log).exists():
        return 0
    from splitbench.servers.phaselog import load_phase_log, merge_phases
    entries = load_phase_log(log)
    merged = merge_phases(R.read_records(run_dir), entries, meta["t0_unix_s"])
    R.write_records(run_dir, meta["run_id"], merged)
    return sum(1 for r in merged if r.phases_s)


def report(run_dir: str | Path, slos: str | None = None, reference: str | None = None,
           write: bool = True) -> dict:
    """Recompute the summary of a run directory from its records (works on live and simulated runs)."""
    from splitbench.metrics.slo import load_reference, parse_slos
    from splitbench.metrics.summary import save_summary, summarize
    run_dir = Path(run_dir)
    meta = R.read_run(run_dir)
    if slos is None:
        slos = (meta.get("options") or {}).get("slos")
    if reference is None:
        reference = (meta.get("options") or {}).get("reference")
    records = R.read_records(run_dir)
    ref = load_reference(reference) if reference else None
    if ref is None and isinstance(meta.get("reference"), dict):   # simulated runs carry their own reference
        from splitbench.metrics.slo import Reference
        ref = Reference(**meta["reference"])
    summary = summarize(records, run_meta=meta, slos=parse_slos(slos) if slos else None, reference=ref,
                        fidelity_limits=client_limits(meta),
                        measured_energy=measured_energy(run_dir, meta, records))
    if write:
        save_summary(summary, run_dir / R.SUMMARY_FILE)
    return summary


# ----------------------------------------------------------------------------- reference

def measure_reference(backend_name: str, backend_options: dict, *, sizes: list[int], output_tokens: int,
                      repeats: int, out: str | Path, api: str = "completions", tokenizer: str | None = None,
                      vocab_size: int | None = None, seed: int = 0, results_dir: str = "results",
                      on_status: Callable[[str], None] = lambda s: None):
    """Unloaded reference: requests one at a time over a grid of prompt sizes; fit TTFT(prompt) and mean TBT."""
    from splitbench.metrics.slo import fit_reference, save_reference
    n = len(sizes) * repeats
    ins = np.repeat(np.asarray(sizes, dtype=np.int64), repeats)
    w = Workload(name="reference-grid", arrival_s=np.zeros(n), input_tokens=ins,
                 output_tokens=np.full(n, output_tokens, dtype=np.int64),
                 trace_index=np.arange(n, dtype=np.int64),
                 source={"name": "reference-grid", "sizes": sizes, "repeats": repeats},
                 transforms={})
    run_id = new_run_id(backend_name, "reference")
    run_dir = Path(results_dir) / run_id
    run_dir.mkdir(parents=True)
    backend = get_backend(backend_name, **backend_options)
    try:
        on_status(f"starting backend {backend_name}")
        backend.start(run_dir)
        headers = backend.headers() if hasattr(backend, "headers") else {}
        info = served_model(backend.endpoint(), headers)
        prompts = prompt_source(info, api=api, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed)
        cfg = ReplayConfig(base_url=backend.endpoint(), model=info.get("id") or "default", api=api,
                           headers=headers, max_inflight=1)
        meta = {"schema_version": R.SCHEMA_VERSION, "run_id": run_id, "kind": "reference", "simulated": False,
                "workload": w.describe(), "backend": backend.describe(), "prompts": prompts.describe(),
                "replay": cfg.describe(), "versions": R.package_versions(), "host": R.host_info()}
        R.atomic_write_json(run_dir / R.RUN_FILE, meta)
        on_status(f"measuring {n} requests one at a time")
        replay_workload(w, prompts.payload, cfg, run_dir, run_id)
    finally:
        backend.stop()
    ref = fit_reference(R.read_records(run_dir))
    save_reference(ref, out)
    return ref, run_dir


# ----------------------------------------------------------------------------- compare

def compare(run_dirs: list[str | Path], slos: str | None = None, labels: list[str] | None = None,
            with_series: bool = True) -> dict:
    """Load runs (live or simulated), recompute their summaries and plot series, and build the comparison
    (metrics.compare.build_comparison); the first run is the reference for ratios and iso views."""
    from splitbench.metrics.compare import build_comparison
    if not run_dirs:
        raise InputError("compare needs at least one run directory")
    runs, seen = [], set()
    for k, d in enumerate(run_dirs):
        d = Path(d)
        meta = R.read_run(d)
        summary = report(d, slos=slos, write=False)
        label = (labels[k] if labels and k < len(labels) else None) or d.name
        while label in seen:
            label += "'"
        seen.add(label)
        series = None
        if with_series:
            from splitbench.servers.scrape import read_series
            from splitbench.metrics.series import run_series
            rows = {}
            for inst in (meta.get("backend") or {}).get("instances") or []:
                path = d / "metrics" / f"{inst['id']}.jsonl"
                if path.exists():
                    rows[inst["id"]] = read_series(path)
            series = run_series(R.read_records(d), meta, rows)
        runs.append({"label": label, "run_dir": str(d), "summary": summary, "series": series})
    return build_comparison(runs)
