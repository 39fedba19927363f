"""Several sender processes for one replay (`--workers N`): one forked worker per shard (shards.py) meet at a start
barrier (all bodies built -> all connections warm -> the message round trip measured -> one start time far enough
ahead), then the shard records are merged. A worker that still starts late records that lateness in its lag."""
from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from splitbench.client.replay import replay_workload
from splitbench.client.replayer import ReplayConfig
from splitbench.client.shards import shard
from splitbench.client.stats import ReplayStats
from splitbench.errors import InputError
from splitbench.procs import die_with_parent
from splitbench.schema import records as R
from splitbench.workload.types import Workload

READY_TIMEOUT_S = 600.0    # a worker builds its request bodies in at most this long
PINGS = 3                  # round trips measured per worker once all are ready
START_RTT_FACTOR = 5.0     # the shared start is this many of the slowest round trips ahead of the barrier's end,
START_MIN_MARGIN_S = 0.1   # and at least this far


def start_margin_s(rtts_s: Sequence[float], min_margin_s: float = START_MIN_MARGIN_S,
                   factor: float = START_RTT_FACTOR) -> float:
    """How far ahead the shared start goes: the start message takes half a round trip to reach a worker; a
    multiple of the slowest round trip measured on this host, now, covers it with margin (busy hosts get more)."""
    return max(min_margin_s, factor * max(rtts_s, default=0.0))


class StartBarrier:
    """The parent's side. send(k, msg) and recv(k, timeout_s) talk to worker k (recv: None when it died or timed
    out); clock is the wall clock. Every worker reports "prepared" (bodies built), is told "warm", reports "ready"
    (connections open, loop running) and answers PINGS pings; then all get ("start", unix s), or "abort"."""

    def __init__(self, n: int, send: Callable[[int, tuple], None], recv: Callable[[int, float], tuple | None],
                 clock: Callable[[], float] = time.time, pings: int = PINGS, timeout_s: float = READY_TIMEOUT_S):
        self.n, self.send, self.recv, self.clock, self.pings, self.timeout_s = n, send, recv, clock, pings, timeout_s
        self.errors: list[str] = []
        self.rtt_s = [0.0] * n
        self.margin_s: float | None = None
        self.start_unix_s: float | None = None

    def run(self) -> float | None:
        """The shared start (unix s), or None when a worker failed (then every worker was told to leave)."""
        if self._gather("prepared"):
            self._all(("warm",))
            if self._gather("ready") and self._measure():
                self.margin_s = start_margin_s(self.rtt_s)
                self.start_unix_s = self.clock() + self.margin_s
                self._all(("start", self.start_unix_s))
                return self.start_unix_s
        self._all(("abort",))
        return None

    def _gather(self, what: str) -> bool:
        for k in range(self.n):
            msg = self.recv(k, self.timeout_s)
            if not msg or msg[0] != what:
                why = msg[1] if msg and msg[0] == "error" else f"exited before it was {what}"
                self.errors.append(f"worker {k}: {why}")
        return not self.errors

    def _measure(self) -> bool:
        for _ in range(self.pings):
            for k in range(self.n):
                t = self.clock()
                self.send(k, ("ping",))
                msg = self.recv(k, self.timeout_s)
                if not msg or msg[0] != "pong":
                    self.errors.append(f"worker {k}: no answer at the start barrier")
                    return False
                self.rtt_s[k] = max(self.rtt_s[k], self.clock() - t)
        return True

    def _all(self, msg: tuple) -> None:
        for k in range(self.n):
            self.send(k, msg)


class WorkerGate:
    """A worker's side of the barrier: the replayer's StartGate over its end of the pipe. Its waits block the
    worker's loop on purpose: nothing is due before the start."""

    def __init__(self, k: int, conn):
        self.k, self.conn = k, conn

    async def prepared(self) -> bool:
        self.conn.send(("prepared", self.k))
        return self.conn.recv()[0] == "warm"

    async def warmed(self) -> float | None:
        self.conn.send(("ready", self.k))
        while True:
            msg = self.conn.recv()
            if msg[0] == "ping":
                self.conn.send(("pong",))
            else:
                return msg[1] if msg[0] == "start" else None


def _child(k: int, workload: Workload, payload, cfg: ReplayConfig, shard_dir: str, run_id: str, conn) -> None:
    """Worker process body (forked: inherits the workload and the prompt source without pickling)."""
    die_with_parent()   # a SIGKILLed CLI must not leave senders replaying
    try:
        replayer, interrupted = replay_workload(workload, payload, cfg, Path(shard_dir), f"{run_id}-w{k}",
                                                gate=WorkerGate(k, conn))
        conn.send(("done", asdict(replayer.stats), interrupted or replayer.stats.stopped_early))
    except BaseException as e:  # report, never hang the parent
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except (OSError, ValueError):
            pass
        raise


def merge_stats(parts: list[dict]) -> ReplayStats:
    """One ReplayStats for the whole replay: counts add up; the in-flight peak is the sum of the workers' peaks
    (an upper bound: they need not peak together); every worker that started shares one t0."""
    s = ReplayStats()
    for p in parts:
        for name in ("planned", "sent", "finished", "failed", "inflight_peak", "inflight_cap_waits", "turns_not_sent",
                     "stand_in_outputs"):
            setattr(s, name, getattr(s, name) + p.get(name, 0))
        s.stopped_early = s.stopped_early or p["stopped_early"]
        s.duration_s = max(s.duration_s, p["duration_s"])
        s.start_late_s = max(s.start_late_s, p["start_late_s"])
    t0s = {p["t0_unix_s"] for p in parts if p["t0_unix_s"]}
    if len(t0s) > 1:
        raise RuntimeError(f"workers started on different clocks: t0 {sorted(t0s)}")
    s.t0_unix_s = t0s.pop() if t0s else 0.0
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
    shard_root = Path(run_dir) / "shards"
    procs, pipes = _spawn(workload, payload, cfg, shard_root, run_id, workers)
    try:
        barrier = StartBarrier(workers, lambda k, m: _send(pipes[k], m), lambda k, t: _recv(pipes[k], procs[k], t))
        if barrier.run() is not None:
            on_status(f"{workers} workers ready; slowest message round trip {max(barrier.rtt_s) * 1e3:.1f} ms; "
                      f"shared start in {barrier.margin_s:.2f} s")
        parts, errors, interrupted = _collect(pipes, procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return _merge(workload, Path(run_dir), run_id, workers, parts, barrier.errors + errors, interrupted)


def _spawn(workload, payload, cfg, shard_root: Path, run_id: str, workers: int) -> tuple[list, list]:
    ctx = mp.get_context("fork")
    procs, pipes = [], []
    for k in range(workers):
        parent, child = ctx.Pipe()
        part = shard(workload, k, workers, by_session=cfg.multi_turn)   # a session's turns stay in one worker
        p = ctx.Process(target=_child, name=f"splitbench-worker-{k}", daemon=True,
                        args=(k, part, payload, cfg, str(shard_root / str(k)), run_id, child))
        p.start()
        child.close()
        procs.append(p)
        pipes.append(parent)
    return procs, pipes


def _collect(pipes, procs) -> tuple[list[dict], list[str], bool]:
    parts, errors, interrupted = [], [], False
    for k, c in enumerate(pipes):
        msg = _recv(c, procs[k], None)
        if msg and msg[0] == "done":
            parts.append(msg[1])
            interrupted = interrupted or msg[2]
        elif msg and msg[0] == "error":
            errors.append(f"worker {k}: {msg[1]}")
    return parts, errors, interrupted


def _merge(workload: Workload, run_dir: Path, run_id: str, workers: int, parts: list[dict], errors: list[str],
           interrupted: bool) -> tuple[ReplayStats, bool]:
    """The shards' records into run_dir (in trace order), the shards removed; the merged stats."""
    shard_root = run_dir / "shards"
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


def _send(conn, msg: tuple) -> None:
    try:
        conn.send(msg)
    except (OSError, ValueError):   # that worker is gone: the barrier hears it from recv
        pass


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
