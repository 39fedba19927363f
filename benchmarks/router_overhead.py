"""Router overhead: TTFT through the P/D router vs directly to the stub, same open-loop trace (default 200 req/s).

Usage: python benchmarks/router_overhead.py [--rate 200] [--duration 10] [--ttft-ms 20] [--mode colocated|split|both]
Placement (2+ cores): stub(s) in their own process pinned to the last core; the router (its own process) and this
client share core 0. colocated: one stub behind the router; split: a prompt stub (ttft) and a token stub (kv transfer
0 ms), two hops. Target: <= 1 ms added TTFT at p99 (colocated). Exit 0 pass, 1 fail, 2 inconclusive (the direct
run itself missed the stub's TTFT by > 2 ms at p99: machine too busy).
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
from splitbench.backends.stub import StubBackend
from splitbench.schema import records as R
from splitbench.servers.phaselog import load_phase_log
from splitbench.servers.router_process import RouterProcess


def _ttft_ms(run_dir) -> np.ndarray:
    recs = [r for r in R.read_records(run_dir)]
    bad = [r for r in recs if not r.ok]
    if bad:
        raise SystemExit(f"{len(bad)} of {len(recs)} requests failed, e.g. {bad[0].status}: {bad[0].error}")
    return np.array([(r.first_token_s - r.actual_send_s) * 1e3 for r in recs])


def _pct(a: np.ndarray) -> dict:
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _replay(url: str, args, results: str, name: str):
    spec = (f"synth:arrivals=poisson,rate={args.rate},duration={args.duration},lengths=fixed,"
            f"input={args.input},output={args.output},seed=1")
    return run(RunOptions(trace=spec, duration_s=None, backend="openai", backend_options={"url": url},
                          results_dir=results, run_id=name, vocab_size=32000))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--tpot-ms", type=float, default=5.0)
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--mode", choices=["colocated", "split", "both"], default="both")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="the router's event loop")
    ap.add_argument("--router-core", choices=["client", "stub"], default="client",
                    help="share the client's core (default) or the stubs' core")
    ap.add_argument("--results", default=None, help="keep run directories here (default: a temp dir)")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    stub_cpu = cores[-1] if len(cores) >= 2 else -1
    client_cpu = cores[0]

    def pin_client() -> None:
        if len(cores) >= 2:
            os.sched_setaffinity(0, {client_cpu})
    results = args.results or tempfile.mkdtemp(prefix="splitbench-router-bench-")
    stub_kw = dict(ttft_s=args.ttft_ms / 1e3, tpot_s=args.tpot_ms / 1e3, cpu=stub_cpu)
    out: dict = {"rate_rps": args.rate, "duration_s": args.duration, "stub_ttft_ms": args.ttft_ms,
                 "placement": {"stubs_cpu": stub_cpu, "client_cpu": client_cpu, "router": args.router_core}, "results": results}
    stubs = [StubBackend(**stub_kw), StubBackend(**{**stub_kw, "ttft_s": 10.0})]  # 2nd: token stub (split)
    try:
        for s in stubs:
            s.start()
        pin_client()
        direct = _ttft_ms(_replay(stubs[0].endpoint(), args, results, "direct").run_dir)
        out["direct_ttft_ms"] = _pct(direct)
        modes = ["colocated", "split"] if args.mode == "both" else [args.mode]
        for mode in modes:
            inst = ([{"id": "b0", "url": stubs[0].endpoint(), "pool": "baseline"}] if mode == "colocated" else
                    [{"id": "p0", "url": stubs[0].endpoint(), "pool": "prompt"},
                     {"id": "t0", "url": stubs[1].endpoint(), "pool": "token"}])
            log = os.path.join(results, f"{mode}-phases.jsonl")
            router_cpu = (client_cpu if args.router_core == "client" else stub_cpu) if len(cores) >= 2 else None
            router = RouterProcess(inst, "jsq", phase_log=log, cpu=router_cpu, loop=args.loop)
            os.sched_setaffinity(0, set(cores))  # children inherit affinity: let the router pin itself
            router.start()
            pin_client()
            try:
                res = _replay(router.url, args, results, f"router-{mode}")
            finally:
                router.stop()
            ttft = _ttft_ms(res.run_dir)
            first = "sent" if mode == "colocated" else "prefill_sent"
            in_router = np.array([(e["phases_unix_s"][first] - e["phases_unix_s"]["router_recv"]) * 1e3
                                  for e in load_phase_log(log).values()])
            out[mode] = {"ttft_ms": _pct(ttft),
                         "added_ms": {k: _pct(ttft)[k] - out["direct_ttft_ms"][k] for k in ("p50", "p99", "mean")},
                         "router_recv_to_upstream_send_ms": _pct(in_router)}
    finally:
        for s in stubs:
            s.stop()
    print(json.dumps(out, indent=2))
    d = out["direct_ttft_ms"]
    print(f"\ndirect TTFT p50/p99 = {d['p50']:.3f}/{d['p99']:.3f} ms")
    for mode in ("colocated", "split"):
        if mode in out:
            m, a = out[mode]["ttft_ms"], out[mode]["added_ms"]
            print(f"{mode:9s} TTFT p50/p99 = {m['p50']:.3f}/{m['p99']:.3f} ms; added p50/p99 = "
                  f"{a['p50']:.3f}/{a['p99']:.3f} ms")
    if d["p99"] - args.ttft_ms > 2.0:  # the stub fidelity bound: without it the comparison means nothing
        print(f"INCONCLUSIVE: direct TTFT p99 is {d['p99'] - args.ttft_ms:.3f} ms over the stub's TTFT "
              "(> 2 ms): the machine is too busy to measure a 1 ms overhead")
        return 2
    ok = "colocated" not in out or out["colocated"]["added_ms"]["p99"] <= 1.0
    print("PASS (colocated added p99 <= 1 ms)" if ok else "FAIL (colocated added p99 > 1 ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
