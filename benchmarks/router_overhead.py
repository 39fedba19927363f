"""Router overhead: TTFT through the P/D router vs directly to the stub, same open-loop trace (default 200 req/s), and
the router's CPU time per request; --ceiling raises the rate until the added TTFT p99 passes 1 ms (or requests fail).

Usage: python benchmarks/router_overhead.py [--rate 200] [--duration 10] [--ttft-ms 20] [--mode colocated|split|both]
       python benchmarks/router_overhead.py --ceiling [--mode colocated] [--duration 5] [--max-rate 5000]
Placement: stub(s) in their own process pinned to the last core; the router (its own process, pinned to one core:
--router-core own = a core of its own when there are 3+, client = the client's core, stub = the stubs' core) and
this client on the first core. colocated: one stub behind the router; split: a prompt stub (ttft) and a token stub
(kv transfer 0 ms), two hops. Target: <= 1 ms added TTFT at p99 (colocated). Router CPU: its process's utime+stime
over the replay (/proc) per request, fixed costs included (the client's connections, /v1/models, health polls: it
falls as the rate rises). Exit 0 pass, 1 fail, 2 inconclusive (the direct run itself missed the stub's TTFT by
> 2 ms at p99: machine too busy).
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

TARGET_MS = 1.0          # added TTFT p99 through the router
DIRECT_SLACK_MS = 2.0    # the direct run's p99 may miss the stub's TTFT by this much (stub fidelity bound)


def _ttft_ms(run_dir) -> tuple[np.ndarray, int]:
    """TTFT of the ok requests (ms) and how many failed."""
    recs = R.read_records(run_dir)
    ok = [r for r in recs if r.ok]
    return np.array([(r.first_token_s - r.actual_send_s) * 1e3 for r in ok]), len(recs) - len(ok)


def _pct(a: np.ndarray) -> dict:
    if not len(a):
        return {"p50": float("nan"), "p99": float("nan"), "mean": float("nan")}
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _replay(url: str, args, rate: float, results: str, name: str):
    spec = (f"synth:arrivals=poisson,rate={rate:g},duration={args.duration},lengths=fixed,"
            f"input={args.input},output={args.output},seed=1")
    return run(RunOptions(trace=spec, duration_s=None, backend="openai", backend_options={"url": url},
                          results_dir=results, run_id=name, vocab_size=32000, power="off"))


class Bench:
    """The stubs, the placement and one measurement point (direct, then through the router per mode)."""

    def __init__(self, args):
        self.args = args
        self.cores = cores = sorted(os.sched_getaffinity(0))
        self.stub_cpu = cores[-1] if len(cores) >= 2 else -1
        self.client_cpu = cores[0]
        place = args.router_core or ("own" if len(cores) >= 3 else "client")
        self.router_cpu = None if len(cores) < 2 else {"own": cores[1] if len(cores) >= 3 else cores[0],
                                                       "client": cores[0], "stub": cores[-1]}[place]
        self.placement = {"stubs_cpu": self.stub_cpu, "client_cpu": self.client_cpu, "router_cpu": self.router_cpu,
                          "router": place, "host_cores": len(cores)}
        self.results = args.results or tempfile.mkdtemp(prefix="splitbench-router-bench-")
        kw = dict(ttft_s=args.ttft_ms / 1e3, tpot_s=args.tpot_ms / 1e3, cpu=self.stub_cpu)
        self.stubs = [StubBackend(**kw), StubBackend(**{**kw, "ttft_s": 10.0})]  # 2nd: token stub (split)
        self.n = 0

    def pin_client(self) -> None:
        if len(self.cores) >= 2:
            os.sched_setaffinity(0, {self.client_cpu})

    def point(self, rate: float, modes: list[str]) -> dict:
        self.n += 1
        res = _replay(self.stubs[0].endpoint(), self.args, rate, self.results, f"direct-{self.n}")
        direct, failed = _ttft_ms(res.run_dir)
        out = {"rate_rps": rate, "direct_ttft_ms": _pct(direct), "direct_failed": failed}
        for mode in modes:
            out[mode] = self._through_router(rate, mode, out["direct_ttft_ms"])
        return out

    def _through_router(self, rate: float, mode: str, direct: dict) -> dict:
        urls = [s.endpoint() for s in self.stubs]
        inst = ([{"id": "baseline-0", "url": urls[0], "pool": "baseline"}] if mode == "colocated" else
                [{"id": "prompt-0", "url": urls[0], "pool": "prompt"},
                 {"id": "token-0", "url": urls[1], "pool": "token"}])
        log = os.path.join(self.results, f"{mode}-{self.n}-phases.jsonl")
        router = RouterProcess(inst, "jsq", phase_log=log, cpu=self.router_cpu, loop=self.args.loop)
        os.sched_setaffinity(0, set(self.cores))  # children inherit affinity: let the router pin itself
        router.start()
        self.pin_client()
        try:
            cpu0 = _cpu_s(router.proc.pid)
            res = _replay(router.url, self.args, rate, self.results, f"router-{mode}-{self.n}")
            cpu_s = _cpu_s(router.proc.pid) - cpu0
        finally:
            router.stop()
        ttft, failed = _ttft_ms(res.run_dir)
        first = "sent" if mode == "colocated" else "prefill_sent"
        entries = load_phase_log(log).values()
        in_router = np.array([(e["phases_unix_s"][first] - e["phases_unix_s"]["router_recv"]) * 1e3
                              for e in entries if first in e["phases_unix_s"]])
        t = _pct(ttft)
        return {"ttft_ms": t, "failed": failed, "added_ms": {k: t[k] - direct[k] for k in ("p50", "p99", "mean")},
                "router_recv_to_upstream_send_ms": _pct(in_router),
                "router_cpu_ms_per_request": cpu_s * 1e3 / max(1, len(entries))}

    def conclusive(self, point: dict) -> bool:
        return point["direct_failed"] == 0 and point["direct_ttft_ms"]["p99"] - self.args.ttft_ms <= DIRECT_SLACK_MS

    def stop(self) -> None:
        for s in self.stubs:
            s.stop()


def _passes(point: dict, mode: str) -> bool:
    m = point[mode]
    return m["failed"] == 0 and m["added_ms"]["p99"] <= TARGET_MS


def _line(point: dict, modes: list[str]) -> str:
    d = point["direct_ttft_ms"]
    parts = [f"{point['rate_rps']:8.1f} req/s: direct p50/p99 {d['p50']:.3f}/{d['p99']:.3f} ms"]
    for mode in modes:
        m = point[mode]
        parts.append(f"{mode} added p50/p99 {m['added_ms']['p50']:.3f}/{m['added_ms']['p99']:.3f} ms, "
                     f"router CPU {m['router_cpu_ms_per_request']:.3f} ms/req" + (f", {m['failed']} failed"
                                                                                    if m["failed"] else ""))
    return "; ".join(parts)


def _best(a: dict, b: dict, modes: list[str]) -> dict:
    """Two measurements of one point -> the better percentile of each side (a busy host only adds latency, to
    either side at random), added TTFT recomputed from those; failures: the fewer."""
    def low(x: dict, y: dict) -> dict:
        return {k: min(x[k], y[k]) for k in x}
    out = {"rate_rps": a["rate_rps"], "direct_ttft_ms": low(a["direct_ttft_ms"], b["direct_ttft_ms"]),
           "direct_failed": min(a["direct_failed"], b["direct_failed"]), "best_of": 2}
    for m in modes:
        t = low(a[m]["ttft_ms"], b[m]["ttft_ms"])
        out[m] = {**b[m], "ttft_ms": t, "failed": min(a[m]["failed"], b[m]["failed"]),
                  "added_ms": {k: t[k] - out["direct_ttft_ms"][k] for k in t},
                  "router_cpu_ms_per_request": (a[m]["router_cpu_ms_per_request"] +
                                                b[m]["router_cpu_ms_per_request"]) / 2}
    return out


def ceiling(bench: Bench, args, modes: list[str]) -> dict:
    """Raise the rate x args.step from args.rate while every mode passes (a failing or inconclusive point is
    measured once more and the better of the two kept per side, _best); then bisect once between the last pass
    and the first fail. The ceiling: the highest passing rate."""
    points, good, bad, rate = [], None, None, args.rate
    while rate <= args.max_rate:
        p = bench.point(rate, modes)
        if not (bench.conclusive(p) and all(_passes(p, m) for m in modes)):
            points.append(p)
            print(_line(p, modes) + "  (again)", file=sys.stderr, flush=True)
            p = _best(p, bench.point(rate, modes), modes)
        points.append(p)
        ok = bench.conclusive(p) and all(_passes(p, m) for m in modes)
        print(_line(p, modes) + ("" if ok else "  FAIL" if bench.conclusive(p) else "  INCONCLUSIVE (direct)"),
              file=sys.stderr, flush=True)
        if not ok:
            bad = p
            break
        good = p
        rate *= args.step
    if good is not None and bad is not None:
        mid = (good["rate_rps"] + bad["rate_rps"]) / 2
        p = bench.point(mid, modes)
        points.append(p)
        ok = bench.conclusive(p) and all(_passes(p, m) for m in modes)
        print(_line(p, modes) + ("" if ok else "  FAIL"), file=sys.stderr, flush=True)
        if ok:
            good = p
    limit = "none below --max-rate" if bad is None else (
        "the router (added TTFT p99 > 1 ms or failed requests)" if bench.conclusive(bad) else
        "the client or the stub (the direct run itself missed)")
    return {"ceiling_rps": good["rate_rps"] if good else None, "limited_by": limit, "points": points}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="the rate (with --ceiling: the first rate)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--tpot-ms", type=float, default=5.0)
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=16)
    ap.add_argument("--mode", choices=["colocated", "split", "both"], default=None,
                    help="default: both (with --ceiling: colocated)")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="the router's event loop")
    ap.add_argument("--router-core", choices=["own", "client", "stub"], default=None,
                    help="the router's core: own (3+ cores, the default there), the client's (the default on 2), "
                         "the stubs'")
    ap.add_argument("--ceiling", action="store_true", help="raise the rate until added TTFT p99 > 1 ms")
    ap.add_argument("--step", type=float, default=1.5, help="--ceiling: rate factor between points")
    ap.add_argument("--max-rate", type=float, default=5000.0, help="--ceiling: stop here")
    ap.add_argument("--results", default=None, help="keep run directories here (default: a temp dir)")
    args = ap.parse_args()
    mode = args.mode or ("colocated" if args.ceiling else "both")
    modes = ["colocated", "split"] if mode == "both" else [mode]
    bench = Bench(args)
    out: dict = {"duration_s": args.duration, "stub_ttft_ms": args.ttft_ms, "placement": bench.placement,
                 "results": bench.results}
    try:
        for s in bench.stubs:
            s.start()
        bench.pin_client()
        if args.ceiling:
            out.update(ceiling(bench, args, modes))
        else:
            out.update(bench.point(args.rate, modes))
    finally:
        bench.stop()
    print(json.dumps(out, indent=2))
    if args.ceiling:
        c = out["ceiling_rps"]
        print(f"\nceiling ({'/'.join(modes)}, router on core {bench.router_cpu}): "
              f"{'none' if c is None else f'{c:.0f} req/s'}; limited by {out['limited_by']}")
        return 0 if c is not None else 1
    print("\n" + _line(out, modes))
    if not bench.conclusive(out):
        print(f"INCONCLUSIVE: direct TTFT p99 is {out['direct_ttft_ms']['p99'] - args.ttft_ms:.3f} ms over the "
              f"stub's TTFT (> {DIRECT_SLACK_MS:g} ms) or requests failed: the machine is too busy to measure")
        return 2
    judged = ["colocated"] if "colocated" in modes else modes   # split adds a second hop: reported, judged alone
    ok = all(_passes(out, m) for m in judged)
    print(f"PASS ({'/'.join(judged)} added p99 <= {TARGET_MS:g} ms)" if ok else
          f"FAIL ({'/'.join(judged)} added p99 > {TARGET_MS:g} ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
