"""`splitbench compare`, `gate`, `baseline`, `hardware` and `calibrate`: comparing runs and guarding them."""
from __future__ import annotations

import json as _json
import os
import time as _time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from splitbench.app import reports
from splitbench.app.baselines import gate as run_gate
from splitbench.app.baselines import list_baselines, save, store_dir
from splitbench.app.calibrate import CRITERIA
from splitbench.app.calibrate import calibrate as run_calibration
from splitbench.cli.common import console, err_console, user_errors
from splitbench.errors import InputError
from splitbench.hardware.catalog import load_catalog
from splitbench.hardware.ceiling import store_path
from splitbench.render.compare import render_compare, render_compare_markdown
from splitbench.render.gate import render_console, render_json, render_junit, render_markdown
from splitbench.render.html import render_html
from splitbench.schema.files import atomic_write_bytes


@user_errors
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="Run directories (live or simulated); the first is the reference."),
    slo: Optional[str] = typer.Option(None, help="SLOs to evaluate on every run (default: each run's own)."),
    label: Optional[list[str]] = typer.Option(None, "--label", help="Run labels in order (default: directory names)."),
    html: Optional[Path] = typer.Option(None, help="HTML report path [results/compare-<time>.html]."),
    no_html: bool = typer.Option(False, "--no-html", help="Do not write the HTML report."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the comparison as JSON here ('-': stdout)."),
    markdown: bool = typer.Option(False, "--markdown", help="Print Markdown instead of tables."),
):
    """Side by side: latency, SLOs, throughput, cost and energy per pool, iso-cost/iso-power, ratios vs the first run."""

    comparison = reports.compare(list(run_dirs), slos=slo, labels=label, with_series=not no_html)
    if markdown:
        print(render_compare_markdown(comparison), end="")
    else:
        render_compare(comparison, console)
    if json_out is not None:
        slim = {**comparison, "runs": [{k: v for k, v in r.items() if k != "series"} for r in comparison["runs"]]}
        text = _json.dumps(slim, indent=2, default=str)
        if str(json_out) == "-":
            print(text)
        else:
            atomic_write_bytes(json_out, text.encode())
            err_console.print(f"JSON written to {json_out}", markup=False)
    if not no_html:
        path = html or Path("results") / f"compare-{_time.strftime('%Y%m%d-%H%M%S')}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, render_html(comparison).encode())
        err_console.print(f"HTML report written to {path}", markup=False)


@user_errors
def hardware_list(file: Optional[str] = typer.Option(None, "--file", help="User catalog TOML merged over the packaged one."),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the hardware catalog: machine types, price, provisioned power, sources (estimates flagged)."""


    cat = load_catalog(file)
    if as_json:
        print(_json.dumps({k: asdict(v) for k, v in cat.items()}, indent=2))
        return
    t = Table("type", "accelerators", "$/h", "W/accel", "server W", "estimated")
    for name, m in cat.items():
        t.add_row(name, f"{m.accelerators}x {m.accelerator}", f"{m.usd_per_hour:g}", f"{m.accelerator_power_w:g}",
                  f"{m.server_power_w:g}", "yes" if m.estimated else "no")
    console.print(t)
    for name, m in cat.items():
        console.print(f"{name}: {m.source}", markup=False, highlight=False)


@user_errors
def calibrate(
    duration: float = typer.Option(10.0, help="Seconds per rate point (after a 1 s warm-up)."),
    workers: int = typer.Option(1, help="Sender processes to calibrate (runs with --workers N use this ceiling)."),
    stub_cpu: Optional[int] = typer.Option(None, help="Core for the stub [the last core]."),
    http: str = typer.Option("lean", help="Client HTTP transport: lean (default) or aiohttp."),
    max_points: int = typer.Option(12, help="Give up the search after this many points."),
    save: bool = typer.Option(True, help="Store the ceiling for this host (runs record it in run.json)."),
    stubs: int = typer.Option(1, help="Stub processes sharing one port, each on its own core (the last cores), "
                              "so that at several workers the stub is never the limit."),
):
    """Find this client's ceiling: ramp an open-loop rate against the built-in stub (TTFT 20 ms, 5 ms/token,
    128 in / 32 out) until achieved < 95% of target, TTFT p99 error > 5 ms or send lag p99 > 2 ms."""
    if workers < 1 or stubs < 1:
        raise InputError(f"--workers and --stubs must be >= 1, got {workers} and {stubs}")
    c = CRITERIA
    console.print(f"criteria: achieved >= {c['min_rate_ratio']:.0%} of target, TTFT p99 error <= "
                  f"{c['ttft_p99_error_s'] * 1e3:g} ms, lag p99 <= {c['lag_p99_s'] * 1e3:g} ms", highlight=False)

    def show(p: dict) -> None:
        if p.get("retrying"):
            console.print(f"  {p['target_rps']:>7.0f} req/s  failed ({p['reason']}); measuring again", highlight=False)
            return
        if "achieved_rps" not in p:
            console.print(f"  {p['target_rps']:>7.0f} req/s  FAIL  {p['reason']}", highlight=False)
            return
        cpu = p.get("cpu_s_per_request")
        console.print(f"  {p['target_rps']:>7.0f} req/s  achieved {p['achieved_rps']:7.1f}  lag p99 "
                      f"{p['lag_p99_s'] * 1e3:6.2f} ms  TTFT p99 err {p['ttft_p99_error_s'] * 1e3:6.2f} ms"
                      + (f"  cpu {cpu * 1e6:5.0f} us/req" if cpu else "")
                      + (f"  stub lateness p99 {p['stub_lateness_p99_s'] * 1e3:.2f} ms"
                         if p.get("stub_lateness_p99_s") is not None else "")
                      + ("  ok" if p["pass"] else f"  FAIL ({p['reason']})"), highlight=False)
    res = run_calibration(duration_s=duration, workers=workers, stub_cpu=stub_cpu, http=http,
                          max_points=max_points, on_point=show, save=save, stubs=stubs)
    console.print(f"ceiling: {res['ceiling_rps']:.0f} req/s"
                  + (f", {res['tokens_per_s']:.0f} streamed tokens/s" if res.get("tokens_per_s") else "")
                  + (f", {res['cpu_s_per_request'] * 1e6:.0f} us CPU per request" if res.get("cpu_s_per_request")
                     else "") + f" ({workers} worker{'s' if workers > 1 else ''})", highlight=False)
    if save:
        console.print(f"stored: {store_path()}", highlight=False)


def emit_gate(result: dict, markdown: Optional[Path], junit: Optional[Path], json_out: Optional[Path]) -> None:
    render_console(result, console)
    for path, text in ((markdown, render_markdown), (junit, render_junit), (json_out, render_json)):
        if path is not None:
            if str(path) == "-":
                print(text(result), end="")
            else:
                atomic_write_bytes(path, text(result).encode())
                err_console.print(f"written: {path}", markup=False)
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file and markdown is None:
        with open(summary_file, "a") as f:
            f.write(render_markdown(result))


@user_errors
def gate(
    baseline: list[str] = typer.Option(..., "--baseline", help="Baseline run dir or saved baseline name (repeat for "
                                       "several runs: the bootstrap then resamples runs)."),
    candidate: list[str] = typer.Option(..., "--candidate", help="Candidate run dir (repeatable)."),
    rules: Path = typer.Option(..., "--rules", help="gates.toml: [gate], [preconditions], [[rule]] tables."),
    baseline_dir: Optional[str] = typer.Option(None, help="Where saved baselines live [$SPLITBENCH_BASELINES or "
                                               "./baselines]."),
    markdown: Optional[Path] = typer.Option(None, help="Write a Markdown summary here ('-': stdout)."),
    junit: Optional[Path] = typer.Option(None, help="Write JUnit XML here."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result as JSON here."),
):
    """Statistical regression gate: exit 0 pass, 1 regression, 2 invalid comparison or bad input."""
    result = run_gate(baseline, candidate, rules, store=baseline_dir)
    emit_gate(result, markdown, junit, json_out)
    raise typer.Exit(result["exit_code"])


@user_errors
def baseline_save(name: str = typer.Argument(..., help="Baseline name."),
                  run_dir: Path = typer.Argument(..., help="Run directory to keep."),
                  baseline_dir: Optional[str] = typer.Option(None, help="Store [$SPLITBENCH_BASELINES or ./baselines]."),
                  force: bool = typer.Option(False, help="Replace an existing baseline of that name.")):
    """Keep a run (records, run.json, summary.json) as a named baseline."""
    console.print(f"saved baseline {name}: {save(name, run_dir, baseline_dir, force)}", markup=False)


@user_errors
def baseline_list(baseline_dir: Optional[str] = typer.Option(None, help="Store [$SPLITBENCH_BASELINES or ./baselines].")):
    """Saved baselines."""

    t = Table("name", "run id", "backend", "workload", "requests", "simulated", title=str(store_dir(baseline_dir)))
    for b in list_baselines(baseline_dir):
        t.add_row(b["name"], str(b["run_id"]), str(b["backend"]), str(b["workload"]), str(b["requests"]),
                  "yes" if b["simulated"] else "no")
    console.print(t)


@user_errors
def baseline_show(name: str = typer.Argument(..., help="Baseline name or run dir."),
                  baseline_dir: Optional[str] = typer.Option(None, help="Store [$SPLITBENCH_BASELINES or ./baselines].")):
    """The report of a saved baseline."""


def register(app: typer.Typer) -> None:
    baseline_app = typer.Typer(no_args_is_help=True, help="Saved baseline runs for regression gates.")
    app.add_typer(baseline_app, name="baseline")
    app.command()(compare)
    app.command("hardware")(hardware_list)
    app.command()(calibrate)
    app.command()(gate)
    baseline_app.command("save")(baseline_save)
    baseline_app.command("list")(baseline_list)
    baseline_app.command("show")(baseline_show)
