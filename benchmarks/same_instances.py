"""Sim vs live on one pair of vLLM instances (docs/sim-vs-live.md, sets 1207g-i), end to end: start two tiny-model
instances pinned to cores 0 and 1 with the arguments `splitbench run --backend vllm` gives its own, profile the
first, replay the live window on both behind splitbench's router, profile the second, then print
benchmarks/sim_vs_live.py's errors for the run from both profiles, without and with --request-spread.

  python benchmarks/same_instances.py --out DIR [--run-id live-base] [--max-requests 191] [--rate-scale 0.28]

Taking the instance start out of the comparison leaves the host's own speed over the run (the instances are the
profiled ones). Each step's command and wall time are printed; DIR keeps the profiles, the run and the simulations.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from neighbour_factor import start_all

from splitbench.servers.launcher import DEFAULT_ENV, TINY_CPU_ARGS, VllmServer, cache_args
from splitbench.servers.ports import free_port
from splitbench.servers.tiny_model import ensure_tiny_model

PROMPT_SIZES = "32,64,128,192,256,384,512,768,1024,1536,2048,3072,4096"   # the protocol's dense batch-1 sweep
HERE = Path(__file__).resolve().parent


def step(cmd: list[str], log: Path) -> None:
    """Run one protocol step, its output into log; exit with its status if it fails."""
    t0 = time.monotonic()
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"  {time.monotonic() - t0:.0f} s, exit {rc} (log: {log})", flush=True)
    if rc:
        raise SystemExit(rc)


def profile(url: str, out: Path, results: Path) -> list[str]:
    """The protocol's profile of one instance: its batch-1 sweep, 4 repeats."""
    return ["splitbench", "profile", "--backend", "openai", "--url", url, "--machine", "cpu-core", "--out", str(out),
            "--prompt-sizes", PROMPT_SIZES, "--repeats", "4", "--results", str(results)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="directory for the profiles, the run and the simulations")
    ap.add_argument("--run-id", default="live-base")
    ap.add_argument("--max-requests", type=int, default=191)
    ap.add_argument("--rate-scale", type=float, default=0.28)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    args = [x for x in TINY_CPU_ARGS if x != "--disable-log-stats"]   # as a launched cluster's (its /metrics)
    servers = [VllmServer(ensure_tiny_model(), port=free_port(), cpu_cores=[c], env=dict(DEFAULT_ENV),
                          extra_args=args + cache_args(args, True)) for c in (0, 1)]
    try:
        start_all(servers)
        step(profile(servers[0].url, a.out / "a.csv", a.out / "profiles"), a.out / "profile-a.log")
        step(["splitbench", "run", "--backend", "vllm", "--url", servers[0].url, "--url", servers[1].url,
              "--max-requests", str(a.max_requests), "--rate-scale", str(a.rate_scale), "--run-id", a.run_id,
              "--results", str(a.out)], a.out / "run.log")
        step(profile(servers[1].url, a.out / "b.csv", a.out / "profiles"), a.out / "profile-b.log")
    finally:
        for s in servers:
            s.stop()
    for extra in ([], ["--request-spread"]):
        cmd = [sys.executable, str(HERE / "sim_vs_live.py"), "--profile", str(a.out / "a.csv"), "--profile",
               str(a.out / "b.csv"), str(a.out / a.run_id), "--results", str(a.out / "sim"), *extra]
        print("$ " + " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True)
        print("\n".join(x for x in out.stdout.splitlines() if x.startswith(("|", a.run_id))), flush=True)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
