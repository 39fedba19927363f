"""--workers: round-robin shards keep the timeline, one shared start, merged records (real stub, real sockets)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from splitbench.schema import records as R
from splitbench.client.shards import shard
from splitbench.client.workers import merge_stats
from splitbench.workload.types import Workload
from splitbench.app.runner import RunOptions, run

pytestmark = pytest.mark.timeout(60)


def _w(n: int) -> Workload:
    return Workload("w", arrival_s=np.linspace(0, 1, n), input_tokens=np.arange(1, n + 1),
                    output_tokens=np.full(n, 3), trace_index=np.arange(100, 100 + n))


def test_shards_cover_every_request_once_at_its_trace_time():
    w = _w(10)
    parts = [shard(w, k, 3) for k in range(3)]
    idx = sorted(int(i) for p in parts for i in p.trace_index)
    assert idx == list(range(100, 110))
    assert parts[1].trace_index.tolist() == [101, 104, 107]
    assert parts[1].arrival_s.tolist() == w.arrival_s[[1, 4, 7]].tolist()   # absolute, not re-based to 0
    assert parts[2].input_tokens.tolist() == [3, 6, 9]


def test_merge_stats_adds_counts():
    a = {"planned": 5, "sent": 5, "finished": 5, "failed": 1, "inflight_peak": 3, "inflight_cap_waits": 0,
         "stopped_early": False, "t0_unix_s": 7.0, "duration_s": 2.0}
    s = merge_stats([a, {**a, "failed": 0, "duration_s": 2.5, "stopped_early": True}])
    assert (s.sent, s.failed, s.inflight_peak, s.duration_s, s.stopped_early, s.t0_unix_s) == \
        (10, 1, 6, 2.5, True, 7.0)


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
    lag = np.array([r.actual_send_s - r.intended_send_s for r in recs])
    assert lag.min() > -0.001 and np.percentile(lag, 50) < 0.01   # both shards on one t0: on schedule
    ttft = np.array([r.first_token_s - r.actual_send_s for r in recs])
    assert 0.009 < np.percentile(ttft, 50) < 0.03
    meta = json.loads((res.run_dir / R.RUN_FILE).read_text())
    assert meta["client"]["workers"] == 2 and meta["client"]["peak_offered_rps"] > 100
    assert "round-robin" in meta["client"]["sharding"]
    assert not (res.run_dir / "shards").exists()
