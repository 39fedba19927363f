"""`splitbench search`: the highest arrival rate meeting the SLOs, live (any backend and run option) or simulated;
--sweep-splits over every xPyD split of the instances and the co-located baseline; --predict beside it."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from splitbench.app.options import RunOptions, parse_rate_scale
from splitbench.app.search import SearchSpec
from splitbench.app.simrun import SimOptions
from splitbench.app.sweep import SearchRun, run_search
from splitbench.cli.common import Opt, console, err_console, user_errors, with_options
from splitbench.cli.groups import BACKEND, CLIENT, CLUSTER, FETCH, HARDWARE, PROMPTS, RESULTS, WORKLOAD
from splitbench.cli.run import run_options
from splitbench.errors import InputError
from splitbench.render.search import render_search_html
from splitbench.render.search_table import render_search
from splitbench.schema.files import atomic_write_bytes
from splitbench.workload.traces import parse_columns

def _sim_options(opts: dict, a: dict) -> SimOptions:
    w = {k: opts[k] for k in ("trace", "trace_dir", "start_s", "duration_s", "max_requests", "max_context_tokens",
                              "block_tokens", "prefix_block_tokens", "fetch", "results_dir", "seed",
                              "hardware_file", "policy")}
    w["columns"] = parse_columns(opts["columns"])
    w["policy"] = w["policy"] or "jsq"
    if not a["cluster"]:
        raise InputError("--simulate needs --cluster (e.g. splitwise-aa:2,2 or prompt=cpu-core:1,token=cpu-core:1)")
    return SimOptions(**w, cluster=a["cluster"], model=a["sim_model"], model_dir=opts["model_dir"],
                      profile=a["profile"], reference_machine=a["reference_machine"] or None,
                      first_token=a["first_token"], batching=a["batching"])


SEARCH = (
    Opt("splitwise_slo", bool, "Judge by Splitwise's nine slowdown checks against the unloaded reference "
        "(--reference, or measured on the backend first).", default=False),
    Opt("search_id", Optional[str], "Search directory name under --results; the same id again resumes it (its "
        "finished probes are reused).", default=None),
    Opt("resume", bool, "Continue --search-id (it must exist; budget options may change).", default=False),
    Opt("arrivals", str, "What the rate is: rate-scale (the window's arrivals scaled), poisson or gamma "
        "(synthetic arrivals at R req/s with the window's lengths).", default="rate-scale"),
    Opt("cv", float, "--arrivals gamma: inter-arrival CV.", default=1.0),
    Opt("probe_duration_s", Optional[float], "poisson/gamma: seconds of arrivals per probe [the window's "
        "--duration].", ("--probe-duration",), default=None),
    Opt("warmup_s", float, "Seconds of each probe's sends left out of its verdict.", ("--warmup",), default=0.0),
    Opt("warmup_requests", int, "First requests of each probe left out of its verdict.", default=0),
    Opt("max_error_rate", float, "A probe with more failed requests fails.", default=0.01),
    Opt("early_stop", bool, "Stop a probe's replay once its verdict cannot pass.", ("--early-stop/--no-early-stop",),
        default=True),
    Opt("start_rate", Optional[float], "First rate [rate scale 1, or the window's req/s].", default=None),
    Opt("growth", float, "Rate factor while no probe failed (or none passed).", default=2.0),
    Opt("tolerance", float, "Stop when the CI is at most this fraction of the capacity.", default=0.05),
    Opt("max_probes", int, "Probes per configuration at most.", default=12),
    Opt("confidence", float, "Confidence of the capacity's bootstrap interval.", default=0.9),
    Opt("bootstrap", int, "Bootstrap draws of the capacity's interval.", default=400),
    Opt("min_repeats", int, "Probes at each end of the final bracket before it converges (a single disturbed "
        "probe cannot decide).", default=2),
)
SIM = (
    Opt("simulate", bool, "Probe on the simulator (--cluster, --profile) instead.", default=False),
    Opt("cluster", Optional[str], "--simulate: the cluster (as `simulate --cluster`).", default=None),
    Opt("sim_model", str, "--simulate: the profile's model name.", default="bloom-176b"),
    Opt("profile", Optional[str], "--simulate: profile CSV.", default=None),
    Opt("reference_machine", str, "--simulate --splitwise-slo: reference machine.", default="auto"),
    Opt("first_token", str, "--simulate: split requests' first token (prefill|decode).", default="prefill"),
    Opt("batching", str, "--simulate: co-located batching (chunked|prompt-first).", default="chunked"),
)
SWEEP = (
    Opt("sweep_splits", bool, "Search every xPyD split of the instances (--cores / --gpus) and the co-located "
        "baseline of as many vLLM instances.", default=False),
    Opt("predict", Optional[str], "Also run the searches on the simulator from this profile CSV (one instance) and "
        "show prediction vs measurement.", default=None),
    Opt("predict_split_profile", Optional[str], "--predict: profile of a prompt + token pair (splitbench profile "
        "--backend splitwise).", default=None),
    Opt("predict_machine", Optional[str], "--predict: catalog machine one instance is [cpu-core].", default=None),
    Opt("html", Optional[Path], "Write the HTML report here [SEARCH_DIR/search.html].", default=None),
    Opt("as_json", bool, "Print search.json instead of the tables.", ("--json",), default=False),
)
OWN = tuple(o.name for o in SEARCH + SIM + SWEEP)


def _specs(opts: dict) -> tuple[SearchSpec, SearchRun]:
    spec = SearchSpec(**{f.name: opts[f.name] for f in fields(SearchSpec) if f.name in opts})
    run = SearchRun(search_id=opts["search_id"], results_dir=opts["results_dir"], resume=opts["resume"],
                    simulate=opts["simulate"], sweep_splits=opts["sweep_splits"], predict=opts["predict"],
                    predict_split_profile=opts["predict_split_profile"], predict_machine=opts["predict_machine"])
    return spec, run


@user_errors
@with_options(WORKLOAD, FETCH, PROMPTS, CLIENT, RESULTS[:1], RESULTS[2:], BACKEND, CLUSTER, HARDWARE, SEARCH, SIM,
              SWEEP, target=RunOptions)
def search(opts: dict):
    """Find the highest arrival rate meeting the SLOs (noise-robust: monotone fit, bootstrap CI, repeats near the
    boundary); every probe is a run directory under the search directory. Exit 0 found, 1 no rate meets the SLOs,
    2 bad input, 130 interrupted (rerun with the same --search-id to resume)."""
    spec, run = _specs(opts)
    if run.simulate:
        if run.sweep_splits or run.predict:
            raise InputError("--sweep-splits and --predict measure live clusters: drop --simulate")
        parse_rate_scale(opts["rate_scale"], allow_auto=False)
        ro = _sim_options(opts, opts)
    else:
        if opts["rate_scale"] not in (None, "1", "1.0"):
            raise InputError("--rate-scale is what the search chooses: drop it (--start-rate sets the first one)")
        opts["rate_scale"] = None
        ro = run_options({k: v for k, v in opts.items() if k not in OWN})
    try:
        result, search_dir = run_search(ro, spec, run, on_status=lambda s: err_console.log(s))
    except KeyboardInterrupt:
        err_console.print("interrupted: finished probes are kept; rerun with the same --search-id to resume")
        raise typer.Exit(130)
    html_path = opts["html"] or search_dir / "search.html"
    atomic_write_bytes(html_path, render_search_html(result).encode())
    if opts["as_json"]:
        print(json.dumps(result, indent=2, default=str))
    else:
        render_search(result, console)
    (err_console if opts["as_json"] else console).print(
        f"search directory: {search_dir} (search.json, {Path(html_path).name})", markup=False, highlight=False)
    if not any((s["capacity"].get("rps") or s["capacity"].get("censored") == "above") for s in result["searches"]):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(search)
