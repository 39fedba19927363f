"""P/D router: a lean HTTP/1.1 server (lean_http.py) that places each request with a policy (co-located, or split
prefill->decode with vLLM's kv_transfer_params protocol), streams the answer back over lean-client pools (upstream.py),
tracks health and pending tokens, logs phases. Run it: `python -m splitbench.servers.router_process --instance ...`."""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import orjson

from splitbench.errors import InputError
from splitbench.policies import POOLS, Decision, Ledger, NoHealthyInstance, Policy, Request, make_policy, routable
from splitbench.prefix_policy import request_hashes
from splitbench.schema import records as R
from splitbench.servers.lean_http import TaskConn, error_body, header, header_items
from splitbench.servers.phaselog import PhaseLog
from splitbench.servers.upstream import PREFILL_KV_PARAMS, StreamError, Upstream, prefill_body

__all__ = ["PREFILL_KV_PARAMS", "Router", "count_input_tokens", "prefill_body"]   # PREFILL_*, prefill_body: upstream.py

DEFAULT_OUTPUT_TOKENS = 16  # pending-token estimate for requests without max_tokens
_HOP = frozenset(h.lower() for h in ("Host", "Content-Length", "Connection", "Keep-Alive", "Transfer-Encoding",
                                      "TE", "Upgrade", "Proxy-Authorization", "Proxy-Connection", "X-Request-Id",
                                      "Accept-Encoding", "Content-Type"))  # bodies are always sent as JSON
_UPSTREAM_ERRORS = (StreamError, OSError)
PROBE_TIMEOUTS_TO_EJECT = 3   # health probes that time out in a row before an instance is taken out
MAX_BODY_BYTES = 256 * 2**20  # of a request
SHUTDOWN_S = 1.0              # stop(): requests in flight get this long to end before their connections are cut
_ROUTES = {b"/v1/completions": (b"POST", "proxy"), b"/v1/chat/completions": (b"POST", "proxy"),
           b"/health": (b"GET", "health"), b"/v1/models": (b"GET", "models"), b"/metrics": (b"GET", "metrics")}
_KINDS = {400: "BadRequestError", 404: "NotFoundError", 405: "BadRequestError", 500: "InternalServerError",
          502: "BadGateway", 503: "ServiceUnavailable"}
_TEXT = b"text/plain; charset=utf-8"


class _ClientGone(Exception):
    """Writing to the downstream client failed (it disconnected)."""


def count_input_tokens(body: dict) -> int:
    """Token-id prompt -> its length; text prompts and chat messages -> a word count (an estimate)."""
    p = body.get("prompt")
    if p is None:
        p = [m.get("content") for m in body.get("messages") or () if isinstance(m, dict)]
    if isinstance(p, str):
        return len(p.split())
    if isinstance(p, list):
        if p and type(p[0]) is int:
            return len(p)
        n = 0
        for x in p:
            if isinstance(x, str):
                n += len(x.split())
            elif isinstance(x, list):
                n += len(x) if x and type(x[0]) is int else sum(
                    len(str(c.get("text", "")).split()) for c in x if isinstance(c, dict))
        return n
    return 0


def _err(status: int, message: str) -> bytes:
    """An OpenAI-style JSON error body."""
    return error_body(status, message, _KINDS.get(status, "Error"))


class _Conn(TaskConn):
    """One downstream connection: requests up to MAX_BODY_BYTES, phases on time.perf_counter."""
    max_body_bytes = MAX_BODY_BYTES
    clock = staticmethod(time.perf_counter)


class Router:
    """The proxy. `instances`: dicts with id, url, pool (prompt|token|mixed|baseline). async start()/stop()."""

    def __init__(self, instances: Sequence[dict], policy: Policy | str = "jsq", host: str = "127.0.0.1",
                 port: int = 0, phase_log: str | os.PathLike | None = None, *, seed: int = 0,
                 policy_params: dict | None = None, health_interval_s: float = 1.0, connect_timeout_s: float = 5.0,
                 prefill_timeout_s: float = 600.0, request_timeout_s: float = 3600.0, idle_timeout_s: float = 120.0):
        if not instances:
            raise InputError("router needs at least one --instance")
        self.urls: dict[str, str] = {}
        for i in instances:
            if not {"id", "url", "pool"} <= set(i):
                raise InputError(f"router instance {i!r} needs id, url and pool")
            self.urls[str(i["id"])] = str(i["url"]).rstrip("/")
        try:
            self.ledger = Ledger((str(i["id"]), str(i["pool"])) for i in instances)
            self.policy = make_policy(policy, seed, **(policy_params or {})) if isinstance(policy, str) else policy
        except ValueError as e:
            raise InputError(str(e)) from None
        self.host, self.port = host, port
        self.phase_log_path = Path(phase_log) if phase_log else None
        self.phase_log: PhaseLog | None = None
        self.health_interval_s = health_interval_s
        self._probe_timeouts: dict[str, int] = {}   # consecutive timed-out health probes per instance
        self._connect_timeout_s, self._prefill_timeout_s = connect_timeout_s, prefill_timeout_s
        self._request_timeout_s, self._idle_timeout_s = request_timeout_s, idle_timeout_s
        self.n: dict[str, int] = {k: 0 for k in ("requests", "split", "colocated", "ok", "http_error",
                                                 "upstream_error", "no_instance", "bad_request", "cancelled",
                                                 "inflight", "marked_unhealthy", "recovered")}
        self.per_instance = {i: {"prompt": 0, "token": 0, "colocated": 0, "failures": 0} for i in self.urls}
        self.per_pool: dict[str, int] = dict.fromkeys(POOLS, 0)
        self.perf = time.perf_counter
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self.conns: set[_Conn] = set()            # open downstream connections
        self.upstream: dict[str, Upstream] = {}   # instance id -> its keep-alive pool (lean client)
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Open the upstream pools, poll health once, listen (self.port is the bound port), open the phase log
        (after the bind: a port in use leaves no log behind; no request can end before it is open)."""
        self.loop = asyncio.get_running_loop()
        self.upstream = {i: Upstream(u, connect_timeout_s=self._connect_timeout_s) for i, u in self.urls.items()}
        await self.poll_health()
        self._server = await self.loop.create_server(lambda: _Conn(self, self.loop), self.host, self.port, backlog=4096,
                                                     reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.phase_log_path:
            self.phase_log = PhaseLog(self.phase_log_path, policy=getattr(self.policy, "name", "?"),
                                      instances=[{"id": i, "url": self.urls[i], "pool": self.ledger.pool[i]}
                                                 for i in self.ledger.order])
        self._tasks = [asyncio.create_task(self._health_loop()), asyncio.create_task(self._flush_loop())]

    async def stop(self) -> None:
        """Stop listening, give requests in flight SHUTDOWN_S to end, cut every connection, close upstream
        connections, flush and close the phase log. Idempotent."""
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            busy = [c.task for c in self.conns if c.task is not None]
            if busy:
                await asyncio.wait(busy, timeout=SHUTDOWN_S)
            busy = [c.task for c in self.conns if c.task is not None]
            for c in list(self.conns):
                c.abort()
            for t in busy:
                t.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
        upstream, self.upstream = self.upstream, {}
        await asyncio.gather(*(u.close() for u in upstream.values()))
        if self.phase_log is not None:
            self.phase_log.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.phase_log is not None:
                self.phase_log.flush()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.poll_health()

    async def poll_health(self) -> None:
        """GET /health of every instance (timeout <= 1 s). 200 = healthy; an answer other than 200 or a refused
        connection = unhealthy at once; a probe that only timed out (a busy CPU server) counts toward
        PROBE_TIMEOUTS_TO_EJECT in a row, as Kubernetes' failureThreshold and Envoy's outlier detection do."""
        timeout_s = min(1.0, max(self.health_interval_s, 0.2))

        async def one(iid: str) -> None:
            timed_out = False
            try:
                ok = (await self.upstream[iid].fetch("/health", method="GET", timeout_s=timeout_s)).status == 200
            except _UPSTREAM_ERRORS as e:
                ok, timed_out = False, getattr(e, "status", None) == R.TIMEOUT
            self._probe_timeouts[iid] = self._probe_timeouts.get(iid, 0) + 1 if timed_out else 0
            if timed_out and self._probe_timeouts[iid] < PROBE_TIMEOUTS_TO_EJECT:
                return   # slow, not dead (yet): keep its state
            if ok and not self.ledger.healthy[iid]:
                self.n["recovered"] += 1
            self.ledger.set_healthy(iid, ok)

        await asyncio.gather(*(one(i) for i in self.ledger.order))

    def _mark_unhealthy(self, iid: str) -> None:
        self.per_instance[iid]["failures"] += 1
        if self.ledger.healthy[iid]:
            self.ledger.set_healthy(iid, False)
            self.n["marked_unhealthy"] += 1

    # ------------------------------------------------------------------ downstream requests
    def handle(self, conn: _Conn, method: bytes, path: bytes, head: bytes, low: bytes, body: bytes, t_recv: float):
        """Route one request: answered here (None), or the coroutine that answers it (run as the request's task)."""
        route = _ROUTES.get(path.split(b"?", 1)[0])
        if route is None:
            return conn.reply(404, _err(404, f"no route {path[:200].decode('latin-1')}"))
        want, name = route
        if method != want and not (want == b"GET" and method == b"HEAD"):
            return conn.reply(405, _err(405, f"method {method[:20].decode('latin-1')} not allowed"),
                              extra=b"Allow: %s\r\n" % want)
        if name == "proxy":
            return self._proxy(conn, path.split(b"?", 1)[0].decode(), head, low, body, t_recv)
        if name == "models":
            return self._models(conn)
        if name == "health":
            views = self.ledger.views()
            body = {"status": "ok" if routable(views) else "unavailable",
                    "instances": {v.id: v.healthy for v in views}}
            return conn.reply(200 if routable(views) else 503, orjson.dumps(body))
        return conn.reply(200, self.metrics_text().encode(), _TEXT)

    async def _models(self, conn: _Conn) -> None:
        for iid in self.ledger.order:
            if self.ledger.healthy[iid]:
                try:
                    a = await self.upstream[iid].fetch("/v1/models", method="GET", timeout_s=self._prefill_timeout_s)
                except _UPSTREAM_ERRORS as e:
                    self._mark_unhealthy(iid)
                    return conn.reply(502, _err(502, f"instance {iid}: {e}"))
                return conn.reply(a.status, a.body, a.content_type.encode("latin-1"))
        conn.reply(503, _err(503, "no healthy instance"))

    def metrics_text(self) -> str:
        """The router's counters and the instances' state, Prometheus text format."""
        rows = [f"# TYPE splitbench_router_{k}_total counter\nsplitbench_router_{k}_total {v}\n"
                for k, v in self.n.items() if k != "inflight"]
        rows.append(f"# TYPE splitbench_router_inflight gauge\nsplitbench_router_inflight {self.n['inflight']}\n")
        rows.append("# TYPE splitbench_router_decisions_total counter\n")
        rows += [f'splitbench_router_decisions_total{{pool="{p}"}} {c}\n' for p, c in self.per_pool.items()]
        for name, kind in (("instance_requests_total", "counter"), ("instance_failures_total", "counter"),
                           ("instance_healthy", "gauge"), ("instance_pending_prompt_tokens", "gauge"),
                           ("instance_pending_decode_tokens", "gauge"), ("instance_running", "gauge")):
            rows.append(f"# TYPE splitbench_router_{name} {kind}\n")
            for v in self.ledger.views():
                lab = f'instance="{v.id}",pool="{v.pool}"'
                if name == "instance_requests_total":
                    rows += [f'splitbench_router_{name}{{{lab},role="{role}"}} {c}\n'
                             for role, c in self.per_instance[v.id].items() if role != "failures"]
                    continue
                val = {"instance_failures_total": self.per_instance[v.id]["failures"],
                       "instance_healthy": int(v.healthy), "instance_pending_prompt_tokens": v.pending_prompt_tokens,
                       "instance_pending_decode_tokens": v.pending_decode_tokens,
                       "instance_running": v.running}[name]
                rows.append(f"splitbench_router_{name}{{{lab}}} {val}\n")
        return "".join(rows)

    # ------------------------------------------------------------------ proxying
    async def _proxy(self, conn: _Conn, path: str, head: bytes, low: bytes, raw: bytes, t_recv: float) -> None:
        t: dict[str, float] = {"router_recv": t_recv}
        rid = (header(head, low, b"\r\nx-request-id:") or b"").decode("latin-1") or uuid.uuid4().hex
        entry: dict[str, Any] = {"request_id": rid, "path": path, "status": "cancelled", "http_status": None,
                                 "error": None, "t": t}
        self.n["requests"] += 1
        self.n["inflight"] += 1
        try:
            try:
                body = orjson.loads(raw)
                if not isinstance(body, dict):
                    raise ValueError("the body must be a JSON object")
                n_out = body.get("max_tokens") or body.get("max_completion_tokens") or DEFAULT_OUTPUT_TOKENS
                req = Request(rid, count_input_tokens(body), int(n_out), request_hashes(self.policy, body))
            except (ValueError, TypeError, AttributeError) as e:
                return self._finish(conn, entry, 400, "bad_request", f"bad request body: {e}")
            entry.update(input_tokens=req.input_tokens, output_tokens=req.output_tokens)
            try:
                d = self.policy.choose(req, self.ledger.views())
            except NoHealthyInstance as e:
                return self._finish(conn, entry, 503, "no_instance", str(e))
            entry.update(instance=d.label, pool=d.pool, prompt_instance=d.prompt_instance,
                         token_instance=d.token_instance, flow="split" if d.split else "colocated",
                         prefill_pool=d.pool, decode_pool=self.ledger.pool[d.token_instance] if d.split else d.pool)
            self.per_pool[d.pool] = self.per_pool.get(d.pool, 0) + 1
            headers = {k: v for k, v in header_items(head) if k.lower() not in _HOP}
            headers["Content-Type"] = "application/json"   # X-Request-Id: added by the upstream client
            self.ledger.dispatch(d, req)
            state = {"prefill_open": True}
            try:
                if d.split:
                    self.n["split"] += 1
                    return await self._split(conn, path, body, headers, d, req, t, entry, state)
                self.n["colocated"] += 1
                self.per_instance[d.prompt_instance]["colocated"] += 1
                t["sent"] = self.perf()
                return await self._relay(conn, d.prompt_instance, path, raw, headers, d, req, t, entry, state,
                                         bool(body.get("stream")))
            finally:
                if state["prefill_open"]:
                    self.ledger.prefill_done(d, req)
                self.ledger.finish(d, req)
        except asyncio.CancelledError:
            entry["error"] = "client disconnected"
            self.n["cancelled"] += 1
            raise
        finally:
            t.setdefault("done", self.perf())
            self.n["inflight"] -= 1
            if self.phase_log is not None:
                self.phase_log.write(entry)

    def _finish(self, conn: _Conn, entry: dict, status: int, kind: str, error: str | None,
                http_status: int | None = None) -> None:
        """Record how the request ended and answer it with an error; an answer already started is cut instead
        (`http_status`: the status it started with)."""
        entry.update(status=kind, http_status=http_status or status, error=error)
        self.n[kind] += 1
        if conn.streaming:
            conn.abort()
        else:
            conn.reply(status, _err(status, error or kind), extra=b"X-Request-Id: %s\r\n"
                       % entry["request_id"].encode("latin-1"))

    def _upstream_failed(self, conn: _Conn, entry: dict, iid: str, stage: str, e: BaseException | str,
                         http_status: int | None = None) -> None:
        self._mark_unhealthy(iid)
        msg = e if isinstance(e, (str, StreamError)) else f"{type(e).__name__}: {e}".rstrip(": ")
        entry["stage"] = stage
        self._finish(conn, entry, 502, "upstream_error", f"{stage} on instance {iid} failed: {msg}", http_status)

    async def _split(self, conn, path, body, headers, d: Decision, req: Request, t, entry, state) -> None:
        p_id, d_id = d.prompt_instance, d.token_instance
        self.per_instance[p_id]["prompt"] += 1
        self.per_instance[d_id]["token"] += 1
        data = orjson.dumps(prefill_body(body))
        t["prefill_sent"] = self.perf()
        try:
            a = await self.upstream[p_id].fetch(path, data, headers=headers, request_id=req.id,
                                                timeout_s=self._prefill_timeout_s)
            answer, status, ctype = a.body, a.status, a.content_type
        except _UPSTREAM_ERRORS as e:
            return self._upstream_failed(conn, entry, p_id, "prefill", e)
        finally:
            t["prefill_done"] = self.perf()
            self.ledger.prefill_done(d, req)
            state["prefill_open"] = False
        if status >= 500:
            return self._upstream_failed(conn, entry, p_id, "prefill", f"HTTP {status}: {answer[:200]!r}")
        if status != 200:  # the request itself is bad: pass the instance's answer on
            entry.update(status="http_error", http_status=status, stage="prefill")
            self.n["http_error"] += 1
            return conn.reply(status, answer, ctype.encode("latin-1"))
        try:
            kv = orjson.loads(answer).get("kv_transfer_params")
        except (ValueError, AttributeError) as e:
            return self._upstream_failed(conn, entry, p_id, "prefill", f"bad JSON answer: {e}")
        decode = dict(body)
        if kv:
            decode["kv_transfer_params"] = kv
        t["decode_sent"] = self.perf()
        return await self._relay(conn, d_id, path, orjson.dumps(decode), headers, d, req, t, entry, state,
                                 bool(body.get("stream")))

    async def _relay(self, conn: _Conn, iid, path, data, headers, d, req, t, entry, state, stream: bool) -> None:
        """POST to the instance and pass its answer on read by read (one write each, the head with the first)."""
        status = None
        stage = "decode" if d.split else "request"
        up = self.upstream[iid].stream(path, data, headers=headers, request_id=req.id,
                                       timeout_s=self._request_timeout_s, idle_timeout_s=self._idle_timeout_s)
        try:
            status = await up.head()
            if status >= 500:
                answer = await up.read()
                return self._upstream_failed(conn, entry, iid, stage, f"HTTP {status}: {answer[:200]!r}")
            length = up.headers.get("content-length", "")
            conn.begin(status, up.headers.get("content-type", "application/json").encode("latin-1"),
                       b"X-Request-Id: %s\r\nCache-Control: no-cache\r\n" % req.id.encode("latin-1"),
                       int(length) if length.isdigit() else None)
            try:
                first = True
                while (chunk := await up.next()) is not None:
                    if first:
                        first = False
                        if stream and status == 200:
                            t["first_token"] = self.perf()
                        if state["prefill_open"]:  # first bytes = prefill done; not streamed: the end
                            self.ledger.prefill_done(d, req)
                            state["prefill_open"] = False
                    if up.ended():   # the answer's end came with this read: the last bytes and the end together
                        break
                    conn.send(chunk)
                    if conn.paused:
                        await conn.drain()
                conn.finish(chunk or b"")
            except ConnectionError as e:   # only the client's side raises it (upstream: StreamError)
                raise _ClientGone() from e
            kind = "ok" if status == 200 else "http_error"
            entry.update(status=kind, http_status=status, stage=None if kind == "ok" else stage)
            self.n[kind] += 1
        except _ClientGone:
            entry.update(status="cancelled", error="client disconnected", http_status=status)
            self.n["cancelled"] += 1
        except _UPSTREAM_ERRORS as e:
            self._upstream_failed(conn, entry, iid, stage, e, status if conn.streaming else None)
        finally:
            up.close()
