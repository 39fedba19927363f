"""Real vLLM (CPU build, tiny model) with prefix caching on: prompts sharing a long token-id prefix get vLLM's
cached-token counts in their records, and the instance's /metrics prefix-cache counters move by exactly as much."""
from __future__ import annotations

import importlib.util
import json

import pytest

from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.schema import records as R
from splitbench.schema.summary import read_summary

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not installed")]
CPU_BLOCK_TOKENS = 128   # vLLM 0.32 on CPU (CpuPlatform.check_and_update_config) unless --block-size is given


@pytest.mark.timeout(300)
def test_shared_prefix_hits_vllms_prefix_cache(tmp_path):
    n, prefix = 4, 300   # 300 shared tokens: 2 whole CPU blocks of 128
    opts = RunOptions(trace=f"synth:arrivals=poisson,rate=2,count={n},lengths=fixed,input=600,output=2,seed=4",
                      duration_s=None, rate_scale=1.0, backend="vllm", shared_prefix_tokens=prefix,
                      max_inflight=1,   # one at a time: each request finds the previous one's blocks cached
                      backend_options={"instances": 1}, results_dir=str(tmp_path), run_id="cache", timeout_s=120)
    res = run(opts)
    meta = json.loads((res.run_dir / "run.json").read_text())
    assert meta["backend"]["prefix_caching"] == "on"
    assert {"--enable-prefix-caching", "--enable-prompt-tokens-details"} <= set(meta["backend"]["instances"][0]["args"])
    recs = sorted(R.read_records(res.run_dir), key=lambda r: r.actual_send_s)
    assert len(recs) == n and all(r.ok for r in recs), [(r.status, r.error) for r in recs]
    whole = prefix // CPU_BLOCK_TOKENS * CPU_BLOCK_TOKENS
    assert [r.cached_input_tokens for r in recs] == [0] + [whole] * (n - 1)
    cache = read_summary(res.run_dir)["cache"]
    assert cache["cached_tokens"] == whole * (n - 1) and cache["requests_hit"] == n - 1
    server = cache["server"]["baseline-0"]   # vllm:prefix_cache_{queries,hits}_total over the run, in tokens
    assert server["hits_tokens"] == sum(r.cached_input_tokens for r in recs)
    assert server["queries_tokens"] == sum(r.actual_input_tokens for r in recs)
    assert server["hit_rate"] == pytest.approx(whole * (n - 1) / (600 * n))
