"""The capacity search's probers: LiveProber replays each probe's workload through one started backend (a RunSession
in SEARCH_DIR/.../backend, started on the first probe) into its own run directory; SimProber simulates it."""
from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from splitbench.app.options import RunOptions
from splitbench.app.runner import reference_grid
from splitbench.app.session import RunSession, summarize_run
from splitbench.app.simrun import SimOptions, build_setup, parse_cluster, sim_reference, simulate_run
from splitbench.client.replay import replay_workload
from splitbench.errors import InputError
from splitbench.hardware.catalog import get_machine, load_catalog
from splitbench.hardware.ceiling import client_section
from splitbench.metrics.probe import EarlyStop
from splitbench.metrics.slo import Reference, fit_reference, load_reference, save_reference
from splitbench.schema import records as R
from splitbench.schema.runmeta import read_run_meta, write_run_meta
from splitbench.servers.phaselog import load_phase_log, merge_phases
from splitbench.workload.prompts import prompt_source
from splitbench.workload.transforms import clip_context
from splitbench.workload.types import Workload

REFERENCE_SIZES = (16, 64, 256, 1024)
SESSION_KEYS = ("options", "versions", "host", "backend", "model", "prompts", "replay", "hardware", "power",
                "reference")


def free_dir(parent: Path, name: str) -> Path:
    """parent/name, or name-1, name-2, ... when an earlier (resumed) search left that one."""
    d, k = parent / name, 0
    while d.exists():
        k += 1
        d = parent / f"{name}-{k}"
    return d


def merge_probe_phases(run_dir: Path, meta: dict) -> int:
    """session.merge_router_phases for one probe: the backend's phase log holds every probe's requests under the
    same ids (r0, r1, ...), so only entries logged since this probe's clock zero are merged."""
    log = (meta.get("backend") or {}).get("phase_log")
    if not log or not Path(log).exists():
        return 0
    t0 = meta["t0_unix_s"]
    mine = {k: e for k, e in load_phase_log(log).items() if e["phases_unix_s"] and
            min(e["phases_unix_s"].values()) >= t0 - 0.5}
    merged = merge_phases(R.read_records(run_dir), mine, t0)
    R.write_records(run_dir, meta["run_id"], merged)
    return sum(1 for r in merged if r.phases_s)


class LiveProber:
    """One backend for every probe of one configuration. Use as a context manager: leaving it stops the backend."""

    def __init__(self, opts: RunOptions, base: Workload, config_dir: Path, slos, on_status: Callable[[str], None]):
        self.opts, self.base, self.config_dir, self.slos, self.on_status = opts, base, config_dir, slos, on_status
        self.session: RunSession | None = None

    def __enter__(self) -> "LiveProber":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.session is not None:
            if exc is None:
                self.session.meta.update(status="complete")
                self.session.write_meta()
            self.session.__exit__(exc_type, exc, tb)
            self.session = None

    def start(self) -> RunSession:
        if self.session is None:
            d = free_dir(self.config_dir, "backend")
            o = replace(self.opts, results_dir=str(self.config_dir), run_id=d.name, rate_scale=1.0)
            self.session = RunSession(o, kind="search", workload=self.base, on_status=self.on_status)
            self.session.plan()
            self.session.start()
        return self.session

    def reference(self, given: str | None, needed: bool, path: Path) -> Reference | None:
        """--reference, else (--splitwise-slo) the reference measured on this backend once (path), else None."""
        if given:
            return load_reference(given)
        if not needed:
            return None
        s = self.start()
        if path.exists():
            s.reference = load_reference(path)
            return s.reference
        grid = reference_grid([x for x in REFERENCE_SIZES if x < (s.conn.model_info.get("max_model_len") or 1 << 30)
                               - 32], 16, 2)
        self.on_status(f"measuring the unloaded reference ({len(grid)} requests one at a time)")
        recs = s.replay_into(grid, free_dir(path.parent, "reference-run"), max_inflight=1)
        ref = fit_reference(recs, meta={"measured_by": "splitbench search"})
        save_reference(ref, path)
        s.reference = ref
        return ref

    def probe(self, run_dir: Path, w: Workload, info: dict, stop: EarlyStop | None) -> tuple[dict, bool]:
        """Replay `w` into run_dir (a normal run directory); stop sending once `stop` says the verdict is lost."""
        s = self.start()
        c = s.conn
        if self.opts.max_context_tokens is None and c.model_info.get("max_model_len"):
            w = clip_context(w, int(c.model_info["max_model_len"]))
        o = s.opts
        prompts = c.prompts if w.prefix_hashes is None else prompt_source(
            c.model_info, api=o.api, tokenizer=o.tokenizer, vocab_size=o.vocab_size, seed=o.seed,
            shared_prefix_tokens=o.shared_prefix_tokens, prefix_salt=o.prefix_salt, workload=w)
        run_dir.mkdir(parents=True)
        meta = {**{k: s.meta[k] for k in SESSION_KEYS if k in s.meta}, "run_id": run_dir.name, "kind": "probe",
                "status": "running", "simulated": False, "created_unix_s": time.time(), "workload": w.describe(),
                "client": client_section(w.arrival_s, 1), "probe": dict(info)}
        write_run_meta(run_dir, meta)

        def on_record(rec: R.RequestRecord) -> None:
            stop.observe(rec)

        def on_progress(rep) -> None:
            if stop.hopeless:
                rep.request_stop()
        try:
            rep, interrupted = replay_workload(w, prompts.payload, c.cfg, run_dir, run_dir.name,
                                               on_progress if stop else None, on_record if stop else None)
        except BaseException as e:
            meta.update(status="failed", error=f"{type(e).__name__}: {e}")
            write_run_meta(run_dir, meta)
            raise
        meta["probe"]["early_stop"] = stop.hopeless if stop else None
        meta.update(status="interrupted" if interrupted else "complete", t0_unix_s=rep.stats.t0_unix_s,
                    replay_stats=asdict(rep.stats), backend=s.backend.describe() if s.backend else meta.get("backend"))
        write_run_meta(run_dir, meta)
        merge_probe_phases(run_dir, meta)
        summarize_run(run_dir, meta, self.slos, s.reference)
        return meta, interrupted


class SimProber:
    """Each probe one simulation (`splitbench simulate` of the probe's workload) into its run directory."""

    def __init__(self, sim: SimOptions):
        catalog = load_catalog(sim.hardware_file)
        for pool in parse_cluster(sim.cluster):
            get_machine(pool.machine, catalog)
        self.sim = sim

    def __enter__(self) -> "SimProber":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def reference(self, given: str | None, needed: bool, path: Path) -> Reference | None:
        """--reference, else (--splitwise-slo) the simulated unloaded latency of the reference machine (as
        `simulate` judges: auto = dgx-a100 when the profile has the model, else the first pool's machine)."""
        if given:
            return load_reference(given)
        s = self.sim
        machine = s.reference_machine
        candidates = ["dgx-a100", parse_cluster(s.cluster)[0].machine] if machine in (None, "auto") else [machine]
        last = None
        for m in candidates:   # building the setup also checks the profile has every machine of the cluster
            try:
                setup = build_setup([p.machine for p in parse_cluster(s.cluster)] + [m], model=s.model,
                                    model_dir=s.model_dir, profile=s.profile, tensor_parallel=s.tensor_parallel,
                                    hardware_file=s.hardware_file, kv_capacity_tokens=s.kv_capacity_tokens)
                return sim_reference(setup, m) if needed else None
            except InputError as e:
                last = e
        raise last

    def probe(self, run_dir: Path, w: Workload, info: dict, stop: EarlyStop | None) -> tuple[dict, bool]:
        simulate_run(replace(self.sim, results_dir=str(run_dir.parent), run_id=run_dir.name), workload=w,
                     extra_meta={"kind": "probe", "probe": {**info, "early_stop": None}})
        return read_run_meta(run_dir), False
