"""The columnar summary (RecordColumns, as simulated runs are summarized) is the per-record summary, value for
value: on random records of every kind, with SLOs, a reference and an allocation, and on simulator output.
The one exception is the TBT mean, a weighted sum instead of the expanded per-token array's pairwise sum."""
from __future__ import annotations

import math

import numpy as np
import pytest

from splitbench.hardware.catalog import load_catalog, whole_machine_allocation
from splitbench.metrics.slo import Reference
from splitbench.metrics.summary import summarize
from splitbench.schema.columns import RecordColumns
from splitbench.schema.records import RequestRecord
from tests.test_columns import random_records

REF = Reference(ttft_intercept_s=0.05, ttft_per_token_s=2e-4, tbt_s=0.03, ttft_floor_s=0.06)
SLOS = "ttft_p99=2s,tbt_p90=40ms,mean_tbt_p50=35ms,e2e_max=9s,norm_mean=0.2s"


def _meta(records) -> dict:
    pools = {}
    for r in records:
        for inst, pool in ((r.prefill_instance, r.prefill_pool), (r.decode_instance, r.decode_pool)):
            if inst:
                pools.setdefault(inst, pool)
    insts = [{"id": i, "pool": p, "machine": "dgx-a100"} for i, p in sorted(pools.items())]
    return {"run_id": "x", "hardware": whole_machine_allocation(insts, load_catalog()) if insts else None}


def assert_same(a, b, path=()):
    """Equal, but for TBT means (relative 1e-12)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        tbt_mean = a.get("metric") == "tbt" and a.get("stat") == "mean"   # an SLO item on the TBT mean
        for k in a:
            assert_same(a[k], b[k], path + (("tbt_mean",) if tbt_mean and k == "value_s" else ()) + (k,))
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for k, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, path + (k,))
    elif isinstance(a, float) and ("tbt_s" in path and path[-1] == "mean" or "tbt_mean" in str(path)):
        assert math.isclose(a, b, rel_tol=1e-12), path
    else:
        assert a == b and type(a) is type(b) or (isinstance(a, float) and isinstance(b, float) and a == b), \
            (path, a, b)


@pytest.mark.parametrize("seed", range(6))
def test_columnar_summary_equals_the_per_record_summary(seed):
    recs = random_records(seed, 400)
    if seed % 2:   # chunk lists of equal length: the vectorized TBT path (odd seeds), else the general one
        for r in recs:
            r.chunk_tokens = (r.chunk_tokens + [1] * len(r.chunk_offsets_s))[:len(r.chunk_offsets_s)]
    kw = dict(run_meta=_meta(recs), slos=SLOS if seed % 3 else "tbt_mean=30ms", reference=REF)
    assert_same(summarize(recs, **kw), summarize(RecordColumns.from_records(recs), **kw))


def test_columnar_summary_of_simulator_records_and_edge_cases():
    from tests.test_simulator import _random_workload, run, split_cfg
    res = run(_random_workload(4, n=200), split_cfg(prompts=2, tokens=3))
    meta = _meta(res.records)
    for recs in (res.records, res.records[:1], []):
        kw = dict(run_meta=meta, slos=SLOS, reference=REF)
        assert_same(summarize(recs, **kw), summarize(RecordColumns.from_records(recs), **kw))
    assert_same(summarize(res.records, **kw), summarize(res.columns, **kw))
    one_token = [RequestRecord("a", 0, 0.0, 5, 1, actual_send_s=0.0, first_token_s=0.1, last_token_s=0.1,
                               end_s=0.1, chunk_offsets_s=[0.1], chunk_tokens=[1], status="ok")]
    assert_same(summarize(one_token, slos=SLOS), summarize(RecordColumns.from_records(one_token), slos=SLOS))
    assert np.isfinite(summarize(res.columns)["latency"]["tbt_s"]["p99"])
