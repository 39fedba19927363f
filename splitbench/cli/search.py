"""`splitbench search`: the highest arrival rate meeting the SLOs, live (any backend and run option) or simulated;
--sweep-splits over every xPyD split of the instances and the co-located baseline; --predict beside it."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from splitbench.app.options import RunOptions, parse_rate_scale
from splitbench.app.search import SearchSpec
from splitbench.app.simrun import SimOptions
from splitbench.app.sweep import SearchRun, run_search
from splitbench.cli.common import console, err_console, user_errors, with_options
from splitbench.cli.groups import BACKEND, CLIENT, CLUSTER, FETCH, HARDWARE, PROMPTS, RESULTS, WORKLOAD
from splitbench.cli.run import run_options
from splitbench.errors import InputError
from splitbench.render.search import render_search_html
from splitbench.render.search_table import render_search
from splitbench.schema.files import atomic_write_bytes
from splitbench.workload.traces import parse_columns

SIM_ONLY = ("cluster", "sim_model", "profile", "reference_machine", "first_token", "batching")


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


@user_errors
@with_options(WORKLOAD, FETCH, PROMPTS, CLIENT, RESULTS[:1], RESULTS[2:], BACKEND, CLUSTER, HARDWARE,
              target=RunOptions)
def search(opts: dict,
           splitwise_slo: bool = typer.Option(False, help="Judge by Splitwise's nine slowdown checks against the "
                                              "unloaded reference (--reference, or measured on the backend first)."),
           search_id: Optional[str] = typer.Option(None, help="Search directory name under --results; the same id "
                                                   "again resumes it (its finished probes are reused)."),
           resume: bool = typer.Option(False, help="Continue --search-id (it must exist; budget options may change)."),
           arrivals: str = typer.Option("rate-scale", help="What the rate is: rate-scale (the window's arrivals "
                                        "scaled), poisson or gamma (synthetic arrivals at R req/s, the window's "
                                        "lengths)."),
           cv: float = typer.Option(1.0, help="--arrivals gamma: inter-arrival CV."),
           probe_duration: Optional[float] = typer.Option(None, help="poisson/gamma: seconds of arrivals per probe "
                                                          "[the window's --duration]."),
           warmup: float = typer.Option(0.0, help="Seconds of each probe's sends left out of its verdict."),
           warmup_requests: int = typer.Option(0, help="First requests of each probe left out of its verdict."),
           max_error_rate: float = typer.Option(0.01, help="A probe with more failed requests fails."),
           early_stop: bool = typer.Option(True, help="Stop a probe's replay once its verdict cannot pass."),
           start_rate: Optional[float] = typer.Option(None, help="First rate [rate scale 1, or the window's req/s]."),
           growth: float = typer.Option(2.0, help="Rate factor while no probe failed (or none passed)."),
           tolerance: float = typer.Option(0.05, help="Stop when the CI is at most this fraction of the capacity."),
           max_probes: int = typer.Option(12, help="Probes per configuration at most."),
           confidence: float = typer.Option(0.9, help="Confidence of the capacity's bootstrap interval."),
           bootstrap: int = typer.Option(400, help="Bootstrap draws of the capacity's interval."),
           min_repeats: int = typer.Option(2, help="Probes at each end of the final bracket before it converges "
                                           "(a single disturbed probe cannot decide)."),
           simulate: bool = typer.Option(False, help="Probe on the simulator (--cluster, --profile) instead."),
           cluster: Optional[str] = typer.Option(None, help="--simulate: the cluster (as `simulate --cluster`)."),
           sim_model: str = typer.Option("bloom-176b", help="--simulate: the profile's model name."),
           profile: Optional[str] = typer.Option(None, help="--simulate: profile CSV."),
           reference_machine: str = typer.Option("auto", help="--simulate --splitwise-slo: reference machine."),
           first_token: str = typer.Option("prefill", help="--simulate: split requests' first token (prefill|decode)."),
           batching: str = typer.Option("chunked", help="--simulate: co-located batching (chunked|prompt-first)."),
           sweep_splits: bool = typer.Option(False, help="Search every xPyD split of the instances (--cores / "
                                             "--gpus) and the co-located baseline of as many vLLM instances."),
           predict: Optional[str] = typer.Option(None, help="Also run the searches on the simulator from this "
                                                 "profile CSV (one instance) and show prediction vs measurement."),
           predict_split_profile: Optional[str] = typer.Option(None, help="--predict: profile of a prompt + token "
                                                               "pair (splitbench profile --backend splitwise)."),
           predict_machine: Optional[str] = typer.Option(None, help="--predict: catalog machine one instance is "
                                                         "[cpu-core]."),
           html: Optional[Path] = typer.Option(None, help="Write the HTML report here [SEARCH_DIR/search.html]."),
           as_json: bool = typer.Option(False, "--json", help="Print search.json instead of the table.")):
    """Find the highest arrival rate meeting the SLOs (noise-robust: monotone fit, bootstrap CI, repeats near the
    boundary); every probe is a run directory under the search directory. Exit 0 found, 1 no rate meets the SLOs,
    2 bad input, 130 interrupted (rerun with the same --search-id to resume)."""
    spec = SearchSpec(arrivals=arrivals, cv=cv, probe_duration_s=probe_duration, warmup_s=warmup,
                      warmup_requests=warmup_requests, slos=opts["slos"], splitwise_slo=splitwise_slo,
                      max_error_rate=max_error_rate, early_stop=early_stop, seed=opts["seed"], start_rate=start_rate,
                      growth=growth, tolerance=tolerance, max_probes=max_probes, confidence=confidence,
                      bootstrap=bootstrap, min_repeats=min_repeats)
    run = SearchRun(search_id=search_id, results_dir=opts["results_dir"], resume=resume, simulate=simulate,
                    sweep_splits=sweep_splits, predict=predict, predict_split_profile=predict_split_profile,
                    predict_machine=predict_machine)
    if simulate:
        if sweep_splits or predict:
            raise InputError("--sweep-splits and --predict measure live clusters: drop --simulate")
        parse_rate_scale(opts["rate_scale"], allow_auto=False)
        ro = _sim_options(opts, locals())
    else:
        if opts["rate_scale"] not in (None, "1", "1.0"):
            raise InputError("--rate-scale is what the search chooses: drop it (--start-rate sets the first one)")
        opts["rate_scale"] = None
        ro = run_options(opts)
    html_path = None
    try:
        result, search_dir = run_search(ro, spec, run, on_status=lambda s: err_console.log(s))
    except KeyboardInterrupt:
        err_console.print("interrupted: finished probes are kept; rerun with the same --search-id to resume")
        raise typer.Exit(130)
    html_path = html or search_dir / "search.html"
    atomic_write_bytes(html_path, render_search_html(result).encode())
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        render_search(result, console)
    (err_console if as_json else console).print(f"search directory: {search_dir} (search.json, {html_path.name})",
                                                markup=False, highlight=False)
    if not any((s["capacity"].get("rps") or s["capacity"].get("censored") == "above") for s in result["searches"]):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(search)
