"""Replay a workload against an endpoint: the replayer under SIGINT/SIGTERM handling, records streamed to a run
directory (journal flushed every second off the hot path, Parquet at the end)."""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Callable

from splitbench.client.replayer import ReplayConfig, Replayer, StartGate
from splitbench.client.sessions import SessionReplayer
from splitbench.client.transport import Transport
from splitbench.schema import records as R
from splitbench.timing import Clock, RealClock
from splitbench.workload.types import Workload


async def replay_with_signals(replayer: Replayer, writer: R.RecordWriter,
                  on_progress: Callable[[Replayer], None] | None) -> bool:
    """Run the replayer with signal handling and off-hot-path record flushing. Returns True if interrupted."""
    loop = asyncio.get_running_loop()
    interrupted = False
    main = asyncio.current_task()

    def on_signal():
        nonlocal interrupted
        if interrupted:          # second signal: stop waiting for in-flight requests
            main.cancel()
        interrupted = True
        replayer.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    async def flusher():
        while True:
            await asyncio.sleep(1.0)
            writer.flush()

    async def progress():
        while True:
            on_progress(replayer)
            await asyncio.sleep(0.25)

    side = [loop.create_task(flusher())]
    if on_progress:
        side.append(loop.create_task(progress()))
    try:
        await replayer.run()
    except asyncio.CancelledError:
        interrupted = True
    finally:
        for t in side:
            t.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):
                pass
        if on_progress:
            on_progress(replayer)
    return interrupted


def replay_workload(workload: Workload, payload, cfg: ReplayConfig, run_dir: Path, run_id: str,
                    on_progress=None, on_record: Callable[[R.RequestRecord], None] | None = None, *,
                    transport: Transport | None = None, clock: Clock | None = None, gate: StartGate | None = None
                    ) -> tuple[Replayer, bool]:
    """Replay and stream records into run_dir; records.parquet is complete when this returns.
    on_record (optional) also receives each finished record, on the replayer's loop: it must not block.
    transport, clock and gate go to the Replayer (a SessionReplayer when cfg.multi_turn); the loop is the clock's
    (cfg.loop's kind for a real one)."""
    writer = R.RecordWriter(run_dir, run_id)

    def both(rec: R.RequestRecord) -> None:
        writer.add(rec)
        on_record(rec)
    clock = clock or RealClock()
    kind = SessionReplayer if cfg.multi_turn else Replayer
    replayer = kind(workload, payload, cfg, writer.add if on_record is None else both, transport=transport,
                    clock=clock, gate=gate)
    interrupted = True
    try:
        interrupted = clock.run(replay_with_signals(replayer, writer, on_progress), cfg.loop)
    finally:
        writer.close()
    return replayer, interrupted
