"""RunSession: the one run lifecycle — plan, start the backend, connect, write run.json, replay, stop, assemble the
records, summarize — that `run`, `locust`, `reference`, `profile` and `calibrate` all go through."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from splitbench.app import accounting, sizing
from splitbench.app.options import RunOptions, check_options, new_run_id, resolve_defaults, workload_spec
from splitbench.backends.registry import get_backend
from splitbench.client.probe import served_model
from splitbench.client.replay import replay_workload
from splitbench.client.replayer import ReplayConfig, Replayer
from splitbench.client.shards import SHARDING, SHARDING_SESSIONS
from splitbench.client.stats import ReplayStats
from splitbench.client.workers import replay_workers
from splitbench.errors import InputError
from splitbench.hardware.catalog import get_machine, load_catalog
from splitbench.hardware.ceiling import client_section
from splitbench.metrics.slo import load_reference, parse_slos
from splitbench.metrics.summary import summarize
from splitbench.schema import records as R
from splitbench.schema.files import read_json_object
from splitbench.schema.runmeta import host_info, package_versions, write_run_meta
from splitbench.schema.summary import write_summary
from splitbench.servers.phaselog import load_phase_log, merge_phases
from splitbench.workload.load import load
from splitbench.workload.prompts import prompt_source
from splitbench.workload.sessions import plan_turns
from splitbench.workload.transforms import clip_context, workload_digest
from splitbench.workload.types import Workload

Status = Callable[[str], None]


@dataclass
class Connection:
    """What start() learned from the running backend: where to send, what it serves, what to send."""
    base_url: str
    headers: dict
    model_info: dict
    model: str
    workload: Workload
    prompts: Any
    cfg: ReplayConfig


class RunSession:
    """One run directory, one backend, one or more replays. Use as a context manager around start()/replay():
    leaving it stops the backend (and the power sampler) whatever happened, and marks run.json failed on an
    exception; finish() then assembles records and writes summary.json."""

    def __init__(self, opts: RunOptions, *, kind: str = "run", workload: Workload | None = None,
                 meta: dict | None = None, on_status: Status = lambda s: None):
        self.opts, self.kind, self.on_status = resolve_defaults(opts), kind, on_status
        self.workload, self.conn, self.backend, self.sampler = workload, None, None, None
        self.sized = False
        self.extra_meta = meta or {}
        self.slos = self.reference = None
        self.run_dir: Path | None = None
        self.meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ plan
    def plan(self) -> "RunSession":
        """Validate everything (bad input fails here, nothing started, no run directory left), then create the run
        directory and write run.json `starting`."""
        o = self.opts
        check_options(o)
        self.slos = parse_slos(o.slos) if o.slos else None
        self.reference = load_reference(o.reference) if o.reference else None
        if o.hardware_file or o.machine:
            cat = load_catalog(o.hardware_file)
            if o.machine:
                get_machine(o.machine, cat)
        self.backend = get_backend(o.backend, **o.backend_options)
        given = self.workload is not None
        self.sized = not given and o.rate_scale == "auto"   # a given workload (profile points, a grid) is never sized
        if not given:
            self.workload = load(workload_spec(o), self.on_status)
        if o.multi_turn:
            self.extra_meta["sessions"] = plan_turns(self.workload).describe()   # no sessions: InputError now
        if hasattr(self.backend, "check"):   # servers the user started: a bad one fails before the run directory
            self.backend.check()
        run_id = o.run_id or new_run_id(o.backend if self.kind == "run" else f"{self.kind}-{o.backend}",
                                        self.kind if given else o.trace)
        self.run_dir = Path(o.results_dir) / run_id
        if self.run_dir.exists():
            raise InputError("run directory exists already: choose another --run-id or remove it",
                             file=str(self.run_dir))
        self.run_dir.mkdir(parents=True)
        self.opts = replace(o, run_id=run_id)
        self.meta = {"run_id": run_id, "kind": self.kind, "status": "starting",
                     "simulated": False, "created_unix_s": time.time(), "options": asdict(self.opts),
                     "versions": package_versions(), "host": host_info(), **self.extra_meta}
        self.write_meta()
        return self

    def write_meta(self) -> None:
        write_run_meta(self.run_dir, self.meta)

    def __enter__(self) -> "RunSession":
        return self.plan()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.meta.update(status="failed", error=f"{exc_type.__name__}: {exc}")
            self.write_meta()
        self.stop()

    # ------------------------------------------------------------------ start
    def start(self) -> Connection:
        """Start the backend (blocks until healthy), learn the served model, clip the workload to its
        max_model_len, start power sampling, and write run.json `running`."""
        o = self.opts
        self.on_status(f"starting backend {o.backend}")
        self.backend.start(self.run_dir)
        base_url = self.backend.endpoint()
        headers = self.backend.headers() if hasattr(self.backend, "headers") else {}
        info = served_model(base_url, headers)
        workload = self.workload
        if o.max_context_tokens is None and info.get("max_model_len"):
            workload = clip_context(workload, int(info["max_model_len"]))
            workload.source["workload_sha256"] = workload_digest(workload)
        prompts = prompt_source(info, api=o.api, tokenizer=o.tokenizer, vocab_size=o.vocab_size, seed=o.seed,
                                shared_prefix_tokens=o.shared_prefix_tokens, prefix_salt=o.prefix_salt,
                                workload=workload)
        cfg = ReplayConfig(base_url=base_url, model=o.model or info.get("id") or "default", api=o.api,
                           headers=headers, http=o.http, max_inflight=o.max_inflight, timeout_s=o.timeout_s,
                           grace_s=o.grace_s, multi_turn=o.multi_turn, think_time=o.think_time, think_seed=o.seed)
        self.conn = Connection(base_url, headers, info, cfg.model, workload, prompts, cfg)
        instances = accounting.backend_instances(self.backend.describe())
        self.meta["hardware"] = accounting.hardware_for(o, instances)
        self.sampler = accounting.start_power(o, instances, self.run_dir)
        if self.sampler is not None:
            self.meta["power"] = self.sampler.describe()
        self.set_workload(self.size(workload) if self.sized else workload)
        return self.conn

    def metrics_urls(self) -> list[str]:
        """Every vLLM instance the backend started (their /metrics), else the endpoint itself."""
        servers = getattr(getattr(self.backend, "cluster", None), "servers", None) or {}
        return [sv.url for sv in servers.values()] or [self.conn.base_url]

    def size(self, workload: Workload) -> Workload:
        """rate_scale "auto": measure what the started backend sustains of this window's request mix (or reuse this
        host's cached measurement) and replay the window at the rate scale for the target utilisation; its unloaded
        reference becomes the run's reference unless one was given (app/sizing.py)."""
        c, o = self.conn, self.opts
        probe = sizing.Probe(c.base_url, c.model, c.prompts.payload, c.headers, o.api, self.run_dir / "sizing",
                             self.metrics_urls())
        sized, workload = sizing.size_session(o.backend, o.backend_options, c.model_info, probe, workload,
                                              self.on_status, keep_all=o.max_requests is not None)
        self.meta["sizing"] = sized.describe()
        if self.reference is None:
            self.reference = sized.reference
            self.meta["reference"] = asdict(sized.reference)
        return workload

    def set_workload(self, workload: Workload) -> None:
        """The workload to replay (after sizing, say), recorded in run.json `running` with what was connected."""
        c, info = self.conn, self.conn.model_info
        c.workload = workload
        self.meta["client"] = client_section(workload.arrival_s, self.opts.workers)
        self.meta.update(status="running", workload=workload.describe(), backend=self.backend.describe(),
                         model={"id": c.model, **{k: info[k] for k in ("root", "max_model_len") if k in info}},
                         prompts=c.prompts.describe(), replay=c.cfg.describe())
        self.write_meta()

    # ------------------------------------------------------------------ replay
    def replay(self, on_progress: Callable[[Replayer], None] | None = None) -> tuple[ReplayStats, bool]:
        """Replay the connected workload into the run directory (this process, or opts.workers processes)."""
        c = self.conn
        self.on_status(f"replaying {len(c.workload)} requests against {c.base_url}")
        if self.opts.workers > 1:
            self.meta["client"]["sharding"] = SHARDING_SESSIONS if self.opts.multi_turn else SHARDING
            return replay_workers(c.workload, c.prompts.payload, c.cfg, self.run_dir, self.meta["run_id"],
                                  self.opts.workers, self.on_status)
        replayer, interrupted = replay_workload(c.workload, c.prompts.payload, c.cfg, self.run_dir,
                                                self.meta["run_id"], on_progress)
        return replayer.stats, interrupted

    def replay_into(self, workload: Workload, run_dir: Path, **cfg_changes) -> list[R.RequestRecord]:
        """One more replay on the started backend into another directory (profile points); its records."""
        cfg = replace(self.conn.cfg, **cfg_changes)
        replay_workload(workload, self.conn.prompts.payload, cfg, run_dir, self.meta["run_id"])
        return R.read_records(run_dir)

    # ------------------------------------------------------------------ stop / finish
    def stop(self) -> None:
        """Stop power sampling and the backend (idempotent); the backend's final description goes into run.json."""
        if self.sampler is not None:
            try:
                self.meta["power"] = {**self.meta.get("power", {}), "summary": self.sampler.stop()}
            except Exception as e:   # a sampler that failed must not lose the run's records
                self.meta["power"] = {**self.meta.get("power", {}), "error": f"{type(e).__name__}: {e}"}
            self.sampler = None
        if self.backend is not None:
            self.on_status("stopping backend")
            self.backend.stop()
            final = {k: v for k, v in self.backend.describe().items() if v is not None}
            if "backend" in self.meta:
                self.meta["backend"] = {**self.meta["backend"], **final}
            self.backend = None

    def finish(self, stats: ReplayStats, interrupted: bool) -> dict:
        """run.json complete/interrupted, router phases merged into the records, summary.json written."""
        self.meta.update(status="interrupted" if interrupted else "complete", t0_unix_s=stats.t0_unix_s,
                         replay_stats=asdict(stats))
        self.write_meta()
        merge_router_phases(self.run_dir, self.meta)
        return summarize_run(self.run_dir, self.meta, self.slos, self.reference)


def merge_router_phases(run_dir: Path, meta: dict) -> int:
    """Fill instance, pool and phases_s of the run's records from the router's phase log, if there is one."""
    log = (meta.get("backend") or {}).get("phase_log")
    if not log or not Path(log).exists():
        return 0
    merged = merge_phases(R.read_records(run_dir), load_phase_log(log), meta["t0_unix_s"])
    R.write_records(run_dir, meta["run_id"], merged)
    return sum(1 for r in merged if r.phases_s)


def client_limits(meta: dict) -> dict | None:
    """The fidelity verdict's extra input: the calibrated client ceiling recorded in run.json and the median lag
    p99 of that calibration's points (what this host's client does; gates may judge lag by it), if any."""
    client = meta.get("client") or {}
    c, lag = client.get("ceiling_rps"), (client.get("calibration") or {}).get("lag_p99_median_s")
    out = {**({"ceiling_rps": c} if c else {}), **({"host_lag_p99_s": lag} if lag is not None else {})}
    return out or None


def summarize_run(run_dir: Path, meta: dict, slos=None, reference=None, write: bool = True) -> dict:
    """summary.json of a run directory from its records and run.json (live or simulated alike)."""
    records = R.read_records(run_dir)
    scraped = run_dir / "metrics" / "summary.json"   # the scraper's per instance counter increases, if it ran
    server = read_json_object(scraped, "metrics summary") if scraped.exists() else None
    summary = summarize(records, run_meta=meta, slos=slos, reference=reference, fidelity_limits=client_limits(meta),
                        measured_energy=accounting.measured_energy(run_dir, meta, records), server_metrics=server)
    if write:
        write_summary(run_dir, summary)
    return summary
