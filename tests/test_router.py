"""The P/D router on real sockets: co-located streaming, vLLM's kv_transfer_params flow, phase log, JSQ spread,
failures (dead / hanging instances), the child-process helper and merging phases into client records."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time

import aiohttp
import orjson
import pytest
from aiohttp import web

from splitbench.errors import InputError
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.schema.runmeta import read_run_meta
from splitbench.servers.phaselog import load_phase_log, merge_phases
from splitbench.servers.router import PREFILL_KV_PARAMS, Router
from splitbench.servers.router_process import RouterProcess, parse_instance_spec
from splitbench.servers.stub_main import run_stub_in_thread


@pytest.fixture
def stubs():
    """Factory for in-process stubs; all stopped at the end of the test."""
    stops = []

    def make(**kw):
        url, stop = run_stub_in_thread(**{"ttft_s": 0.005, "tpot_s": 0.001, **kw})
        stops.append(stop)
        return url, stop
    yield make
    for s in stops:
        s()


@contextlib.asynccontextmanager
async def running(instances, policy="jsq", **kw):
    r = Router(instances, policy, **kw)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


async def post_sse(url: str, body: dict, rid: str | None = None, path: str = "/v1/completions", headers=None):
    """-> (status, [data payloads], raw body)"""
    h = {"X-Request-Id": rid} if rid else {}
    h.update(headers or {})
    async with aiohttp.ClientSession() as s:
        async with s.post(url + path, json=body, headers=h) as r:
            raw = await r.read()
            return r.status, [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")], raw


async def metrics(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def _strip(payload: bytes):
    if payload == b"[DONE]":
        return payload
    d = json.loads(payload)
    d.pop("id"), d.pop("created")
    return d


BODY = {"model": "stub-model", "prompt": [5] * 40, "max_tokens": 6, "min_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


def test_colocated_proxy_streams_exactly_what_the_instance_sends(stubs, tmp_path):
    url, _ = stubs(prefix_block_tokens=0)   # no prefix cache: the second copy of BODY gets the same answer

    async def go():
        async with running([{"id": "b0", "url": url, "pool": "baseline"}], phase_log=tmp_path / "p.jsonl") as r:
            direct = await post_sse(url, BODY)
            via = await post_sse(r.url, BODY, rid="req-1")
            chat = await post_sse(r.url, {**BODY, "messages": [{"role": "user", "content": "a b c"}]},
                                  rid="req-2", path="/v1/chat/completions")
            async with aiohttp.ClientSession() as s:
                async with s.get(r.url + "/v1/models") as m:
                    models = await m.json()
                async with s.get(r.url + "/health") as h:
                    health = h.status
            return direct, via, chat, models, health
    direct, via, chat, models, health = asyncio.run(go())
    assert via[0] == 200 and len(via[1]) == 6 + 2  # 6 tokens, usage chunk, [DONE]
    assert [_strip(p) for p in via[1]] == [_strip(p) for p in direct[1]]
    assert chat[0] == 200 and b'"role":"assistant"' in chat[2] and chat[2].count(b" tok") == 6
    assert models["data"][0]["id"] == "stub-model" and health == 200
    log = load_phase_log(tmp_path / "p.jsonl")
    e = log["req-1"]
    assert (e["instance"], e["pool"], e["flow"], e["status"], e["http_status"]) == ("b0", "baseline", "colocated",
                                                                                     "ok", 200)
    assert (e["input_tokens"], e["output_tokens"]) == (40, 6)
    ph = e["phases_unix_s"]
    assert list(ph) == ["router_recv", "sent", "first_token", "done"]
    assert ph["router_recv"] <= ph["sent"] <= ph["first_token"] <= ph["done"]
    assert ph["first_token"] - ph["sent"] >= 0.005  # the stub's TTFT
    assert abs(ph["done"] - time.time()) < 30


async def _recorder(prompt_answer_kv: dict):
    """A fake prompt instance and a fake token instance that record what they receive."""
    seen = {"prompt": [], "token": []}

    async def prompt(request):
        seen["prompt"].append((request.headers.copy(), await request.json()))
        return web.json_response({"id": "cmpl-x", "choices": [{"index": 0, "text": " a"}],
                                  "kv_transfer_params": prompt_answer_kv})

    async def token(request):
        seen["token"].append((request.headers.copy(), await request.json()))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(3):
            await resp.write(b'data: {"choices":[{"text":"t%d"}]}\n\n' % k)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def health(request):
        return web.Response(text="ok")

    runners, urls = [], []
    for handler in (prompt, token):
        app = web.Application()
        app.router.add_post("/v1/completions", handler)
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
    return seen, urls, runners


def test_split_flow_speaks_vllm_kv_transfer_protocol_exactly():
    kv = {"do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [3, 4],
          "remote_engine_id": "eng-7", "remote_request_id": "x", "remote_host": "10.0.0.1", "remote_port": 5600,
          "tp_size": 1}

    async def go():
        seen, (p_url, t_url), runners = await _recorder(kv)
        try:
            async with running([{"id": "p0", "url": p_url, "pool": "prompt"},
                                {"id": "t0", "url": t_url, "pool": "token"}]) as r:
                res = await post_sse(r.url, {**BODY, "max_completion_tokens": 6}, rid="abc",
                                     headers={"Authorization": "Bearer k"})
        finally:
            for x in runners:
                await x.cleanup()
        return seen, res
    seen, (status, payloads, _) = asyncio.run(go())
    assert status == 200 and payloads[-1] == b"[DONE]" and len(payloads) == 4
    (ph, pb), = seen["prompt"]
    (th, tb), = seen["token"]
    assert pb["kv_transfer_params"] == PREFILL_KV_PARAMS
    assert (pb["max_tokens"], pb["max_completion_tokens"], pb["stream"]) == (1, 1, False)
    assert "stream_options" not in pb and "min_tokens" not in pb and pb["prompt"] == BODY["prompt"]
    assert tb == {**BODY, "max_completion_tokens": 6, "kv_transfer_params": kv}
    assert ph["X-Request-Id"] == th["X-Request-Id"] == "abc"
    assert ph["Authorization"] == th["Authorization"] == "Bearer k"


def test_split_flow_on_stubs_counts_and_phases(stubs, tmp_path):
    decode_ttft_s = 60.0   # what a token stub would take if it prefilled itself: the KV transfer replaces it
    prompts = [stubs(ttft_s=0.03)[0] for _ in range(2)]
    tokens = [stubs(ttft_s=decode_ttft_s, kv_transfer_s=0.004)[0] for _ in range(2)]
    inst = [{"id": f"p{i}", "url": u, "pool": "prompt"} for i, u in enumerate(prompts)] + \
           [{"id": f"t{i}", "url": u, "pool": "token"} for i, u in enumerate(tokens)]
    n = 8

    async def go():
        async with running(inst, "round-robin", phase_log=tmp_path / "p.jsonl") as r:
            res = await asyncio.gather(*(post_sse(r.url, BODY, rid=f"r{k}") for k in range(n)))
            ms = [await metrics(u) for u in prompts + tokens]
            return res, ms, await metrics(r.url)
    res, ms, rm = asyncio.run(go())
    assert all(s == 200 and p[-1] == b"[DONE]" and raw.count(b" tok") == 6 for s, p, raw in res)
    key = 'vllm:generation_tokens_total{model_name="stub-model"}'
    for m in ms[:2]:  # prompt stubs: prefill-only requests of one token each, never a decode
        assert m["splitbench_stub_prefill_only_total"] == m["splitbench_stub_requests_total"] == n / 2
        assert m[key] == n / 2 and m["splitbench_stub_remote_decode_total"] == 0
    for m in ms[2:]:  # token stubs: every request arrived with do_remote_prefill
        assert m["splitbench_stub_remote_decode_total"] == m["splitbench_stub_requests_total"] == n / 2
        assert m[key] == 6 * n / 2 and m["splitbench_stub_prefill_only_total"] == 0
    assert rm["splitbench_router_split_total"] == n and rm["splitbench_router_ok_total"] == n
    assert rm['splitbench_router_instance_pending_decode_tokens{instance="t0",pool="token"}'] == 0
    log = load_phase_log(tmp_path / "p.jsonl")
    assert sorted(log) == [f"r{k}" for k in range(n)]
    order = ["router_recv", "prefill_sent", "prefill_done", "decode_sent", "first_token", "done"]
    for e in log.values():
        ph = e["phases_unix_s"]
        assert list(ph) == order and [ph[k] for k in order] == sorted(ph[k] for k in order)
        assert ph["prefill_done"] - ph["prefill_sent"] >= 0.03           # prompt stub's TTFT
        assert 0.004 <= ph["first_token"] - ph["decode_sent"] < decode_ttft_s   # the KV transfer, no prefill
        assert e["flow"] == "split" and e["instance"] == f"{e['prompt_instance']}>{e['token_instance']}"


def test_jsq_spreads_concurrent_load(stubs, tmp_path):
    # a TTFT long enough that all 30 requests are in flight before the first finishes (checked below): then JSQ
    # over equal requests must split them evenly, whatever the host's speed
    urls = [stubs(ttft_s=2.0, tpot_s=0.01)[0] for _ in range(3)]
    inst = [{"id": f"b{i}", "url": u, "pool": "baseline"} for i, u in enumerate(urls)]

    async def go():
        async with running(inst, "jsq", phase_log=tmp_path / "p.jsonl") as r:
            res = await asyncio.gather(*(post_sse(r.url, {**BODY, "max_tokens": 5}, rid=f"r{k}")
                                         for k in range(30)))
            return res, [await metrics(u) for u in urls]
    res, ms = asyncio.run(go())
    assert all(s == 200 for s, _, _ in res)
    counts = [m["splitbench_stub_requests_total"] for m in ms]
    log = load_phase_log(tmp_path / "p.jsonl").values()
    assert max(e["phases_unix_s"]["router_recv"] for e in log) < min(e["phases_unix_s"]["done"] for e in log)
    assert sum(counts) == 30 and max(counts) - min(counts) <= 1, counts
    by_inst = [e["instance"] for e in log]
    assert [by_inst.count(f"b{i}") for i in range(3)] == counts


def test_dead_instance_leaves_rotation_fails_fast_and_comes_back(stubs, tmp_path):
    live, _ = stubs()
    dead, stop_dead = stubs()
    port = int(dead.rsplit(":", 1)[1])
    inst = [{"id": "dead", "url": dead, "pool": "baseline"}, {"id": "live", "url": live, "pool": "baseline"}]
    connect_timeout_s = 120.0

    async def go():
        # no health polls of its own during the test (the test polls): what the router knows comes from requests
        async with running(inst, "round-robin", phase_log=tmp_path / "p.jsonl", health_interval_s=3600,
                           connect_timeout_s=connect_timeout_s) as r:
            stop_dead()  # after the router saw it healthy
            t = time.perf_counter()
            first = await post_sse(r.url, BODY, rid="f0")
            rest = [await post_sse(r.url, BODY, rid=f"f{k}") for k in range(1, 5)]
            elapsed = time.perf_counter() - t
            m1 = await metrics(r.url)
            _, stop2 = stubs(port=port)  # the instance comes back on its port
            await r.poll_health()
            back = [await post_sse(r.url, BODY, rid=f"g{k}") for k in range(2)]
            return first, rest, elapsed, m1, back, await metrics(r.url)
    first, rest, elapsed, m1, back, m2 = asyncio.run(go())
    assert first[0] == 502 and "dead" in json.loads(first[2])["error"]["message"]
    assert all(s == 200 for s, _, _ in rest)
    assert elapsed < connect_timeout_s   # failed on the refused connection, never waited for a timeout
    assert m1["splitbench_router_marked_unhealthy_total"] == 1
    assert m1['splitbench_router_instance_healthy{instance="dead",pool="baseline"}'] == 0
    assert all(s == 200 for s, _, _ in back)
    assert m2["splitbench_router_recovered_total"] >= 1
    log = load_phase_log(tmp_path / "p.jsonl")
    assert (log["f0"]["status"], log["f0"]["http_status"], log["f0"]["instance"]) == ("upstream_error", 502, "dead")
    assert log["f0"]["error"] and all(log[f"f{k}"]["instance"] == "live" for k in range(1, 5))
    assert {log["g0"]["instance"], log["g1"]["instance"]} == {"dead", "live"}


def test_hanging_instances_time_out_and_bad_requests_pass_through(stubs, tmp_path):
    p, _ = stubs()
    t, _ = stubs()
    split = [{"id": "p0", "url": p, "pool": "prompt"}, {"id": "t0", "url": t, "pool": "token"}]

    async def go():
        async with running(split, phase_log=tmp_path / "p.jsonl", prefill_timeout_s=0.3) as r:
            # a 4xx is the request's fault: passed on, the instance stays in rotation
            bad = await post_sse(r.url, BODY, rid="b", headers={"X-Stub-Fault": "nonsense"})
            t0 = time.perf_counter()
            hang = await post_sse(r.url, BODY, rid="h", headers={"X-Stub-Fault": "hang"})
            hang_s = time.perf_counter() - t0
            m = await metrics(r.url)
        async with running([{"id": "b0", "url": t, "pool": "baseline"}], idle_timeout_s=0.3) as r:
            t0 = time.perf_counter()
            hang2 = await post_sse(r.url, BODY, headers={"X-Stub-Fault": "hang"})
            hang2_s = time.perf_counter() - t0
        return hang, hang_s, bad, m, hang2, hang2_s
    hang, hang_s, bad, m, hang2, hang2_s = asyncio.run(go())
    # the router's timeouts answer 502 (the client's own timeout, 5 min, would raise instead)
    assert hang[0] == 502 and hang_s >= 0.3 and "prefill" in json.loads(hang[2])["error"]["message"]
    assert hang2[0] == 502 and hang2_s >= 0.3
    assert bad[0] == 400 and b"X-Stub-Fault" in bad[2]
    assert m["splitbench_router_http_error_total"] == 1 and m["splitbench_router_upstream_error_total"] == 1
    log = load_phase_log(tmp_path / "p.jsonl")
    assert (log["h"]["status"], log["h"]["stage"]) == ("upstream_error", "prefill")
    assert log["b"]["status"] == "http_error" and log["b"]["http_status"] == 400


def test_no_healthy_route_is_503_and_bad_body_is_400(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"

    async def go():
        async with running([{"id": "p0", "url": closed, "pool": "prompt"},
                            {"id": "t0", "url": closed, "pool": "token"}], phase_log=tmp_path / "p.jsonl") as r:
            no_route = await post_sse(r.url, BODY, rid="n")
            async with aiohttp.ClientSession() as s:
                async with s.post(r.url + "/v1/completions", data=b"[1,2") as resp:
                    bad = resp.status
                async with s.get(r.url + "/health") as resp:
                    health = resp.status
        return no_route, bad, health
    no_route, bad, health = asyncio.run(go())
    assert no_route[0] == 503 and "unhealthy" in json.loads(no_route[2])["error"]["message"]
    assert bad == 400 and health == 503
    assert load_phase_log(tmp_path / "p.jsonl")["n"]["status"] == "no_instance"


def test_merge_phases_converts_router_clock_to_run_clock(tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [{"kind": "anchor", "unix_s": 1000.0, "perf_s": 50.0},
             {"request_id": "a", "instance": "p0>t1", "pool": "prompt", "prompt_instance": "p0", "token_instance": "t1",
              "prefill_pool": "prompt", "decode_pool": "token", "t": {"router_recv": 51.0, "done": 52.5}}]
    path.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines) + b'{"request_id": "torn')
    log = load_phase_log(path)
    recs = [RequestRecord("a", 0, 0.0, 1, 1), RequestRecord("b", 1, 0.1, 1, 1)]
    out = merge_phases(recs, log, t0_unix_s=1000.25)
    a = out[0]
    assert (a.prefill_instance, a.decode_instance, a.prefill_pool, a.decode_pool, a.instance, a.pool) == \
        ("p0", "t1", "prompt", "token", None, "split")
    assert out[0].phases_s == pytest.approx({"router_recv": 0.75, "done": 2.25})
    assert out[1] == recs[1] and recs[0].phases_s == {}  # inputs untouched


def test_router_process_end_to_end_with_the_replayer(stubs, tmp_path):
    """A real run (runner + replayer) through the router as a child process; merged phases line up with the
    client's own timestamps on its run clock."""
    from splitbench.app.options import RunOptions
    from splitbench.app.runner import run
    p, _ = stubs(ttft_s=0.02)
    t, _ = stubs(ttft_s=0.3, kv_transfer_s=0.003)
    rp = RouterProcess([{"id": "p0", "url": p, "pool": "prompt"}, {"id": "t0", "url": t, "pool": "token"}],
                       "jsq", phase_log=tmp_path / "phases.jsonl")
    rp.start(timeout_s=120)
    try:
        res = run(RunOptions(trace="synth:arrivals=poisson,rate=40,duration=0.5,lengths=fixed,input=32,output=4,"
                                   "seed=3", duration_s=None, backend="openai", backend_options={"url": rp.url},
                             results_dir=str(tmp_path / "res"), vocab_size=1000))
    finally:
        rp.stop()
        rp.stop()  # idempotent
    assert rp.proc is None
    recs = R.read_records(res.run_dir)
    t0 = read_run_meta(res.run_dir)["t0_unix_s"]
    log = load_phase_log(tmp_path / "phases.jsonl")
    assert set(log) == {r.request_id for r in recs}, \
        "the replayer must send X-Request-Id: <request_id> on every request (the router's phase-log key)"
    merged = merge_phases(recs, log, t0)
    assert merged and all(r.ok for r in merged)
    order = ["router_recv", "prefill_sent", "prefill_done", "decode_sent", "first_token", "done"]
    for r in merged:
        ph = r.phases_s
        assert (r.prefill_instance, r.decode_instance, r.pool) == ("p0", "t0", "split")
        assert list(ph) == order and [ph[k] for k in order] == sorted(ph.values())
        assert ph["prefill_done"] - ph["prefill_sent"] >= 0.02
    # The two processes' clocks meet through time.time() anchors, so the router's times may sit off the client's
    # by one constant e (their anchors' skew; large only if a process was preempted while anchoring). Causality
    # bounds e per request: send <= router_recv + e and router first_token + e <= client first token.
    # One e must fit every request: phases are on the run clock, not shifted per request or scaled.
    e_lo = max(r.actual_send_s - r.phases_s["router_recv"] for r in merged)
    e_hi = min(r.first_token_s - r.phases_s["first_token"] for r in merged)
    assert e_lo <= e_hi, (e_lo, e_hi)
    assert e_lo < 1.0 and e_hi > -1.0   # and the anchors agree to well within a second


def test_parse_instance_spec():
    assert parse_instance_spec("id=p0,url=http://h:1,pool=prompt") == {"id": "p0", "url": "http://h:1",
                                                                       "pool": "prompt"}
    for bad in ("id=p0,url=http://h:1", "id=p0,url=h:1,pool=prompt", "id=p0,url=http://h:1,pool=decode",
                "id=p0,url=http://h:1,pool=prompt,x=1"):
        with pytest.raises(InputError):
            parse_instance_spec(bad)


def test_a_health_probe_that_only_times_out_ejects_after_three_in_a_row(tmp_path):
    """A busy CPU vLLM can answer /health late: one slow probe must not take it out (the default run saw 503s
    'no healthy route' from that), three in a row do; a refused connection still ejects at once."""
    slow = {"on": False}

    async def go():
        async def health(request):
            if slow["on"]:
                await asyncio.sleep(1.5)      # past the probe's 1 s timeout
            return web.Response(text="ok")
        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with running([{"id": "b0", "url": url, "pool": "baseline"}], phase_log=tmp_path / "p.jsonl",
                               health_interval_s=3600) as r:
                slow["on"] = True
                seen = []
                for _ in range(3):
                    await r.poll_health()
                    seen.append((await metrics(r.url))['splitbench_router_instance_healthy{instance="b0",pool="baseline"}'])
                slow["on"] = False
                await r.poll_health()
                seen.append((await metrics(r.url))['splitbench_router_instance_healthy{instance="b0",pool="baseline"}'])
                return seen
        finally:
            await runner.cleanup()
    assert asyncio.run(go()) == [1, 1, 0, 1]
