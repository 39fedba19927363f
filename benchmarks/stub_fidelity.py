"""Replay fidelity against the built-in stub: schedule lag and TTFT error at a fixed open-loop rate.

Usage: python benchmarks/stub_fidelity.py [--rate 200] [--duration 30] [--ttft-ms 20] [--tpot-ms 5]
The stub runs in its own process pinned to the last core; this client is pinned to core 0.
Acceptance (issue 2): at 200 req/s for 30 s, schedule lag p99 <= 2 ms and TTFT p99 within 2 ms of the stub's TTFT.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.schema import records as R


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--tpot-ms", type=float, default=5.0)
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--arrivals", default="poisson", choices=["poisson", "gamma"])
    ap.add_argument("--results", default=None, help="keep the run directory here (default: a temp dir)")
    args = ap.parse_args()
    ncpu = os.cpu_count() or 1
    if ncpu >= 2:
        os.sched_setaffinity(0, {0})
    results = args.results or tempfile.mkdtemp(prefix="splitbench-bench-")
    spec = (f"synth:arrivals={args.arrivals},rate={args.rate},duration={args.duration},lengths=fixed,"
            f"input={args.input},output={args.output},seed=1")
    opts = RunOptions(trace=spec, duration_s=None, backend="stub", results_dir=results,
                      backend_options={"ttft_s": args.ttft_ms / 1000, "tpot_s": args.tpot_ms / 1000},
                      vocab_size=32000)
    res = run(opts)
    recs = [r for r in R.read_records(res.run_dir)]
    ok = [r for r in recs if r.ok]
    lag_ms = np.array([(r.actual_send_s - r.intended_send_s) * 1e3 for r in recs if r.actual_send_s is not None])
    ttft_ms = np.array([(r.first_token_s - r.actual_send_s) * 1e3 for r in ok])
    err_ms = ttft_ms - args.ttft_ms
    sends = np.array(sorted(r.actual_send_s for r in recs if r.actual_send_s is not None))
    intended = np.array(sorted(r.intended_send_s for r in recs))
    out = {
        "rate_rps": args.rate, "duration_s": args.duration, "requests": len(recs), "ok": len(ok),
        "client_cpu": sorted(os.sched_getaffinity(0)), "stub": res.summary.get("backend", None),
        "trace_rate_rps": (len(intended) - 1) / (intended[-1] - intended[0]),
        "achieved_rate_rps": (len(sends) - 1) / (sends[-1] - sends[0]),
        "lag_ms": {"p50": float(np.percentile(lag_ms, 50)), "p99": float(np.percentile(lag_ms, 99)),
                   "max": float(lag_ms.max())},
        "ttft_ms": {"configured": args.ttft_ms, "p50": float(np.percentile(ttft_ms, 50)),
                    "p99": float(np.percentile(ttft_ms, 99)), "max": float(ttft_ms.max())},
        "ttft_error_ms": {"p50": float(np.percentile(err_ms, 50)), "p99": float(np.percentile(err_ms, 99))},
        "run_dir": str(res.run_dir),
    }
    out["pass"] = bool(out["lag_ms"]["p99"] <= 2.0 and out["ttft_error_ms"]["p99"] <= 2.0 and len(ok) == len(recs))
    print(json.dumps(out, indent=2))
    print(f"\nlag p50/p99/max = {out['lag_ms']['p50']:.3f}/{out['lag_ms']['p99']:.3f}/{out['lag_ms']['max']:.3f} ms;"
          f" TTFT p50/p99 = {out['ttft_ms']['p50']:.3f}/{out['ttft_ms']['p99']:.3f} ms"
          f" (configured {args.ttft_ms} ms, p99 error {out['ttft_error_ms']['p99']:.3f} ms);"
          f" achieved {out['achieved_rate_rps']:.1f} of {out['trace_rate_rps']:.1f} req/s;"
          f" {'PASS' if out['pass'] else 'FAIL'}")
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
