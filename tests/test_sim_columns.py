"""The simulator's columnar records and their summary do not depend on the block sizes they are assembled in,
and a simulated run directory holds exactly the records the simulation made."""
from __future__ import annotations

from splitbench.metrics import vectors
from splitbench.metrics.summary import summarize
from splitbench.schema.columns import write_columns
from splitbench.schema.records import read_records
from splitbench.sim import recorder
from tests.test_columnar import assert_same
from tests.test_simulator import _random_workload, run, split_cfg


def test_records_and_summary_are_the_same_in_any_block_size(monkeypatch, tmp_path):
    w = _random_workload(7, n=150, rate=40.0)
    cfgs = (split_cfg(prompts=2, tokens=2), split_cfg(prompts=2, tokens=2, first_token="decode"))
    for cfg in cfgs:
        whole = run(w, cfg)
        want, summary = whole.records, summarize(whole.columns)
        assert max(len(r.chunk_tokens) for r in want) > 3
        monkeypatch.setattr(recorder, "BLOCK_RUNS", 3)
        monkeypatch.setattr(vectors, "BLOCK_CHUNKS", 7)
        small = run(w, cfg)
        assert small.records == want
        assert_same(summarize(small.columns)["latency"], summary["latency"])   # TBT means: sums in other blocks
        write_columns(tmp_path / cfg.first_token, "r", small.columns)
        assert read_records(tmp_path / cfg.first_token) == want
        monkeypatch.undo()
