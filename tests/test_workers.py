"""--workers with real processes: the whole trace replayed once on one clock through the start barrier (real stub,
real sockets), and a worker that fails before the start makes every worker leave. The barrier's logic, sharding
and stats merging are tested exactly on a fake clock in test_replay_clock.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.client.replayer import ReplayConfig
from splitbench.client.workers import replay_workers
from splitbench.schema import records as R
from splitbench.workload.types import Workload

pytestmark = pytest.mark.timeout(120)


def test_two_workers_replay_the_whole_trace_on_one_clock(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITBENCH_CACHE", str(tmp_path / "cache"))
    spec = "synth:arrivals=poisson,rate=150,duration=1.5,lengths=fixed,input=16,output=4,seed=3"
    opts = RunOptions(trace=spec, duration_s=None, backend="stub", results_dir=str(tmp_path), vocab_size=1000,
                      backend_options={"ttft_s": 0.01, "tpot_s": 0.002, "cpu": -1}, workers=2)
    res = run(opts)
    recs = R.read_records(res.run_dir)
    planned = res.stats.planned
    assert planned > 100 and len(recs) == planned and res.stats.sent == planned
    assert [r.trace_index for r in recs] == sorted({r.trace_index for r in recs})   # each once, merged in order
    assert all(r.ok and r.actual_output_tokens == 4 for r in recs)
    # one clock: both workers report the same t0 (merge_stats refuses two), and on it no send is early; a worker
    # that got the start late would show it here as lag, honestly (start_late_s), never as an early send
    lag = np.array([r.actual_send_s - r.intended_send_s for r in recs])
    assert lag.min() > -1e-3 and res.stats.start_late_s >= 0.0
    meta = json.loads((res.run_dir / R.RUN_FILE).read_text())
    assert meta["t0_unix_s"] == res.stats.t0_unix_s > 1.7e9
    ttft = np.array([r.first_token_s - r.actual_send_s for r in recs])
    assert ttft.min() >= 0.010 - 1e-3   # the stub's TTFT is a floor
    assert meta["client"]["workers"] == 2 and meta["client"]["peak_offered_rps"] > 100
    assert "round-robin" in meta["client"]["sharding"]
    assert not (res.run_dir / "shards").exists()


def test_a_worker_that_fails_before_the_start_makes_every_worker_leave(tmp_path):
    n = 10
    w = Workload("w", arrival_s=np.linspace(0, 1, n), input_tokens=np.full(n, 4), output_tokens=np.full(n, 2),
                 trace_index=np.arange(n))

    def payload(trace_index: int, input_tokens: int) -> dict:
        if trace_index == 3:   # in worker 1's shard (1, 3, 5, ...): its request bodies cannot be built
            raise ValueError("no prompt for request 3")
        return {"prompt": [1] * input_tokens}
    cfg = ReplayConfig(base_url="http://127.0.0.1:9", model="m")   # nothing listens: nothing may be sent
    stats, interrupted = replay_workers(w, payload, cfg, tmp_path, "fail", 2)
    assert interrupted and stats.stopped_early and stats.sent == 0 and stats.planned == n
    assert R.read_records(tmp_path) == []
    assert not (tmp_path / "shards").exists()
