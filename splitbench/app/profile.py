"""`splitbench profile`: measure a real backend over SplitwiseSim's grid (b requests sent together per point) into
a profile CSV of SplitwiseSim's format, which the simulator reads like the published ones."""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Callable

import numpy as np

from splitbench.app.options import RunOptions
from splitbench.app.session import RunSession
from splitbench.errors import InputError
from splitbench.hardware.catalog import get_machine, load_catalog
from splitbench.hardware.detect import host_machine
from splitbench.hardware.power import detect_gpus
from splitbench.metrics.latency import coalesced, e2e_s, first_chunk_tokens, mean_tbt_s, output_tokens, ttft_s
from splitbench.schema.files import atomic_write_bytes, atomic_write_json
from splitbench.schema.runmeta import host_info, package_versions
from splitbench.servers import scrape
from splitbench.sim.profiles import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_OUTPUT_SIZES,
    DEFAULT_PROMPT_SIZES,
    profile_csv_bytes,
    profile_grid,
    profile_hardware_name,
)
from splitbench.sim.perfmodel import VLLM_CPU_CHUNK_TOKENS, PerfModel
from splitbench.sim.spread import (measure_cold_prefill, measure_idle_wake, measure_prefill_spread,
                                   measure_request_spread, measure_spread, spread_path)
from splitbench.workload.types import Workload

POINT_ATTEMPTS = 3   # a point whose tokens the client saw coalesced is measured again, at most this often
MIN_TOGETHER_ITERS = 8   # a batch point's decode is timed over at least this many iterations with all b decoding
SPREAD_SUMMARY = ("path", "requests", "gaps", "p50", "p90", "p99", "prefills", "prefill_p50",   # profile.json's
                  "prefill_p90", "cold_prefill_factor", "request_mean", "request_p90", "request_spread_s", "idle_wake")
SPREAD_MARGIN = 1.5       # tokens_to_decode_together: the first-token spread's iterations, half again
COLD_PAIRS = 12           # (new prompt length, the same again) prefill pairs that measure cold_prefill_factor
COLD_TOKENS = 8           # output tokens of each of their requests
IDLE_WAKE_S = (0.5, 1.0, 2.0, 4.0)   # idle gaps before a lone prefill, then the same length at once (idle_wake)
WAKE_ROUNDS = 2           # each gap this often
WAKE_PROMPT = 512         # their prompt length: the grid's nearest (512 is a warm-up point)


def fresh_prompt_seed() -> int:
    """A new prompt seed for each profile: its prompts are then none of a run's (seed 0 unless --seed) nor an earlier
    profile's, which a server's prefix cache would serve in part (a run after a profile of its server found 29% of
    its prompt tokens cached: docs/sim-vs-live.md). The seed is kept in the profile run's run.json."""
    return secrets.randbelow(2 ** 31 - 1) + 1


def _host_hardware(machine: str | None, hardware_file: str | None) -> str:
    """Profile hardware name of this host: --machine, else the detected GPUs' DGX type, else cpu-host."""
    catalog = load_catalog(hardware_file)
    if machine is None:
        gpus = detect_gpus()
        host = host_machine(gpus, catalog)
        machine = host.machine if host else ("cpu-host" if not gpus else None)
        if machine is None:
            raise InputError(f"cannot tell the machine type of this host's GPUs: give --machine "
                             f"(known: {', '.join(sorted(catalog))})")
    return profile_hardware_name(get_machine(machine, catalog))


def together_step_s(records) -> tuple[float | None, float]:
    """The decode iteration time while all the point's requests decode together, and how many iterations that
    window holds: from the last first token to the first last token, over the tokens each request got in it (one
    per iteration). A P/D pair prefills a batch one prompt after another, so its requests first decode alone."""
    firsts = [r.actual_send_s + r.chunk_offsets_s[0] for r in records]
    w0, w1 = max(firsts), min(r.actual_send_s + r.chunk_offsets_s[-1] for r in records)
    tokens = sum(k for r in records for o, k in zip(r.chunk_offsets_s, r.chunk_tokens)
                 if w0 < r.actual_send_s + o <= w1)
    iters = tokens / len(records)
    return ((w1 - w0) / iters if iters > 0 else None), iters


def tokens_to_decode_together(records, t: int) -> int:
    """Output tokens a point needs so that its requests decode together for >= MIN_TOGETHER_ITERS iterations: t
    plus the spread of their first tokens over the fastest mean gap (an upper bound on the iterations it spans), half
    again as margin: the prompt and token instances run on cores whose speed drifts apart between two measurements."""
    firsts = [r.actual_send_s + r.chunk_offsets_s[0] for r in records]
    gaps_s = [g for g in (mean_tbt_s(r) for r in records) if g]
    if not gaps_s:
        return 2 * t + MIN_TOGETHER_ITERS
    return t + int(np.ceil(SPREAD_MARGIN * (max(firsts) - min(firsts)) / min(gaps_s))) + MIN_TOGETHER_ITERS


def point_row(records, model: str, hardware: str, p: int, b: int, t: int, tp: int = 1) -> dict:
    """One CSV row from the records of b simultaneous requests (ms): prompt_time = the LAST first token of the batch
    (when the whole batch is prefilled, what SplitwiseSim's prompt_time means and the simulator uses as one prompt
    iteration for b x p tokens), token_time = the iteration time while all b decode together (together_step_s;
    with fewer than MIN_TOGETHER_ITERS such iterations the mean of the requests' mean TBT), e2e_time = mean E2E."""
    bad = [r for r in records if not r.ok]
    if bad or len(records) != b:
        why = bad[0].error or bad[0].status if bad else f"{len(records)} records"
        raise InputError(f"profile point prompt {p} batch {b} tokens {t}: {len(bad)} of {b} requests failed ({why})")
    short = [output_tokens(r) for r in records if output_tokens(r) != t]
    if short:
        raise InputError(f"profile point prompt {p} batch {b} tokens {t}: the backend returned {short[0]} "
                         f"tokens instead of {t} (it must honour min_tokens/ignore_eos)")
    mean = lambda f: float(np.mean([f(r) for r in records])) * 1e3  # noqa: E731
    step_s, iters = together_step_s(records)
    return {"model": model, "hardware": hardware, "prompt_size": p, "batch_size": b, "token_size": t,
            "peak_power": 0.0, "average_power": 0.0, "prompt_time": float(max(ttft_s(r) for r in records)) * 1e3,
            "token_time": step_s * 1e3 if step_s and iters >= MIN_TOGETHER_ITERS else mean(mean_tbt_s),
            "e2e_time": mean(e2e_s), "tensor_parallel": tp}


def server_row(row: dict, records, server: dict) -> dict:
    """A point whose first tokens the client saw coalesced: token_time is vLLM's mean inter-token latency, and
    prompt_time the client's last first token, each request's taken back by the tokens that arrived with its first
    ((k - 1) x that latency). vLLM's mean request_prefill_time is not used: it leaves out the queue, so a batch's
    requests prefilled one after another each show one prompt's time, and on a P/D pair it averages the prompt
    instance's prefills with the token instance's KV loads."""
    itl_s = server["token_time"] / 1e3
    first_s = max(ttft_s(r) - (first_chunk_tokens(r) - 1) * itl_s for r in records)
    return {**row, "token_time": server["token_time"], "prompt_time": float(first_s) * 1e3}


def _measure_point(session: RunSession, point: tuple, index: int, model: str, hardware: str,
                   tp: int) -> tuple[dict, int, dict | None, list]:
    """One grid point, up to POINT_ATTEMPTS times while the client sees first tokens coalesced; if every attempt
    was, its token time comes from the server's /metrics (noted, server_row), or it fails with one line saying why."""
    k, p, b, t = point
    urls = session.metrics_urls()
    for attempt in range(1, POINT_ATTEMPTS + 1):
        pdir = session.run_dir / "points" / f"p{p}-b{b}-t{t}-r{k}" / f"a{attempt}"
        pdir.mkdir(parents=True)
        before = scrape.snapshots(urls)
        recs = session.replay_into(_point_workload(p, b, t, index, k), pdir, max_inflight=b, timeout_s=300.0,
                                   start_delay_s=0.05)
        index += b
        row = point_row(recs, model, hardware, p, b, t, tp)
        if not coalesced(recs):
            return row, index, None, recs
    server = scrape.server_times_ms(list(zip(before, scrape.snapshots(urls))))
    why = (f"profile point prompt {p} batch {b} tokens {t}: the client saw first tokens arrive with later ones in "
           f"all {POINT_ATTEMPTS} attempts (this host is too busy to time each token)")
    if server is None:
        raise InputError(why + "; the server has no vLLM /metrics to fall back on: rerun on a quieter host")
    note = {"point": [p, b, t], "repeat": k, "source": "server /metrics",
            "why": why + "; token_time taken from vLLM's /metrics (mean inter_token_latency), prompt_time from the "
                   "client's first tokens less the tokens that came with them"}
    return server_row(row, recs, server), index, note, recs


def _measure_batch_point(session: RunSession, point: tuple, index: int, model: str, hardware: str, tp: int,
                         max_len: int | None) -> tuple[dict, int, list[dict], list]:
    """_measure_point, and once more with more output tokens when its b requests barely decoded together (a P/D
    pair's prompt instance prefills them one after another): the row's token_size says how many were made."""
    row, index, note, recs = _measure_point(session, point, index, model, hardware, tp)
    notes = [note] if note else []
    k, p, b, t = point
    if b == 1 or k == "warmup" or together_step_s(recs)[1] >= MIN_TOGETHER_ITERS:
        return row, index, notes, recs
    t2 = tokens_to_decode_together(recs, t)
    if max_len and p + t2 > max_len:
        notes.append({"point": [p, b, t], "repeat": k, "why": f"prompt {p} batch {b}: its requests decoded "
                      f"together for under {MIN_TOGETHER_ITERS} iterations and {t2} output tokens would pass "
                      f"max_model_len {max_len}: token_time is the mean of their mean TBT"})
        return row, index, notes, recs
    row, index, note, recs = _measure_point(session, (k, p, b, t2), index, model, hardware, tp)
    notes.append({"point": [p, b, t], "repeat": k, "token_size": t2, "why": f"prompt {p} batch {b}: its requests "
                  f"decoded together for under {MIN_TOGETHER_ITERS} iterations with {t} output tokens: measured with {t2}"})
    return row, index, notes + ([note] if note else []), recs


def _point_workload(p: int, b: int, t: int, first_index: int, repeat) -> Workload:
    """b requests of p prompt tokens and t output tokens, all due at 0, with fresh token ids (no prefix hits)."""
    return Workload(name="profile-point", arrival_s=np.zeros(b), input_tokens=np.full(b, p, np.int64),
                    output_tokens=np.full(b, t, np.int64), trace_index=np.arange(first_index, first_index + b),
                    source={"name": "profile-grid", "point": [p, b, t], "repeat": repeat}, transforms={})


def _plan(grid: list[tuple[int, int, int]], repeats: int) -> list[tuple]:
    """Two warm-up points (first requests are slow: not recorded), then the grid, repeats outermost."""
    p_max, b_max = max(p for p, _, _ in grid), max(b for _, b, _ in grid)
    p0 = next(p for p, b, _ in grid if b == b_max)
    warm = [("warmup", p_max, 1, 8)] + ([("warmup", p0, b_max, 8)] if (p0, b_max) != (p_max, 1) else [])
    return warm + [(k, p, b, t) for k in range(repeats) for p, b, t in grid]


def iteration_sizes(p: int, b: int, budget: int = VLLM_CPU_CHUNK_TOKENS) -> set[int]:
    """The token counts of the prefill iterations of b prompts of p tokens under a per-iteration budget."""
    total = p * b
    return ({budget} if total >= budget else set()) | ({total % budget} if total % budget else set())


class ColdPrefills:
    """The prompt lengths a profile's iterations have prefilled, in plan order, and the batch-1 prefills that
    repeated one (the prefill spread's samples: a new length's first prefill is slower, docs/sim-vs-live.md);
    fresh() picks lengths none had, for the (new, again) pairs that measure how much slower."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.warm_s: dict[int, list[float]] = {}

    def add(self, k, p: int, b: int, prompt_time_s: float) -> None:
        sizes = iteration_sizes(p, b)
        if b == 1 and k not in ("warmup", "cold") and sizes <= self.seen:
            self.warm_s.setdefault(p, []).append(prompt_time_s)
        self.seen |= sizes

    def warm_pairs(self) -> list[tuple[int, float]]:
        return [(p, t) for p, ts in self.warm_s.items() for t in ts]

    def fresh(self, lo: int, hi: int, n: int = COLD_PAIRS) -> list[int]:
        """n prompt lengths from lo to hi (log-spaced, odd offsets) that no iteration has prefilled."""
        out: list[int] = []
        for x in np.geomspace(max(lo, 8), max(hi, lo + n), n):
            p = int(x) | 1
            while p in self.seen or p in out:
                p += 2
            out.append(p)
        return out


def _cold_pairs(session: RunSession, cold: ColdPrefills, index: int, model: str, hardware: str, tp: int,
                lo: int, hi: int) -> tuple[list[tuple[int, float, float]], int]:
    """For each fresh length: one lone prefill, then the same length again at once: (tokens, first s, again s)."""
    pairs = []
    for p in cold.fresh(lo, min(hi, VLLM_CPU_CHUNK_TOKENS)):
        first, index, _, _ = _measure_point(session, ("cold", p, 1, COLD_TOKENS), index, model, hardware, tp)
        again, index, _, _ = _measure_point(session, ("again", p, 1, COLD_TOKENS), index, model, hardware, tp)
        cold.add("cold", p, 1, 0.0)
        pairs.append((p, first["prompt_time"] / 1e3, again["prompt_time"] / 1e3))
    return pairs, index


def _idle_wakes(session: RunSession, index: int, model: str, hardware: str, tp: int, p: int,
                gaps: tuple[float, ...],
                on_status: Callable[[str], None]) -> tuple[list[tuple[float, float, float]], int]:
    """For each idle gap, WAKE_ROUNDS times (each round starting at another gap): idle that long, one lone prefill
    of p tokens, then the same length again at once: (gap s, first s, again s)."""
    samples: list[tuple[float, float, float]] = []
    if not gaps:
        return samples, index
    on_status(f"idle wake: a lone {p}-token prefill after {', '.join(f'{g:g}' for g in gaps)} s idle")
    for k in range(WAKE_ROUNDS):
        for g in gaps[k % len(gaps):] + gaps[:k % len(gaps)]:
            time.sleep(g)
            n = len(samples)   # each point its own name: its records' directory
            first, index, _, _ = _measure_point(session, (f"wake{n}", p, 1, COLD_TOKENS), index, model, hardware, tp)
            again, index, _, _ = _measure_point(session, (f"woke{n}", p, 1, COLD_TOKENS), index, model, hardware, tp)
            samples.append((g, first["prompt_time"] / 1e3, again["prompt_time"] / 1e3))
    return samples, index


def write_spread(out: str | os.PathLike, records: list, rows: list[dict], run_id: str,
                 cold: ColdPrefills | None = None, pairs: list[tuple[int, float, float]] | None = None,
                 wakes: list[tuple[float, float, float]] | None = None) -> dict | None:
    """The step spread of the batch-1 points (sim/spread.py) beside the profile CSV: their decode gaps, their
    prefills over the profile's own fit of the rows (the repeated lengths only, when `cold` tells them apart) and
    the cold-prefill factor; None (and no stale one left there) when too few tokens were timed."""
    path = spread_path(out)
    spread = measure_spread(records, source=f"splitbench profile {run_id}: batch-1 points")
    if spread is None:
        path.unlink(missing_ok=True)
        return None
    lone = [(r["prompt_size"], r["prompt_time"] / 1e3) for r in rows if r["batch_size"] == 1]
    warm = cold.warm_pairs() if cold is not None else []
    if lone:
        r0 = rows[0]
        fit = PerfModel(r0["model"], r0["hardware"], r0["tensor_parallel"], rows, source=str(out))
        # repeated lengths only, unless a profile of few repeats has too few of them: then every lone prefill
        spread.update(measure_prefill_spread(warm if len(warm) >= len(lone) // 2 else lone, fit.lone_prompt_s) or {})
        spread.update(measure_request_spread(records, lambda p, n: fit.token_time_s(1, p + n // 2)) or {})
    spread.update(measure_cold_prefill(pairs or []) or {})
    spread.update(measure_idle_wake(wakes or []) or {})
    atomic_write_json(path, spread)
    return {**spread, "path": str(path)}


def measure_profile(backend_name: str, backend_options: dict, *, out: str | os.PathLike,
                    prompt_sizes=DEFAULT_PROMPT_SIZES, batch_sizes=DEFAULT_BATCH_SIZES,
                    output_sizes=DEFAULT_OUTPUT_SIZES, repeats: int = 2, model_name: str | None = None,
                    machine: str | None = None, hardware_file: str | None = None, tensor_parallel: int = 1,
                    results_dir: str | os.PathLike = "results", idle_wake_s: tuple[float, ...] = IDLE_WAKE_S,
                    on_status: Callable[[str], None] = lambda s: None) -> dict:
    """Measure a backend over profile_grid() x repeats (b requests sent together, max_inflight b) and write the
    profile CSV atomically; per-point records stay under results_dir/<run id>/points/."""
    grid = profile_grid(prompt_sizes, batch_sizes, output_sizes)
    if int(repeats) < 1:
        raise InputError(f"--repeats must be >= 1, got {repeats}")
    hardware = _host_hardware(machine, hardware_file)
    opts = RunOptions(trace="profile", rate_scale=1.0, backend=backend_name, backend_options=backend_options,
                      results_dir=str(results_dir), hardware_file=hardware_file, machine=machine,
                      seed=fresh_prompt_seed())
    plan, rows, index, started = _plan(grid, int(repeats)), [], 0, time.monotonic()
    notes: list[dict] = []
    alone: list = []
    cold = ColdPrefills()
    with RunSession(opts, kind="profile", workload=_point_workload(*grid[0], 0, "plan"),
                    on_status=on_status) as session:
        info = session.start().model_info
        served = session.conn.model
        model = model_name or (Path(served).name if "/" in served else served)
        need = max(p + t for p, _, t in grid)
        if info.get("max_model_len") and need > int(info["max_model_len"]):
            raise InputError(f"profile grid needs prompt + output up to {need} tokens but the server's "
                             f"max_model_len is {info['max_model_len']}")
        on_status(f"warm-up, then {len(grid)} points x {repeats} repeats on {hardware}")
        max_len = int(info.get("max_model_len") or 0) or None
        for k, p, b, t in plan:
            row, index, new, recs = _measure_batch_point(session, (k, p, b, t), index, model, hardware,
                                                         tensor_parallel, max_len)
            for note in new:
                notes.append(note)
                on_status(note["why"])
            cold.add(k, p, b, row["prompt_time"] / 1e3)
            if k != "warmup":
                rows.append(row)
                if b == 1 and not new:   # decode steps alone, each token timed by the client
                    alone.extend(recs)
                on_status(f"prompt {p} batch {b} tokens {row['token_size']} (repeat {k + 1}): "
                          f"TTFT {row['prompt_time']:.1f} ms, TBT {row['token_time']:.2f} ms")
        sizes = [p for p, _, _ in grid]
        pairs = []   # one prompt size spans no range to draw new lengths from
        if min(sizes) < max(sizes):
            pairs, index = _cold_pairs(session, cold, index, model, hardware, tensor_parallel, min(sizes), max(sizes))
        wakes, index = _idle_wakes(session, index, model, hardware, tensor_parallel,
                                   min(sizes, key=lambda x: abs(x - WAKE_PROMPT)), tuple(idle_wake_s), on_status)
        session.meta.update(status="complete")
        session.write_meta()
    spread = write_spread(out, alone, rows, session.meta["run_id"], cold, pairs, wakes)
    atomic_write_bytes(out, profile_csv_bytes(rows))
    meta = {"run_id": session.meta["run_id"], "kind": "profile", "out": str(out), "model": model,
            "hardware": hardware, "grid": grid, "repeats": int(repeats), "backend": session.meta["backend"],
            "wall_s": time.monotonic() - started, "point_notes": notes,
            "spread": spread and {k: spread[k] for k in SPREAD_SUMMARY if k in spread},
            "versions": package_versions(), "host": host_info()}
    atomic_write_json(session.run_dir / "profile.json", meta)
    return {**meta, "rows": len(rows), "run_dir": str(session.run_dir)}
