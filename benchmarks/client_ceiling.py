"""Client ceilings: splitbench (1 worker) vs `vllm bench serve`, same stub, same workload, same core split.

Usage: python benchmarks/client_ceiling.py [--duration 10] [--workers 1] [--stubs 1] [--ramp-from RPS] [--skip-vllm]
       [--json F]
The stub (TTFT 20 ms, 5 ms/token; 128 input ids, 32 output tokens, Poisson arrivals) is pinned to the last core and
the client to core 0. Each client climbs an open-loop rate ramp (250, 500, 1000, 1500, 2000, 3000, ...) and then
bisects to within 10%; a point passes when achieved >= 95% of target and TTFT p99 error <= 5 ms, and for splitbench
also send lag p99 <= 2 ms (vllm bench serve reports no send times, so it is judged on the other two only).
vllm bench serve runs from the installed vLLM's module (vllm.benchmarks.serve; its console script fails on the CPU
build); its request rate is also Poisson, and it gets warm-up requests that open as many connections as splitbench
opens before its clock starts (otherwise connection setup lands in its first TTFTs). Both get one re-measurement of
a failed point (this host is shared). Prints each point, both ceilings and their ratio. Not a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from splitbench.app import calibrate as C
from splitbench.backends.registry import get_backend
from splitbench.servers.tiny_model import ensure_tiny_model

VBENCH = """import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))
"""


def vllm_point(rate: float, duration_s: float, stub_cpu: int | None, client_cpu: int | None,
               tokenizer: str) -> dict:
    """One `vllm bench serve` run at `rate` against a fresh stub; judged by achieved rate and TTFT p99 error."""
    w = C.WORKLOAD
    stub = get_backend("stub", ttft_s=w["ttft_s"], tpot_s=w["tpot_s"], cpu=-1 if stub_cpu is None else stub_cpu)
    stub.start(None)
    try:
        with tempfile.TemporaryDirectory(prefix="vbench-") as tmp:
            n = max(50, int(rate * duration_s))
            cmd = [sys.executable, "-c", VBENCH, "--base-url", stub.endpoint(), "--backend", "openai",
                   "--model", stub.cfg.model, "--tokenizer", tokenizer, "--dataset-name", "random",
                   "--random-input-len", str(w["input_tokens"]), "--random-output-len", str(w["output_tokens"]),
                   "--ignore-eos", "--request-rate", str(rate), "--num-prompts", str(n), "--seed", "1",
                   "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
                   "--save-result", "--result-dir", tmp, "--result-filename", "r.json", "--disable-tqdm",
                   "--ready-check-timeout-sec", "0",
                   # warm-up requests open its connections first, as splitbench pre-connects before its clock starts
                   "--num-warmups", str(min(256, max(1, int(rate * 0.25))))]
            pre = ["taskset", "-c", str(client_cpu)] if client_cpu is not None else []
            proc = subprocess.run(pre + cmd, capture_output=True, text=True, timeout=duration_s * 10 + 120)
            path = Path(tmp) / "r.json"
            if not path.exists():
                tail = (proc.stdout + proc.stderr)[-600:]
                return {"target_rps": rate, "pass": False, "reason": f"vllm bench serve failed: {tail}"}
            d = json.loads(path.read_text())
            lateness = C._stub_lateness_p99_s(stub.endpoint())
    finally:
        stub.stop()
    err_s = (d["p99_ttft_ms"] - w["ttft_s"] * 1e3) / 1e3
    achieved = d["request_throughput"] * (d["duration"] / max(d["duration"] - w["ttft_s"] - w["output_tokens"]
                                                               * w["tpot_s"], 1e-9))  # minus the drain tail
    p = {"target_rps": rate, "achieved_rps": achieved, "rate_ratio": achieved / rate, "requests": d["num_prompts"],
         "ok": d["completed"], "ttft_p99_error_s": err_s, "ttft_p50_error_s": d["p50_ttft_ms"] / 1e3 - w["ttft_s"],
         "lag_p99_s": None, "tokens_per_s": d["output_throughput"], "stub_lateness_p99_s": lateness}
    reasons = []
    if p["rate_ratio"] < C.CRITERIA["min_rate_ratio"] or d["completed"] < d["num_prompts"]:
        reasons.append(f"achieved {achieved:.0f} of {rate:.0f} req/s ({d['failed']} failed)")
    if err_s > C.CRITERIA["ttft_p99_error_s"]:
        reasons.append(f"TTFT p99 error {err_s * 1e3:.2f} ms")
    p["pass"], p["reason"] = not reasons, "; ".join(reasons)
    return p


def search(measure, label: str, max_points: int) -> tuple[float, list[dict]]:
    points: list[dict] = []
    rate = C.next_rate(points)
    while rate is not None and len(points) < max_points:
        p = measure(rate)
        if not p["pass"]:   # the same one retry as splitbench's calibrate
            show(label + " (1st try)", p)
            q = measure(rate)
            p = {**(q if q["pass"] or q.get("ttft_p99_error_s", 1e9) < p.get("ttft_p99_error_s", 1e9) else p),
                 "attempts": 2}
        points.append(p)
        show(label, p)
        rate = C.next_rate(points)
    good = [p for p in points if p["pass"]]
    return (max(good, key=lambda p: p["target_rps"])["achieved_rps"] if good else 0.0), points


def show(label: str, p: dict) -> None:
    if "achieved_rps" not in p:
        print(f"{label:>28} {p['target_rps']:7.0f} req/s  FAIL {p['reason']}", flush=True)
        return
    lag = f"{p['lag_p99_s'] * 1e3:6.2f}" if p.get("lag_p99_s") is not None else "   n/a"
    stub = p.get("stub_lateness_p99_s")
    print(f"{label:>28} {p['target_rps']:7.0f} req/s  achieved {p['achieved_rps']:7.1f}  lag p99 {lag} ms  "
          f"TTFT p99 err {p['ttft_p99_error_s'] * 1e3:7.2f} ms"
          + (f"  (stub chunk lateness p99 {stub * 1e3:.2f} ms)" if stub is not None else "")
          + f"  {'ok' if p['pass'] else 'FAIL: ' + p['reason']}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per point")
    ap.add_argument("--workers", type=int, default=1, help="splitbench sender processes")
    ap.add_argument("--stubs", type=int, default=1, help="splitbench: stub processes on one port, one core each "
                    "(the last cores; senders on the first)")
    ap.add_argument("--ramp-from", type=float, default=0.0, help="splitbench: start the rate ramp at this req/s")
    ap.add_argument("--max-points", type=int, default=10)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-splitbench", action="store_true")
    ap.add_argument("--json", default=None, help="write all points and ceilings here")
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    stub_cpu, client_cpu = (ncpu - 1, 0) if ncpu >= 2 else (None, None)
    print(f"host: {os.uname().nodename}, {ncpu} cores; stub on core {stub_cpu}, client on core {client_cpu}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    out: dict = {"stub_cpu": stub_cpu, "client_cpu": client_cpu, "workload": C.WORKLOAD, "criteria": C.CRITERIA}
    if not args.skip_splitbench:
        res = C.calibrate(duration_s=args.duration, workers=args.workers,
                          stub_cpu=stub_cpu if args.stubs == 1 else None, max_points=args.max_points, save=False,
                          on_point=lambda p: show("splitbench" + (" (1st try)" if p.get("retrying") else ""), p),
                          stubs=args.stubs, ramp_from_rps=args.ramp_from)
        out["splitbench"] = {"ceiling_rps": res["ceiling_rps"], "workers": args.workers, "points": res["points"],
                             "stubs": res["stubs"], "stub_cpus": res["stub_cpus"], "client_cpus": res["client_cpus"]}
    if not args.skip_vllm:
        tok = str(ensure_tiny_model())
        ceiling, pts = search(lambda r: vllm_point(r, args.duration, stub_cpu, client_cpu, tok),
                              "vllm bench serve", args.max_points)
        out["vllm_bench_serve"] = {"ceiling_rps": ceiling, "points": pts}
    print()
    sb, vb = (out.get("splitbench") or {}).get("ceiling_rps"), (out.get("vllm_bench_serve") or {}).get("ceiling_rps")
    if sb is not None:
        print(f"splitbench ({args.workers} worker{'s' if args.workers > 1 else ''}) ceiling: {sb:.0f} req/s")
    if vb is not None:
        print(f"vllm bench serve ceiling:      {vb:.0f} req/s")
    if sb and vb:
        out["ratio"] = sb / vb
        print(f"ratio: {sb / vb:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
