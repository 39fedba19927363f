"""Error classification (outcome.py) and the scripted MockTransport: every failure kind becomes its status and a
record through the real replayer and RecordSink, never a crash; answer times are exact on the fake clock."""
from __future__ import annotations

import asyncio

import aiohttp
import numpy as np
import pytest

from splitbench.client.mock import MockResponse, MockTransport
from splitbench.client.outcome import StreamError, answer_status, classify
from splitbench.client.replayer import ReplayConfig, Replayer
from splitbench.client.transport import HTTP_TRANSPORTS, make_transport
from splitbench.errors import InputError
from splitbench.schema import records as R
from splitbench.timing import FakeClock
from splitbench.workload.types import Workload

EPS = 1e-9


@pytest.mark.parametrize("exc,status", [
    (asyncio.CancelledError(), R.CANCELLED),
    (StreamError(R.DISCONNECTED, "server closed the connection mid-response"), R.DISCONNECTED),
    (StreamError(R.HTTP_ERROR, "x"), R.HTTP_ERROR),
    (asyncio.TimeoutError(), R.TIMEOUT),
    (aiohttp.ServerTimeoutError("read"), R.TIMEOUT),
    (aiohttp.ServerDisconnectedError(), R.DISCONNECTED),
    (aiohttp.ClientPayloadError("cut"), R.DISCONNECTED),
    (ConnectionResetError(104, "reset"), R.DISCONNECTED),
    (BrokenPipeError(), R.DISCONNECTED),
    (asyncio.IncompleteReadError(b"ab", 10), R.DISCONNECTED),
    (ConnectionRefusedError(111, "refused"), R.ERROR),
    (aiohttp.ClientConnectionError("no route"), R.ERROR),
    (OSError("boom"), R.ERROR),
    (ValueError("bad"), R.ERROR),
])
def test_classify_maps_every_exception_to_a_record_status(exc, status):
    got, message = classify(exc, 5.0, 1.5)
    assert got == status and message and len(message) <= 300
    if status == R.TIMEOUT:
        assert message == "no response within limits (total 5s, idle 1.5s)"
    if isinstance(exc, (OSError, ValueError)) and status != R.TIMEOUT:
        assert message.startswith(type(exc).__name__)


def test_answer_status():
    assert answer_status(200) == R.OK
    assert answer_status(200, complete=False) == R.DISCONNECTED
    assert [answer_status(c) for c in (429, 500, 503, 404)] == [R.HTTP_ERROR] * 4


def test_make_transport_names_the_choices():
    assert set(HTTP_TRANSPORTS) == {"lean", "aiohttp"}
    with pytest.raises(InputError, match="lean, aiohttp"):
        make_transport("curl", "http://x/v1/completions", {}, clock=lambda: 0.0, timeout_s=1, idle_timeout_s=1)


# every failure kind, one request each, in one replay (request i gets KINDS[i]); idle timeout 0.5 s, total 2 s
KINDS = [
    ("ok", MockResponse.stream(4, 0.05, 0.01), R.OK, 200, 4),
    ("500", MockResponse(status=500, delay_s=0.02), R.HTTP_ERROR, 500, None),
    ("429", MockResponse(status=429, delay_s=0.02, body=b'{"error":{"message":"slow down"}}'), R.HTTP_ERROR, 429, None),
    ("refused", MockResponse(status=None, end=ConnectionRefusedError(111, "refused")), R.ERROR, None, None),
    ("cut", MockResponse(delay_s=0.05, chunks=[(0.0, 1), (0.01, 2)], end=aiohttp.ServerDisconnectedError(),
                         end_delay_s=0.01), R.DISCONNECTED, 200, 3),
    ("reset", MockResponse(delay_s=0.05, chunks=[(0.0, 1)], end=ConnectionResetError()), R.DISCONNECTED, 200, 1),
    ("eof", MockResponse(delay_s=0.05, chunks=[(0.0, 2)], end="eof"), R.DISCONNECTED, 200, 2),
    ("idle", MockResponse(delay_s=0.05, chunks=[(0.0, 1)], end="hang"), R.TIMEOUT, 200, 1),
    ("total", MockResponse(delay_s=0.05, chunks=[(0.0, 1)] + [(0.4, 1)] * 20), R.TIMEOUT, 200, 5),
    ("silent", MockResponse(status=None, end="hang"), R.TIMEOUT, None, None),
    ("payload", MockResponse(delay_s=0.05, chunks=[(0.0, 1)], end=aiohttp.ClientPayloadError("x")), R.DISCONNECTED,
     200, 1),
    ("raises", RuntimeError("handler bug"), R.ERROR, None, None),
    ("stream-error", StreamError(R.ERROR, "bad HTTP response: header line 'x'"), R.ERROR, None, None),
]


def _handler(req):
    script = KINDS[req.index][1]
    if isinstance(script, BaseException):
        raise script
    return script


def test_every_failure_kind_becomes_its_status_and_a_record():
    n = len(KINDS)
    w = Workload("k", arrival_s=np.arange(n) * 0.01, input_tokens=np.full(n, 3), output_tokens=np.full(n, 4),
                 trace_index=np.arange(n))
    clock, out = FakeClock(), []
    mock = MockTransport(_handler, clock, timeout_s=2.0, idle_timeout_s=0.5)
    cfg = ReplayConfig(base_url="http://mock", model="m", timeout_s=2.0, idle_timeout_s=0.5, start_delay_s=0.0)
    rep = Replayer(w, lambda i, k: {"prompt": [1] * k}, cfg, out.append, transport=mock, clock=clock)
    stats = clock.run(rep.run())
    recs = {KINDS[r.trace_index][0]: r for r in out}
    assert len(out) == n and set(recs) == {k[0] for k in KINDS}
    for name, _, status, http, tokens in KINDS:
        r = recs[name]
        assert (r.status, r.http_status) == (status, http), (name, r.status, r.error)
        assert (r.error is None) == (status == R.OK), name
        assert r.end_s is not None and r.end_s >= r.actual_send_s, name
        if tokens is not None:   # what arrived before a failure still counts
            assert r.actual_output_tokens == sum(r.chunk_tokens) == tokens, name
    assert recs["429"].error == "slow down" and recs["500"].error == "mock error"
    assert recs["eof"].error == "stream ended without [DONE]"
    assert recs["ok"].actual_input_tokens == 3 and recs["ok"].chunk_offsets_s == pytest.approx(
        [0.05, 0.06, 0.07, 0.08], abs=EPS)
    # the timeouts end exactly at their limits: idle 0.5 s after the last byte, total 2 s after the send
    assert recs["idle"].end_s - recs["idle"].actual_send_s == pytest.approx(0.05 + 0.5, abs=EPS)
    assert recs["total"].end_s - recs["total"].actual_send_s == pytest.approx(2.0, abs=EPS)
    assert recs["silent"].end_s - recs["silent"].actual_send_s == pytest.approx(0.5, abs=EPS)
    assert "handler bug" in recs["raises"].error and "RuntimeError" in recs["raises"].error
    assert (stats.sent, stats.finished, stats.failed) == (n, n, n - 1)


def test_prompt_tokens_follow_the_request_or_the_script():
    w = Workload("c", arrival_s=np.array([0.0, 0.1]), input_tokens=np.array([5, 9]), output_tokens=np.array([2, 2]),
                 trace_index=np.array([0, 1]))
    clock, out = FakeClock(), []
    mock = MockTransport(lambda req: MockResponse.stream(2, 0.01, 0.01, prompt_tokens=42 if req.index else None),
                         clock)
    rep = Replayer(w, lambda i, k: {"prompt": [1] * k}, ReplayConfig(base_url="http://mock", model="m"), out.append,
                   transport=mock, clock=clock)
    clock.run(rep.run())
    got = sorted((r.trace_index, r.actual_input_tokens) for r in out)
    assert got == [(0, 5), (1, 42)]
    assert mock.requests[0].json()["max_tokens"] == 2 and mock.requests[0].json()["stream"] is True
    assert mock.warmed == 2 and mock.closed   # open(): connections for the first 0.25 s; aclose() at the end
