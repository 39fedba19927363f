"""The lean HTTP/1.1 transport over real loopback sockets: the stub (faults), a raw asyncio server (framing,
splits, Connection: close, reuse), timeouts, cancellation, and no leaked sockets."""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from splitbench.client.http_conn import _Conn
from splitbench.client.http_lean import LeanClient, LeanTransport
from splitbench.client.outcome import StreamError
from splitbench.client.sink import RecordSink
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.servers.stub_main import run_stub_in_thread
from splitbench.timing import run

pytestmark = pytest.mark.timeout(60)


def _ev(n_done: int, text: str = " tok") -> bytes:
    """One vLLM-shaped completion event with continuous usage (n_done output tokens so far)."""
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": text}],
                                   "usage": {"prompt_tokens": 7, "completion_tokens": n_done}}).encode() + b"\n\n"


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":%d}}\n\n'
DONE = b"data: [DONE]\n\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def _chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def _sse_stream(n: int) -> list[bytes]:
    """n token events (the first carries 2 tokens), the usage-only event and [DONE]: n + 1 tokens in all."""
    evs = [_ev(2)] + [_ev(k + 2) for k in range(1, n)]
    return evs + [USAGE % (n + 1), DONE]


async def _post(client: LeanClient, **kw) -> RequestRecord:
    """What the replayer does per request, minus scheduling: t0 = 0 on the perf_counter clock."""
    rec = RequestRecord("r", 0, 0.0, 1, 1)
    send = time.perf_counter()
    rec.actual_send_s = send
    sink = RecordSink(rec, 0.0, send)
    try:
        await client.request(b'{"x": 1}', sink, send=send, **kw)
    except StreamError as e:
        rec.status, rec.error = e.status, str(e)
        sink.partial()
    rec.end_s = time.perf_counter()
    return rec


async def _until(cond, limit_s: float = 30.0) -> None:
    """Wait until cond() holds (a condition, not a time: the limit only stops a test that would hang)."""
    for _ in range(int(limit_s / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)


def _socket_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


class RawServer:
    """A tiny HTTP/1.1 server: `script(i)` gives the i-th request's answer, a list of (delay_s, bytes),
    "close" (end the connection) or "await_eof" (send nothing more until the client closes)."""

    def __init__(self, script, ssl_context: ssl.SSLContext | None = None):
        self.script, self.accepted, self.requests, self.eofs = script, 0, [], 0
        self.tasks: set[asyncio.Task] = set()
        self.ssl = ssl_context

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if self.ssl else 'http'}://localhost:{port}/v1/completions"
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.tasks.add(asyncio.current_task())
        self.accepted += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.eofs += 1   # the client closed (or aborted) its end
                    return
                length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                                  if ln.lower().startswith(b"content-length")))
                self.requests.append((head, await reader.readexactly(length)))
                for item in self.script(len(self.requests) - 1):
                    if item == "close":
                        return
                    if item == "await_eof":   # stall until the client ends the connection
                        await reader.read()
                        self.eofs += 1
                        return
                    delay, data = item
                    if delay:
                        await asyncio.sleep(delay)
                    writer.write(data)
                    await writer.drain()
        except asyncio.CancelledError:   # server shutdown (swallowed: 3.11's start_server logs cancelled handlers)
            pass
        finally:
            writer.close()
            self.tasks.discard(asyncio.current_task())


# ------------------------------------------------------------------ framing and splits over real sockets

def test_chunk_boundaries_split_inside_size_line_event_and_crlf():
    evs = _sse_stream(4)
    body = _chunked(*evs)
    starts = [len(_chunked(*evs[:k])) - 5 for k in range(len(evs) + 1)]  # where each chunk's size line starts
    c2 = starts[1]                                       # chunk 2's size line
    e3 = body.index(evs[2], starts[2]) + len(evs[2]) // 2  # the middle of SSE event 3
    crlf = body.index(evs[3], starts[3]) + len(evs[3]) + 1  # between \r and \n after event 4
    assert body[c2:c2 + 2] == b"%x" % len(evs[1]) and body[crlf - 1:crlf + 1] == b"\r\n"
    cuts = [0, c2 + 1, e3, crlf, len(body)]   # piece k (1-based) leaves k * gap after the headers
    gap = 0.02
    pieces = [(0, SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n")]
    pieces += [(gap, body[a:b]) for a, b in zip(cuts, cuts[1:])]

    async def main():
        async with RawServer(lambda i: pieces) as srv:
            client = LeanClient(srv.url)
            rec = await _post(client)
            await client.close()
            return rec, srv.requests
    rec, reqs = run(main())
    assert rec.status == R.OK, rec.error
    assert rec.http_status == 200
    assert rec.actual_output_tokens == 5 == sum(rec.chunk_tokens)
    # events 3 and 4 complete in the same read (piece 3): one chunk of 2 tokens, as the client saw them
    assert rec.chunk_tokens == [2, 1, 2] and rec.actual_input_tokens == 7
    assert rec.chunk_offsets_s == sorted(rec.chunk_offsets_s)
    # event 1 completes in piece 1, event 2 in piece 2, events 3-4 in piece 3: each is stamped on arrival (the
    # server writes the pieces >= gap apart, so the stamps are too however late the reads are handled)
    off = rec.chunk_offsets_s
    assert len(off) == 3 and off[0] >= gap and min(off[1] - off[0], off[2] - off[1]) >= gap / 2
    assert rec.end_s - rec.actual_send_s >= 4 * gap
    head, sent = reqs[0]
    assert head.startswith(b"POST /v1/completions HTTP/1.1\r\n") and b"Content-Length: 8\r\n" in head
    assert sent == b'{"x": 1}'


def test_content_length_keep_alive_reuses_one_connection_and_leaks_no_sockets():
    sse = b"".join(_sse_stream(3))
    answer = [(0, SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(sse) + sse)]
    before = _socket_fds()

    async def main():
        async with RawServer(lambda i: answer) as srv:
            client = LeanClient(srv.url)
            recs = [await _post(client) for _ in range(5)]
            seq = (srv.accepted, client.connections_opened)
            recs += await asyncio.gather(*[_post(client) for _ in range(3)])  # concurrent: needs more
            conc = (srv.accepted, client.open_connections)
            await client.close()
            await _until(lambda: srv.eofs == 3)
            return recs, seq, conc, srv.eofs, client.open_connections
    recs, seq, conc, eofs, left = run(main())
    assert all(r.status == R.OK and r.actual_output_tokens == 4 == sum(r.chunk_tokens) for r in recs)
    assert seq == (1, 1)                   # 5 sequential requests, one connection
    assert conc[0] == 3 and conc[1] == 3   # the idle one reused, two opened for the concurrent burst
    assert eofs == 3 and left == 0         # close() closed every connection; the server saw each end
    assert _socket_fds() == before


def test_connection_close_is_honoured_and_body_until_close_works():
    sse = b"".join(_sse_stream(2))

    def script(i):
        if i % 2 == 0:   # Content-Length + Connection: close
            return [(0, SSE_HEAD + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(sse) + sse), "close"]
        return [(0, SSE_HEAD + b"\r\n" + sse[:40]), (0.01, sse[40:]), "close"]   # no framing: until close

    async def main():
        async with RawServer(script) as srv:
            client = LeanClient(srv.url)
            recs = [await _post(client) for _ in range(4)]
            await client.close()
            return recs, srv.accepted
    recs, accepted = run(main())
    assert [r.status for r in recs] == [R.OK] * 4, [r.error for r in recs]
    assert all(r.actual_output_tokens == 3 == sum(r.chunk_tokens) for r in recs)
    assert accepted == 4   # never reused


def test_http_error_malformed_sse_and_short_body():
    err = json.dumps({"error": {"message": "model overloaded", "code": 503}}).encode()
    sse = b"".join(_sse_stream(3))
    whole = b'{"choices":[{"text":"a b"}],"usage":{"prompt_tokens":7,"completion_tokens":9}}'
    answers = [
        [(0, b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
          % len(err) + err)],
        [(0, SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(_ev(1), b"data: {not json\n\n", DONE))],
        [(0, SSE_HEAD + b"Content-Length: %d\r\n\r\n" % (len(sse) + 50) + sse[:len(_ev(2)) + 10]), "close"],
        [(0, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
          % (len(whole), whole))],
    ]

    async def main():
        async with RawServer(lambda i: answers[i]) as srv:
            client = LeanClient(srv.url)
            recs = [await _post(client) for _ in answers]
            await client.close()
            return recs, srv.accepted
    (e503, bad, short, js), accepted = run(main())
    assert (e503.status, e503.http_status, e503.error) == (R.HTTP_ERROR, 503, "model overloaded")
    assert bad.status == R.ERROR and "malformed SSE" in bad.error and sum(bad.chunk_tokens) == 1
    assert short.status == R.DISCONNECTED and short.chunk_tokens == [2] and short.actual_output_tokens == 2
    assert js.status == R.OK and js.chunk_tokens == [9]   # a whole-JSON (non-streaming) answer
    assert accepted == 3   # the 503 connection was reused; the broken ones were not


def test_idle_and_total_timeouts_abort_and_never_reuse():
    """Idle: one event then 5 s of silence (then the server closes: disconnected, had the idle limit not ended it).
    Total: an event every 20 ms for 10 s (never idle; without the total limit it would end ok)."""
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"

    def script(i):
        if i == 0:   # one event, then silence
            return [(0, head + b"%x\r\n%s\r\n" % (len(_ev(1)), _ev(1))), (5.0, b"")]
        if i == 1:   # an event every 20 ms forever: never idle, but the total limit ends it
            return [(0, head)] + [(0.02, b"%x\r\n%s\r\n" % (len(_ev(k + 1)), _ev(k + 1))) for k in range(500)]
        sse = b"".join(_sse_stream(1))
        return [(0, SSE_HEAD + b"Content-Length: %d\r\n\r\n" % len(sse) + sse)]

    async def main():
        async with RawServer(script) as srv:
            client = LeanClient(srv.url)
            t = time.perf_counter()
            idle = await _post(client, timeout_s=10, idle_timeout_s=0.15)
            t_idle = time.perf_counter() - t
            t = time.perf_counter()
            total = await _post(client, timeout_s=0.3, idle_timeout_s=1.0)
            t_total = time.perf_counter() - t
            ok = await _post(client)
            await client.close()
            return idle, t_idle, total, t_total, ok, srv.accepted
    idle, t_idle, total, t_total, ok, accepted = run(main())
    assert idle.status == R.TIMEOUT and idle.chunk_tokens == [1] and idle.actual_output_tokens == 1
    assert t_idle >= 0.15
    assert total.status == R.TIMEOUT and t_total >= 0.3 and len(total.chunk_tokens) >= 1
    assert ok.status == R.OK
    assert accepted == 3


def test_cancellation_closes_the_connection():
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"

    async def main():
        async with RawServer(lambda i: [(0, head), "await_eof"]) as srv:
            client = LeanClient(srv.url)
            task = asyncio.ensure_future(_post(client))
            await _until(lambda: srv.requests)   # in flight: the server has it
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _until(lambda: srv.eofs)
            state = (client.open_connections, srv.eofs)
            await client.close()
            return state
    assert run(main()) == (0, 1)


def test_lean_transport_sends_without_a_task_when_a_connection_is_idle_and_cancels_both_kinds():
    head = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"

    async def main():
        async with RawServer(lambda i: [(0, head), "await_eof"]) as srv:
            t = LeanTransport(srv.url, None, clock=time.perf_counter, timeout_s=60, idle_timeout_s=60, spare=0)
            await t.open(1)
            recs = [RequestRecord(f"r{k}", k, 0.0, 1, 1) for k in range(2)]
            sinks = [RecordSink(rec, 0.0, time.perf_counter()) for rec in recs]
            made = sinks[1].send
            on_idle = t.start(b"{}", sinks[0], "r0")       # the warm connection: written at once
            connecting = t.start(b"{}", sinks[1], "r1")    # none idle: a task connects and sends
            kinds = (isinstance(on_idle, asyncio.Task), isinstance(connecting, asyncio.Task))
            await _until(lambda: len(srv.requests) == 2)
            t.cancel([on_idle, connecting])
            await asyncio.gather(on_idle, connecting, return_exceptions=True)
            ends = (type(on_idle.exception()).__name__, connecting.cancelled())
            await _until(lambda: srv.eofs == 2)
            heads = sorted(h.split(b"X-Request-Id: ")[1].split(b"\r\n")[0] for h, _ in srv.requests)
            await t.aclose()
            return kinds, ends, srv.eofs, heads, recs, t.open_connections, (made, sinks[1].send)
    kinds, ends, eofs, heads, recs, left, (made, sent) = run(main())
    assert kinds == (False, True) and ends == ("StreamError", True)
    assert eofs == 2 and heads == [b"r0", b"r1"] and left == 0
    # the task stamped its own send (on the sink and the record); the write at once kept the caller's stamp
    assert recs[1].actual_send_s == sent >= made and recs[0].actual_send_s is None


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command for a test certificate")
def test_https(tmp_path):
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    sse = b"".join(_sse_stream(3))
    answer = [(0, SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"), (0.01, _chunked(sse))]

    async def main():
        async with RawServer(lambda i: answer, server_ctx) as srv:
            trusting = LeanClient(srv.url, ssl_context=ssl.create_default_context(cafile=str(cert)))
            recs = [await _post(trusting) for _ in range(3)]
            await trusting.close()
            untrusting = LeanClient(srv.url)   # the system CAs do not know this certificate
            bad = await _post(untrusting)
            await untrusting.close()
            return recs, srv.accepted, bad
    recs, accepted, bad = run(main())
    assert all(r.status == R.OK and r.actual_output_tokens == 4 == sum(r.chunk_tokens) for r in recs)
    assert accepted == 1   # reused over TLS (the untrusting client never got past the handshake)
    assert bad.status == R.ERROR and "CERTIFICATE_VERIFY_FAILED" in bad.error


def test_connection_refused_is_an_error():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()

    async def main():
        return await _post(LeanClient(f"http://127.0.0.1:{port}/v1/completions"))
    rec = run(main())
    assert rec.status == R.ERROR and "cannot connect" in rec.error


# ------------------------------------------------------------------ every split position, through the parser itself

class _Transport:
    def __init__(self):
        self.closing, self.written = False, []

    def write(self, data):
        self.written.append(data)

    def is_closing(self):
        return self.closing

    def get_write_buffer_size(self):
        return 0

    def close(self):
        self.closing = True

    abort = close


def test_parser_gives_the_same_record_for_every_split():
    evs = _sse_stream(5)[:-1] + [b": comment\r\ndata: [DONE]\r\n\r\n"]   # CRLF-delimited SSE too
    body = SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + _chunked(*evs)
    rng = random.Random(3)
    splits = [[i] for i in range(1, len(body))] + [sorted(rng.sample(range(1, len(body)), 12)) for _ in range(50)]

    async def main():
        client = LeanClient("http://127.0.0.1:9/v1/completions")
        client._loop = asyncio.get_running_loop()
        out = []
        for cuts in splits:
            conn = _Conn(client)
            conn.connection_made(_Transport())
            rec = RequestRecord("r", 0, 0.0, 1, 1)
            fut = client._loop.create_future()
            conn.start(fut, RecordSink(rec, 0.0, 0.0), b"req", 0.0, 60, 60)
            for k, (a, b) in enumerate(zip([0] + cuts, cuts + [len(body)])):
                conn.data_received(body[a:b])
            out.append((fut.done() and fut.exception() is None, rec.status, sum(rec.chunk_tokens),
                        rec.actual_output_tokens, conn in client._idle, len(rec.chunk_tokens) <= 5))
            client._idle.clear()
        return out
    for got in run(main()):
        # events completing in one read merge into one chunk, so only the totals are split-independent
        assert got == (True, R.OK, 6, 6, True, True)


# ------------------------------------------------------------------ against the real stub

@pytest.fixture(scope="module")
def stub():
    url, stop = run_stub_in_thread(ttft_s=0.030, tpot_s=0.005)
    yield url + "/v1/completions"
    stop()


def _stub_body(n_out: int) -> bytes:
    return json.dumps({"model": "m", "prompt": list(range(16)), "max_tokens": n_out, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()


async def _stub_post(client, n_out, **kw):
    rec = RequestRecord("r", 0, 0.0, 16, n_out)
    send = time.perf_counter()
    sink = RecordSink(rec, send, send)
    try:
        await client.request(_stub_body(n_out), sink, send=send, **kw)
    except StreamError as e:
        rec.status, rec.error = e.status, str(e)
        sink.partial()
    return rec


def test_stub_exact_tokens_monotone_timestamps_and_reuse(stub):
    async def main():
        client = LeanClient(stub)
        recs = [await _stub_post(client, n) for n in (1, 7, 12)]
        recs += await asyncio.gather(*[_stub_post(client, 5) for _ in range(4)])
        opened = client.connections_opened
        await client.close()
        return recs, opened
    recs, opened = run(main())
    for r, n in zip(recs, (1, 7, 12, 5, 5, 5, 5)):
        assert r.status == R.OK, r.error
        assert r.actual_output_tokens == n == sum(r.chunk_tokens) and r.actual_input_tokens == 16
        assert r.chunk_offsets_s == sorted(r.chunk_offsets_s)
        assert r.first_token_s >= 0.030                  # never before the stub's TTFT
        for k, off in enumerate(r.chunk_offsets_s):   # the stub paces chunk k from receipt: never early
            assert off >= 0.030 + k * 0.005
    assert opened == 4   # one for the sequential three, reused once, three more for the burst


@pytest.mark.parametrize("fault,status,code", [
    ("status:500", R.HTTP_ERROR, 500), ("disconnect:3", R.DISCONNECTED, 200),
    ("hang", R.TIMEOUT, None), ("garbage", R.ERROR, 200)])
def test_stub_faults(stub, fault, status, code):
    async def main():
        client = LeanClient(stub, {"X-Stub-Fault": fault})
        recs = await asyncio.gather(*[_stub_post(client, 6, timeout_s=0.4) for _ in range(2)])
        await client.close()
        return recs
    for r in run(main()):
        assert r.status == status and r.http_status == code and r.error
        if fault.startswith("disconnect"):
            assert sum(r.chunk_tokens) == 3 == r.actual_output_tokens
        if fault.startswith("status"):
            assert "injected fault" in r.error
