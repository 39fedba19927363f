"""`splitbench traces`, `model tiny|random` and `serve-stub`: workloads, generated models and the stub server."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from splitbench.app.options import parse_rate_scale
from splitbench.cli.common import console, err_console, user_errors, with_options
from splitbench.cli.groups import WORKLOAD
from splitbench.render.plots import plot_workload
from splitbench.servers.random_model import KNOWN_CONFIGS, MARKER_FILE, write_random_model
from splitbench.servers.stub import StubConfig
from splitbench.servers.stub_main import run_server
from splitbench.servers.tiny_model import write_tiny_model
from splitbench.workload.catalog import catalog, fetch_trace, find_local
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.prefix import VLLM_CPU_BLOCK_TOKENS
from splitbench.workload.synth import from_spec, write_azure_csv
from splitbench.workload.traces import parse_columns
from splitbench.workload.transforms import workload_stats


@user_errors
def traces_list(trace_dir: Optional[str] = typer.Option(None, "--trace-dir", help="Searched first.")):
    """List catalogue traces and where each is found locally (search path: --trace-dir,
    $SPLITBENCH_TRACE_DIR, ./traces, ../shared/traces, the user cache)."""

    table = Table("name", "description", "where")
    for name, entry in catalog().items():
        path = find_local(name, trace_dir)
        table.add_row(name, entry["description"], str(path) if path else "not local")
    console.print(table)


@user_errors
@with_options(WORKLOAD[1:], target=WorkloadSpec)
def traces_show(opts: dict,
                trace: str = typer.Argument(..., help="Catalogue name, file path, or synth:... spec."),
                plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: arrivals/s + length histograms."),
                as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
                server_block_tokens: int = typer.Option(VLLM_CPU_BLOCK_TOKENS, help="Prefix-hash traces: the "
                                                        "server's KV block size for the expected cache hits "
                                                        "[vLLM CPU's default].")):
    """Validate a trace, apply the transforms and print its statistics (prefix-hash traces: block reuse, expected
    prefix-cache hits with a cache that never evicts, inferred sessions)."""
    w = load(WorkloadSpec(trace, **{**opts, "columns": parse_columns(opts["columns"]),
                                    "rate_scale": parse_rate_scale(opts["rate_scale"], allow_auto=False) or 1.0},
                          fetch=False))
    stats = workload_stats(w, server_block_tokens)
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
    for k, v in _prefix_rows(stats):
        table.add_row(k, v)
    table.add_row("sha256", str(w.source.get("sha256")))
    for k, v in w.transforms.items():
        table.add_row(f"transform: {k}", json.dumps(v, default=str))
    console.print(table)
    if plot:
        console.print(f"plot written to {plot}")


def _prefix_rows(stats: dict) -> list[tuple[str, str]]:
    rows = []
    p, se = stats.get("prefix"), stats.get("sessions")
    if p:
        rows += [("hash blocks", f"{p['blocks']:,} of {p['block_tokens']} tokens, {p['distinct_blocks']:,} distinct, "
                                 f"{p['reused_fraction']:.1%} reused"),
                 ("expected cache hits", f"{p['expected_hit_fraction']:.1%} of prompt tokens (never-evicting cache, "
                                         f"{p['server_block_tokens']}-token server blocks)")]
    if se:
        rows.append(("sessions (inferred)", f"{se['sessions']:,} with {se['requests_in_sessions']:,} requests "
                     f"(mean {se['mean_turns']:.2f} turns, max {se['max_turns']}); {se['singletons']:,} singletons; "
                     f"by turns {json.dumps(se['sessions_by_turns'])}"))
    return rows


@user_errors
def traces_fetch(name: str = typer.Argument(..., help="Catalogue name (see `splitbench traces list`)."),
                 dest: Optional[Path] = typer.Option(None, "--dest", help="Directory (default: the user cache)."),
                 url: Optional[str] = typer.Option(None, "--url", help="Download from this URL instead.")):
    """Download a catalogue trace (temp file, sha256 check, atomic rename). A mismatch with a verified
    catalogue hash is an error and leaves nothing behind; third-party (unverified) hashes only warn."""

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
    elif res["status"] == "unknown-sha256":
        err_console.print("warning: the catalogue has no sha256 for this trace, so the file is unverified "
                          "(recorded as sha256_verified: false); check it before relying on it", highlight=False)
    else:
        err_console.print(f"warning: sha256 differs from the unverified third-party value "
                          f"{res['expected_sha256']}; check the file before relying on it", highlight=False)


@user_errors
def traces_synth(spec: str = typer.Argument(..., help="e.g. synth:arrivals=poisson,rate=20,duration=60,"
                                                    "lengths=fixed,input=128,output=32,seed=1"),
                 out: Path = typer.Option(..., "--out", help="CSV to write (Azure format)."),
                 trace_dir: Optional[str] = typer.Option(None, "--trace-dir", help="For lengths=TRACE.")):
    """Generate a seeded synthetic workload and write it as an Azure-format CSV
    (TIMESTAMP,ContextTokens,GeneratedTokens). Keys: arrivals=poisson|gamma, rate, cv (gamma),
    duration|count, lengths=fixed|uniform|TRACE, input, output (N or LOW-HIGH), seed, system_prompts=N,
    system_share=F, block=TOKENS (prefix hashes; the CSV keeps only the lengths)."""
    w = from_spec(spec, trace_dir=trace_dir)
    write_azure_csv(w, out)
    span = float(w.arrival_s[-1]) if len(w) else 0.0
    console.print(f"wrote {out}: {len(w):,} requests over {span:.1f} s", highlight=False)


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

    t0 = time.perf_counter()
    path = write_tiny_model(out, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                            vocab_size=vocab_size, max_position=max_position, seed=seed)
    console.print(f"wrote {path} in {time.perf_counter() - t0:.2f} s", highlight=False)


@user_errors
def model_random(out: Path = typer.Option(..., "--out", help="Directory to write the HF-format model to."),
                 config: Optional[str] = typer.Option(None, help=f"Known config ({', '.join(KNOWN_CONFIGS)}; "
                                                      "default llama-3.1-8b) or a HF config.json / its directory."),
                 weights: bool = typer.Option(False, "--weights", help="Also write random bf16 safetensors (16 GB "
                                              "for 8B) for paths that need weight files."),
                 seed: int = typer.Option(0, help="Seed for tokenizer corpus and weights.")) -> None:
    """Write a real-architecture model with random weights: the config's shapes and the tiny model's tokenizer
    (no download). Without --weights there are no weight files and vLLM serves it with --load-format dummy."""

    t0 = time.perf_counter()
    path = write_random_model(out, config, weights=weights, seed=seed)
    meta = json.loads((path / MARKER_FILE).read_text())
    params = f"{meta['params'] / 1e9:.2f}e9 parameters, " if meta["params"] else ""
    how = (f"{meta['weight_bytes'] / 1e9:.1f} GB bf16 safetensors" if weights else
           "no weight files: splitbench serves it with vLLM --load-format dummy")
    console.print(f"wrote {path} ({meta['config']}: {params}{how}) in {time.perf_counter() - t0:.1f} s",
                  highlight=False, markup=False)


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
    kv_connector: Optional[str] = typer.Option(None, help="P/D: KV-connector series in /metrics as vLLM shows them "
                                               "(nixl, consumer), or none (kv_transfer_params ignored)."),
) -> None:
    """Run the built-in OpenAI-compatible stub server in the foreground until Ctrl-C; prints a one-line summary
    (requests, chunk emission lateness p50/p99/max) at exit. /metrics has the lateness live."""
    cfg = StubConfig(ttft_ms / 1e3, tpot_ms / 1e3, tokens_per_chunk, model, fail_rate, seed,
                     kv_transfer_s=kv_transfer_ms / 1e3, tick_s=tick_ms / 1e3, kv_connector=kv_connector)
    run_server(cfg, host, port, cpu=cpu, loop=loop, server=server)


def register(app: typer.Typer) -> None:
    traces_app = typer.Typer(no_args_is_help=True, help="List, inspect, fetch and synthesize traces.")
    model_app = typer.Typer(no_args_is_help=True, help="Generate models that need no download.")
    app.add_typer(traces_app, name="traces")
    app.add_typer(model_app, name="model")
    traces_app.command("list")(traces_list)
    traces_app.command("show")(traces_show)
    traces_app.command("fetch")(traces_fetch)
    traces_app.command("synth")(traces_synth)
    model_app.command("tiny")(model_tiny)
    model_app.command("random")(model_random)
    app.command("serve-stub")(serve_stub)
