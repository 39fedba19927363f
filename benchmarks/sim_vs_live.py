"""Simulator vs reality (issue 5): simulate the very trace window of live runs and report the simulator's error on
TTFT, TBT and E2E at p50 and p99.

Steps (docs/sim-vs-live.md has the full protocol: denser prompt sweeps, and each profile measured again after the
live runs, then given twice to be pooled, because a shared VM's speed drifts):
  splitbench profile --backend vllm --cores 1 --machine cpu-core --out tiny.csv   # one instance on one core
  splitbench run --backend vllm --run-id live-base            # the embedded default window, co-located baseline
  splitbench profile --backend splitwise --machine cpu-core --out split.csv           # the pair, connector active
  splitbench run --backend splitwise --run-id live-split      # the same window on a prompt + token pair
  python benchmarks/sim_vs_live.py --profile tiny.csv --split-profile split.csv results/live-base results/live-split
No per-run calibration: a baseline run is simulated from the one-instance profile, a split run from the pair's
profile (its prompt_time measured on the producer side with the transfer, token_time on the consumer side). Each
profile's step spread (X.spread.json beside X.csv) is drawn for every iteration (decode and, where the file has
one, prefill), and the prompt machine chunks prompts as a vLLM V1 instance does (--no-step-spread, --whole-prompts
leave these out).
--cold-prefills: a prefill of a token count new to its machine takes the profile's cold_prefill_factor (written
into X.spread.json by `splitbench profile`: a prompt length's first prefill over its repeats) x its time.
--request-spread: each machine's decode iterations take a factor drawn from X.spread.json's request quantiles (a
batch-1 profile request's mean gap over the fit: a shared host runs whole requests slower or faster), a new draw
once one has held request_spread_s (the profile requests' median decode time).
--idle-wake: a prefill on a machine that idled for g s takes X.spread.json's idle_wake extra for g (the profile's lone
prefills after 0.5-4 s idle over the same length at once: a shared VM's first work after idling runs cold).
--neighbour-busy-factor F.json (benchmarks/neighbour_factor.py, measured once on the host, not from the live runs)
slows a decode-only iteration while another instance of the host is busy: the instances share one VM's caches and
memory.
On a GPU: --machine TYPE (the live runs' run.json hardware.machine) and --split-profile P.csv, a profile of the
prompt + token pair measured with the connector active (`splitbench profile --backend splitwise`), for split runs.

Each live run's window (trace, start, duration, rate scale, clipping to max_model_len) and cluster (instances per
pool, one core each = machine type cpu-core, the router's policy) are read from its run.json; vLLM's CPU scheduler
limits are the simulator's (2048 batched prompt tokens, 128 sequences), and as in vLLM's P/D the token instance
streams a split request's first token (first_token="decode"). The KV link of a split run is calibrated
from its own scraped NIXL counters (bytes / transfer time), since the simulator has no model of NIXL on CPU.
Error = (sim - live) / live. Simulated run directories are written beside (compare them with `splitbench compare`).
`--live-repeat DIR` (once per live run, in order) adds the same error between two live runs of one command: what
the live measurement itself reproduces to on this host, the floor under any simulator's error.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from splitbench.app.simrun import SimOptions, simulate_run
from splitbench.metrics.cache import cache_section
from splitbench.metrics.latency import metric_values, stat_of
from splitbench.schema import records as R
from splitbench.schema.runmeta import read_run_meta
from splitbench.sim.profiles import profile_hardware_name
from splitbench.sim.spread import spread_path

METRICS = (("ttft", "TTFT"), ("tbt", "TBT"), ("e2e", "E2E"))


def server_scales(run_dir: Path, recs, pm) -> dict[str, tuple[float, float]]:
    """Per pool: (live prefill time / profile's, live inter-token latency / profile's), from the instances' own
    scraped /metrics histograms against the profile's batch-1 predictions for the same requests. A diagnostic:
    it says how much slower a role's steps ran live than when profiled alone (contention, KV connector)."""
    meta = read_run_meta(run_dir)
    summ = json.loads((run_dir / "metrics" / "summary.json").read_text())
    ok = [r for r in recs if r.ok]
    pred_prefill = sum(pm.lone_prompt_s(r.planned_input_tokens) for r in ok) / len(ok)
    pred_itl = (sum(pm.token_time_s(1, r.planned_input_tokens + r.planned_output_tokens // 2)
                    * (r.planned_output_tokens - 1) for r in ok) / max(1, sum(r.planned_output_tokens - 1 for r in ok)))
    out = {}
    for inst in meta["backend"]["instances"]:
        h = (summ.get(inst["id"]) or {}).get("histograms") or {}
        pre = (h.get("vllm:request_prefill_time_seconds") or {}).get("mean")
        itl = (h.get("vllm:inter_token_latency_seconds") or {}).get("mean")
        ps, ts = out.get(inst["role"], (None, None))
        out[inst["role"]] = (pre / pred_prefill if pre and inst["role"] != "token" else ps,
                             itl / pred_itl if itl and inst["role"] != "prompt" else ts)
    return out


def nixl_link_gbps(run_dir: Path, kv_bytes_per_token: float, input_tokens: int) -> float | None:
    """Effective KV link speed of a live split run: the token instances' NIXL bytes / transfer seconds, expressed
    for the simulator's KV size (its bytes per token may differ from vLLM's cache dtype)."""
    path = run_dir / "metrics" / "summary.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    secs = sum((v.get("nixl") or {}).get("vllm:nixl_xfer_time_seconds_sum", 0.0) for v in m.values()
               if isinstance(v, dict))
    if secs <= 0:
        return None
    return kv_bytes_per_token * input_tokens / secs * 8 / 1e9


def replayed_requests(meta: dict) -> int | None:
    """How many of the window's requests the live run replayed: --max-requests, or the sizing's cut (a slow cluster
    replays the window's first requests), else the whole window."""
    return meta["options"].get("max_requests") or (meta.get("sizing") or {}).get("max_requests")


def applied_rate_scale(meta: dict) -> float:
    """The rate scale the live run replayed at: the workload's applied transform (a sized run's options say
    "auto"; the sizing chose the number)."""
    applied = (meta.get("workload") or {}).get("transforms", {}).get("rate_scale")
    return float(applied if applied is not None else meta["options"]["rate_scale"])


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def pooled_profile(paths: list[str], out_dir: Path, name: str) -> str | None:
    """One profile of several (`--profile A --profile B`: measured before and after the live runs, so the host's
    drift between them is averaged): their rows together (the fit takes medians per point over all of them), and
    beside it the mean of their step spreads' quantile tables, cold-prefill factors and idle-wake extras, where each
    has one."""
    if not paths:
        return None
    if len(paths) == 1:
        return paths[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [Path(p).read_text().splitlines() for p in paths]
    csv = out_dir / f"{name}.csv"
    csv.write_text("\n".join([lines[0][0]] + [row for rows in lines for row in rows[1:] if row.strip()]) + "\n")
    spreads = [json.loads(spread_path(p).read_text()) for p in paths if spread_path(p).is_file()]
    if len(spreads) == len(paths) and len({len(sp["quantiles"]) for sp in spreads}) == 1:
        mean = lambda key: [sum(v) / len(v) for v in zip(*(sp[key] for sp in spreads))]  # noqa: E731
        doc = {"what": spreads[0].get("what"), "source": "mean of the quantiles of "
               + ", ".join(str(spread_path(p)) for p in paths), "quantiles": mean("quantiles")}
        if all("prefill_quantiles" in sp for sp in spreads):
            doc["prefill_quantiles"] = mean("prefill_quantiles")
        for key in ("cold_prefill_factor", "request_spread_s"):
            if all(key in sp for sp in spreads):
                doc[key] = sum(sp[key] for sp in spreads) / len(spreads)
        if all("request_quantiles" in sp for sp in spreads):
            doc["request_quantiles"] = mean("request_quantiles")
        if len({tuple(g for g, _ in sp.get("idle_wake") or ()) for sp in spreads}) == 1 and "idle_wake" in spreads[0]:
            doc["idle_wake"] = [[g, sum(sp["idle_wake"][i][1] for sp in spreads) / len(spreads)]
                                for i, (g, _) in enumerate(spreads[0]["idle_wake"])]   # the same gaps in each
        spread_path(csv).write_text(json.dumps(doc))
    else:
        spread_path(csv).unlink(missing_ok=True)
    return str(csv)


def neighbour_factor(spec: str) -> float:
    """--neighbour-busy-factor: a number, or the JSON file benchmarks/neighbour_factor.py wrote."""
    try:
        return float(spec)
    except ValueError:
        return float(json.loads(Path(spec).read_text())["neighbour_busy_factor"])


def step_spread(a, profile: str) -> str | None:
    """The decode step spread that `splitbench profile` wrote beside this profile (X.spread.json), unless
    --no-step-spread."""
    path = spread_path(profile)
    return str(path) if path.is_file() and not a.no_step_spread else None


def variants(a, live: Path, counts: dict, model_dir: str, live_recs) -> list[tuple]:
    """(name, cluster, profile, hardware file, first token, KV link Gb/s, step spread) of each simulation of one
    live run."""
    from splitbench.sim.perfmodel import get_perf_model, load_profiles
    from splitbench.sim.shapes import shape_from_hf_config
    cluster = ",".join(f"{pool}={a.machine}:{n}" for pool, n in counts.items())
    if "prompt" in counts and a.split_profile:
        # measured on the split pair with the connector active: its prompt_time already holds the KV transfer and
        # the first token, so the prompt machine streams the first token and the transfer adds nothing
        return [("split-profile", cluster, a.split_profile, None, "prefill", 1e6, step_spread(a, a.split_profile))]
    shape = shape_from_hf_config(model_dir)
    n_in = sum(r.actual_input_tokens or r.planned_input_tokens for r in live_recs if r.ok)
    link = nixl_link_gbps(live, shape.kv_bytes_per_token, n_in) if "prompt" in counts else None
    phw = profile_hardware_name(a.machine)   # the profile's `hardware` (h200-141gb for 1x-h200; cpu-core itself)
    pm = get_perf_model(load_profiles(a.profile), Path(model_dir).name, phw, 1)
    scales = server_scales(live, live_recs, pm)
    print(f"{live.name}: live step time / profile's batch-1 prediction per pool (prefill, decode), a diagnostic "
          "(no calibration is applied): " + ", ".join(f"{p} ({x or 1:.2f}, {y or 1:.2f})" for p, (x, y) in scales.items())
          + (f"; KV link {link:.2f} Gb/s from the run's NIXL counters" if link else ""))
    return [("profile", cluster, a.profile, None, "decode", link, step_spread(a, a.profile))]


def cached_share(recs) -> float:
    """The share of ok requests' prompt tokens that a prefix cache served (the summary's cache.cached_fraction)."""
    return (cache_section(recs) or {}).get("cached_fraction") or 0.0


def simulate_live(a, live: Path) -> list[tuple]:
    """Error rows (run, variant, metric, live s, sim s, error) of every simulation of one live run."""
    meta = read_run_meta(live)
    o, b = meta["options"], meta["backend"]
    counts: dict[str, int] = {}
    for inst in b["instances"]:
        counts[inst["role"]] = counts.get(inst["role"], 0) + 1
    live_recs = R.read_records(live)
    model_dir = meta["model"].get("root")
    rows = []
    for variant, spec, prof, hw, first, link, spread in variants(a, live, counts, model_dir, live_recs):
        own = Path(a.results) / f"sim-{variant}-of-{live.name}"
        if (own / "run.json").is_file() and read_run_meta(own).get("simulated"):
            shutil.rmtree(own)   # this script's own simulation of the same live run, from an earlier call
        sim_dir, _ = simulate_run(SimOptions(
            cluster=spec, trace=o["trace"], trace_dir=o.get("trace_dir"), start_s=o["start_s"],
            duration_s=o["duration_s"], rate_scale=applied_rate_scale(meta), max_requests=replayed_requests(meta),
            max_context_tokens=meta["model"].get("max_model_len"), model=Path(model_dir).name,
            model_dir=model_dir, profile=prof, hardware_file=hw, tensor_parallel=1,
            policy=b.get("policy") or "jsq", max_prompt_batch_tokens=2048, max_decode_batch=a.max_decode_batch,
            first_token=first, kv_transfer="serialized", link_gbps=link, reference_machine=None, step_spread=spread,
            prompt_chunked_prefill=not a.whole_prompts, neighbour_busy_factor=a.neighbour_busy_factor,
            cold_prefills=a.cold_prefills and spread is not None,
            request_spread=a.request_spread and spread is not None, idle_wake=a.idle_wake and spread is not None,
            results_dir=a.results, run_id=f"sim-{variant}-of-{live.name}"))
        sim_recs = R.read_records(sim_dir)
        live_cached, sim_cached = cached_share(live_recs), cached_share(sim_recs)
        why = (" (live more: an earlier run or profile of the same server sent the same prompts)"
               if live_cached > sim_cached + 0.01 else "")
        print(f"{live.name} [{variant}]: cluster {spec}, {len(live_recs)} live / {len(sim_recs)} simulated "
              f"requests; decode step spread: {spread or 'none'}; simulated run: {sim_dir}; prompt tokens served "
              f"from a prefix cache: {live_cached:.1%} live, {sim_cached:.1%} simulated{why}")
        for key, label in METRICS:
            lv, sv = metric_values(live_recs, key), metric_values(sim_recs, key)
            for st in ("p50", "p99"):
                x, y = stat_of(lv, st), stat_of(sv, st)
                rows.append((live.name, variant, f"{label} {st}", x, y, (y - x) / x if x else None))
    return rows


def repeat_rows(live: Path, repeat: Path) -> list[tuple]:
    """The noise floor: a second live run of the same command, as if it were the simulation ("live repeat")."""
    a, b = R.read_records(live), R.read_records(repeat)
    rows = []
    for key, label in METRICS:
        for st in ("p50", "p99"):
            x, y = stat_of(metric_values(a, key), st), stat_of(metric_values(b, key), st)
            rows.append((live.name, f"live repeat {repeat.parent.name}/{repeat.name}", f"{label} {st}", x, y,
                         (y - x) / x if x else None))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="live run directories")
    ap.add_argument("--profile", required=True, action="append", help="profile CSV of one instance (splitbench "
                    "profile); repeat it to pool profiles measured before and after the live runs")
    ap.add_argument("--split-profile", action="append", help="profile CSV of a prompt + token pair measured with the "
                    "connector active (splitbench profile --backend splitwise), used for split runs (repeatable)")
    ap.add_argument("--machine", default="cpu-core", help="machine type each live instance is [cpu-core]")
    ap.add_argument("--max-decode-batch", type=int, default=128, help="vLLM's max_num_seqs [128, the CPU build's]")
    ap.add_argument("--results", default="results", help="where the simulated run directories go")
    ap.add_argument("--whole-prompts", action="store_true", help="prompt machines run each prompt as one "
                    "iteration (Splitwise's), not in vLLM's 2048-token chunks")
    ap.add_argument("--no-step-spread", action="store_true", help="simulate decode iterations at exactly the "
                    "profile's times, ignoring the X.spread.json beside each profile")
    ap.add_argument("--cold-prefills", action="store_true", help="prefills of a token count new to a machine take "
                    "the step spread's cold_prefill_factor x their time (`simulate --cold-prefills`)")
    ap.add_argument("--request-spread", action="store_true", help="each machine's decode x a draw from the step "
                    "spread's request quantiles, held request_spread_s (`simulate --request-spread`)")
    ap.add_argument("--idle-wake", action="store_true", help="a prefill on a machine that idled takes the step "
                    "spread's idle_wake extra for its idle time (`simulate --idle-wake`)")
    ap.add_argument("--neighbour-busy-factor", default="1", metavar="X|FILE",
                    help="decode-only iterations x X while another instance of the host is busy: a number, or the "
                         "JSON of benchmarks/neighbour_factor.py measured on this host [1: none]")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--live-repeat", action="append", default=[], type=Path, metavar="DIR",
                    help="a repeat of the k-th live run (same command, another time): its difference from that run "
                         "is printed as a 'live repeat' row, the floor under any simulator error (repeatable)")
    a = ap.parse_args()
    a.neighbour_busy_factor = neighbour_factor(a.neighbour_busy_factor)
    a.profile = pooled_profile(a.profile, Path(a.results), "pooled-profile")
    a.split_profile = pooled_profile(a.split_profile or [], Path(a.results), "pooled-split-profile")
    rows = [row for live in a.runs for row in simulate_live(a, live)]
    rows += [row for live, rep in zip(a.runs, a.live_repeat) for row in repeat_rows(live, rep)]
    print("\n| run | simulated with | metric | live (ms) | sim (ms) | error |\n|---|---|---|---:|---:|---:|")
    for run, variant, m, x, y, e in rows:
        print(f"| {run} | {variant} | {m} | {_ms(x)} | {_ms(y)} | {'-' if e is None else f'{e:+.0%}'} |")
    if a.json:
        Path(a.json).write_text(json.dumps([dict(zip(("run", "variant", "metric", "live_s", "sim_s", "error"), r))
                                            for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
