"""Several sender processes for one replay (`--workers N`): the trace is dealt round-robin in arrival order (each
worker follows the whole timeline at 1/N of the rate), every worker starts at one shared wall-clock instant (the
replayer's start_at_unix_s hook) once all have built their request bodies, and the shard records are merged."""
from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from splitbench.client.locust_bridge import shard_positions
from splitbench.client.replayer import ReplayConfig, ReplayStats
from splitbench.errors import InputError
from splitbench.schema import records as R
from splitbench.workload.types import Workload

SHARDING = "round-robin by arrival order: worker k of n sends requests k, k+n, k+2n, ... at their trace times"
START_MARGIN_S = 0.3   # shared start this long after the last worker reported ready
READY_TIMEOUT_S = 600.0


def shard(workload: Workload, k: int, n: int) -> Workload:
    """Worker k's requests; arrival times stay absolute (run clock), so all shards share one t0."""
    pos = shard_positions(len(workload), k, n)
    return Workload(name=f"{workload.name}#shard{k}of{n}", arrival_s=workload.arrival_s[pos],
                    input_tokens=workload.input_tokens[pos], output_tokens=workload.output_tokens[pos],
                    trace_index=workload.trace_index[pos], source=workload.source, transforms=workload.transforms)


def _child(k: int, workload: Workload, payload, cfg: ReplayConfig, shard_dir: str, run_id: str, conn) -> None:
    """Worker process body (forked: inherits the workload and the prompt source without pickling)."""
    from splitbench import timing
    from splitbench.client.replay import replay_with_signals
    from splitbench.client.replayer import Replayer
    try:
        writer = R.RecordWriter(shard_dir, f"{run_id}-w{k}")
        replayer = Replayer(workload, payload, cfg, writer.add)
        replayer.prepare()
        conn.send(("ready", k))
        start = conn.recv()
        if start is None:   # the parent gave up (another worker failed): leave without sending
            writer.close()
            conn.send(("done", asdict(replayer.stats), True))
            return
        replayer.cfg = replace(cfg, start_at_unix_s=start)
        try:
            interrupted = timing.run(replay_with_signals(replayer, writer, None), cfg.loop)
        finally:
            writer.close()
        conn.send(("done", asdict(replayer.stats), interrupted))
    except BaseException as e:  # report, never hang the parent
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except (OSError, ValueError):
            pass
        raise


def merge_stats(parts: list[dict]) -> ReplayStats:
    """One ReplayStats for the whole replay: counts add up; the in-flight peak is the sum of the workers' peaks
    (an upper bound: they need not peak together)."""
    s = ReplayStats()
    for p in parts:
        for name in ("planned", "sent", "finished", "failed", "inflight_peak", "inflight_cap_waits"):
            setattr(s, name, getattr(s, name) + p[name])
        s.stopped_early = s.stopped_early or p["stopped_early"]
        s.t0_unix_s = p["t0_unix_s"]
        s.duration_s = max(s.duration_s, p["duration_s"])
    return s


def replay_workers(workload: Workload, payload: Callable[[int, int], dict], cfg: ReplayConfig, run_dir: Path,
                   run_id: str, workers: int, on_status: Callable[[str], None] = lambda s: None
                   ) -> tuple[ReplayStats, bool]:
    """Replay with `workers` processes; records.parquet in run_dir holds every worker's records when this returns.
    Returns (merged stats, interrupted). Ctrl-C reaches every worker (same process group); each stops itself."""
    if workers < 1:
        raise InputError(f"--workers must be >= 1, got {workers}")
    if "fork" not in mp.get_all_start_methods():
        raise InputError("--workers > 1 needs the 'fork' start method (Linux/macOS)")
    ctx = mp.get_context("fork")
    run_dir = Path(run_dir)
    shard_root = run_dir / "shards"
    procs, pipes = [], []
    for k in range(workers):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child, name=f"splitbench-worker-{k}", daemon=True,
                        args=(k, shard(workload, k, workers), payload, cfg, str(shard_root / str(k)), run_id, child))
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    parts, errors, interrupted = [], [], False
    try:
        ready = 0
        for k, c in enumerate(pipes):
            msg = _recv(c, procs[k], READY_TIMEOUT_S)
            if msg and msg[0] == "ready":
                ready += 1
            else:
                errors.append(f"worker {k}: {msg[1] if msg else 'exited before it was ready'}")
        start = time.time() + START_MARGIN_S if not errors else None
        if start is not None:
            on_status(f"{workers} workers ready; shared start in {START_MARGIN_S:.1f} s")
        for c in pipes:
            try:
                c.send(start)
            except (OSError, ValueError):
                pass
        for k, c in enumerate(pipes):
            msg = _recv(c, procs[k], None)
            if msg and msg[0] == "done":
                parts.append(msg[1])
                interrupted = interrupted or msg[2]
            elif msg and msg[0] == "error":
                errors.append(f"worker {k}: {msg[1]}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    recs = []
    for k in range(workers):
        d = shard_root / str(k)
        if (d / R.RECORDS_FILE).exists() or (d / R.JOURNAL_FILE).exists():
            recs.extend(R.read_records(d))
    recs.sort(key=lambda r: r.trace_index)
    R.write_records(run_dir, run_id, recs)
    shutil.rmtree(shard_root, ignore_errors=True)
    if errors and not parts:
        raise RuntimeError("; ".join(errors))
    stats = merge_stats(parts) if parts else ReplayStats(planned=len(workload))
    stats.planned = len(workload)
    if errors:
        stats.stopped_early = True
    return stats, interrupted or bool(errors)


def _recv(conn, proc, timeout_s: float | None):
    """The next message from a worker, or None when it died first."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            if conn.poll(0.2):
                return conn.recv()
        except (EOFError, OSError):
            return None
        except KeyboardInterrupt:   # the workers got the same signal and are stopping: keep collecting
            continue
        if not proc.is_alive() and not conn.poll(0):
            return None
        if deadline is not None and time.monotonic() > deadline:
            return None
