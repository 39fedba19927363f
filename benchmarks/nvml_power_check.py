"""One-off check of the real NVML path: PowerSamplerProcess on every GPU through idle -> bf16 matmul load -> idle.

Usage (a host with NVIDIA GPUs, nvidia-ml-py and CUDA torch; no orjson needed):
    python benchmarks/nvml_power_check.py [--out DIR] [--idle-s 3] [--load-s 10] [--interval-s 0.1] [--n 8192]

Timeline: start the sampler on all GPUs, idle --idle-s, square bf16 matmuls on GPU 0 for --load-s, idle --idle-s,
stop. Prints per GPU: name, samples, achieved Hz, energy over the whole run by the total-energy counter vs by
integrating power_w (and their relative difference), mean power in the first idle phase vs in the load phase.
Writes DIR/power_samples.jsonl, power_summary.json and nvml_power_check.json (a temp dir unless --out).

Measured (1x NVIDIA H200, driver 580.159.04, the pynvml of its torch 2.11+cu130 venv, defaults):
    driver 580.159.04, 1 GPU(s), load 6200 matmuls (680 TFLOP/s), samples in /root/out/run
    gpu name                         samples    Hz  counter_J  integr_J  diff%  idle_W  load_W load_cW
      0 NVIDIA H200                      160  10.0       7671      7678   +0.1     116     660     692
    PASS
load_W integrates power_w over the load phase, load_cW is the counter's. On this Hopper GPU power_w is a 1 s moving
average (it ramps 118 -> 703 W over ~1 s after the load starts, and back down after it ends) while the energy
counter steps at once: over the load phase alone the integral is ~5 % low, over the whole run (idle tails
included) they agree within 0.1 %. Hence the counter is preferred wherever a GPU has one. idle_W is with a CUDA
context open (~118 W; ~78 W measured on the same GPU without one). GPUs other than 0 stay at idle.
Exit 0 when every GPU reached >= 9.5 Hz, counter and integral agree within 10 % over the run where a counter
exists, and GPU 0's load power exceeds its idle power by >= 30 %; else 1.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from splitbench.hardware.energy import energy_by_gpu, load_power_samples
from splitbench.hardware.power import PowerSamplerProcess


def _matmul_setup(n: int):
    """CUDA context, operands and one warm-up matmul, before sampling starts (so 'load' is only the matmuls)."""
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("nvml_power_check: needs a CUDA GPU and a CUDA build of torch")
    a = torch.randn(n, n, device="cuda:0", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda:0", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    return torch, a, b


def _load(setup, seconds: float) -> int:
    torch, a, b = setup
    end, iters = time.time() + seconds, 0
    while time.time() < end:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        iters += 20
    return iters


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--idle-s", type=float, default=3.0)
    ap.add_argument("--load-s", type=float, default=10.0)
    ap.add_argument("--interval-s", type=float, default=0.1)
    ap.add_argument("--n", type=int, default=8192, help="matmul size")
    a = ap.parse_args()
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="nvml_power_check_"))
    setup = _matmul_setup(a.n)
    sampler = PowerSamplerProcess(out, interval_s=a.interval_s)
    try:
        sampler.start(timeout_s=30)
    except RuntimeError as e:
        raise SystemExit(str(e)) from None
    try:
        t_start = time.time()
        time.sleep(a.idle_s)
        t_load0 = time.time()
        iters = _load(setup, a.load_s)
        t_load1 = time.time()
        time.sleep(a.idle_s)
        t_end = time.time()
    finally:
        summary = sampler.stop()
    data = load_power_samples(out / "power_samples.jsonl")
    names = {g["index"]: g["name"] for g in data["header"]["gpus"]}
    integ_only = {g: {**s, "energy_j": None} for g, s in data["samples"].items()}
    whole = energy_by_gpu(data, t_start, t_end)
    whole_i = energy_by_gpu(integ_only, t_start, t_end)
    idle = energy_by_gpu(integ_only, t_start, t_load0)
    load = energy_by_gpu(integ_only, t_load0, t_load1)
    load_c = energy_by_gpu(data, t_load0, t_load1)
    tflops = 2 * a.n**3 * iters / (t_load1 - t_load0) / 1e12
    print(f"driver {data['header']['driver']}, {len(names)} GPU(s), load {iters} matmuls ({tflops:.0f} TFLOP/s), "
          f"samples in {out}")
    print(f"{'gpu':>3} {'name':<28} {'samples':>7} {'Hz':>5} {'counter_J':>10} {'integr_J':>9} {'diff%':>6} "
          f"{'idle_W':>7} {'load_W':>7} {'load_cW':>7}")
    ok, report = True, {}
    for g in sorted(whole):
        w, wi = whole[g], whole_i[g]
        counter = w["energy_j"] if w["method"] == "counter" else None
        diff = None if counter is None else 100.0 * (wi["energy_j"] - counter) / counter
        print(f"{g:>3} {names.get(g, '?'):<28} {w['samples']:>7} {w['rate_hz']:>5.1f} "
              f"{'n/a' if counter is None else f'{counter:.0f}':>10} {wi['energy_j']:>9.0f} "
              f"{'n/a' if diff is None else f'{diff:+.1f}':>6} {idle[g]['avg_power_w']:>7.0f} "
              f"{load[g]['avg_power_w']:>7.0f} "
              f"{load_c[g]['avg_power_w'] if load_c[g]['method'] == 'counter' else math.nan:>7.0f}")
        ok &= w["rate_hz"] >= 9.5 and (diff is None or abs(diff) <= 10.0)
        report[g] = {"name": names.get(g), "whole": w, "whole_integrated": wi, "idle": idle[g], "load": load[g],
                     "load_counter": load_c[g], "diff_pct": diff}
    ok &= 0 in load and load[0]["avg_power_w"] >= 1.3 * idle[0]["avg_power_w"]
    (out / "nvml_power_check.json").write_text(json.dumps(
        {"header": data["header"], "sampler_summary": summary, "gpus": report, "matmul_tflops": tflops,
         "phases_unix_s": [t_start, t_load0, t_load1, t_end]}, indent=1))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
