"""Profile points on a busy host: a point whose tokens the client saw coalesced is detected, and its iteration times
come from vLLM's own /metrics deltas (real Prometheus text through the real parser)."""
from __future__ import annotations

import pytest

from splitbench.app.profile import coalesced, point_row, server_times_ms
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.servers.scrape import parse_prometheus, select


def rec(chunks: list[int], offsets: list[float]) -> RequestRecord:
    n = sum(chunks)
    return RequestRecord(request_id="r", trace_index=0, intended_send_s=0.0, planned_input_tokens=32,
                         planned_output_tokens=n, actual_send_s=0.0, first_token_s=offsets[0],
                         last_token_s=offsets[-1], end_s=offsets[-1], chunk_offsets_s=offsets, chunk_tokens=chunks,
                         actual_input_tokens=32, actual_output_tokens=n, status=R.OK)


def test_one_chunk_per_token_is_not_coalesced_and_one_chunk_of_all_is():
    timed = rec([1] * 8, [0.05 + 0.01 * i for i in range(8)])
    together = rec([8], [0.4])
    assert not coalesced([timed]) and coalesced([timed, together])
    row = point_row([together], "m", "cpu-host", 32, 1, 8)
    assert row["token_time"] == 0.0   # what the client alone reports: why the fallback exists


def metrics(itl_sum: float, itl_n: int, prefill_sum: float, prefill_n: int, t: float) -> dict:
    text = f"""# HELP vllm:inter_token_latency_seconds Histogram of inter-token latency in seconds.
# TYPE vllm:inter_token_latency_seconds histogram
vllm:inter_token_latency_seconds_bucket{{engine="0",le="0.01",model_name="m"}} {itl_n}
vllm:inter_token_latency_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {itl_n}
vllm:inter_token_latency_seconds_count{{engine="0",model_name="m"}} {itl_n}
vllm:inter_token_latency_seconds_sum{{engine="0",model_name="m"}} {itl_sum}
vllm:request_prefill_time_seconds_count{{engine="0",model_name="m"}} {prefill_n}
vllm:request_prefill_time_seconds_sum{{engine="0",model_name="m"}} {prefill_sum}
"""
    return {**select(parse_prometheus(text)), "t_unix_s": t}


def test_server_times_are_the_deltas_between_scrapes_weighted_over_instances():
    a0, a1 = metrics(1.0, 100, 2.0, 10, 0.0), metrics(1.0 + 31 * 0.012, 131, 2.0 + 0.040, 11, 1.0)
    b0, b1 = metrics(0.0, 0, 0.0, 0, 0.0), metrics(0.0, 0, 0.0, 0, 1.0)   # an idle instance adds nothing
    got = server_times_ms([(a0, a1), (b0, b1)])
    assert got["token_time"] == pytest.approx(12.0) and got["prompt_time"] == pytest.approx(40.0)


def test_no_server_metrics_means_no_fallback():
    assert server_times_ms([(None, None)]) is None
    idle = metrics(1.0, 5, 1.0, 5, 0.0)
    assert server_times_ms([(idle, {**idle, "t_unix_s": 1.0})]) is None
