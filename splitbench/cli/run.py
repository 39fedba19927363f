"""`splitbench run`, `report`, `reference` and `locust`: a replay against a backend and reading it back."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from splitbench.app import reports, runner
from splitbench.app.baselines import gate as run_gate
from splitbench.app.baselines import resolve
from splitbench.app.locust_launch import LocustOptions, run_locust, run_worker
from splitbench.app.options import RunOptions, backend_options, parse_rate_scale
from splitbench.cli.common import console, err_console, int_list, pick, user_errors, with_options
from splitbench.cli.gates import emit_gate
from splitbench.cli.groups import (
    BACKEND,
    BACKEND_FLAGS,
    CLIENT,
    CLUSTER,
    FETCH,
    HARDWARE,
    PROMPTS,
    RESULTS,
    SESSIONS,
    WORKLOAD,
)
from splitbench.errors import InputError
from splitbench.metrics.gate_rules import load_rules
from splitbench.render.console import render_markdown, render_summary
from splitbench.workload.traces import parse_columns

# The progress bar is redrawn from the replay loop at most once a second, never by rich's refresh thread: that
# thread's renders take the GIL from the sender (measured: send lag p99 10-15 ms with it, 6.6 ms without).
PROGRESS_REFRESH_S = 1.0


def run_options(opts: dict, **fixed) -> RunOptions:
    """RunOptions from a command's option groups: backend flags become backend_options."""
    flags = pick(opts, BACKEND_FLAGS)
    fields = {k: v for k, v in opts.items() if k not in BACKEND_FLAGS}
    fields["columns"] = parse_columns(fields.get("columns"))
    fields["rate_scale"] = parse_rate_scale(fields.get("rate_scale"))
    return RunOptions(**fields, **fixed, backend_options=backend_options(opts["backend"], **flags,
                                                                         machine=opts.get("machine")))


def _progress() -> tuple[Progress, callable]:
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} done"),
                        TextColumn("sent {task.fields[sent]}  in flight {task.fields[inflight]}  failed "
                                   "{task.fields[failed]}"),
                        TimeElapsedColumn(), console=err_console, transient=False, auto_refresh=False)
    task, last = None, [-PROGRESS_REFRESH_S]

    def on_progress(rep):
        nonlocal task
        if task is None:
            task = progress.add_task("replay", total=rep.stats.planned, sent=0, inflight=0, failed=0)
        progress.update(task, completed=rep.stats.finished, sent=rep.stats.sent, inflight=rep.inflight,
                        failed=rep.stats.failed)
        now = time.monotonic()
        if now - last[0] >= PROGRESS_REFRESH_S and err_console.is_terminal:
            last[0] = now
            progress.refresh()
    return progress, on_progress


@user_errors
@with_options(WORKLOAD, SESSIONS, FETCH, PROMPTS, CLIENT, RESULTS, BACKEND, CLUSTER, HARDWARE, target=RunOptions)
def run(opts: dict,
        workers: int = typer.Option(1, help="Sender processes: the trace is dealt round-robin, one shared start, "
                                    "records merged (for rates past one core's calibrated ceiling)."),
        gate_rules: Optional[Path] = typer.Option(None, "--gate", help="After the run, gate it against --baseline "
                                                  "with these rules (exit 1 regression, 2 invalid)."),
        gate_baseline: Optional[str] = typer.Option(None, "--baseline", help="Saved baseline name or run dir."),
        baseline_dir: Optional[str] = typer.Option(None, help="Store of saved baselines for --baseline.")):
    """Replay a trace open-loop against a backend; write records, run.json and summary.json; print the report."""
    if (gate_rules is None) != (gate_baseline is None):
        raise InputError("--gate and --baseline go together")
    if gate_rules is not None:   # bad rules or an unknown baseline fail before anything starts
        load_rules(gate_rules)
        resolve(gate_baseline, baseline_dir)
    progress, on_progress = _progress()
    with progress:
        result = runner.run(run_options(opts, workers=workers), on_progress=on_progress,
                            on_status=lambda s: progress.console.log(s))
    render_summary(result.summary, console)
    console.print(f"run directory: {result.run_dir}")
    if result.interrupted:
        err_console.print("interrupted: finished records were written; exiting non-zero")
        raise typer.Exit(130)
    counts = result.summary.get("counts") or {}
    if counts.get("sent") and not counts.get("ok"):
        err_console.print(f"every request failed ({counts.get('by_status')}): the server failed, see the instance "
                          "logs in the run directory; exiting 1")
        raise typer.Exit(1)
    if gate_rules is not None:
        res = run_gate([gate_baseline], [str(result.run_dir)], gate_rules, store=baseline_dir)
        emit_gate(res, None, None, None)
        raise typer.Exit(res["exit_code"])


@user_errors
def report(run_dir: Path = typer.Argument(..., help="A results/<run-id> directory (live or simulated)."),
           slo: Optional[str] = typer.Option(None, help="SLOs to evaluate (default: those given at run time)."),
           reference: Optional[str] = typer.Option(None, help="Reference JSON for the Splitwise verdict."),
           json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
           markdown: bool = typer.Option(False, "--markdown", help="Print a markdown summary.")):
    """Recompute metrics from a run's per-request records and print the report."""
    summary = reports.report(run_dir, slos=slo, reference=reference)
    if json_out:
        print(json.dumps(summary, indent=2, default=str))
    elif markdown:
        print(render_markdown(summary))
    else:
        render_summary(summary, console)


@user_errors
@with_options(PROMPTS[:1], PROMPTS[2:5], BACKEND, CLUSTER, target=RunOptions)
def reference(opts: dict,
              out: Path = typer.Option(..., help="Where to store the reference JSON."),
              sizes: str = typer.Option("16,64,256,1024,2048,4096", help="Prompt sizes (tokens) of the grid."),
              output_tokens: int = typer.Option(32, help="Output tokens per request."),
              repeats: int = typer.Option(3, help="Requests per prompt size."),
              results: str = typer.Option("results", help="Directory for the reference run's records.")):
    """Measure an unloaded reference (one request at a time over prompt sizes) for Splitwise's SLO verdict."""
    ref, run_dir = runner.measure_reference(run_options(opts, results_dir=results), sizes=int_list(sizes, "--sizes"),
                                            output_tokens=output_tokens, repeats=repeats, out=out,
                                            on_status=lambda s: err_console.log(s))
    console.print(f"reference written to {out} (records in {run_dir}):")
    console.print(vars(ref))


@user_errors
@with_options(WORKLOAD, FETCH, PROMPTS, CLIENT, RESULTS, BACKEND, CLUSTER, HARDWARE, target=RunOptions,
              overrides={"backend": None})
def locust(opts: dict,
           headless: bool = typer.Option(False, help="No web UI: start at once, exit when the replay ends (CI)."),
           web_host: str = typer.Option("127.0.0.1", help="Web UI address ('*' for all interfaces)."),
           web_port: int = typer.Option(8089, help="Web UI port."),
           master: bool = typer.Option(False, help="Run a master that shards the trace over --expect-workers "
                                       "workers."),
           expect_workers: int = typer.Option(1, help="--master: workers to wait for (headless) before starting."),
           worker: bool = typer.Option(False, help="Run a worker that joins --master-host (needs no trace or "
                                       "backend)."),
           master_host: str = typer.Option("127.0.0.1", help="--worker: the master's address."),
           master_port: Optional[int] = typer.Option(None, help="Master port [5557; --processes: a free one]."),
           processes: Optional[int] = typer.Option(None, help="Local worker processes (a master plus N workers)."),
           start_lead: float = typer.Option(2.0, help="Shared start = master's clock at test start + this many s."),
           locust_log: Optional[str] = typer.Option(None, help="Write Locust's output to this file instead.")):
    """Replay a trace open-loop from Locust: web UI (or --headless), TTFT/TBT/E2E rows and an LLM tab, master/worker
    sharding; writes the same run directory as `run` plus Locust's CSV/HTML. Exit: 0 ok, 1 SLO missed, 2 bad input,
    3 incomplete (a worker or replayer died), 130 interrupted (headless)."""
    lo = LocustOptions(headless=headless, web_host=web_host, web_port=web_port, master=master,
                       expect_workers=expect_workers, worker=worker, master_host=master_host, master_port=master_port,
                       processes=processes, start_lead_s=start_lead, log_file=locust_log)
    if worker:
        raise typer.Exit(run_worker(lo).exit_code)
    if opts["url"] and opts["backend"] not in (None, "openai"):
        raise InputError("--url is for an existing server: drop --backend (or use --backend openai)")
    opts["backend"] = opts["backend"] or ("openai" if opts["url"] else None)
    if opts["backend"] is None:
        raise InputError("give --url http://HOST:PORT (an existing server) or --backend NAME (stub, vllm, ...)")
    res = run_locust(run_options(opts), lo, on_status=lambda s: err_console.log(s))
    render_summary(res.summary, console)
    lag = (res.summary.get("fidelity") or {}).get("lag_s") or {}
    if lag.get("p99") is not None:
        console.print(f"schedule lag p99 {lag['p99'] * 1e3:.2f} ms (max {lag['max'] * 1e3:.2f} ms)", highlight=False)
    console.print(f"run directory: {res.run_dir} (Locust CSV/HTML: locust_stats.csv, locust.html)", highlight=False)
    for p in res.problems:
        err_console.print(f"warning: {p}", markup=False, highlight=False)
    raise typer.Exit(res.exit_code)


def register(app: typer.Typer) -> None:
    app.command()(run)
    app.command()(report)
    app.command()(reference)
    app.command("locust")(locust)
