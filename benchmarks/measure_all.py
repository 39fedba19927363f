"""Re-measure every benchmark the README names and write their output, with the host they ran on, to
docs/benchmarks.md: the README quotes targets only, the figures live in that generated file.

Usage: python benchmarks/measure_all.py [--out docs/benchmarks.md] [--only NAME,...] [--quick]
Each benchmark runs as its own process (`python benchmarks/X.py ...`); its exit code (0 = target met) and the
last lines of its output go into the file verbatim. Run it on a quiet host: the figures are this host's.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (command after `python`, target as the README states it, arguments of a --quick run)
BENCHMARKS = {
    "stub_fidelity": (["benchmarks/stub_fidelity.py"], "lag p99 <= 2 ms, TTFT p99 within 2 ms at 200 req/s",
                      ["--duration", "10"]),
    "client_transport": (["benchmarks/client_transport.py"], "lean transport: less client CPU per request than "
                         "aiohttp, TTFT error within 2 ms", ["--duration", "4", "--repeats", "1"]),
    "router_overhead": (["benchmarks/router_overhead.py"], "<= 1 ms TTFT added at p99 by the router",
                        ["--duration", "5"]),
    "stub_pacing": (["benchmarks/stub_pacing.py"], "stub chunk pacing within its stated precision", []),
    "sim_speed": (["benchmarks/sim_speed.py"], "1 h azure-conv-2023 on 70 machines <= 5 s; 150,914 Poisson "
                  "requests on 250 machines <= 30 s (one core)", []),
    "workload_speed": (["benchmarks/workload_speed.py"], "trace load and prompt-body build times", []),
    "client_ceiling": (["benchmarks/client_ceiling.py"], "splitbench >= 1,500 req/s on one core; TTFT p99 error "
                       "<= 2 ms at 500 req/s", ["--duration", "4", "--skip-vllm"]),
}
TAIL_LINES = 25


def host_line() -> str:
    model = ""
    try:
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()}: {os.cpu_count()} cores, {model or platform.processor()}, Python "
            f"{platform.python_version()}, load average {load:.1f} at start")


def run_one(name: str, quick: bool) -> str:
    cmd, target, quick_args = BENCHMARKS[name]
    args = [sys.executable, *cmd, *(quick_args if quick else [])]
    if name == "sim_speed" and sys.platform == "linux":
        args = ["taskset", "-c", "0", *args]
    t0 = time.monotonic()
    p = subprocess.run(args, cwd=HERE.parent, capture_output=True, text=True, check=False)
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-TAIL_LINES:])
    shown = " ".join(a if a != sys.executable else "python" for a in args)
    verdict = "target met" if p.returncode == 0 else f"exit {p.returncode}"
    return (f"## {name}\n\nTarget: {target}.\n\n`{shown}` — {verdict}, {time.monotonic() - t0:.0f} s\n\n"
            f"```\n{tail}\n```\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    ap.add_argument("--only", default=",".join(BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    a = ap.parse_args()
    names = [n for n in a.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    head = (f"# Benchmark figures\n\nWritten by `python benchmarks/measure_all.py{' --quick' if a.quick else ''}` "
            f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; host {host_line()}.\n"
            "Every figure below is this host's; re-run the script to measure yours.\n\n")
    sections = []
    for n in names:
        print(f"running {n} ...", file=sys.stderr, flush=True)
        sections.append(run_one(n, a.quick))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(head + "\n".join(sections))
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
