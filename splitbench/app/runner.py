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


STALE_CACHE_SHARE = 0.01   # a workload without prefix reuse whose prompts the server had cached beyond this share


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
    if note := stale_cache_note(session.workload, opts, summary):
        on_status(note)
    return RunResult(session.run_dir, summary, interrupted, stats)


def stale_cache_note(workload: Workload, opts: RunOptions, summary: dict) -> str | None:
    """A warning when prompts that share no prefix (no prefix hashes, no --shared-prefix, one turn each) were
    served in part from the server's prefix cache: an earlier run with the same --seed sent them, and TTFT is then
    a warm cache's (docs/sim-vs-live.md: 29.5% of a run's prompt tokens after a profile of the same seed)."""
    share = (summary.get("cache") or {}).get("cached_fraction")
    if share is None or share < STALE_CACHE_SHARE or workload.prefix_hashes is not None \
            or opts.shared_prefix_tokens or opts.multi_turn:
        return None
    return (f"warning: the server's prefix cache served {share:.1%} of the prompt tokens, though these prompts share "
            f"no prefix: an earlier run with --seed {opts.seed} sent them to this server, so TTFT is a warm cache's "
            "(use another --seed, or restart the server)")


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
