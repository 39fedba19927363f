"""GPU check (issue 13): the baseline and the Splitwiser layout over NIXL and over the example connector, each on a
short trace window through splitbench's library, verified from the records; one table; exit 1 if a check fails.

Usage: python benchmarks/gpu_check.py [--model DIR] [--trace azure-conv-2023] [--trace-dir D] [--duration 20]
           [--rate-scale 1] [--results DIR] [--gpu 0] [--skip STEP ...] [--vllm-args="ARGS"] [--json F] [--cpu]
Steps: `baseline` (--backend vllm --instances 1 --gpus G), `nixl` and `example` (--backend splitwise --gpus G
--layout splitwiser --connector nixl|example: a prompt and a token instance sharing GPU G, memory split). On a host
without a GPU (or --cpu) the same steps run on vLLM CPU with --gpus and --layout left out (prompt and token instance
on their own cores), and the power checks are n/a. Checks per step: the run completed and every request is ok;
split steps: every request prefilled on a prompt instance and decoded on a token instance (records v2
prefill_instance/decode_instance/prefill_pool/decode_pool), the token instance got its prompt KV from the connector
(its /metrics), NIXL transfers were counted (nixl); GPU: NVML power sampled at >= 10 Hz with the energy counter read.
--model: default a tiny Llama with head_dim 128 (`splitbench model tiny --hidden 512 --heads 4 --kv-heads 2`) made
under --results.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import splitbench
from splitbench.app.options import RunOptions, backend_options
from splitbench.app.runner import run
from splitbench.errors import SplitbenchError
from splitbench.servers.tiny_model import write_tiny_model
from splitbench.servers.topology import detect_hardware
from splitbench.servers.vllm_features import detect as detect_vllm

STEPS = ("baseline", "nixl", "example")
MIN_POWER_HZ = 10.0
# GPU: eager mode and a 4 GiB KV cache per instance start in seconds and leave room for two instances per GPU
GPU_VLLM_ARGS = "--enforce-eager --max-model-len 4096 --kv-cache-memory-bytes 4294967296 --uvicorn-log-level warning"
COLUMNS = ("step", "result", "requests ok/total", "TTFT p50/p99 ms", "TBT p50 ms", "NIXL xfer ms",
           "power Hz", "energy J", "why failed")


def step_options(step: str, a: argparse.Namespace, model_dir: str, gpu: int | None, stamp: str) -> RunOptions:
    """The RunOptions of one step, as `splitbench run` would build them from its flags."""
    split = step != "baseline"
    flags = {"model_dir": model_dir, "vllm_args": a.vllm_args if a.vllm_args is not None else
             (GPU_VLLM_ARGS if gpu is not None else None),
             "gpus": str(gpu) if gpu is not None else None,
             "layout": "splitwiser" if split and gpu is not None else None,
             "connector": step if split else None, "instances": None if split else 1}
    opts = backend_options("splitwise" if split else "vllm", **flags)
    return RunOptions(trace=a.trace, trace_dir=a.trace_dir, duration_s=a.duration, rate_scale=a.rate_scale,
                      backend="splitwise" if split else "vllm", backend_options=opts, results_dir=a.results,
                      run_id=f"gpucheck-{stamp}-{step}", power="auto" if gpu is not None else "off",
                      timeout_s=120.0, grace_s=5.0)


# ----------------------------------------------------------------------------- checks (pure: tested on fakes)

def _ms(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) * 1e3


def placement_problems(df) -> list[str]:
    """Split steps: every ok request prefilled on a prompt instance and decoded on a token instance."""
    ok = df[df["status"] == "ok"]
    bad = ok[~(ok["prefill_instance"].fillna("").str.startswith("prompt-")
               & ok["decode_instance"].fillna("").str.startswith("token-")
               & (ok["prefill_pool"] == "prompt") & (ok["decode_pool"] == "token"))]
    if len(bad):
        r = bad.iloc[0]
        return [(f"{len(bad)} request(s) not prefilled on prompt / decoded on token (e.g. {r['request_id']}: "
                 f"{r['prefill_instance']}/{r['prefill_pool']} -> {r['decode_instance']}/{r['decode_pool']})")]
    return []


def kv_checks(step: str, metrics: dict) -> tuple[float | None, list[str]]:
    """(mean NIXL transfer ms, problems) from the token instances' scraped /metrics (metrics/summary.json)."""
    tokens = {k: v for k, v in metrics.items() if k.startswith("token-")}
    if not tokens or not all(v.get("scraped") for v in tokens.values()):
        return None, ["no /metrics of the token instance"]
    problems = []
    external = sum(v["counters"].get("vllm:prompt_tokens_by_source_total{source=external_kv_transfer}", 0.0)
                   for v in tokens.values())
    known = any(k.startswith("vllm:prompt_tokens_by_source_total") for v in tokens.values() for k in v["counters"])
    if known and external <= 0:
        problems.append("the token instance computed every prompt itself (no KV from the connector)")
    n = sum(v.get("nixl", {}).get("vllm:nixl_xfer_time_seconds_count", 0.0) for v in tokens.values())
    s = sum(v.get("nixl", {}).get("vllm:nixl_xfer_time_seconds_sum", 0.0) for v in tokens.values())
    if step == "nixl" and n <= 0:
        problems.append("no NIXL transfer counted on the token instance")
    return (s / n * 1e3 if n else None), problems


def power_checks(meta: dict, gpu: int) -> tuple[float | None, float | None, list[str]]:
    """(sampling Hz, energy J, problems) of GPU `gpu` from run.json power (the NVML sampler's summary)."""
    summ = (meta.get("power") or {}).get("summary") or {}
    g = (summ.get("gpus") or {}).get(str(gpu))
    if not g:
        why = (meta.get("power") or {}).get("error") or "no NVML power samples"
        return None, None, [f"GPU {gpu}: {why}"]
    problems = []
    hz, energy = g.get("rate_hz"), g.get("energy_j")
    if not hz or hz < MIN_POWER_HZ:
        problems.append(f"power sampled at {hz or 0:.1f} Hz (< {MIN_POWER_HZ:g})")
    if g.get("method") != "counter" or not g.get("counter_energy_j"):
        problems.append("energy counter not read (energy integrated from power samples)")
    return hz, energy, problems


def check_run(step: str, run_dir: Path, gpu: int | None) -> dict:
    """One table row (and its JSON) from a finished run directory."""
    r = splitbench.open_run(run_dir)
    df, meta = r.records, r.meta
    lat = r.summary["latency"]
    ok, total = int((df["status"] == "ok").sum()), len(df)
    why = []
    if meta.get("status") != "complete":
        why.append(f"run {meta.get('status')}")
    if not total or ok < total:
        kinds = df[df["status"] != "ok"]["status"].value_counts().to_dict()
        why.append(f"{total - ok} of {total} requests failed {kinds}" if total else "no requests")
    xfer_ms = None
    if step != "baseline":
        why += placement_problems(df)
        metrics_path = run_dir / "metrics" / "summary.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        xfer_ms, kv_why = kv_checks(step, metrics)
        why += kv_why
    hz = energy = None
    if gpu is not None:
        hz, energy, p_why = power_checks(meta, gpu)
        why += p_why
    return {"step": step, "ok": not why, "requests_ok": ok, "requests": total,
            "ttft_p50_ms": _ms(lat["ttft_s"].get("p50")), "ttft_p99_ms": _ms(lat["ttft_s"].get("p99")),
            "tbt_p50_ms": _ms(lat["tbt_s"].get("p50")), "nixl_xfer_ms": xfer_ms, "power_hz": hz,
            "energy_j": energy, "why": "; ".join(why), "run_dir": str(run_dir)}


# ----------------------------------------------------------------------------- running and the table

def run_step(step: str, a: argparse.Namespace, model_dir: str, gpu: int | None, stamp: str) -> dict:
    """Run one step and check it; a run that raised is a FAIL row with the error's first line."""
    opts = step_options(step, a, model_dir, gpu, stamp)
    t0 = time.monotonic()
    try:
        res = run(opts, on_status=lambda s: print(f"  [{step}] {s}", file=sys.stderr, flush=True))
        row = check_run(step, res.run_dir, gpu)
    except (SplitbenchError, OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        row = {"step": step, "ok": False, "why": f"{type(e).__name__}: {first}"[:300],
               "run_dir": str(Path(a.results) / opts.run_id)}
    row["wall_s"] = round(time.monotonic() - t0, 1)
    return row


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    """The one table: a row per step."""
    cells = [COLUMNS]
    for r in rows:
        reqs = f"{r['requests_ok']}/{r['requests']}" if "requests" in r else "-"
        ttft = f"{_fmt(r.get('ttft_p50_ms'))}/{_fmt(r.get('ttft_p99_ms'))}" if "requests" in r else "-"
        cells.append((r["step"], "ok" if r["ok"] else "FAIL", reqs, ttft, _fmt(r.get("tbt_p50_ms"), ".2f"),
                      _fmt(r.get("nixl_xfer_ms"), ".2f"), _fmt(r.get("power_hz")), _fmt(r.get("energy_j"), ".0f"),
                      r.get("why") or ""))
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(str(c[i]).ljust(w) for i, w in enumerate(widths)) + "  " + str(c[-1]) for c in cells]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def default_model(results: str) -> str:
    """The head_dim-128 tiny Llama under results/ (made once)."""
    out = Path(results) / "tiny-hd128"
    if not (out / "config.json").exists():
        write_tiny_model(out, hidden=512, heads=4, kv_heads=2)
    return str(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: a head_dim-128 tiny Llama, made here)")
    ap.add_argument("--trace", default="azure-conv-2023")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--duration", type=float, default=20.0, help="trace window per step, s")
    ap.add_argument("--rate-scale", type=float, default=1.0)
    ap.add_argument("--results", default="results/gpu-check")
    ap.add_argument("--gpu", type=int, default=0, help="GPU index for every step")
    ap.add_argument("--skip", action="append", default=[], choices=STEPS, help="leave a step out (repeatable)")
    ap.add_argument("--vllm-args", default=None, help=f"vLLM args per instance (GPU default: {GPU_VLLM_ARGS!r}; "
                    "CPU: splitbench's)")
    ap.add_argument("--cpu", action="store_true", help="the vLLM CPU path even where a GPU is present")
    ap.add_argument("--json", default=None, help="also write the rows (and host) as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    gpu = None if a.cpu or detect_hardware() == "cpu-host" else a.gpu
    Path(a.results).mkdir(parents=True, exist_ok=True)
    model_dir = a.model or default_model(a.results)
    vllm = detect_vllm()
    print(f"gpu_check: vLLM {vllm.version} ({vllm.source}), {'GPU ' + str(gpu) if gpu is not None else 'CPU'}, "
          f"model {model_dir}, {a.trace} {a.duration:g} s x {a.rate_scale:g}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows = [run_step(s, a, model_dir, gpu, stamp) for s in STEPS if s not in a.skip]
    print(table(rows), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"vllm": vllm.describe(), "gpu": gpu, "model": model_dir,
                                            "rows": rows}, indent=1) + "\n")
    failed = [r["step"] for r in rows if not r["ok"]]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}", flush=True)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
