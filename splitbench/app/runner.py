"""The library's run entry points: `run()` replays a trace against a backend and `measure_reference()` measures an
unloaded reference; both are one RunSession (app/session.py)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from splitbench.app.options import RunOptions
from splitbench.app.session import RunSession
from splitbench.client.replayer import Replayer
from splitbench.client.stats import ReplayStats
from splitbench.metrics.slo import Reference, fit_reference, save_reference
from splitbench.schema import records as R
from splitbench.workload.types import Workload


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    interrupted: bool
    stats: ReplayStats


def run(opts: RunOptions, on_progress: Callable[[Replayer], None] | None = None,
        on_status: Callable[[str], None] = lambda s: None) -> RunResult:
    """Replay opts.trace open-loop against opts.backend; results/<run-id>/ holds records, run.json, summary.json."""
    with RunSession(opts, on_status=on_status) as session:
        session.start()
        stats, interrupted = session.replay(on_progress)
    summary = session.finish(stats, interrupted)
    return RunResult(session.run_dir, summary, interrupted, stats)


def reference_grid(sizes: list[int], output_tokens: int, repeats: int) -> Workload:
    """Every prompt size `repeats` times, all due at 0 (sent one at a time: max_inflight 1)."""
    n = len(sizes) * repeats
    return Workload(name="reference-grid", arrival_s=np.zeros(n),
                    input_tokens=np.repeat(np.asarray(sizes, dtype=np.int64), repeats),
                    output_tokens=np.full(n, output_tokens, dtype=np.int64), trace_index=np.arange(n, dtype=np.int64),
                    source={"name": "reference-grid", "sizes": sizes, "repeats": repeats}, transforms={})


def measure_reference(opts: RunOptions, *, sizes: list[int], output_tokens: int, repeats: int, out: str | Path,
                      on_status: Callable[[str], None] = lambda s: None) -> tuple[Reference, Path]:
    """Unloaded reference: requests one at a time over a grid of prompt sizes; fit TTFT(prompt) and mean TBT."""
    opts = replace(opts, max_inflight=1, trace="reference", duration_s=None, rate_scale=1.0)
    with RunSession(opts, kind="reference", workload=reference_grid(sizes, output_tokens, repeats),
                    on_status=on_status) as session:
        session.start()
        on_status(f"measuring {len(session.workload)} requests one at a time")
        stats, interrupted = session.replay()
    session.finish(stats, interrupted)
    ref = fit_reference(R.read_records(session.run_dir))
    save_reference(ref, out)
    return ref, session.run_dir
