"""vLLM V1's continuous batching with chunked prefill for co-located (baseline / mixed) machines: every iteration
runs the decodes first (one token each), then fills the rest of a per-iteration token budget with FCFS prefill chunks.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from splitbench.sim.cluster import SimCluster
    from splitbench.sim.perfmodel import PerfModel
    from splitbench.sim.state import SimMachine, SimRequest


def mixed_iteration_s(perf: PerfModel, decode_batch: int, decode_context_tokens: int, prefill_tokens: int,
                      prefill_context_tokens: int, prefill_cross_tokens2: int = 0, prefill_self_tokens2: int = 0
                      ) -> float:
    """One iteration carrying `prefill_tokens` prompt-chunk tokens (whose requests already hold
    `prefill_context_tokens` KV tokens from earlier chunks) and `decode_batch` decodes holding
    `decode_context_tokens` KV tokens.

    vLLM V1 runs such a step as ONE forward pass over all scheduled tokens (vllm/v1/core/sched/scheduler.py
    Scheduler.schedule: "There's no 'decoding phase' nor 'prefill phase' ... each request just has the
    num_computed_tokens"): its weights are read once and its dense layers process prefill + decode tokens
    together, which is what the profile's prompt curve measures (prompt_time over batched tokens, as for a batch
    of prompts); attention over KV already cached (the decodes' contexts and a chunk's earlier chunks) is the
    per-KV-token read cost the decode fit measured (kv(b)), and a chunk of n tokens over P tokens already in its
    KV does 2 c P n more attention work than a lone n-token prompt (c: the prompt curve's p^2 term,
    PerfModel.context_prefill_s; `prefill_cross_tokens2` = the sum of P x n). So prompt_time(prefill + decodes)
    + kv x cached KV + that cross term, and never less than the decode-only step of the same batch (its
    per-sequence cost is part of any step that carries those decodes). SplitwiseSim's rule for a mixed batch is
    prompt_time(prompt tokens + 1 per decode) x 1.1 (performance_model.py get_iteration_duration); ours replaces
    the flat 10% with the measured context term. A step without prefill tokens is token_time(b, C) as before.
    """
    t = (perf.prompt_time_s(prefill_tokens + decode_batch) + perf.kv_at(decode_batch) * decode_context_tokens
         + perf.kv_at(1) * prefill_context_tokens
         + perf.attention_s(prefill_self_tokens2, prefill_cross_tokens2))
    return max(t, perf.token_time_s(decode_batch, decode_context_tokens))


class ChunkState:
    """Per chunked machine: requests admitted and still prefilling, FCFS, as [request, tokens prefilled so far, time
    of the first chunk's start]; and the chunks of the iteration in flight as (entry, tokens)."""
    __slots__ = ("chunks", "prefilling")
    prefilling: deque[list[Any]]
    chunks: list[tuple[list[Any], int]]

    def __init__(self) -> None:
        self.prefilling = deque()
        self.chunks = []


class ChunkedBatching:
    """The plan/iteration handlers of chunked machines, called from SimCluster._plan (the machine is at an
    iteration boundary). Semantics, after vLLM V1's Scheduler.schedule with its defaults (FCFS policy, no
    long_prefill_token_threshold, no preemption because a request's whole KV is reserved at admission):
    1. the running decodes each take one token of the budget (budget >= max_num_seqs, as vLLM requires);
    2. requests admitted earlier and still prefilling continue, FCFS, with min(remaining prompt, budget left);
    3. waiting requests are admitted FCFS while budget is left, running requests (decoding + prefilling) stay
       below max_num_seqs (SimConfig.max_decode_batch; unset: the budget) and the head's input + output KV fits
       (else admission stops: FCFS, no skipping), each with its first chunk. A split request (prefilled here,
       decoded on a token machine: prompt machines with SimConfig.prompt_chunked_prefill) reserves no KV here.
    An iteration with prefill chunks is simulated alone (mixed_iteration_s); its decodes make one token each at
    its end; a co-located request whose last chunk ran gets its first token at that end and decodes from the next
    iteration on; a split one goes on as after a whole prefill (SimCluster.split_prefilled: KV transfer). Without a
    chunk to run (nothing waiting, or the head cannot be admitted) the decodes are fast-forwarded to the batch's next
    finish exactly as on other machines; an arrival cuts that run (SimCluster._interrupt)."""

    cl: SimCluster
    idle: int
    busy: int
    decode: int
    budget: int
    max_seqs: int

    def __init__(self, cluster: SimCluster, states: tuple[int, int, int]) -> None:
        self.cl = cluster
        self.idle, self.busy, self.decode = states
        cfg = cluster.cfg
        self.budget = cfg.max_num_batched_tokens
        self.max_seqs = cfg.max_decode_batch or self.budget

    def plan(self, m: SimMachine) -> None:
        cl, st = self.cl, cast(ChunkState, m.chunk)
        now = cl.sim.now_s
        room = self.budget - m.b
        chunks: list[tuple[list[Any], int]] = []
        tokens, cached, cross, sq = 0, 0, 0, 0
        for e in st.prefilling:   # admitted earlier: continue FCFS
            if room <= 0:
                break
            r: SimRequest = e[0]
            n: int = min(r.pre - e[1], room)
            chunks.append((e, n))
            room -= n
            tokens += n
            cached += e[1]
            cross += (r.n_in - r.pre + e[1]) * n
            sq += n * n
        q, seqs = m.prompt_q, m.b + len(st.prefilling)
        while q and room > 0 and seqs < self.max_seqs:
            r = q[0]
            if r.colocated:
                if r.kv > m.kv_free:
                    break
                m.kv_free -= r.kv
            q.popleft()
            e = [r, 0, now]
            st.prefilling.append(e)
            seqs += 1
            n = min(r.pre, room)
            chunks.append((e, n))
            room -= n
            tokens += n
            cross += (r.n_in - r.pre) * n   # after a prefix-cache hit
            sq += n * n
        if chunks:
            st.chunks = chunks
            m.state = self.busy
            cl.n.chunked_iterations += 1
            t = mixed_iteration_s(m.perf, m.b, m.ctx, tokens, cached, cross, sq)
            cl.sim.schedule(now + cl.prefill_s(m, now, t, tokens + m.b), self.iteration_done, m)
        elif m.b:
            m.state, m.run_t0 = self.decode, now
            cl.set_decode_run(m, now, m.fin[0][0] - m.it)
            m.version += 1
            cl.sim.schedule(m.run_end, cl._decode_done, m, m.version)
        else:
            m.state = self.idle

    def iteration_done(self, m: SimMachine) -> None:
        """End of an iteration with prefill chunks: its decodes made a token each, finished prefills made their
        first token and join the decode batch (or finish, with one output token)."""
        cl, st = self.cl, cast(ChunkState, m.chunk)
        now = cl.sim.now_s
        ledger = cl.ledger
        if m.b:
            m.it += 1
            m.ctx += m.b
            m.log_t.append(now)
            m.log_it.append(m.it)
            cl.finish_due(m, now)
        for e, n in st.chunks:
            e[1] += n
            r: SimRequest = e[0]
            if e[1] < r.pre:
                continue
            st.prefilling.popleft()   # only the last chunk of an iteration can be partial: completions are FCFS
            if not r.colocated:
                cl.split_prefilled(m, r, e[2], now)
                continue
            r.first = r.pdone = now
            ledger.prefill_done(r.d, r.req)
            if r.n_out == 1:
                r.decode_sent = r.last = now
                m.kv_free += r.kv
                ledger.finish(r.d, r.req)
                cl.rec.finished(r, -1)
            else:
                cl._join(m, r)
        st.chunks = []
        self.plan(m)

