"""Simulated cluster on the event loop: Splitwise machine-level scheduling (prompt / token / mixed / baseline),
KV memory from the model shape, KV transfer over per-machine links, and the live run's RequestRecords."""
from __future__ import annotations

import heapq
import random
from array import array
from collections.abc import Mapping
from typing import Any, cast

from splitbench.errors import InputError
from splitbench.policies import COLOCATED_POOLS, Ledger, NoHealthyInstance, Request, make_policy, routable
from splitbench.prefix_policy import BlockIndex
from splitbench.sim.batching import ChunkedBatching, ChunkState
from splitbench.sim.config import SimConfig, SimResult, validate_config
from splitbench.sim.engine import Simulator
from splitbench.sim.recorder import Recorder
from splitbench.sim.state import DECODE, IDLE, PROMPT, WAKING, SimCounts, SimMachine, SimRequest


class SimCluster:
    """One simulation: build with the workload and config, then run() -> SimResult.
    Semantics (Splitwise's where it says): the prefill emits the first token, so first_token_s = end of the prefill
    iteration (no network delay modelled); tokens 2..n come from decode iterations on the decode machine.
    Split: prefill on the prompt machine (no KV reserved there), KV transfer (see _transfer), then the token
    machine admits the request FCFS once input+output KV tokens fit (reserved until it finishes, no preemption);
    phases_s decode_sent = KV transfer done (the admission wait shows as the first decode chunk's delay).
    Co-located: KV reserved when the prefill is taken into a batch. Everything joins a decode batch at an
    iteration boundary. Decode runs are fast-forwarded: one event per run (to the batch's next finish, or cut at
    the end of the iteration in progress when a newcomer can join or a prompt can run), one token chunk per run:
    k tokens at the run's end, so the k TBT gaps all equal the run's mean iteration time (iterations inside a run
    grow slightly with the context; the per-token spread is lost, the sum is exact). Same-instant arrivals on an
    idle machine share its first batch. A request whose KV can never fit is an "error" record.
    cfg.batching "chunked" (the default): baseline/mixed machines batch as vLLM V1 does instead (sim/batching.py:
    decodes first, FCFS prefill chunks under max_num_batched_tokens, KV reserved at admission); "prompt-first":
    as described here. Prompt and token machines are the same in both; cfg.prompt_chunked_prefill makes prompt
    machines chunk too. cfg.step_spread: every decode-only iteration is its own run, its time the profile's x a
    seeded draw (spread_factor), x the machine's request_spread draw, x cfg.neighbour_busy_factor while another is
    busy; iterations with prompt tokens: prefill_s."""
    w: Any
    cfg: SimConfig
    machines: list[SimMachine]
    by_id: dict[str, SimMachine]
    ledger: Ledger
    policy: Any
    sim: Simulator
    kv_s_per_token: float
    layerwise: bool
    cap_tokens: int
    cap_iters: int
    cap_batch: float
    decode_first: bool
    rec: Recorder
    n: SimCounts
    batching: ChunkedBatching | None
    _arr: list[float]
    _count: int
    _in: list[int]
    _out: list[int]
    _ti: list[int]
    _hashes: Any
    _block: int
    _spread: list[float] | None
    pspread: list[float] | None
    _rs: list[float] | None
    _rs_s: float
    cold: float
    _wx: list[float] | None
    _wy: list[float]
    _rng: random.Random
    _nb: float
    _per_step: bool

    def __init__(self, workload: Any, cfg: SimConfig, perf: Mapping[str, Any], kv_capacity_tokens: Mapping[str, Any],
                 kv_bytes_per_token: float) -> None:
        validate_config(cfg, perf, kv_capacity_tokens, kv_bytes_per_token)  # type: ignore[arg-type]
        self.w, self.cfg = workload, cfg
        self.machines = []
        counts: dict[str, int] = {}
        for p in cfg.pools:
            for _ in range(p.count):
                k = counts.get(p.pool, 0)
                counts[p.pool] = k + 1
                self.machines.append(SimMachine(len(self.machines), f"{p.pool}-{k}", p.pool, p.machine,
                                              perf[p.machine], int(kv_capacity_tokens[p.machine])))
        self.by_id = {m.id: m for m in self.machines}
        self.ledger = Ledger((m.id, m.pool) for m in self.machines)
        if not routable(self.ledger.views()):
            raise InputError(f"cluster cannot route requests (pools: {', '.join(sorted(counts))}): it needs a "
                             "prompt and a token machine, or a mixed/baseline machine", column="pools")
        self.policy = make_policy(cfg.policy, seed=cfg.seed, **(cfg.policy_params or {}))
        self.sim = Simulator()
        self.kv_s_per_token = kv_bytes_per_token / cfg.link_bytes_per_s
        self.layerwise = cfg.kv_transfer == "layerwise"
        self.cap_tokens = cfg.max_prompt_batch_tokens
        self.cap_iters = cfg.mixed_max_consecutive_prompt_iterations
        self.cap_batch = cfg.max_decode_batch or float("inf")
        self.decode_first = cfg.first_token == "decode"
        self.rec = Recorder(workload, [m.id for m in self.machines], [m.pool for m in self.machines],
                            cfg.record_token_chunks)
        chunked = [m for m in self.machines if (m.pool in COLOCATED_POOLS and cfg.batching == "chunked")
                   or (m.pool == "prompt" and cfg.prompt_chunked_prefill)]
        self.n = SimCounts(bool(chunked))
        self.batching = ChunkedBatching(self, (IDLE, PROMPT, DECODE)) if chunked else None
        for m in chunked:
            m.chunk = ChunkState()
        self._arr = workload.arrival_s.tolist()
        self._count = len(self._arr)
        self._in = workload.input_tokens.tolist()
        self._out = workload.output_tokens.tolist()
        self._ti = workload.trace_index.tolist()
        self._hashes = workload.prefix_hashes if cfg.prefix_cache else None
        self._block = max(1, int(workload.block_tokens or 1))
        self._spread, self.pspread, self._rs = [list(q) if q else None for q in
                                                (cfg.step_spread, cfg.prefill_spread, cfg.request_spread)]
        self._rs_s, self._nb, self.cold = (float(x) for x in (cfg.request_spread_s, cfg.neighbour_busy_factor,
                                                              cfg.cold_prefill_factor))
        self._rng = random.Random(cfg.seed)
        wake = cfg.idle_wake or ()
        self._wx, self._wy = ([g for g, _ in wake] or None), [x for _, x in wake]
        self._per_step = self._spread is not None or self._rs is not None or self._nb != 1.0   # one at a time

    def run(self) -> SimResult:
        if self._arr:
            self.sim.schedule(self._arr[0], self._arrival, 0)
        end_s = self.sim.run()
        self._arr, self._in, self._out, self._ti = [], [], [], []   # a million numbers each: gone before the records
        stats: dict[str, Any] = {"events": self.sim.events, **self.n.as_dict(), "sim_end_s": end_s,
                                 "machines": len(self.machines)}
        for k in ("borrow_count", "return_count"):
            if hasattr(self.policy, k):
                stats[k] = getattr(self.policy, k)
        cols = self.rec.columns([m.log_t for m in self.machines], [m.log_it for m in self.machines])
        return SimResult(None, [{"id": m.id, "pool": m.pool, "machine": m.mtype} for m in self.machines], stats,
                         columns=cols)

    def _arrival(self, i: int) -> None:
        sim = self.sim
        now = sim.now_s
        if i + 1 < self._count:
            sim.schedule(self._arr[i + 1], self._arrival, i + 1)
        n_in, n_out = self._in[i], self._out[i]
        hashes: tuple[int, ...] = () if self._hashes is None else \
            tuple(self._hashes[i][:n_in // self._block].tolist())   # whole blocks
        r = SimRequest(i, now, n_in, n_out, Request(f"r{self._ti[i]}", n_in, n_out, hashes))
        try:
            d = self.policy.choose(r.req, self.ledger.views())
        except NoHealthyInstance as e:   # cannot happen with all machines healthy; kept as a record, not a crash
            self.rec.failed(i, str(e))
            self.n.errors += 1
            return
        r.d = d
        r.colocated = d.token_instance is None
        self.ledger.dispatch(d, r.req)
        pm = self.by_id[d.prompt_instance]
        holder = pm if r.colocated else self.by_id[cast(str, d.token_instance)]
        self.rec.decided(i, pm.idx, -1 if r.colocated else holder.idx, d.pool)
        if r.kv > holder.kv_cap:
            self.rec.failed(i, f"request needs {r.kv} KV tokens (input {n_in} + output {n_out}) but {holder.id} "
                               f"({holder.mtype}) holds at most {holder.kv_cap}")
            self.ledger.prefill_done(d, r.req)
            self.ledger.finish(d, r.req)
            self.n.errors += 1
            return
        if hashes:
            r.pre = n_in - self._cache_hit(pm, i, hashes, n_in)
        pm.prompt_q.append(r)
        if pm.state == IDLE:
            self._wake(pm)
        elif pm.state == DECODE and len(pm.prompt_q) == 1 and (not r.colocated or r.kv <= pm.kv_free):
            self._interrupt(pm)

    def _cache_hit(self, m: SimMachine, i: int, hashes: tuple[int, ...], n_in: int) -> int:
        """Tokens of request i's prompt found in m's prefix cache (whole leading blocks, at most n_in - 1, as vLLM
        computes the last token); its blocks are then cached (LRU over m's KV capacity in blocks)."""
        if m.cache is None:
            m.cache = BlockIndex(max(1, m.kv_cap // self._block))
        hit = min(m.cache.matched(hashes) * self._block, n_in - 1)
        m.cache.add(hashes)
        cast(array, self.rec.cached)[i] = hit
        return hit

    def _wake(self, m: SimMachine) -> None:
        """An idle machine got work: plan at the same time but after the events already queued for it, so
        requests arriving at the same instant share the first batch; at once when none is queued for now (the
        same order: callers wake last in their handler)."""
        if self.sim.nothing_else_now():
            return self._plan(m)
        m.state = WAKING
        self.sim.schedule(self.sim.now_s, self._plan, m)

    def _plan(self, m: SimMachine) -> None:
        """The machine is at an iteration boundary: admit waiting decodes, then prompts first (up to the cap),
        else a decode run up to the batch's next finish. Chunked machines plan in sim/batching.py."""
        if m.chunk is not None:
            cast(ChunkedBatching, self.batching).plan(m)
            return
        now = self.sim.now_s
        q = m.admit_q
        while q and q[0].kv <= m.kv_free and m.b < self.cap_batch:
            r = q.popleft()
            m.kv_free -= r.kv
            self._join(m, r)
        if m.prompt_q and (m.b == 0 or m.consec < self.cap_iters):
            batch, tokens = m.take_prompts(self.cap_tokens, self.cap_batch)
            if batch:
                m.state, m.pbatch, m.pstart = PROMPT, batch, now
                m.consec += 1
                self.n.prompt_iterations += 1
                # dense work over the new tokens, plus each prompt's attention (over its cached part too)
                t = m.perf.prompt_time_s(tokens) + m.perf.attention_s(sum(r.pre * r.pre for r in batch),
                                                                      sum((r.n_in - r.pre) * r.pre for r in batch))
                self.sim.schedule(now + self.prefill_s(m, now, t, tokens), self._prompt_done, m)
                return
        if m.b:
            k = m.fin[0][0] - m.it
            pq = m.prompt_q
            if pq and (not pq[0].colocated or pq[0].kv <= m.kv_free):
                k = 1   # prompts are waiting but the cap was hit: one decode iteration, then prompts again
            if m.single:
                k, m.single = 1, False
            m.consec = 0
            m.state, m.run_t0 = DECODE, now
            self.set_decode_run(m, now, k)
            m.version += 1
            self.sim.schedule(m.run_end, self._decode_done, m, m.version)
            return
        m.state = IDLE

    def _prompt_done(self, m: SimMachine) -> None:
        now = self.sim.now_s
        batch, start = m.pbatch, m.pstart
        m.pbatch = []
        ledger = self.ledger
        for r in batch:
            if not r.colocated:
                self.split_prefilled(m, r, start, now)
                continue
            r.first = r.pdone = now
            ledger.prefill_done(r.d, r.req)
            if r.n_out == 1:   # the prefill made the only token: no decode
                r.decode_sent = r.last = now
                m.kv_free += r.kv
                ledger.finish(r.d, r.req)
                self.rec.finished(r, -1)
            else:
                self._join(m, r)
        self._plan(m)

    def split_prefilled(self, m: SimMachine, r: SimRequest, start_s: float, now: float) -> None:
        """A split request's prefill (started at start_s) ended now on m: its first token (unless the token machine
        streams it), then its KV transfer; a one-token request ends here."""
        r.pdone = now
        self.ledger.prefill_done(r.d, r.req)
        if self.decode_first:
            r.n_dec = r.n_out   # the token machine makes every token; the first streams after its 1st iteration
            self._transfer(m, r, start_s, now)
            return
        r.first = now
        if r.n_out == 1:   # the prefill made the only token: no transfer, no decode
            r.decode_sent = r.last = now
            self.ledger.finish(r.d, r.req)
            self.rec.finished(r, -1)
        else:
            self._transfer(m, r, start_s, now)

    def _transfer(self, pm: SimMachine, r: SimRequest, start_s: float, end_s: float) -> None:
        """KV of the prompt over the links of both machines (each link carries one transfer at a time).
        serialized: starts after the prefill. layerwise (Splitwise §IV-C): layer l's KV may leave once the
        prefill computed it, so with prefill time P, L layers and X = bytes / bandwidth the transfer ends at
        max(start + X, prefill end + X / L), start >= prefill start + P / L; the link is busy for X."""
        tm = self.by_id[cast(str, r.d.token_instance)]
        x = r.n_in * self.kv_s_per_token
        a = max(tm.link_free, pm.link_free)
        if self.layerwise:
            first_layer = start_s + (end_s - start_s) / self.cfg.layers
            s = max(first_layer, a)
            done = max(s + x, end_s + x / self.cfg.layers)
            pm.link_free = tm.link_free = s + x
        else:
            s = max(end_s, a)
            done = pm.link_free = tm.link_free = s + x
        self.n.transfers += 1
        self.sim.schedule(done, self._kv_arrived, tm, r)

    def _kv_arrived(self, m: SimMachine, r: SimRequest) -> None:
        r.decode_sent = self.sim.now_s
        m.admit_q.append(r)
        if m.state == IDLE:
            self._wake(m)
        elif m.state == DECODE and len(m.admit_q) == 1 and r.kv <= m.kv_free and m.b < self.cap_batch:
            self._interrupt(m)

    def _join(self, m: SimMachine, r: SimRequest) -> None:
        """r joins the decode batch at this iteration boundary (its KV already reserved)."""
        r.m, r.join_log, r.join_it = m, len(m.log_t), m.it
        heapq.heappush(m.fin, (m.it + r.n_dec, r.i, r))
        m.b += 1
        # context of the iteration making token j+1 is input + j (token 1 came from the prefill, or is made now)
        m.ctx += r.n_in + r.n_out - r.n_dec
        if r.first is None:
            m.single = True   # its first token's time must be an iteration boundary: the next run is 1 iteration

    def set_decode_run(self, m: SimMachine, now: float, k: int) -> None:
        """m's decode run from now: k iterations in closed form, or one (step spread, busy neighbour factor)."""
        if not self._per_step:
            m.run_k, m.run_end = k, now + m.perf.token_iterations_s(m.b, m.ctx, k)
        else:
            t = m.perf.token_time_s(m.b, m.ctx)
            if self._spread is not None:
                t *= self.spread_factor(self._spread)
            t *= m.host_factor(now, self._rs_s, self._rs, self.spread_factor)
            if self._nb != 1.0 and self.neighbour_busy(m):
                t *= self._nb
            m.run_k, m.run_end = 1, now + t
        m.busy_until = m.run_end

    def prefill_s(self, m: SimMachine, now: float, t: float, tokens: int) -> float:
        """An iteration with prompt tokens from now, of model time t: x a prefill_spread draw, x cfg.cold_prefill_factor
        for a token count new to m, + cfg.idle_wake's extra after m idled; m is then busy until its end."""
        if self.pspread is not None:
            t *= self.spread_factor(self.pspread)
        t = t * m.prefill_factor(tokens, self.cold) + m.wake_s(now, self._wx, self._wy)
        m.busy_until = now + t
        return t

    def neighbour_busy(self, m: SimMachine) -> bool:
        """Another machine of the cluster is prefilling, decoding or about to plan (not idle) now."""
        return any(o is not m and o.state != IDLE for o in self.machines)

    def spread_factor(self, q: list[float]) -> float:
        """An iteration's time over the model's, drawn from a spread's quantiles (linear between them)."""
        u = self._rng.random() * (len(q) - 1)
        i = int(u)
        return q[i] + (q[i + 1] - q[i]) * (u - i)

    def _interrupt(self, m: SimMachine) -> None:
        """The batch must change: cut the running decode run at the end of the iteration in progress."""
        now = self.sim.now_s
        if m.run_end <= now or m.run_k <= 1:
            return   # the run ends now anyway, or is one iteration: its handler re-plans
        perf, b, ctx, t0 = m.perf, m.b, m.ctx, m.run_t0
        k = perf.iterations_within(b, ctx, now - t0)
        tb = t0 + perf.token_iterations_s(b, ctx, k + 1)
        while tb <= now:   # guard against rounding between iterations_within and token_iterations_s
            k += 1
            tb = t0 + perf.token_iterations_s(b, ctx, k + 1)
        if k + 1 >= m.run_k:
            return
        m.run_k, m.run_end = k + 1, tb
        m.version += 1
        self.n.interrupts += 1
        self.sim.schedule(tb, self._decode_done, m, m.version)

    def _decode_done(self, m: SimMachine, version: int) -> None:
        if version != m.version:
            self.n.stale_events += 1
            return
        now = self.sim.now_s
        k = m.run_k
        m.it += k
        m.ctx += m.b * k
        m.log_t.append(now)
        m.log_it.append(m.it)
        self.n.runs += 1
        self.finish_due(m, now)
        self._plan(m)

    def finish_due(self, m: SimMachine, now: float) -> None:
        """The requests of m's decode batch whose last token came with the iteration just logged leave it
        (KV freed, ledger and recorder told); the chunked batching's iterations end the same way."""
        fin, it = m.fin, m.it
        if fin and fin[0][0] <= it:
            end_log = len(m.log_t)
            ledger, rec = self.ledger, self.rec   # called through them: compiled, a call on a bound method held
            while fin and fin[0][0] <= it:       # in a local goes through Python's protocol, not natively
                r = heapq.heappop(fin)[2]
                r.last, r.end_log = now, end_log
                m.b -= 1
                m.ctx -= r.kv
                m.kv_free += r.kv
                ledger.finish(r.d, r.req)
                rec.finished(r, m.idx)


def simulate(workload: Any, cfg: SimConfig, perf: Mapping[str, Any], kv_capacity_tokens: Mapping[str, Any],
             kv_bytes_per_token: float) -> SimResult:
    """Replay `workload` on the simulated cluster `cfg`: one RequestRecord per request, in workload order.
    perf and kv_capacity_tokens are keyed by machine type. Pure and deterministic (all randomness from cfg.seed)."""
    return SimCluster(workload, cfg, perf, kv_capacity_tokens, kv_bytes_per_token).run()

