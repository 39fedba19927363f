"""A/B the replayer's HTTP transports (lean vs aiohttp) against the stub: TTFT error, schedule lag, client CPU.

Usage: python benchmarks/client_transport.py [--rate 200] [--duration 10] [--repeats 3] [--shared-core] [--json F]
One stub process pinned to the last core (or, --shared-core, to the client's) serves every run; client on core 0. Runs interleave
(A B, B A, ...) because the machine may be shared; the load average is printed with every run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

from splitbench import timing
from splitbench.backends.stub import StubBackend
from splitbench.client.replayer import ReplayConfig, Replayer
from splitbench.client.transport import HTTP_TRANSPORTS
from splitbench.schema import records as R
from splitbench.schema.files import atomic_write_json
from splitbench.workload.load import WorkloadSpec, load
from splitbench.workload.prompts import TokenIdPrompts

_HZ = os.sysconf("SC_CLK_TCK")


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    v = [int(x) for x in open("/proc/stat").readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / _HZ


def _proc_cpu_s(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / _HZ


def one_run(url: str, model: str, workload, prompts, http: str, ttft_ms: float, stub_pid: int) -> dict:
    recs: list[R.RequestRecord] = []
    rep = Replayer(workload, prompts.payload, ReplayConfig(base_url=url, model=model, http=http), recs.append)
    load1 = os.getloadavg()[0]
    busy, stub_cpu, t = _busy_s(), _proc_cpu_s(stub_pid), os.times()
    timing.run(rep.run(), "precise")
    t2 = os.times()
    cpu_s = (t2.user - t.user) + (t2.system - t.system)
    wall_s = t2.elapsed - t.elapsed
    others_s = (_busy_s() - busy) - cpu_s - (_proc_cpu_s(stub_pid) - stub_cpu)
    ok = [r for r in recs if r.ok]
    lag_ms = np.array([(r.actual_send_s - r.intended_send_s) * 1e3 for r in recs if r.actual_send_s is not None])
    err_ms = np.array([(r.first_token_s - r.actual_send_s) * 1e3 - ttft_ms for r in ok])
    tbt_ms = np.concatenate([np.diff(r.chunk_offsets_s) * 1e3 for r in ok])
    return {"http": http, "requests": len(recs), "ok": len(ok), "load1": load1,
            "others_cpu_pct": 100 * max(others_s, 0.0) / (wall_s * (os.cpu_count() or 1)),
            "ttft_err_p50_ms": float(np.percentile(err_ms, 50)), "ttft_err_p99_ms": float(np.percentile(err_ms, 99)),
            "ttft_err_max_ms": float(err_ms.max()), "lag_p99_ms": float(np.percentile(lag_ms, 99)),
            "tbt_p99_ms": float(np.percentile(tbt_ms, 99)),
            "cpu_s_per_1k_req": cpu_s / max(len(recs), 1) * 1000, "cpu_util": cpu_s / max(rep.stats.duration_s, 1e-9)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3, help="A/B pairs (order alternates)")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of untimed replay per transport first")
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--tpot-ms", type=float, default=5.0)
    ap.add_argument("--input", type=int, default=128)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--transports", default=",".join(HTTP_TRANSPORTS))
    ap.add_argument("--shared-core", action="store_true",
                    help="stub and client on the same core (what stub_fidelity.py gets: the stub inherits affinity)")
    ap.add_argument("--json", default=None, help="also write all runs here")
    ap.add_argument("--quiet-pct", type=float, default=10.0,
                    help="a run is 'quiet' when other processes used less than this %% of the machine during it")
    args = ap.parse_args()
    transports = args.transports.split(",")
    spec = (f"synth:arrivals=poisson,rate={args.rate},duration={{d}},lengths=fixed,input={args.input},"
            f"output={args.output},seed=1")
    workload = load(WorkloadSpec(spec.format(d=args.duration)))
    warm = load(WorkloadSpec(spec.format(d=args.warmup)))
    prompts = TokenIdPrompts(vocab_size=32000, seed=1)
    cores = sorted(os.sched_getaffinity(0))
    if args.shared_core:
        os.sched_setaffinity(0, {cores[0]})
    stub = StubBackend(ttft_s=args.ttft_ms / 1e3, tpot_s=args.tpot_ms / 1e3)  # pins itself to the last core
    stub.start()   # before this process narrows its affinity: the child inherits it
    if len(cores) >= 2:
        os.sched_setaffinity(0, {cores[0]})
    runs = []
    try:
        url, model = stub.endpoint(), stub.discover_model()
        print(f"stub pid {stub.pid} on cpus {sorted(os.sched_getaffinity(stub.pid))}; client cpu {sorted(os.sched_getaffinity(0))}; "
              f"{len(workload)} requests at {args.rate:g} req/s, {args.input} in / {args.output} out; "
              f"load at start {os.getloadavg()}", flush=True)
        for h in transports:
            if args.warmup > 0:
                one_run(url, model, warm, prompts, h, args.ttft_ms, stub.pid)
        for i in range(args.repeats):
            for h in (transports if i % 2 == 0 else transports[::-1]):
                r = one_run(url, model, workload, prompts, h, args.ttft_ms, stub.pid)
                r["repeat"] = i
                runs.append(r)
                print(f"[{i}] {h:8s} ok {r['ok']}/{r['requests']}  TTFT err p50 {r['ttft_err_p50_ms']:.3f} "
                      f"p99 {r['ttft_err_p99_ms']:.3f} ms  lag p99 {r['lag_p99_ms']:.3f} ms  "
                      f"CPU {r['cpu_s_per_1k_req']:.3f} s/1k req ({r['cpu_util'] * 100:.0f}% of a core)  "
                      f"others {r['others_cpu_pct']:.0f}% (load1 {r['load1']:.2f})", flush=True)
    finally:
        stub.stop()
    summary = {}
    keys = ("ttft_err_p50_ms", "ttft_err_p99_ms", "lag_p99_ms", "tbt_p99_ms", "cpu_s_per_1k_req", "others_cpu_pct")
    for label, keep in (("all runs", lambda r: True), (f"quiet runs (others < {args.quiet_pct:g}%)",
                                                      lambda r: r["others_cpu_pct"] < args.quiet_pct)):
        print(f"\nmedians over {label}:")
        for h in transports:
            rs = [r for r in runs if r["http"] == h and keep(r)]
            if not rs:
                print(f"  {h:8s} (none)")
                continue
            s = summary.setdefault(label, {})[h] = {k: statistics.median(r[k] for r in rs) for k in keys}
            print(f"  {h:8s} n={len(rs)}  TTFT err p50 {s['ttft_err_p50_ms']:.3f} ms  p99 {s['ttft_err_p99_ms']:.3f} ms  "
                  f"lag p99 {s['lag_p99_ms']:.3f} ms  TBT p99 {s['tbt_p99_ms']:.3f} ms  "
                  f"CPU {s['cpu_s_per_1k_req']:.3f} s/1k req  (others {s['others_cpu_pct']:.0f}%)")
    if args.json:
        atomic_write_json(args.json, {"args": vars(args), "runs": runs, "summary": summary})
    return 0 if all(r["ok"] == r["requests"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
