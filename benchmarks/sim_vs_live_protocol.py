"""Sim vs live, the full protocol of docs/sim-vs-live.md (issue 14, scope item 3), end to end: profile one instance
and the prompt + token pair, run the baseline and split windows twice (the second runs are the live repeat), profile
both again, then print benchmarks/sim_vs_live.py's errors from the pooled profiles: plain, --request-spread, --idle-wake.

  python benchmarks/sim_vs_live_protocol.py --out DIR [--repeats 4] [--max-requests 191] [--rate-scale 0.28]

Every step starts its own instances, as a user's `splitbench profile` and `splitbench run` do, so the instance start
is part of the error (benchmarks/same_instances.py takes it out). Each step's command and wall time are printed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from same_instances import PROMPT_SIZES, step

SPLIT_PROMPT_SIZES = "32,64,128,256,512,1024,2048,4096"   # the pair's sweep, with batch points 1-8
HERE = Path(__file__).resolve().parent


def profiles(out: Path, tag: str, repeats: int) -> list[tuple[list[str], Path]]:
    """The two profiles of one round: one instance on one core, and the pair with its connector active."""
    common = ["--machine", "cpu-core", "--repeats", str(repeats), "--results", str(out / "profiles")]
    return [(["splitbench", "profile", "--backend", "vllm", "--cores", "1", "--out", str(out / f"base-{tag}.csv"),
              "--prompt-sizes", PROMPT_SIZES, *common], out / f"profile-base-{tag}.log"),
            (["splitbench", "profile", "--backend", "splitwise", "--out", str(out / f"split-{tag}.csv"),
              "--prompt-sizes", SPLIT_PROMPT_SIZES, "--batch-sizes", "1,2,4,8", *common],
             out / f"profile-split-{tag}.log")]


def live_run(out: Path, backend: str, run_id: str, a) -> tuple[list[str], Path]:
    """One live replay of the protocol's window."""
    return (["splitbench", "run", "--backend", backend, "--max-requests", str(a.max_requests), "--rate-scale",
             str(a.rate_scale), "--run-id", run_id, "--results", str(out)], out / f"{run_id}.log")


def compare(out: Path, extra: list[str]) -> int:
    """benchmarks/sim_vs_live.py on the first runs, the second ones as their live repeat; prints its table."""
    pooled = [x for tag in ("a", "b") for x in ("--profile", str(out / f"base-{tag}.csv"),
                                                "--split-profile", str(out / f"split-{tag}.csv"))]
    cmd = [sys.executable, str(HERE / "sim_vs_live.py"), *pooled, str(out / "live-base"), str(out / "live-split"),
           "--live-repeat", str(out / "live-base2"), "--live-repeat", str(out / "live-split2"),
           "--results", str(out / "sim"), *extra]
    print("$ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    print(res.stdout, end="", flush=True)
    if res.returncode:
        print(res.stderr[-2000:], file=sys.stderr)
    return res.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="directory for the profiles, the runs and the simulations")
    ap.add_argument("--repeats", type=int, default=4, help="repeats of every profile point [4]")
    ap.add_argument("--max-requests", type=int, default=191)
    ap.add_argument("--rate-scale", type=float, default=0.28)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    before, after = profiles(a.out, "a", a.repeats), profiles(a.out, "b", a.repeats)
    steps = [before[0], live_run(a.out, "vllm", "live-base", a), before[1],
             live_run(a.out, "splitwise", "live-split", a), live_run(a.out, "vllm", "live-base2", a),
             live_run(a.out, "splitwise", "live-split2", a), *after]
    for cmd, log in steps:
        step(cmd, log)
    return compare(a.out, []) or compare(a.out, ["--request-spread"]) or compare(a.out, ["--idle-wake"])


if __name__ == "__main__":
    raise SystemExit(main())
