"""`splitbench search` end to end: validate everything first, then one capacity search (live or simulated) or a P:D
sweep over a fixed set of instances (every xPyD split and the co-located baseline), each configuration's probes in
SEARCH_DIR/<config>/probe-NNN; --predict runs the same searches on the simulator from a measured profile; search.json
is rewritten after every probe."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from splitbench.app.options import CLUSTER_BACKENDS, RunOptions, check_options, resolve_defaults, workload_spec
from splitbench.app.probers import LiveProber, SimProber
from splitbench.app.search import InterruptedSearch, SearchSpec, search_config_dir
from splitbench.app.simrun import SimOptions
from splitbench.backends.registry import get_backend
from splitbench.errors import InputError
from splitbench.metrics.slo import load_reference, parse_slos
from splitbench.schema.search import SEARCH_FILE, read_search, write_search
from splitbench.servers.topology import parse_id_list
from splitbench.workload.load import load


@dataclass
class SearchRun:
    """Where and what: the search directory, live or simulated, single search or sweep, prediction."""
    search_id: str | None = None
    results_dir: str = "results"
    resume: bool = False
    simulate: bool = False
    sweep_splits: bool = False
    predict: str | None = None               # profile CSV: the same searches on the simulator
    predict_split_profile: str | None = None  # profile of a prompt + token pair (split configurations)
    predict_machine: str | None = None       # machine type of one instance [cpu-core on CPU hosts]


def sweep_configs(opts: RunOptions) -> list[tuple[str, str, dict]]:
    """(label, backend, backend options) of every xPyD split of the instances and the co-located baseline."""
    bo = dict(opts.backend_options)
    n = len(parse_id_list(bo.get("cores"), "cores") or []) or len(parse_id_list(bo.get("gpus"), "gpus") or []) \
        or int(bo.get("instances") or 0) or int(bo.get("prompt_instances") or 1) + int(bo.get("token_instances") or 1)
    if n < 2:
        raise InputError(f"--sweep-splits needs at least 2 instances (--cores/--gpus list them), got {n}")
    if opts.backend not in CLUSTER_BACKENDS:
        raise InputError(f"--sweep-splits is for the cluster backends ({', '.join(CLUSTER_BACKENDS)}), got "
                         f"--backend {opts.backend}")
    common = {k: v for k, v in bo.items() if k not in ("instances", "prompt_instances", "token_instances")}
    split_backend = opts.backend if opts.backend in ("splitwise", "mixed") else "splitwise"
    out = [(f"{p}P{n - p}T", split_backend, {**common, "prompt_instances": p, "token_instances": n - p})
           for p in range(1, n)]
    base = {k: v for k, v in common.items() if k not in ("connector", "kv_transfer_config", "layout")}
    return out + [(f"baseline-{n}", "vllm", {**base, "instances": n})]


def predict_options(label: str, backend: str, bo: dict, opts: RunOptions, run: SearchRun) -> SimOptions:
    """The simulation of one live configuration: one machine of `predict_machine` per instance, the model's
    shape from its directory, vLLM P/D's first token (the token instance streams it), serialized KV transfer."""
    from splitbench.servers.tiny_model import ensure_tiny_model   # noqa: PLC0415 (creates the model only here)
    if bo.get("gpus") and not run.predict_machine:
        raise InputError("--predict on GPUs needs --predict-machine (the catalog machine one instance is, e.g. "
                         "1x-h200)")
    machine = run.predict_machine or "cpu-core"
    model_dir = bo.get("model_dir") or str(ensure_tiny_model())
    cfg = json.loads((Path(model_dir) / "config.json").read_text()) if (Path(model_dir) / "config.json").exists() \
        else {}
    if backend == "vllm":
        cluster, profile = f"baseline={machine}:{bo['instances']}", run.predict
    else:
        cluster = f"prompt={machine}:{bo['prompt_instances']},token={machine}:{bo['token_instances']}"
        profile = run.predict_split_profile or run.predict
    return SimOptions(cluster=cluster, trace=opts.trace, trace_dir=opts.trace_dir, columns=opts.columns,
                      start_s=opts.start_s, duration_s=opts.duration_s, max_requests=opts.max_requests,
                      max_context_tokens=opts.max_context_tokens or cfg.get("max_position_embeddings"),
                      model=Path(model_dir).name, model_dir=model_dir, profile=profile, tensor_parallel=1,
                      policy=bo.get("policy") or "jsq", first_token="decode", kv_transfer="serialized",
                      reference_machine=None, hardware_file=opts.hardware_file, seed=opts.seed, fetch=opts.fetch)


def _search_dir(run: SearchRun, spec: SearchSpec, options: dict) -> Path:
    """The search directory: a new one, or (same id) an earlier search of the same measurements to resume."""
    sid = run.search_id or f"{time.strftime('%Y%m%d-%H%M%S')}-search"
    d = Path(run.results_dir) / sid
    if not d.exists():
        if run.resume:
            raise InputError("--resume: no such search directory", file=str(d))
        return d
    prev = read_search(d / SEARCH_FILE)
    if prev["spec"].get("measured") != json.loads(json.dumps(spec.measured(), default=str)) or \
            prev.get("options") != options:
        raise InputError("this search id holds a search of other options or SLOs: choose another --search-id",
                         file=str(d / SEARCH_FILE))
    return d


def run_search(opts: RunOptions | SimOptions, spec: SearchSpec, run: SearchRun,
               on_status: Callable[[str], None] = lambda s: None) -> tuple[dict, Path]:
    """Validate, then search; (search.json's dict, search dir). Every bad input fails before anything is written."""
    spec.check()
    slos = parse_slos(spec.slos) if spec.slos else []
    opts, configs, probers, predictions = _validate(opts, spec, run)
    base = load(workload_spec(opts), on_status)
    options = json.loads(json.dumps(asdict(opts), default=str))
    search_dir = _search_dir(run, spec, options)
    state = {"search_id": search_dir.name, "status": "running", "simulated": run.simulate,
             "spec": {"measured": json.loads(json.dumps(spec.measured(), default=str)), **asdict(spec)},
             "options": options, "searches": [], "created_unix_s": time.time()}
    search_dir.mkdir(parents=True, exist_ok=True)
    ref_path = search_dir / "reference.json"
    try:
        for label, backend, bo in configs:
            o = opts if run.simulate else replace(opts, backend=backend, backend_options=bo)
            config = {"backend": backend, **{k: v for k, v in bo.items() if k in ("cluster", "instances",
                                                                                   "prompt_instances",
                                                                                   "token_instances")}}
            cdir = search_dir / (label if len(configs) > 1 else "search")
            with probers.get(label) or LiveProber(o, base, cdir, slos, on_status) as prober:
                ref = prober.reference(opts_ref(o), spec.splitwise_slo, ref_path)
                _one(state, "searches", search_dir, cdir, label, config, prober, base, spec, slos, ref, on_status)
        live_ref = load_reference(ref_path) if ref_path.exists() else (load_reference(opts.reference)
                                                                        if getattr(opts, "reference", None) else None)
        for label, sim in predictions:
            config = {"backend": "simulator", "cluster": sim.cluster, "profile": sim.profile}
            with SimProber(replace(sim, slos=spec.slos)) as prober:
                ref = live_ref if spec.splitwise_slo else None
                _one(state, "predictions", search_dir, search_dir / f"predict-{label}", label, config, prober, base,
                     spec, slos, ref, on_status)
    except (InterruptedSearch, KeyboardInterrupt) as e:
        state["status"] = "interrupted"
        write_search(search_dir, finish(state))
        raise KeyboardInterrupt from e
    except BaseException as e:
        state.update(status="failed", error=f"{type(e).__name__}: {e}")
        write_search(search_dir, finish(state))
        raise
    state["status"] = "complete"
    write_search(search_dir, finish(state))
    return state, search_dir


def _validate(opts, spec: SearchSpec, run: SearchRun) -> tuple:
    """(options, configurations, simulated probers, predictions) after every check that needs no backend."""
    if run.simulate:
        opts = replace(opts, slos=spec.slos)
        SimProber(opts).reference(opts_ref(opts), spec.splitwise_slo, Path("."))   # checks the profile now
        return opts, [("sim", None, {"cluster": opts.cluster})], {"sim": SimProber(opts)}, []
    opts = resolve_defaults(replace(opts, slos=spec.slos, rate_scale=1.0))
    check_options(opts)
    if opts.reference:
        load_reference(opts.reference)
    configs = sweep_configs(opts) if run.sweep_splits else [(opts.backend, opts.backend, opts.backend_options)]
    for _, backend, bo in configs:
        get_backend(backend, **bo)
    predictions = [(label, predict_options(label, b, bo, opts, run)) for label, b, bo in configs] \
        if run.predict else []
    for _, sim in predictions:
        SimProber(sim).reference(None, False, Path("."))
    return opts, configs, {}, predictions


def opts_ref(o) -> str | None:
    return getattr(o, "reference", None) if isinstance(o, RunOptions) else getattr(o, "reference_file", None)


def _one(state: dict, key: str, search_dir: Path, cdir: Path, label: str, config: dict, prober, base, spec, slos,
         ref, on_status) -> None:
    """One configuration's search into state[key], search.json rewritten after every probe."""
    state.setdefault(key, [])
    slot = len(state[key])
    state[key].append(None)

    def update(result: dict) -> None:
        state[key][slot] = result
        write_search(search_dir, finish({**state, key: [r for r in state[key] if r is not None]}))
    result = search_config_dir(cdir, label, config, prober, base, spec, slos, ref, update, on_status)
    state[key][slot] = result


def _ranked_rps(capacity: dict) -> float:
    """A configuration's capacity for ranking: its boundary, or where every probe passed (censored above) the
    highest rate measured, which it takes at least."""
    if capacity.get("rps") is not None:
        return capacity["rps"]
    bracket = capacity.get("bracket_rps") or [None]
    return bracket[0] or 0.0 if capacity.get("censored") == "above" else 0.0


def finish(state: dict) -> dict:
    """search.json's derived keys: the best configuration and, with predictions, measured vs predicted capacity."""
    out = {**state, "searches": [s for s in state["searches"] if s is not None]}
    caps = [(_ranked_rps(s["capacity"]), s["label"]) for s in out["searches"]]
    if caps:
        out["best"] = max(caps)[1]
    preds = {p["label"]: p for p in state.get("predictions") or [] if p is not None}
    if preds:
        out["predictions"] = list(preds.values())
        rows = []
        for s in out["searches"]:
            p = preds.get(s["label"])
            m, q = s["capacity"].get("rps"), (p or {}).get("capacity", {}).get("rps")
            rows.append({"label": s["label"], "measured_rps": m, "predicted_rps": q,
                         "measured_ci_rps": [s["capacity"].get("ci_lo_rps"), s["capacity"].get("ci_hi_rps")],
                         "predicted_ci_rps": [(p or {}).get("capacity", {}).get("ci_lo_rps"),
                                              (p or {}).get("capacity", {}).get("ci_hi_rps")],
                         "error": (q - m) / m if m and q is not None else None})
        out["comparison"] = rows
    return out
