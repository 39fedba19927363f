"""The simulator's per-request and per-machine state (SimCluster's, sim/cluster.py): typed slots, so the compiled
build (splitbench/native.py) reads and writes them as C fields.
"""
from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable

from splitbench.policies import Decision, Request
from splitbench.prefix_policy import BlockIndex
from splitbench.sim.batching import ChunkState
from splitbench.sim.perfmodel import PerfModel

IDLE, PROMPT, DECODE, WAKING = 0, 1, 2, 3


class SimCounts:
    """The simulation's event counts (SimResult.stats), as native fields: one is bumped per event."""
    __slots__ = ("chunked", "chunked_iterations", "errors", "interrupts", "prompt_iterations", "runs",
                 "stale_events", "transfers")
    runs: int
    prompt_iterations: int
    stale_events: int
    interrupts: int
    transfers: int
    errors: int
    chunked_iterations: int
    chunked: bool

    def __init__(self, chunked: bool) -> None:
        self.runs = self.prompt_iterations = self.stale_events = self.interrupts = self.transfers = 0
        self.errors = self.chunked_iterations = 0
        self.chunked = chunked   # machines batch as vLLM V1 does: chunked_iterations is reported

    def as_dict(self) -> dict[str, int]:
        out = {"runs": self.runs, "prompt_iterations": self.prompt_iterations, "stale_events": self.stale_events,
               "interrupts": self.interrupts, "transfers": self.transfers, "errors": self.errors}
        if self.chunked:
            out["chunked_iterations"] = self.chunked_iterations
        return out


class SimRequest:
    """One request's progress through the simulated cluster."""
    __slots__ = ("arrival", "colocated", "d", "decode_sent", "end_log", "first", "i", "join_it",
                 "join_log", "kv", "last", "m", "n_dec", "n_in", "n_out", "pdone", "pre", "req")
    i: int
    arrival: float
    n_in: int
    n_out: int
    req: Request
    kv: int
    pre: int
    colocated: bool
    first: float | None
    decode_sent: float | None
    last: float | None
    m: SimMachine | None
    pdone: float | None
    n_dec: int
    d: Decision
    join_log: int
    join_it: int
    end_log: int

    def __init__(self, i: int, arrival: float, n_in: int, n_out: int, req: Request) -> None:
        self.i, self.arrival, self.n_in, self.n_out, self.req = i, arrival, n_in, n_out, req
        self.kv = n_in + n_out
        self.pre = n_in          # prompt tokens to prefill: n_in less the prefix-cache hit
        self.colocated = False
        self.first = self.decode_sent = self.last = self.pdone = None
        self.m = None
        self.n_dec = n_out - 1   # decode iterations; all n_out in "decode" first-token mode for split requests


class SimMachine:
    """One simulated machine: its queues, decode batch, KV memory and link."""
    __slots__ = ("admit_q", "b", "busy_until", "cache", "chunk", "consec", "ctx", "fin", "hf", "hf_end", "id", "idx",
                 "it", "kv_cap", "kv_free", "link_free", "log_it", "log_t", "mtype", "pbatch", "perf", "pool",
                 "prompt_q", "pstart", "run_end", "run_k", "run_t0", "seen", "single", "state", "version")
    idx: int
    id: str
    pool: str
    mtype: str
    perf: PerfModel
    kv_cap: int
    kv_free: int
    cache: BlockIndex | None
    prompt_q: deque[SimRequest]
    admit_q: deque[SimRequest]
    state: int
    pbatch: list[SimRequest]
    pstart: float
    consec: int
    b: int
    ctx: int
    it: int
    fin: list[tuple[int, int, SimRequest]]
    log_t: array[float]
    log_it: array[int]
    run_t0: float
    run_end: float
    run_k: int
    version: int
    link_free: float
    single: bool
    chunk: ChunkState | None
    seen: set[int]
    hf: float
    hf_end: float
    busy_until: float

    def __init__(self, idx: int, iid: str, pool: str, mtype: str, perf: PerfModel, kv_cap: int) -> None:
        self.idx, self.id, self.pool, self.mtype, self.perf = idx, iid, pool, mtype, perf
        self.kv_cap = self.kv_free = kv_cap
        self.cache = None                # prefix-hash workloads: a BlockIndex of the blocks this machine prefilled
        self.seen = set()                # token counts of the prefill iterations it ran (cold_prefill_factor)
        self.prompt_q = deque()          # FCFS prefills (split and co-located)
        self.admit_q = deque()           # prefilled requests whose KV arrived, waiting for KV memory (FCFS)
        self.state = IDLE
        self.pbatch = []
        self.pstart = 0.0
        self.consec = 0                  # prompt iterations in a row while decodes were waiting
        self.b = self.ctx = self.it = 0  # decode batch size, its KV tokens, decode iterations so far
        self.fin = []                    # heap (finish iteration, request index, request)
        self.log_t = array("d")          # end time of each decode run ...
        self.log_it = array("q")         # ... and the iteration count after it (token chunks come from these)
        self.run_t0 = self.run_end = 0.0
        self.run_k = self.version = 0
        self.link_free = 0.0
        self.single = False
        self.chunk = None                # set on machines that batch as vLLM V1 does (sim/batching.py)
        self.hf, self.hf_end = 1.0, -1.0  # request-spread factor and until when it holds (host_factor)
        self.busy_until = 0.0            # end of its last scheduled iteration (idle before the run: wake_s)

    def host_factor(self, now: float, span_s: float, q: list[float] | None,
                    draw: Callable[[list[float]], float]) -> float:
        """The machine's request-spread factor now (SimConfig.request_spread): a new draw from q once the last one
        has held span_s; 1 without q."""
        if q is None:
            return 1.0
        if now >= self.hf_end:
            self.hf, self.hf_end = draw(q), now + span_s
        return self.hf

    def take_prompts(self, cap_tokens: int, cap_batch: float) -> tuple[list[SimRequest], int]:
        """FCFS prompts while the batch stays <= cap_tokens (a longer prompt runs alone) and, for co-located
        requests, their whole KV fits (reserved now, released at finish) and the decode batch stays <= cap_batch."""
        batch: list[SimRequest] = []
        q, tokens = self.prompt_q, 0
        joining = self.b   # the decode batch once the co-located prompts taken so far join it
        while q:
            r = q[0]
            if batch and tokens + r.pre > cap_tokens:
                break
            if r.colocated:
                if r.kv > self.kv_free or joining >= cap_batch:
                    break
                self.kv_free -= r.kv
                joining += 1
            q.popleft()
            batch.append(r)
            tokens += r.pre
        return batch, tokens

    def wake_s(self, now: float, idle_s: list[float] | None, extra_s: list[float]) -> float:
        """Extra seconds for an iteration starting now after the machine idled since busy_until (SimConfig.idle_wake:
        linear in the idle time between measured gaps, from 0 at 0, the last gap's beyond it); 0 without a table."""
        idle = now - self.busy_until
        if idle_s is None or idle <= 0:
            return 0.0
        x0, y0 = 0.0, 0.0
        for x, y in zip(idle_s, extra_s):
            if idle <= x:
                return y0 + (y - y0) * (idle - x0) / (x - x0)
            x0, y0 = x, y
        return y0

    def prefill_factor(self, tokens: int, cold: float) -> float:
        """`cold` for this machine's first prefill iteration of `tokens` tokens (SimConfig.cold_prefill_factor),
        else 1."""
        if cold == 1.0 or tokens in self.seen:
            return 1.0
        self.seen.add(tokens)
        return cold

