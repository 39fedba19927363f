"""How the simulator's co-located batching model moves the Splitwise paper's iso-power designs (issue 14 item 2,
docs/sim-models.md).

For BLOOM-176B and Llama2-70B on SplitwiseSim's profiles, every configuration of Baseline-A100/H100 and
Splitwise-AA/HH/HA/HHcap within an iso-power budget (default: 40 DGX-H100 = 408 kW; 6 prompt/token splits per design,
then prompt counts +-2/4/6 around each model's best split) gets its highest Poisson rate
meeting all nine Splitwise SLOs (app/design.py max_rate: doubling, then bisection to 3%), with lengths from
azure-conv-2023. The baselines are searched under each batching model of their machines:
  prompt-first  whole prompts as separate iterations first (<= 4 in a row while decodes wait): the old model;
  chunked       vLLM V1: decodes first, FCFS prefill chunks, 2048 tokens per iteration (the default);
  chunked-8192  the same with vLLM's default budget for >= 70 GiB GPUs other than A100 (Baseline-H100 only).
Split designs have only prompt and token machines, which batch the same under every model: they are searched once
(and one configuration is re-probed under prompt-first to show the verdict is identical). The SLO reference is the
lone request on an unloaded DGX-A100, the same for all models.

Run: `python benchmarks/sim_models.py [--processes 2] [--out docs]` (about 3-5 minutes on 2 free cores with the
defaults). Prints one table per model (best configuration of each design and its max rate under each batching
model) and which splits meet the SLOs at a few rates; writes OUT/sim-models.json and OUT/sim-models.png; the LAST
line is one JSON object with every figure. SplitwiseSim's own semantics (--perf-model splitwisesim, branch h/compat)
are not on main yet and not included.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from splitbench.app.design import DesignSpec, configurations, max_rate, probe
from splitbench.hardware.catalog import load_catalog
from splitbench.schema.runmeta import host_info, package_versions

LLMS = ("bloom-176b", "llama2-70b")
DESIGNS = ("baseline-a100", "baseline-h100", "splitwise-aa", "splitwise-hh", "splitwise-ha", "splitwise-hhcap")
# (name, batching, max_num_batched_tokens, designs it is searched for)
MODELS = (("prompt-first", "prompt-first", 2048, ("baseline-a100", "baseline-h100")),
          ("chunked", "chunked", 2048, DESIGNS),
          ("chunked-8192", "chunked", 8192, ("baseline-h100",)))


def _job(args) -> dict:
    spec, llm, model, design, pools = args
    t = time.perf_counter()
    rate, probes, info = max_rate(spec, pools)
    v = (info or {}).get("verdict") or {}
    return {"llm": llm, "model": model, "design": design, "pools": pools, "max_rate_rps": rate, "probes": probes,
            "wall_s": round(time.perf_counter() - t, 2),
            "binding": [c["name"] for c in v.get("checks", []) if c["slowdown"] and c["slowdown"] > 0.9 * c["limit"]]}


def jobs(a) -> list[tuple]:
    cat, out = load_catalog(), []
    for llm in LLMS:
        for model, batching, budget, designs in MODELS:
            spec = DesignSpec(model=llm, budget_machines=a.machines, splits=a.splits, duration_s=a.duration,
                              designs=list(designs), batching=batching, max_num_batched_tokens=budget, seed=a.seed)
            out += [(spec, llm, model, d, pools) for d, pools in configurations(spec, cat)]
    return out


def refine_jobs(a, results: list[dict]) -> list[tuple]:
    """Around each model's best split configuration: prompt counts best +-2, 4, 6 (tokens filling the budget)."""
    cat, out = load_catalog(), []
    budget = cat["dgx-h100"].server_power_w * a.machines
    for llm in LLMS:
        top = max((r for r in results if r["llm"] == llm and r["design"].startswith("splitwise")),
                  key=lambda r: r["max_rate_rps"])
        (pp, pm, p0), (tp, tm, _) = top["pools"]
        spec = DesignSpec(model=llm, duration_s=a.duration, seed=a.seed)
        seen = {tuple(r["pools"][0]) for r in results if r["llm"] == llm and r["design"] == top["design"]}
        for p in (p0 + d for d in (-6, -4, -2, 2, 4, 6)):
            t = int((budget - p * cat[pm].server_power_w) // cat[tm].server_power_w + 1e-9)
            if p >= 1 and t >= 1 and (pp, pm, p) not in seen:
                out.append((spec, llm, "chunked", top["design"], [(pp, pm, p), (tp, tm, t)]))
    return out


def best_of(results: list[dict]) -> dict:
    """(llm, model, design) -> the configuration with the highest max rate."""
    best: dict = {}
    for r in results:
        k = (r["llm"], r["model"], r["design"])
        if k not in best or r["max_rate_rps"] > best[k]["max_rate_rps"]:
            best[k] = r
    return best


def same_verdict_check(a, best: dict) -> dict:
    """Splitwise-HA's best configuration probed at its max rate under both batching models: identical verdicts."""
    r = best[(LLMS[0], "chunked", "splitwise-ha")]
    out = {}
    for b in ("chunked", "prompt-first"):
        spec = DesignSpec(model=LLMS[0], duration_s=a.duration, batching=b, seed=a.seed)
        out[b] = probe(spec, r["pools"], r["max_rate_rps"])[1]["verdict"]
    return {"pools": r["pools"], "rate_rps": r["max_rate_rps"], "identical": out["chunked"] == out["prompt-first"]}


def rate_of(best: dict, llm: str, design: str, model: str) -> float:
    """A design's best max rate under a batching model (split designs: their one model-independent search)."""
    return best.get((llm, model, design), best.get((llm, "chunked", design)))["max_rate_rps"]


def print_tables(results: list[dict], best: dict) -> dict:
    """The per-model tables; returns {llm: {rates: ..., passing: {rate: [configs]}}} for the JSON."""
    names = [m for m, *_ in MODELS]
    out = {}
    for llm in LLMS:
        print(f"\n{llm}: highest rate meeting all nine SLOs (req/s), best configuration per design")
        print(f"{'design':<17}{'configuration':<26}" + "".join(f"{m:>14}" for m in names))
        for d in DESIGNS:
            r = best[(llm, "chunked", d)]
            cfgs = " + ".join(f"{c}x{m.removeprefix('dgx-')}" for _, m, c in r["pools"])
            cells = [best.get((llm, m, d)) for m in names]
            print(f"{d:<17}{cfgs:<26}" + "".join(f"{c['max_rate_rps']:>14.2f}" if c else f"{'=':>14}"
                                                  for c in cells))
        rates = sorted({math.floor(rate_of(best, llm, d, m) * 10) / 10 for d in ("baseline-a100", "baseline-h100")
                        for m in names if (llm, m, d) in best})
        passing = {}
        for rate in rates:
            ok = [r for r in results if r["llm"] == llm and r["max_rate_rps"] >= rate]
            base = sorted(f"{r['design']}[{r['model']}]" for r in ok if r["design"].startswith("baseline"))
            splits = {d: ["+".join(str(c) for _, _, c in r["pools"])
                          for r in sorted(ok, key=lambda r: r["pools"][0][2]) if r["design"] == d]
                      for d in DESIGNS[2:]}
            passing[str(rate)] = {"baselines": base, "splits": splits}
            print(f"  at {rate:6.1f} req/s pass: " + "; ".join(f"{d.removeprefix('splitwise-')} "
                                                                 f"{', '.join(v) or '-'}" for d, v in splits.items())
                  + f" | {', '.join(base) or 'no baseline'}")
        out[llm] = {"passing": passing}
    return out


def plot(results: list[dict], best: dict, path: str, spec_line: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cat = load_catalog()
    fig, axes = plt.subplots(len(LLMS), 2, figsize=(13, 5.0 * len(LLMS)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.5, 1]})
    colors = {"splitwise-aa": "#4c72b0", "splitwise-hh": "#dd8452", "splitwise-ha": "#55a868",
              "splitwise-hhcap": "#c44e52", "baseline-a100": "#8172b3", "baseline-h100": "#937860"}
    styles = {"prompt-first": ":", "chunked": "-", "chunked-8192": "--"}
    for row, llm in zip(axes, LLMS):
        ax = row[0]
        for d in DESIGNS[2:]:
            pts = sorted((p[0][2] * cat[p[0][1]].server_power_w / sum(c * cat[m].server_power_w for _, m, c in p),
                          r["max_rate_rps"]) for r in results if r["llm"] == llm and r["design"] == d
                         for p in [r["pools"]])
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color=colors[d], label=d, ms=4)
        for d in DESIGNS[:2]:
            for m, ls in styles.items():
                if (llm, m, d) in best:
                    ax.axhline(best[(llm, m, d)]["max_rate_rps"], color=colors[d], ls=ls, lw=1.4,
                               label=f"{d} [{m}]")
        ax.set_xlabel("prompt machines' share of the power budget")
        ax.set_ylabel("max rate meeting the 9 SLOs (req/s)")
        ax.set_title(f"{llm}: every iso-power split (points) vs the baselines (lines)")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.14))
        ax = row[1]
        names = [m for m, *_ in MODELS]
        for j, m in enumerate(names):
            vals = [rate_of(best, llm, d, m) for d in DESIGNS]   # not searched: the same as chunked
            ax.bar([i + (j - 1) * 0.27 for i in range(len(DESIGNS))], vals, 0.27, label=m,
                   color=["#bbbbbb", "#4c72b0", "#88a8d8"][j])
        ax.set_xticks(range(len(DESIGNS)), [d.replace("splitwise-", "sw-").replace("baseline-", "base-")
                                            for d in DESIGNS], rotation=20)
        ax.set_title(f"{llm}: best configuration per design")
        ax.legend(title="baselines' batching", fontsize=8, title_fontsize=8, ncol=3, loc="upper center",
                  bbox_to_anchor=(0.5, -0.14))
    fig.suptitle(spec_line, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machines", type=int, default=40, help="iso-power budget in DGX-H100s [40 = 408 kW]")
    ap.add_argument("--splits", type=int, default=6, help="prompt/token splits per Splitwise design [6]")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of Poisson arrivals per probe [60]")
    ap.add_argument("--processes", type=int, default=min(2, len(os.sched_getaffinity(0))))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs", help="directory for sim-models.json and sim-models.png [docs]")
    ap.add_argument("--from-json", default=None, help="re-print and re-plot an earlier sim-models.json (no runs)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    if a.from_json:
        old = json.loads(Path(a.from_json).read_text())
        results, check = old["results"], old["split_same_verdict"]
        a = argparse.Namespace(**{**old["args"], "out": a.out, "from_json": a.from_json})
    else:
        todo = jobs(a)
        print(f"{len(todo)} max-rate searches on {a.processes} process(es)", flush=True)
        with ProcessPoolExecutor(a.processes) as ex:
            results = list(ex.map(_job, todo))
            more = refine_jobs(a, results)
            print(f"{len(more)} more around the best splits", flush=True)
            results += list(ex.map(_job, more))
    best = best_of(results)
    if not a.from_json:
        check = same_verdict_check(a, best)
    tables = print_tables(results, best)
    print(f"\nsplit designs under both batching models: {check['pools']} at {check['rate_rps']:.2f} req/s -> "
          f"verdicts {'identical' if check['identical'] else 'DIFFERENT'}")
    spec_line = (f"iso-power {a.machines} x DGX-H100, azure-conv-2023 lengths, Poisson {a.duration:g} s per probe, "
                 f"SplitwiseSim profiles; SLO reference: unloaded DGX-A100")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    plot(results, best, str(Path(a.out) / "sim-models.png"), spec_line)
    out = {"benchmark": "sim_models", "args": vars(a), "results": results, "tables": tables,
           "split_same_verdict": check, "wall_s": round(time.perf_counter() - t0, 1),
           "host": {**host_info(), "loadavg_1m": os.getloadavg()[0]},
           "versions": package_versions(("splitbench", "numpy")), "unix_s": round(time.time(), 1)}
    if a.from_json:   # the measurement's own time, host and versions
        out.update({k: old[k] for k in ("wall_s", "host", "versions", "unix_s")}, args=old["args"])
    (Path(a.out) / "sim-models.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"written {Path(a.out) / 'sim-models.png'}, {Path(a.out) / 'sim-models.json'} "
          f"({out['wall_s']:.0f} s)")
    print(json.dumps({k: out[k] for k in ("benchmark", "wall_s", "split_same_verdict")} |
                     {"best": {f"{k[0]}/{k[1]}/{k[2]}": v["max_rate_rps"] for k, v in best.items()}},
                     separators=(",", ":")))
    return 0 if check["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
