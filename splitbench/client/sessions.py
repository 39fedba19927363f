"""Multi-turn replay (`--multi-turn`): open loop across sessions, closed within one. A session's next turn is due
at max(its trace time, the previous answer's end + think time); its prompt is the previous turn's prompt + the
output token ids the server streamed for it (vLLM's return_token_ids) + new user tokens; every turn carries the
session's affinity headers. A failed turn ends its session: the later turns become not_sent records."""
from __future__ import annotations

import asyncio
import heapq
import re

from splitbench.client.replayer import ReplayConfig, Replayer, _dumps
from splitbench.client.sink import RecordSink
from splitbench.errors import InputError
from splitbench.schema import records as R
from splitbench.schema.records import RequestRecord
from splitbench.workload.sessions import ThinkTime, plan_turns

SESSION_HEADER = "X-Session-ID"    # vLLM's session header (its serving code reads it into the request's session_id)
LLMD_COOKIE = "llm-d-session"      # llm-d's session-affinity scorer sets this cookie; later turns send it back
_COOKIE = re.compile(LLMD_COOKIE + r"=([^;,\s]+)")


class SessionSink(RecordSink):
    """A RecordSink that keeps the answer's output token ids and llm-d's session cookie."""
    __slots__ = ("cookie", "pos")

    def __init__(self, rec: RequestRecord, t0: float, send: float, pos: int):
        super().__init__(rec, t0, send)
        self.ids = []
        self.cookie: str | None = None
        self.pos = pos   # the turn's position in the workload

    def on_head(self, status: int, reason: str, headers) -> None:
        super().on_head(status, reason, headers)
        getall = getattr(headers, "getall", None)
        values = getall("set-cookie", []) if getall else [headers.get("set-cookie") or ""]
        for v in values:
            m = _COOKIE.search(v)
            if m:
                self.cookie = m.group(1)


class SessionReplayer(Replayer):
    """Replays a Workload with sessions (workload.session_id, turn) as conversations; requests outside sessions
    go open loop at their trace times. payload(trace_index, n) must give token-id prompts ({"prompt": [ids]})."""

    def __init__(self, workload, payload, cfg: ReplayConfig, sink, *, transport=None, clock=None, gate=None):
        super().__init__(workload, payload, cfg, sink, transport=transport, clock=clock, gate=gate)
        self.plan = plan_turns(workload)
        self.think = ThinkTime.parse(cfg.think_time, cfg.think_seed)
        self._heap: list[tuple[float, int]] = []   # (due, position): turns ready to send
        self._ready: dict[int, bytes] = {}         # bodies built ahead (a later turn: when its previous answer came)
        self._prompts: dict[int, list[int]] = {}   # prompt ids of sent turns whose next turn is not built yet
        self._cookies: dict[int, str] = {}         # session -> llm-d cookie
        self._left = len(workload)                 # turns neither sent nor given up
        self._target = float("inf")                # the run-clock time the dispatcher waits for

    # ------------------------------------------------------------------ bodies
    def prepare(self) -> None:
        """The first turns (and requests outside sessions) are due at their trace times; their bodies are built
        one ahead of sending, later turns' when the previous answer arrives."""
        if self._bodies is not None:
            return
        cfg, w = self.cfg, self.w
        self._base = {"model": cfg.model, "stream": True, "return_token_ids": True,
                      "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **cfg.extra_body}
        self._arrivals = w.arrival_s.tolist()
        self._heap = [(self._arrivals[i], i) for i in range(len(w)) if self.plan.prev[i] < 0]
        heapq.heapify(self._heap)
        self._bodies = []
        if self._heap:
            self._seeded(self._heap[0][1], 1)   # token-id prompts, or refuse before the start

    def _seeded(self, i: int, n: int, length: int | None = None) -> list[int]:
        """The last n ids of request i's own seeded prompt of `length` tokens (default: its input tokens)."""
        length = int(self.w.input_tokens[i]) if length is None else length
        prompt = self.payload(int(self.w.trace_index[i]), max(length, n)).get("prompt")
        if not isinstance(prompt, list):
            raise InputError("--multi-turn needs token-id prompts (--api completions)")
        return prompt[len(prompt) - n:]

    def _encode(self, i: int, prompt: list[int]) -> bytes:
        if self.plan.next[i] >= 0:
            self._prompts[i] = prompt
        b = dict(self._base)
        out = int(self.w.output_tokens[i])
        b.update(prompt=prompt, max_tokens=out)
        if self.cfg.force_output_length:
            b.update(min_tokens=out, ignore_eos=True)
        return _dumps(b)

    def _build_ahead(self) -> None:
        if self._heap and self._heap[0][1] not in self._ready:
            i = self._heap[0][1]
            self._ready[i] = self._encode(i, self._seeded(i, int(self.w.input_tokens[i])))

    def _thread(self, i: int, prev: int, output_ids: list[int]) -> bytes:
        """Turn i's body: the previous turn's prompt + its output ids + the new user tokens (the tail of turn i's
        own seeded prompt, so a prefix-faithful prompt source gives the turn's new blocks)."""
        if not output_ids:   # the server sent no token ids: seeded stand-ins of the planned answer's length
            self.stats.stand_in_outputs += 1
            n_out, n_in = int(self.w.output_tokens[prev]), int(self.w.input_tokens[prev])
            output_ids = self._seeded(prev, n_out, n_in + n_out)   # the continuation of its own seeded ids
        return self._encode(i, self._prompts.pop(prev) + output_ids + self._seeded(i, int(self.plan.new_tokens[i])))

    # ------------------------------------------------------------------ the run
    async def _dispatch(self) -> None:
        """Send the earliest due turn at its time; an answer that makes an earlier turn due wakes the wait."""
        now, t0, heap, stats, cap = self._now, self._t0, self._heap, self.stats, self.cfg.max_inflight
        loop = asyncio.get_running_loop()
        self._build_ahead()
        while self._left > 0 and not self._stopping:
            if not heap:   # every remaining turn waits for an answer (or a stop)
                self._target = float("inf")
                await self._wait(loop.create_future())
                continue
            due, i = heap[0]
            self._target = target = t0 + due
            if target - now() > self.cfg.spin_s:
                await self._wait(self.clock.wake_at(target - self.cfg.spin_s))
                continue   # look again: stopped, an earlier turn came in, woken early, or due now
            while now() < target:
                await asyncio.sleep(0)
            if cap and self._active >= cap:
                stats.inflight_cap_waits += 1
                await self._wait(loop.create_future(), "slot")
                continue
            heapq.heappop(heap)
            self._send_turn(i, due)
            self._build_ahead()
        self._target = float("inf")
        stats.stopped_early = stats.stopped_early or self._left > 0

    def _send_turn(self, i: int, due: float) -> None:
        rec = self.record(i, due)
        body = self._ready.pop(i)
        send = self._now()
        rec.actual_send_s = send - self._t0
        self._left -= 1
        if rec.session_id is None:
            return self._launch(rec, RecordSink(rec, self._t0, send), body)
        headers = {SESSION_HEADER: str(rec.session_id)}
        cookie = self._cookies.get(rec.session_id)
        if cookie:
            headers["Cookie"] = f"{LLMD_COOKIE}={cookie}"
        self._launch(rec, SessionSink(rec, self._t0, send, i), body, headers)

    def _done(self, rec: RequestRecord, sink: RecordSink, fut: asyncio.Future) -> None:
        super()._done(rec, sink, fut)
        if not isinstance(sink, SessionSink):
            return
        i = sink.pos
        nxt = int(self.plan.next[i])
        if sink.cookie:
            self._cookies[rec.session_id] = sink.cookie
        if nxt < 0 or self._stopping:
            self._prompts.pop(i, None)
            return
        if rec.status != R.OK:
            return self._give_up(i, nxt, rec)
        arr = self._arrivals
        due = max(arr[nxt], rec.end_s + self.think.delay_s(int(self.w.trace_index[nxt]), arr[nxt] - arr[i]))
        self._ready[nxt] = self._thread(nxt, i, sink.ids or [])
        heapq.heappush(self._heap, (due, nxt))
        self._wake(self._t0 + due)

    def _give_up(self, i: int, nxt: int, failed: RequestRecord) -> None:
        """The session's later turns: not_sent records saying why (a conversation cannot go on without the answer
        it threads)."""
        self._prompts.pop(i, None)
        while nxt >= 0:
            rec = self.record(nxt, self._arrivals[nxt])
            rec.error = f"not sent: turn {failed.turn} of session {failed.session_id} ended {failed.status}"
            self._left -= 1
            self.stats.turns_not_sent += 1
            self.stats.finished += 1
            self.stats.failed += 1
            self.sink(rec)
            nxt = int(self.plan.next[nxt])
        self._wake(float("-inf"))

    def _wake(self, target: float) -> None:
        """A turn became due at `target` (or the run may be over): end the dispatcher's wait if it waits longer."""
        w = self._waiter
        if w is not None and not w.done() and not self._wake_on_done and target < self._target:
            w.set_result(None)
