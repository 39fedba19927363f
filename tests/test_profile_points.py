"""Profile points and the sizing reference on a busy host: tokens the client saw coalesced are detected, and the times
come from vLLM's own /metrics deltas (real Prometheus text through the real parser)."""
from __future__ import annotations

import http.server
import threading

import numpy as np
import pytest

from splitbench.app import sizing as S
from splitbench.errors import InputError
from splitbench.workload.types import Workload

from splitbench.app.profile import (
    MIN_TOGETHER_ITERS,
    point_row,
    server_row,
    together_step_s,
    tokens_to_decode_together,
)
from splitbench.metrics.latency import coalesced
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.servers.scrape import parse_prometheus, select, server_times_ms


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


def test_tokens_coalesced_after_the_first_leave_ttft_and_mean_tbt_exact():
    late = rec([1, 3, 1, 2, 1], [0.05, 0.08, 0.09, 0.11, 0.12])   # 8 tokens, some arriving together mid-stream
    assert not coalesced([late])
    row = point_row([late], "m", "cpu-host", 32, 1, 8)
    assert row["prompt_time"] == pytest.approx(50.0) and row["token_time"] == pytest.approx(70.0 / 7)
    assert coalesced([rec([2, 1, 1, 1, 1, 1, 1], [0.06 + 0.01 * i for i in range(7)])])


def test_server_fallback_keeps_the_clients_first_tokens_less_the_tokens_that_came_with_them():
    """A batch of 2 prefilled one after the other: the server's mean prefill time (one prompt each) would halve
    the batch's prompt time; the fallback takes the later first token, 3 tokens early at the server's 10 ms."""
    a = rec([1] * 8, [0.1 + 0.01 * i for i in range(8)])
    b = rec([4, 1, 1, 1, 1], [0.23, 0.24, 0.25, 0.26, 0.27])
    row = server_row(point_row([a, b], "m", "cpu-host", 32, 2, 8), [a, b], {"token_time": 10.0, "prompt_time": 100.0})
    assert row["token_time"] == 10.0 and row["prompt_time"] == pytest.approx(200.0)


def staggered(first_b_s: float, n_a: int = 40, n_b: int = 40) -> list[RequestRecord]:
    """A P/D pair's batch of 2: a's first token at 0.10 s, it decodes alone at 5 ms until b's first token at
    first_b_s, then both at 10 ms a step (b's gaps 10 ms throughout)."""
    ta, t = [0.10], 0.10
    while len(ta) < n_a:
        t += 0.005 if t < first_b_s - 1e-9 else 0.010
        ta.append(round(t, 6))
    tb = [round(first_b_s + 0.010 * k, 6) for k in range(n_b)]
    return [rec([1] * len(ta), ta), rec([1] * len(tb), tb)]


def test_a_batch_points_token_time_is_its_step_while_all_decode_together():
    a, b = staggered(0.20)
    step_s, iters = together_step_s([a, b])
    assert step_s == pytest.approx(0.010) and iters >= MIN_TOGETHER_ITERS
    row = point_row([a, b], "m", "cpu-core", 32, 2, 40)
    assert row["token_time"] == pytest.approx(10.0)   # not the mean TBT, which a's lone 5 ms steps pull down
    assert np.mean([(r.chunk_offsets_s[-1] - r.chunk_offsets_s[0]) / 39 for r in (a, b)]) * 1e3 < 9.5


def test_a_batch_that_barely_decoded_together_falls_back_and_asks_for_more_tokens():
    a, b = staggered(0.28)   # a ends at 0.10 + 36 x 5 ms + 3 x 10 ms = 0.31: 3 iterations together
    _, iters = together_step_s([a, b])
    assert iters < MIN_TOGETHER_ITERS
    row = point_row([a, b], "m", "cpu-core", 32, 2, 40)
    tbt = np.mean([(r.chunk_offsets_s[-1] - r.chunk_offsets_s[0]) / 39 for r in (a, b)]) * 1e3
    assert row["token_time"] == pytest.approx(tbt)
    # the first tokens 180 ms apart over the fastest mean gap (a's, ~5.4 ms), half again, and the minimum
    need = tokens_to_decode_together([a, b], 40)
    gap_a = (a.chunk_offsets_s[-1] - a.chunk_offsets_s[0]) / 39
    assert need == 40 + int(np.ceil(1.5 * 0.18 / gap_a)) + MIN_TOGETHER_ITERS
    longer = staggered(0.28, n_a=need, n_b=need)
    assert together_step_s(longer)[1] >= MIN_TOGETHER_ITERS   # enough: a decodes alone only until b's first


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


class _Metrics(http.server.BaseHTTPRequestHandler):
    """A /metrics whose inter-token latency histogram grows by 15 tokens at 12 ms per scrape (as vLLM's would)."""
    scrapes = 0

    def do_GET(self):  # noqa: N802
        _Metrics.scrapes += 1
        n = _Metrics.scrapes
        body = (f"vllm:inter_token_latency_seconds_count {15 * n}\nvllm:inter_token_latency_seconds_sum {0.012 * 15 * n}\n"
                f"vllm:request_prefill_time_seconds_count {n}\nvllm:request_prefill_time_seconds_sum {0.03 * n}\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class _CoalescingProbe(S.Probe):
    """The server streams every reference request's tokens in one chunk, as a starved vLLM frontend does."""
    def replay(self, w, concurrency, name, stop_after_s=None):
        self.calls = getattr(self, "calls", 0) + 1
        return [RequestRecord(request_id=f"r{i}", trace_index=int(w.trace_index[i]), intended_send_s=0.0,
                              planned_input_tokens=int(w.input_tokens[i]), planned_output_tokens=int(n),
                              actual_send_s=0.0, first_token_s=0.05 + 0.001 * w.input_tokens[i] / 100,
                              last_token_s=0.3, end_s=0.3, chunk_offsets_s=[0.05 + 0.001 * w.input_tokens[i] / 100],
                              chunk_tokens=[int(n)], actual_input_tokens=int(w.input_tokens[i]),
                              actual_output_tokens=int(n), status=R.OK) for i, n in enumerate(w.output_tokens)]


def test_sizing_reference_on_a_busy_host_is_retried_then_timed_from_vllm_metrics():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        w = Workload(name="w", arrival_s=np.linspace(0, 9, 10), input_tokens=np.arange(100, 1100, 100),
                     output_tokens=np.full(10, 50), trace_index=np.arange(10))
        probe = _CoalescingProbe("http://127.0.0.1:9", "m", lambda i, n: {"prompt": [1] * n},
                                 metrics_urls=[f"http://127.0.0.1:{srv.server_address[1]}"])
        ref, _ = S.measure_reference(probe, w)
        assert probe.calls == 1 + S.REF_ATTEMPTS                     # the warm-up, then every attempt
        assert ref.tbt_s == pytest.approx(0.012) and "server /metrics" in ref.meta["tbt_source"]
        probe.metrics_urls = []
        with pytest.raises(InputError, match="too busy to time tokens"):
            S.measure_reference(probe, w)
    finally:
        srv.shutdown()
