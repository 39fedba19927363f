"""Thin typer CLI over the library API: parse flags, call one library function, render, set the exit code."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from splitbench.servers.launcher import ServerStartError
from splitbench.errors import InputError

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="splitbench: replay LLM traces against serving backends and measure TTFT/TBT/E2E.")
traces_app = typer.Typer(no_args_is_help=True, help="List, inspect, fetch and synthesize traces.")
model_app = typer.Typer(no_args_is_help=True, help="Generate models that need no download.")
app.add_typer(traces_app, name="traces")
app.add_typer(model_app, name="model")
console = Console()
err_console = Console(stderr=True, log_path=False)


def user_errors(fn):
    """Bad input becomes one line on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except ServerStartError as e:  # a backend that could not start: say why (log tail), no traceback
            err_console.print(f"error: {e}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1)
    return wrapper


# ===================================================================== traces (section: traces)

def _trace_columns(spec: Optional[str]) -> Optional[dict]:
    """'timestamp=ts,input=prompt_len,output=gen_len' (roles may be written ts/in/out) -> mapping."""
    if not spec:
        return None
    out = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        role, eq, col = item.partition("=")
        if not eq or not col.strip():
            raise InputError(f"--columns: expected ROLE=COLUMN (roles: timestamp, input, output), got {item!r}")
        out[role.strip()] = col.strip()
    return out


@traces_app.command("list")
@user_errors
def traces_list(trace_dir: Optional[str] = typer.Option(None, "--trace-dir", help="Searched first.")):
    """List catalogue traces and where each is found locally (search path: --trace-dir,
    $SPLITBENCH_TRACE_DIR, ./traces, ../shared/traces, the user cache)."""
    from rich.table import Table

    from splitbench.workload.traces import catalog, find_local
    table = Table("name", "description", "where")
    for name, entry in catalog().items():
        path = find_local(name, trace_dir)
        table.add_row(name, entry["description"], str(path) if path else "not local")
    console.print(table)


@traces_app.command("show")
@user_errors
def traces_show(trace: str = typer.Argument(..., help="Catalogue name, file path, or synth:... spec."),
                trace_dir: Optional[str] = typer.Option(None, "--trace-dir", help="Searched first for names."),
                start_s: float = typer.Option(0.0, "--start", help="Window start, s after the first row."),
                duration_s: Optional[float] = typer.Option(None, "--duration", help="Window length in seconds."),
                rate_scale: float = typer.Option(1.0, "--rate-scale", help="Multiply the arrival rate."),
                max_requests: Optional[int] = typer.Option(None, "--max-requests", help="Keep the first N."),
                max_context_tokens: Optional[int] = typer.Option(None, "--max-context-tokens",
                                                                 help="Clip input+output to this context."),
                columns: Optional[str] = typer.Option(None, "--columns",
                                                      help="timestamp=COL,input=COL,output=COL for other files."),
                plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: arrivals/s + length histograms."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")):
    """Validate a trace, apply the transforms and print its statistics."""
    import json

    from rich.table import Table

    from splitbench.workload.traces import load_workload
    from splitbench.workload.transforms import plot_workload, workload_stats
    w = load_workload(trace, trace_dir=trace_dir, columns=_trace_columns(columns), start_s=start_s,
                      duration_s=duration_s, rate_scale=rate_scale, max_requests=max_requests,
                      max_context_tokens=max_context_tokens)
    stats = workload_stats(w)
    if plot:
        plot_workload(w, str(plot))
    if as_json:
        print(json.dumps({"workload": w.describe(), "stats": stats}, indent=2, default=str))
        return
    table = Table("statistic", "value", title=f"{w.name}  ({w.source.get('path') or w.source.get('name')})")
    rate = stats["mean_rate_rps"]
    cv = stats["interarrival_cv"]
    for k, v in (("rows", f"{stats['rows']:,}"), ("span", f"{stats['span_s']:.1f} s"),
                 ("mean rate", f"{rate:.3f} req/s" if rate else "-"),
                 ("inter-arrival CV", f"{cv:.2f}" if cv is not None else "-"),
                 ("longest gap", f"{stats['max_gap_s']:.2f} s"),
                 ("busiest second", f"{stats['busiest_second']['requests']} requests at "
                                    f"{stats['busiest_second']['at_s']:.0f} s")):
        table.add_row(k, v)
    for role in ("input_tokens", "output_tokens"):
        d = stats[role]
        table.add_row(role.replace("_", " "), f"mean {d['mean']:.1f}  min {d['min']}  p50 {d['p50']:.0f}  "
                      f"p90 {d['p90']:.0f}  p99 {d['p99']:.0f}  max {d['max']}")
    table.add_row("sha256", str(w.source.get("sha256")))
    for k, v in w.transforms.items():
        table.add_row(f"transform: {k}", json.dumps(v, default=str))
    console.print(table)
    if plot:
        console.print(f"plot written to {plot}")


@traces_app.command("fetch")
@user_errors
def traces_fetch(name: str = typer.Argument(..., help="Catalogue name (see `splitbench traces list`)."),
                 dest: Optional[Path] = typer.Option(None, "--dest", help="Directory (default: the user cache)."),
                 url: Optional[str] = typer.Option(None, "--url", help="Download from this URL instead.")):
    """Download a catalogue trace (temp file, sha256 check, atomic rename). A mismatch with a verified
    catalogue hash is an error and leaves nothing behind; third-party (unverified) hashes only warn."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from splitbench.workload.traces import fetch_trace
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err_console, transient=True) as progress:
        task = progress.add_task(f"fetch {name}", total=None)
        res = fetch_trace(name, dest=dest, url=url,
                          progress=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(f"saved {res['path']} ({res['bytes']:,} bytes)", highlight=False)
    console.print(f"sha256 {res['sha256']}", highlight=False)
    if res["status"] == "verified":
        console.print("sha256 verified against the catalogue")
    elif res["status"] == "matches-unverified":
        console.print("sha256 matches the third-party value in the catalogue (not independently verified)")
    else:
        err_console.print(f"warning: sha256 differs from the unverified third-party value "
                          f"{res['expected_sha256']}; check the file before relying on it", highlight=False)


@traces_app.command("synth")
@user_errors
def traces_synth(spec: str = typer.Argument(..., help="e.g. synth:arrivals=poisson,rate=20,duration=60,"
                                                    "lengths=fixed,input=128,output=32,seed=1"),
                 out: Path = typer.Option(..., "--out", help="CSV to write (Azure format)."),
                 trace_dir: Optional[str] = typer.Option(None, "--trace-dir", help="For lengths=TRACE.")):
    """Generate a seeded synthetic workload and write it as an Azure-format CSV
    (TIMESTAMP,ContextTokens,GeneratedTokens). Keys: arrivals=poisson|gamma, rate, cv (gamma),
    duration|count, lengths=fixed|uniform|TRACE, input, output (N or LOW-HIGH), seed."""
    from splitbench.workload.synth import from_spec, write_azure_csv
    w = from_spec(spec, trace_dir=trace_dir)
    write_azure_csv(w, out)
    span = float(w.arrival_s[-1]) if len(w) else 0.0
    console.print(f"wrote {out}: {len(w):,} requests over {span:.1f} s", highlight=False)


# ===================================================================== model (section: model)

@model_app.command("tiny")
@user_errors
def model_tiny(out: Path = typer.Option(..., "--out", help="Directory to write the HF-format model to."),
               layers: int = typer.Option(2, help="Decoder layers."),
               hidden: int = typer.Option(128, help="Hidden size."),
               heads: int = typer.Option(4, help="Attention heads."),
               kv_heads: int = typer.Option(2, help="Key/value heads."),
               vocab_size: int = typer.Option(4096, help="Tokenizer vocabulary size."),
               max_position: int = typer.Option(16384, help="max_position_embeddings."),
               seed: int = typer.Option(0, help="Seed for tokenizer corpus and weights.")) -> None:
    """Write a tiny random-weight Llama with a locally trained tokenizer (vLLM serves it; no download)."""
    import time

    from splitbench.servers.tiny_model import write_tiny_model
    t0 = time.perf_counter()
    path = write_tiny_model(out, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                            vocab_size=vocab_size, max_position=max_position, seed=seed)
    console.print(f"wrote {path} in {time.perf_counter() - t0:.2f} s", highlight=False)


# ===================================================================== stub (section: stub)


@app.command("serve-stub")
@user_errors
def serve_stub(
    port: int = typer.Option(8000, help="Port to listen on (0 picks a free one)."),
    ttft_ms: float = typer.Option(20.0, help="Request received -> first token chunk, ms."),
    tpot_ms: float = typer.Option(5.0, help="Time per output token after the first chunk, ms."),
    tokens_per_chunk: int = typer.Option(1, help="Output tokens per streamed chunk."),
    cpu: Optional[int] = typer.Option(None, help="Pin the server to this core."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    model: str = typer.Option("stub-model", help="Model id reported by /v1/models."),
    fail_rate: float = typer.Option(0.0, help="Fraction of requests answered HTTP 500 (seeded)."),
    seed: int = typer.Option(0, help="Seed for --fail-rate."),
    loop: str = typer.Option("precise", help="Event loop: precise (asyncio, µs selector), uvloop, asyncio. The "
                                            "lean server's ticker is µs-precise on any of them (timerfd)."),
    server: str = typer.Option("lean", help="lean (asyncio.Protocol + one shared chunk ticker) or aiohttp "
                                            "(one timer and write per chunk; for comparison)."),
    tick_ms: float = typer.Option(0.2, help="Lean server: least time between two ticker wakeups, ms."),
    kv_transfer_ms: float = typer.Option(0.0, help="P/D: replaces TTFT for do_remote_prefill requests, ms."),
) -> None:
    """Run the built-in OpenAI-compatible stub server in the foreground until Ctrl-C; prints a one-line summary
    (requests, chunk emission lateness p50/p99/max) at exit. /metrics has the lateness live."""
    from splitbench.servers.stub import StubConfig, run_server
    cfg = StubConfig(ttft_ms / 1e3, tpot_ms / 1e3, tokens_per_chunk, model, fail_rate, seed,
                     kv_transfer_s=kv_transfer_ms / 1e3, tick_s=tick_ms / 1e3)
    run_server(cfg, host, port, cpu=cpu, loop=loop, server=server)


# ===================================================================== run / report / reference (section: run)

def _parse_columns(spec: Optional[str]) -> Optional[dict]:
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        if "=" not in item:
            raise InputError(f"--columns: expected key=column, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


CLUSTER_BACKENDS = ("vllm", "splitwise", "mixed")


def _backend_options(backend: str, url: Optional[str], api_key_env: str, stub_ttft_ms: float,
                     stub_tpot_ms: float, **cluster) -> dict:
    if backend == "openai":
        if not url:
            raise InputError("--backend openai needs --url http://HOST:PORT")
        return {"url": url, "api_key_env": api_key_env}
    if backend == "stub":
        return {"ttft_s": stub_ttft_ms / 1000, "tpot_s": stub_tpot_ms / 1000}
    if backend in CLUSTER_BACKENDS:
        opts = {k: v for k, v in cluster.items() if v is not None}
        if backend == "vllm":
            opts.pop("prompt_instances", None), opts.pop("token_instances", None)
        else:
            opts.pop("instances", None)
        return opts
    return {}


@app.command()
@user_errors
def run(
    backend: str = typer.Option("stub", help="Backend: openai (an existing URL), stub (built-in fake server), vllm "
                                "(local baseline cluster), splitwise (prompt/token cluster + KV connector), mixed."),
    url: Optional[str] = typer.Option(None, help="Base URL of an OpenAI-compatible server (--backend openai)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Env var holding the API key (never written to results)."),
    trace: str = typer.Option("azure-conv-2023", help="Trace name, CSV/Parquet path, or 'synth:...' spec."),
    trace_dir: Optional[str] = typer.Option(None, help="Directory searched first for named traces."),
    columns: Optional[str] = typer.Option(None, help="Column mapping: timestamp=COL,input=COL,output=COL."),
    start: float = typer.Option(0.0, help="Window start, seconds after the trace's first request."),
    duration: Optional[float] = typer.Option(None, help="Window length in seconds of trace time [60; local "
                                             "CPU clusters (vllm/splitwise/mixed): 40]."),
    rate_scale: Optional[str] = typer.Option(None, help="Multiply the arrival rate, keeping the burst shape, or "
                                             "'auto': measure the started backend and load it to 50% of what it "
                                             "sustains [1.0; local CPU clusters: auto]."),
    max_requests: Optional[int] = typer.Option(None, help="Replay at most this many requests."),
    api: str = typer.Option("completions", help="completions (token-id prompts) or chat."),
    model: Optional[str] = typer.Option(None, help="Model name to send (default: first of /v1/models)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer dir (default: the served model's dir if local)."),
    vocab_size: Optional[int] = typer.Option(None, help="Token-id range when no tokenizer is known."),
    seed: int = typer.Option(0, help="Seed for prompt synthesis."),
    shared_prefix: int = typer.Option(0, help="Tokens of prompt prefix shared by all requests (prefix caching)."),
    max_context: Optional[int] = typer.Option(None, help="Clip requests to this context (default: server's max_model_len)."),
    max_inflight: Optional[int] = typer.Option(None, help="Explicit cap on concurrent requests (reported when it binds)."),
    timeout: float = typer.Option(600.0, help="Per-request timeout, seconds."),
    grace: float = typer.Option(10.0, help="On Ctrl-C/SIGTERM: wait this long for in-flight requests."),
    slo: Optional[str] = typer.Option(None, help="SLOs, e.g. ttft_p99=2s,tbt_p99=100ms,e2e_p50=10s."),
    reference: Optional[str] = typer.Option(None, help="Reference JSON from `splitbench reference` (Splitwise SLO verdict)."),
    results: str = typer.Option("results", help="Directory for run output."),
    run_id: Optional[str] = typer.Option(None, help="Run id (default: time-backend-trace)."),
    stub_ttft_ms: float = typer.Option(20.0, help="Stub backend: time to first token, ms."),
    stub_tpot_ms: float = typer.Option(5.0, help="Stub backend: time per output token, ms."),
    fetch: bool = typer.Option(True, help="Download a catalogue trace that is not found locally (sha256-checked)."),
    http: str = typer.Option("lean", help="Client HTTP transport: lean (default) or aiohttp."),
    workers: int = typer.Option(1, help="Sender processes: the trace is dealt round-robin, one shared start, "
                                "records merged (for rates past one core's calibrated ceiling)."),
    instances: Optional[int] = typer.Option(None, help="vllm backend: co-located instances (>1: behind the router, JSQ)."),
    prompt_instances: Optional[int] = typer.Option(None, help="splitwise/mixed: prompt (prefill) instances [1]."),
    token_instances: Optional[int] = typer.Option(None, help="splitwise/mixed: token (decode) instances [1]."),
    connector: Optional[str] = typer.Option(None, help="KV connector for splitwise/mixed: nixl (default) or example."),
    kv_transfer_config: Optional[str] = typer.Option(None, help="Raw vLLM --kv-transfer-config JSON (LMCache, Mooncake, ...)."),
    model_dir: Optional[str] = typer.Option(None, help="Model for cluster backends (default: the cached tiny model)."),
    gpus: Optional[str] = typer.Option(None, help="GPU ids for cluster backends, e.g. 0,1,2,3 (CUDA_VISIBLE_DEVICES per instance)."),
    cores: Optional[str] = typer.Option(None, help="CPU cores for CPU-build instances, e.g. 0,1."),
    tensor_parallel: Optional[int] = typer.Option(None, help="Tensor-parallel size per instance (GPU)."),
    layout: Optional[str] = typer.Option(None, help="'splitwiser': a prompt and a token instance share each GPU."),
    policy: Optional[str] = typer.Option(None, help="Router policy: jsq (default), round-robin, mixed-pool."),
    vllm_args: Optional[str] = typer.Option(None, help="Extra arguments for every vLLM server (quoted string)."),
    machine: Optional[str] = typer.Option(None, help="Hardware-catalog machine type for cost/power (default: the "
                                          "detected GPU's DGX type, or cpu-host); see `splitbench hardware`."),
    machines: Optional[float] = typer.Option(None, help="Machines of that type (default 1, this host; for "
                                             "--backend openai: what serves the URL)."),
    hardware: Optional[str] = typer.Option(None, help="User hardware catalog TOML merged over the packaged one "
                                           "(or $SPLITBENCH_HARDWARE)."),
    power: str = typer.Option("auto", help="Power sampling: auto (NVML when instances hold GPUs), nvml, off."),
    gate_rules: Optional[Path] = typer.Option(None, "--gate", help="After the run, gate it against --baseline with "
                                              "these rules (exit 0 pass, 1 regression, 2 invalid)."),
    gate_baseline: Optional[str] = typer.Option(None, "--baseline", help="Saved baseline name or run dir for --gate."),
    baseline_dir: Optional[str] = typer.Option(None, help="Store of saved baselines for --baseline."),
):
    """Replay a trace open-loop against a backend; write records, run.json and summary.json; print the report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from splitbench.app import runner, sizing
    from splitbench.render.console import render_summary
    if (gate_rules is None) != (gate_baseline is None):
        raise InputError("--gate and --baseline go together")
    if gate_rules is not None:   # bad rules or an unknown baseline fail before anything starts
        from splitbench.app.baselines import resolve
        from splitbench.metrics.gate import load_rules
        load_rules(gate_rules)
        resolve(gate_baseline, baseline_dir)
    local_cpu_cluster = backend in CLUSTER_BACKENDS and not gpus
    if duration is None:
        duration = 40.0 if local_cpu_cluster else 60.0
    rate_scale = sizing.parse_rate_scale(rate_scale)
    if sizing.wants_sizing(rate_scale, backend, gpus):
        rate_scale = "auto"
    elif rate_scale is None:
        rate_scale = 1.0
    opts = runner.RunOptions(
        trace=trace, trace_dir=trace_dir, columns=_parse_columns(columns), start_s=start, duration_s=duration,
        rate_scale=rate_scale, max_requests=max_requests, backend=backend,
        backend_options=_backend_options(
            backend, url, api_key_env, stub_ttft_ms, stub_tpot_ms, instances=instances,
            prompt_instances=prompt_instances, token_instances=token_instances, connector=connector,
            kv_transfer_config=kv_transfer_config, model_dir=model_dir, gpus=gpus, cores=cores,
            tensor_parallel=tensor_parallel, layout=layout, policy=policy, vllm_args=vllm_args),
        api=api, model=model, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed,
        shared_prefix_tokens=shared_prefix, max_context_tokens=max_context, max_inflight=max_inflight,
        timeout_s=timeout, grace_s=grace, results_dir=results, run_id=run_id, slos=slo, reference=reference,
        fetch=fetch, http=http, machine=machine, machines=machines, hardware_file=hardware, power=power,
        workers=workers)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} done"),
                        TextColumn("sent {task.fields[sent]}  in flight {task.fields[inflight]}  failed {task.fields[failed]}"),
                        TimeElapsedColumn(), console=err_console, transient=False, refresh_per_second=4)
    task = None

    def on_progress(rep):
        nonlocal task
        if task is None:
            task = progress.add_task("replay", total=rep.stats.planned, sent=0, inflight=0, failed=0)
        progress.update(task, completed=rep.stats.finished, sent=rep.stats.sent, inflight=rep.inflight,
                        failed=rep.stats.failed)

    with progress:
        result = runner.run(opts, on_progress=on_progress, on_status=lambda s: progress.console.log(s))
    render_summary(result.summary, console)
    console.print(f"run directory: {result.run_dir}")
    if result.interrupted:
        err_console.print("interrupted: finished records were written; exiting non-zero")
        raise typer.Exit(130)
    if gate_rules is not None:
        from splitbench.app.baselines import gate as run_gate
        res = run_gate([gate_baseline], [str(result.run_dir)], gate_rules, store=baseline_dir)
        _emit_gate(res, None, None, None)
        raise typer.Exit(res["exit_code"])


@app.command()
@user_errors
def report(
    run_dir: Path = typer.Argument(..., help="A results/<run-id> directory (live or simulated)."),
    slo: Optional[str] = typer.Option(None, help="SLOs to evaluate (default: those given at run time)."),
    reference: Optional[str] = typer.Option(None, help="Reference JSON for the Splitwise verdict."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
    markdown: bool = typer.Option(False, "--markdown", help="Print a markdown summary."),
):
    """Recompute metrics from a run's per-request records and print the report."""
    import json as _json
    from splitbench.app import runner
    from splitbench.render.console import render_markdown, render_summary
    if not (run_dir / "run.json").exists():
        raise InputError(f"{run_dir}: not a run directory (no run.json)")
    summary = runner.report(run_dir, slos=slo, reference=reference)
    if json_out:
        print(_json.dumps(summary, indent=2, default=str))
    elif markdown:
        print(render_markdown(summary))
    else:
        render_summary(summary, console)


@app.command()
@user_errors
def reference(
    out: Path = typer.Option(..., help="Where to store the reference JSON."),
    backend: str = typer.Option("stub", help="Backend to measure (unloaded)."),
    url: Optional[str] = typer.Option(None, help="Base URL for --backend openai."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Env var holding the API key."),
    sizes: str = typer.Option("16,64,256,1024,2048,4096", help="Prompt sizes (tokens) of the grid."),
    output_tokens: int = typer.Option(32, help="Output tokens per request."),
    repeats: int = typer.Option(3, help="Requests per prompt size."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer dir for token-id prompts."),
    vocab_size: Optional[int] = typer.Option(None, help="Token-id range when no tokenizer is known."),
    results: str = typer.Option("results", help="Directory for the reference run's records."),
    stub_ttft_ms: float = typer.Option(20.0, help="Stub backend: time to first token, ms."),
    stub_tpot_ms: float = typer.Option(5.0, help="Stub backend: time per output token, ms."),
    model_dir: Optional[str] = typer.Option(None, help="--backend vllm: model dir (default: the cached tiny model)."),
):
    """Measure an unloaded reference (one request at a time over prompt sizes) for Splitwise's SLO verdict."""
    from splitbench.app import runner
    try:
        grid = [int(x) for x in sizes.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--sizes: expected comma-separated integers, got {sizes!r}")
    ref, run_dir = runner.measure_reference(
        backend, _backend_options(backend, url, api_key_env, stub_ttft_ms, stub_tpot_ms, model_dir=model_dir),
        sizes=grid,
        output_tokens=output_tokens, repeats=repeats, out=out, tokenizer=tokenizer, vocab_size=vocab_size,
        results_dir=results, on_status=lambda s: err_console.log(s))
    console.print(f"reference written to {out} (records in {run_dir}):")
    console.print(ref if not hasattr(ref, "__dict__") else vars(ref))


# ===================================================================== profiles (section: profiles)

profiles_app = typer.Typer(no_args_is_help=True, help="Performance profiles for the simulator: fetch and list.")
app.add_typer(profiles_app, name="profiles")


def _int_list(spec: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated whole numbers, got {spec!r}") from None


@profiles_app.command("fetch")
@user_errors
def profiles_fetch(dest: Optional[str] = typer.Option(None, "--dest", help="Directory (default: the user cache)."),
                   url: Optional[str] = typer.Option(None, "--url", help="Download from here instead (sha256 still "
                                                     "checked against SplitwiseSim's file).")):
    """Download SplitwiseSim's perf_model.csv (pinned commit), sha256-verified; nothing is kept on mismatch."""
    from splitbench.sim.profiles import fetch_profile
    res = fetch_profile(dest=dest, url=url)
    console.print(f"fetched {res['path']} ({res['bytes']} bytes, sha256 {res['sha256']}, {res['status']})",
                  markup=False, highlight=False)


_KV_LABEL = {"fitted": "fit", "bandwidth": "bw", "zero:": "zero"}


@profiles_app.command("list")
@user_errors
def profiles_list(file: Optional[str] = typer.Option(None, "--file", help="Profile CSV (default: found along "
                                                     "$SPLITBENCH_PROFILE_DIR, ../shared/profiles, the user cache)."),
                  hardware_file: Optional[str] = typer.Option(None, "--hardware", help="User hardware catalog TOML."),
                  model_dir: Optional[str] = typer.Option(None, "--model-dir", help="HF model dir whose shape "
                                                          "(named after the dir) a measured profile's model has."),
                  json_out: bool = typer.Option(False, "--json", help="Print every group's describe() as JSON.")):
    """Profile groups with their fitted figures (decode at 512 prompt + 64 generated tokens per request)."""
    import json as _json

    from rich.table import Table

    from splitbench.hardware.catalog import load_catalog
    from splitbench.sim.perfmodel import MODEL_SHAPES, find_profile, load_profiles, machine_kv_capacity_tokens, \
        profile_hardware_name, shape_from_hf_config
    path = find_profile(file)
    shapes = {}
    if model_dir:
        shape = shape_from_hf_config(model_dir)
        shapes[shape.name] = shape
    profiles = load_profiles(path, shapes=shapes)
    if json_out:
        print(_json.dumps([m.describe() for m in profiles.values()], indent=2, default=str))
        return
    machines = {profile_hardware_name(m): m for m in load_catalog(hardware_file).values()}
    table = Table("model", "hardware", "TP", "prefill ms\n512 | 2048", "decode ms\nb1 | b64", "kv us/token\n(used)",
                  "kv fitted\n(+-1 se)", "kv bw est.", "dropped\npoints", "KV tokens\nper DGX (*)")
    us = lambda v: "-" if v is None else f"{v * 1e6:.3f}"  # noqa: E731
    for (model, hw, tp), m in sorted(profiles.items()):
        d, shape, mt = m.describe(), shapes.get(model) or MODEL_SHAPES.get(model), machines.get(hw)
        ok = shape and mt and 0 < tp <= mt.accelerators
        cap = f"{machine_kv_capacity_tokens(shape, mt, tensor_parallel=tp):,}" if ok else "-"
        fit = us(d["kv_fitted_s_per_token"]) + (f" +-{us(d['kv_fitted_stderr'])}" if d["kv_fitted_stderr"] else "")
        table.add_row(model, hw, str(tp), f"{m.prompt_time_s(512) * 1e3:.1f} | {m.prompt_time_s(2048) * 1e3:.1f}",
                      f"{m.token_time_s(1, 576) * 1e3:.2f} | {m.token_time_s(64, 64 * 576) * 1e3:.2f}",
                      f"{us(m.kv_s_per_token)} {_KV_LABEL[d['kv_source'].split(' ')[0]]}", fit,
                      us(d["kv_bandwidth_s_per_token"]), str(len(d["dropped"])), cap)
    console.print(f"profile: {path}", markup=False, highlight=False)
    console.print(table)
    console.print("decode at 512 prompt + 64 generated tokens per request; kv: microseconds per KV token per "
                  "iteration (fit: from batch-1 e2e; bw: kv bytes / (HBM bandwidth x TP)); (*) 8 / TP instances, "
                  "each with its own weights, 90% of GPU memory; --json for every detail",
                  markup=False, highlight=False)


@app.command("profile")
@user_errors
def profile(backend: str = typer.Option("vllm", help="Backend to measure: vllm (local server), openai (--url), stub."),
            model_dir: Optional[str] = typer.Option(None, help="--backend vllm: model dir (default: the tiny model)."),
            url: Optional[str] = typer.Option(None, help="--backend openai: base URL."),
            api_key_env: str = typer.Option("OPENAI_API_KEY", help="Env var holding the API key."),
            out: Path = typer.Option(Path("profile.csv"), help="Profile CSV to write (SplitwiseSim's columns)."),
            prompt_sizes: str = typer.Option("32,128,512,2048", help="Prompt sweep (batch 1), tokens."),
            batch_sizes: str = typer.Option("1,2,4,8,16", help="Batch sweep at the middle prompt size."),
            output_sizes: str = typer.Option("16,64,256", help="Output sweep at the middle prompt size, batch 1."),
            repeats: int = typer.Option(2, help="Repeats of every point."),
            model: Optional[str] = typer.Option(None, help="Model name for the CSV (default: served name's last part)."),
            machine: Optional[str] = typer.Option(None, help="Hardware-catalog machine type of this host "
                                                  "(default: detected GPUs' DGX type, or cpu-host)."),
            hardware: Optional[str] = typer.Option(None, help="User hardware catalog TOML."),
            results: str = typer.Option("results", help="Directory for the measurement's per-point records."),
            cores: Optional[str] = typer.Option(None, help="--backend vllm on CPU: pin the instance to these cores "
                                                "(e.g. 1, as one instance of the local clusters holds)."),
            gpus: Optional[str] = typer.Option(None, help="--backend vllm on GPU hosts: GPU ids of the instance.")):
    """Measure a real backend into a profile CSV that `load_profiles` (and the simulator) accepts."""
    from splitbench.app.profile import measure_profile
    if backend == "vllm":
        opts = {"instances": 1, **({"model_dir": model_dir} if model_dir else {}),
                **({"cores": cores} if cores else {}), **({"gpus": gpus} if gpus else {})}
    elif backend == "openai":
        if not url:
            raise InputError("--backend openai needs --url http://HOST:PORT")
        opts = {"url": url, "api_key_env": api_key_env}
    else:
        opts = {}
    res = measure_profile(backend, opts, out=out, prompt_sizes=_int_list(prompt_sizes, "--prompt-sizes"),
                          batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
                          output_sizes=_int_list(output_sizes, "--output-sizes"), repeats=repeats, model_name=model,
                          machine=machine, hardware_file=hardware, results_dir=results,
                          on_status=lambda s: err_console.log(s))
    console.print(f"profile written to {out}: {res['rows']} rows, model {res['model']}, hardware {res['hardware']} "
                  f"({res['wall_s']:.0f} s; records in {res['run_dir']})", markup=False, highlight=False)


# ===================================================================== compare / hardware (section: compare)

@app.command()
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
    import json as _json
    import time as _time

    from splitbench.app import runner
    from splitbench.metrics.compare import render_compare, render_compare_markdown
    from splitbench.schema.records import atomic_write_bytes
    comparison = runner.compare(list(run_dirs), slos=slo, labels=label, with_series=not no_html)
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
        from splitbench.render.html import render_html
        path = html or Path("results") / f"compare-{_time.strftime('%Y%m%d-%H%M%S')}.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, render_html(comparison).encode())
        err_console.print(f"HTML report written to {path}", markup=False)


@app.command("hardware")
@user_errors
def hardware_list(file: Optional[str] = typer.Option(None, "--file", help="User catalog TOML merged over the packaged one."),
                  as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the hardware catalog: machine types, price, provisioned power, sources (estimates flagged)."""
    import json as _json
    from dataclasses import asdict

    from rich.table import Table

    from splitbench.hardware.catalog import load_catalog
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


# ===================================================================== locust (section: locust)

@app.command("locust")
@user_errors
def locust_cmd(
    trace: str = typer.Option("azure-conv-2023", help="Trace name, CSV/Parquet path, or 'synth:...' spec."),
    url: Optional[str] = typer.Option(None, help="Base URL of an existing OpenAI-compatible server (= --backend openai)."),
    backend: Optional[str] = typer.Option(None, help="Backend to start like `splitbench run` does: stub, vllm, "
                                          "splitwise, mixed, openai (with --url)."),
    trace_dir: Optional[str] = typer.Option(None, help="Directory searched first for named traces."),
    start: float = typer.Option(0.0, help="Window start, seconds after the trace's first request."),
    duration: Optional[float] = typer.Option(None, help="Window length in seconds of trace time [60; local CPU "
                                             "clusters: 40]."),
    rate_scale: Optional[float] = typer.Option(None, help="Multiply the arrival rate [1.0; local CPU clusters: 0.5]."),
    max_requests: Optional[int] = typer.Option(None, help="Replay at most this many requests."),
    api: str = typer.Option("completions", help="completions (token-id prompts) or chat."),
    model: Optional[str] = typer.Option(None, help="Model name to send (default: first of /v1/models)."),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer dir (default: the served model's dir if local)."),
    vocab_size: Optional[int] = typer.Option(None, help="Token-id range when no tokenizer is known."),
    seed: int = typer.Option(0, help="Seed for prompt synthesis."),
    max_context: Optional[int] = typer.Option(None, help="Clip requests to this context (default: server's max_model_len)."),
    max_inflight: Optional[int] = typer.Option(None, help="Cap on concurrent requests per worker."),
    timeout: float = typer.Option(600.0, help="Per-request timeout, seconds."),
    grace: float = typer.Option(10.0, help="On stop: wait this long for in-flight requests."),
    slo: Optional[str] = typer.Option(None, help="SLOs, e.g. ttft_p99=2s,tbt_p99=100ms; exit code 1 when one is missed."),
    reference: Optional[str] = typer.Option(None, help="Reference JSON for the Splitwise verdict."),
    results: str = typer.Option("results", help="Directory for run output."),
    run_id: Optional[str] = typer.Option(None, help="Run id (default: time-locust-backend-trace)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Env var holding the API key (never written to results)."),
    stub_ttft_ms: float = typer.Option(20.0, help="Stub backend: time to first token, ms."),
    stub_tpot_ms: float = typer.Option(5.0, help="Stub backend: time per output token, ms."),
    model_dir: Optional[str] = typer.Option(None, help="Model for cluster backends (default: the cached tiny model)."),
    instances: Optional[int] = typer.Option(None, help="vllm backend: co-located instances."),
    cores: Optional[str] = typer.Option(None, help="CPU cores for CPU-build instances, e.g. 0,1."),
    gpus: Optional[str] = typer.Option(None, help="GPU ids for cluster backends."),
    http: str = typer.Option("lean", help="Replayer HTTP transport: lean (default) or aiohttp."),
    headless: bool = typer.Option(False, help="No web UI: start at once, exit when the replay ends (CI)."),
    web_host: str = typer.Option("127.0.0.1", help="Web UI address ('*' for all interfaces)."),
    web_port: int = typer.Option(8089, help="Web UI port."),
    master: bool = typer.Option(False, help="Run a master that shards the trace over --expect-workers workers."),
    expect_workers: int = typer.Option(1, help="--master: workers to wait for (headless) before starting."),
    worker: bool = typer.Option(False, help="Run a worker that joins --master-host (needs no trace or backend)."),
    master_host: str = typer.Option("127.0.0.1", help="--worker: the master's address."),
    master_port: Optional[int] = typer.Option(None, help="Master port [5557; --processes: a free one]."),
    processes: Optional[int] = typer.Option(None, help="Local worker processes (a master plus N workers)."),
    start_lead: float = typer.Option(2.0, help="Shared start = master's clock at test start + this many seconds."),
    locust_log: Optional[str] = typer.Option(None, help="Write Locust's output to this file instead of the terminal."),
):
    """Replay a trace open-loop from Locust: web UI (or --headless), TTFT/TBT/E2E rows and an LLM tab, master/worker
    sharding; writes the same run directory as `run` plus Locust's CSV/HTML. Exit: 0 ok, 1 SLO missed, 2 bad input,
    3 incomplete (a worker or replayer died), 130 interrupted (headless)."""
    from splitbench.app import runner
    from splitbench.app.locust_launch import LocustOptions, run_locust, run_worker
    lo = LocustOptions(headless=headless, web_host=web_host, web_port=web_port, master=master,
                       expect_workers=expect_workers, worker=worker, master_host=master_host, master_port=master_port,
                       processes=processes, start_lead_s=start_lead, log_file=locust_log)
    if worker:
        raise typer.Exit(run_worker(lo).exit_code)
    if url and backend not in (None, "openai"):
        raise InputError("--url is for an existing server: drop --backend (or use --backend openai)")
    backend = backend or ("openai" if url else None)
    if backend is None:
        raise InputError("give --url http://HOST:PORT (an existing server) or --backend NAME (stub, vllm, ...)")
    local_cpu_cluster = backend in CLUSTER_BACKENDS and not gpus
    opts = runner.RunOptions(
        trace=trace, trace_dir=trace_dir, start_s=start,
        duration_s=duration if duration is not None else (40.0 if local_cpu_cluster else 60.0),
        rate_scale=rate_scale if rate_scale is not None else (0.5 if local_cpu_cluster else 1.0),
        max_requests=max_requests, backend=backend,
        backend_options=_backend_options(backend, url, api_key_env, stub_ttft_ms, stub_tpot_ms, instances=instances,
                                         model_dir=model_dir, gpus=gpus, cores=cores),
        api=api, model=model, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed, max_context_tokens=max_context,
        max_inflight=max_inflight, timeout_s=timeout, grace_s=grace, results_dir=results, run_id=run_id, slos=slo,
        reference=reference, http=http, power="off")
    from splitbench.render.console import render_summary
    res = run_locust(opts, lo, on_status=lambda s: err_console.log(s))
    render_summary(res.summary, console)
    lag = (res.summary.get("fidelity") or {}).get("lag_s") or {}
    if lag.get("p99") is not None:
        console.print(f"schedule lag p99 {lag['p99'] * 1e3:.2f} ms (max {lag['max'] * 1e3:.2f} ms)", highlight=False)
    console.print(f"run directory: {res.run_dir} (Locust CSV/HTML: locust_stats.csv, locust.html)", highlight=False)
    for p in res.problems:
        err_console.print(f"warning: {p}", markup=False, highlight=False)
    raise typer.Exit(res.exit_code)


# ===================================================================== simulate / design (section: simulate)

@app.command()
@user_errors
def simulate(
    cluster: str = typer.Option(..., help="Cluster: POOL=MACHINE:COUNT,... (pools prompt, token, mixed, baseline; "
                                "machines from `splitbench hardware`) or a Splitwise design with counts, e.g. "
                                "splitwise-ha:35,35 or baseline-a100:40."),
    trace: str = typer.Option("azure-conv-2023", help="Trace name, CSV/Parquet path, or 'synth:...' spec."),
    trace_dir: Optional[str] = typer.Option(None, help="Directory searched first for named traces."),
    start: float = typer.Option(0.0, help="Window start, seconds after the trace's first request."),
    duration: Optional[float] = typer.Option(None, help="Window length in seconds of trace time [whole trace]."),
    rate_scale: float = typer.Option(1.0, help="Multiply the arrival rate."),
    max_requests: Optional[int] = typer.Option(None, help="Simulate at most this many requests."),
    max_context: Optional[int] = typer.Option(None, help="Clip requests to this context, as a live run clips to "
                                              "the server's max_model_len."),
    model: str = typer.Option("bloom-176b", help="Model: the profile's model name (shape: bloom-176b, llama2-70b, "
                              "or --model-dir)."),
    model_dir: Optional[str] = typer.Option(None, help="HF model dir to read the KV shape from (config.json)."),
    profile: Optional[str] = typer.Option(None, help="Profile CSV (SplitwiseSim columns) [../shared/profiles, cache]."),
    tensor_parallel: Optional[int] = typer.Option(None, help="Profile group's tensor parallelism [GPUs per machine]."),
    policy: str = typer.Option("jsq", help="Cluster policy: jsq, round-robin, mixed-pool (the router's objects)."),
    seed: int = typer.Option(0, help="Seed for the policy's tie-breaks."),
    max_prompt_batch_tokens: int = typer.Option(2048, help="Prompt machines: batched prompt tokens cap."),
    max_decode_batch: Optional[int] = typer.Option(None, help="Requests per decode batch (vLLM's max_num_seqs) "
                                                   "[KV memory only]."),
    kv_transfer: str = typer.Option("layerwise", help="KV transfer: layerwise (overlapped) or serialized."),
    first_token: str = typer.Option("prefill", help="Split requests' first token: prefill (Splitwise: the prompt "
                                    "machine streams it) or decode (vLLM P/D: after the token machine's 1st step)."),
    link_gbps: Optional[float] = typer.Option(None, help="KV link bandwidth per machine, Gb/s."),
    kv_capacity_tokens: Optional[int] = typer.Option(None, help="Override KV capacity per machine (tokens)."),
    hardware: Optional[str] = typer.Option(None, help="User hardware catalog TOML."),
    slo: Optional[str] = typer.Option(None, help="SLOs, e.g. ttft_p99=2s,tbt_p99=100ms."),
    reference_machine: Optional[str] = typer.Option("auto", help="Splitwise SLO verdict against this machine's "
                                                    "simulated unloaded latency [auto: dgx-a100 if profiled, else "
                                                    "the first pool's machine; '' to skip]."),
    results: str = typer.Option("results", help="Directory for run output."),
    run_id: Optional[str] = typer.Option(None, help="Run id [time-sim-trace]."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Replay a trace on a simulated cluster; writes a run directory like `run` does (marked simulated)."""
    import json as _json

    from splitbench.render.console import render_summary
    from splitbench.app.simrun import SimOptions, simulate_run
    opts = SimOptions(cluster=cluster, trace=trace, trace_dir=trace_dir, start_s=start, duration_s=duration,
                      rate_scale=rate_scale, max_requests=max_requests, max_context_tokens=max_context,
                      model=model, model_dir=model_dir,
                      profile=profile, tensor_parallel=tensor_parallel, policy=policy, seed=seed,
                      max_prompt_batch_tokens=max_prompt_batch_tokens, max_decode_batch=max_decode_batch,
                      first_token=first_token,
                      kv_transfer=kv_transfer, link_gbps=link_gbps,
                      kv_capacity_tokens=kv_capacity_tokens, hardware_file=hardware, slos=slo,
                      reference_machine=reference_machine or None, results_dir=results, run_id=run_id)
    run_dir, summary = simulate_run(opts)
    if as_json:
        print(_json.dumps(summary, indent=2, default=str))
    else:
        render_summary(summary, console)
    console.print(f"run directory: {run_dir}")


@app.command()
@user_errors
def design(
    trace: str = typer.Option("azure-conv-2023", help="Trace whose request lengths drive Poisson arrivals."),
    objective: str = typer.Option("throughput", help="throughput (max rate in budget), cost or power (cheapest / "
                                  "least power serving --target-rate)."),
    budget: str = typer.Option("iso-power", help="iso-power or iso-cost: every design gets the same provisioned "
                               "power or $/h."),
    budget_machines: int = typer.Option(40, help="Budget = this many machines of --budget-design."),
    budget_design: str = typer.Option("baseline-h100", help="Design whose machine sets the budget unit."),
    designs: str = typer.Option(",".join(["baseline-a100", "baseline-h100", "splitwise-aa", "splitwise-hh",
                                          "splitwise-ha", "splitwise-hhcap"]), help="Designs to search."),
    target_rate: Optional[float] = typer.Option(None, help="cost/power objectives: req/s to serve [Baseline-H100's best]."),
    duration: float = typer.Option(120.0, help="Seconds of Poisson arrivals simulated per rate probe."),
    model: str = typer.Option("bloom-176b", help="Model of the profile (bloom-176b, llama2-70b)."),
    profile: Optional[str] = typer.Option(None, help="Profile CSV [../shared/profiles or the cache]."),
    reference_machine: str = typer.Option("dgx-a100", help="SLO slowdowns against this machine's unloaded latency."),
    splits: int = typer.Option(10, help="Prompt/token splits tried per Splitwise design."),
    processes: Optional[int] = typer.Option(None, help="Worker processes [all cores]."),
    seed: int = typer.Option(0, help="Seed of arrivals and policy tie-breaks."),
    out: Path = typer.Option(Path("results") / "design", help="Directory for design.json and design.png."),
):
    """Search Splitwise's cluster designs: highest rate meeting all nine Splitwise SLOs within a budget."""

    from rich.table import Table

    from splitbench.app.design import DesignSpec, plot_design, search
    from splitbench.schema.records import atomic_write_json
    spec = DesignSpec(trace=trace, designs=[d.strip() for d in designs.split(",") if d.strip()], objective=objective,
                      budget=budget, budget_design=budget_design, budget_machines=budget_machines,
                      target_rate_rps=target_rate, duration_s=duration, model=model, profile=profile,
                      reference_machine=reference_machine, splits=splits, seed=seed, processes=processes)
    result = search(spec, on_status=lambda s: err_console.log(s))
    t = Table(title=f"{trace}: {objective}-optimal, {budget} ({budget_machines} x {budget_design} machines)")
    for col in ("design", "prompt", "token", "machines", "max req/s", "out tok/s", "$/h", "kW"):
        t.add_column(col, justify="left" if col == "design" else "right", no_wrap=col == "design")
    for d, r in result["best"].items():
        counts = {p: f"{c}x {m.replace('dgx-', '')}" for p, m, c in r["pools"]}
        t.add_row(d, counts.get("prompt", counts.get("baseline", "-")), counts.get("token", "-"), str(r["machines"]),
                  f"{r['max_rate_rps']:.2f}", f"{r['output_tokens_per_s'] or 0:.0f}", f"{r['usd_per_hour']:.0f}",
                  f"{r['power_w'] / 1e3:.0f}")
    console.print(t)
    for k, v in result["ratios"].items():
        if v is not None:
            console.print(f"{k}: {v:.2f}x", highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "design.json", result)
    plot_design(result, str(out / "design.png"))
    console.print(f"written: {out / 'design.json'}, {out / 'design.png'}")


# ===================================================================== calibrate (section: calibrate)

@app.command()
@user_errors
def calibrate(
    duration: float = typer.Option(10.0, help="Seconds per rate point (after a 1 s warm-up)."),
    workers: int = typer.Option(1, help="Sender processes to calibrate (runs with --workers N use this ceiling)."),
    stub_cpu: Optional[int] = typer.Option(None, help="Core for the stub [the last core]."),
    http: str = typer.Option("lean", help="Client HTTP transport: lean (default) or aiohttp."),
    max_points: int = typer.Option(12, help="Give up the search after this many points."),
    save: bool = typer.Option(True, help="Store the ceiling for this host (runs record it in run.json)."),
):
    """Find this client's ceiling: ramp an open-loop rate against the built-in stub (TTFT 20 ms, 5 ms/token,
    128 in / 32 out) until achieved < 95% of target, TTFT p99 error > 5 ms or send lag p99 > 2 ms."""
    from splitbench.app.calibrate import CRITERIA, calibrate as run_calibration, store_path
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
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
                          max_points=max_points, on_point=show, save=save)
    console.print(f"ceiling: {res['ceiling_rps']:.0f} req/s"
                  + (f", {res['tokens_per_s']:.0f} streamed tokens/s" if res.get("tokens_per_s") else "")
                  + (f", {res['cpu_s_per_request'] * 1e6:.0f} us CPU per request" if res.get("cpu_s_per_request")
                     else "") + f" ({workers} worker{'s' if workers > 1 else ''})", highlight=False)
    if save:
        console.print(f"stored: {store_path()}", highlight=False)


# ===================================================================== gate / baseline (section: gate)

baseline_app = typer.Typer(no_args_is_help=True, help="Saved baseline runs for regression gates.")
app.add_typer(baseline_app, name="baseline")


def _emit_gate(result: dict, markdown: Optional[Path], junit: Optional[Path], json_out: Optional[Path]) -> None:
    from splitbench.render.gate import render_console, render_json, render_junit, render_markdown
    from splitbench.schema.records import atomic_write_bytes
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


@app.command()
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
    from splitbench.app.baselines import gate as run_gate
    result = run_gate(baseline, candidate, rules, store=baseline_dir)
    _emit_gate(result, markdown, junit, json_out)
    raise typer.Exit(result["exit_code"])


@baseline_app.command("save")
@user_errors
def baseline_save(name: str = typer.Argument(..., help="Baseline name."),
                  run_dir: Path = typer.Argument(..., help="Run directory to keep."),
                  baseline_dir: Optional[str] = typer.Option(None, help="Store [$SPLITBENCH_BASELINES or ./baselines]."),
                  force: bool = typer.Option(False, help="Replace an existing baseline of that name.")):
    """Keep a run (records, run.json, summary.json) as a named baseline."""
    from splitbench.app.baselines import save
    console.print(f"saved baseline {name}: {save(name, run_dir, baseline_dir, force)}", markup=False)


@baseline_app.command("list")
@user_errors
def baseline_list(baseline_dir: Optional[str] = typer.Option(None, help="Store [$SPLITBENCH_BASELINES or ./baselines].")):
    """Saved baselines."""
    from rich.table import Table

    from splitbench.app.baselines import list_baselines, store_dir
    t = Table("name", "run id", "backend", "workload", "requests", "simulated", title=str(store_dir(baseline_dir)))
    for b in list_baselines(baseline_dir):
        t.add_row(b["name"], str(b["run_id"]), str(b["backend"]), str(b["workload"]), str(b["requests"]),
                  "yes" if b["simulated"] else "no")
    console.print(t)


@baseline_app.command("show")
@user_errors
def baseline_show(name: str = typer.Argument(..., help="Baseline name or run dir."),
                  baseline_dir: Optional[str] = typer.Option(None, help="Store [$SPLITBENCH_BASELINES or ./baselines].")):
    """The report of a saved baseline."""
    from splitbench.app import runner
    from splitbench.app.baselines import resolve
    from splitbench.render.console import render_summary
    render_summary(runner.report(resolve(name, baseline_dir), write=False), console)



def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
