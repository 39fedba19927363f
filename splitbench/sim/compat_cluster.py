"""The simulator's SplitwiseSim-compatible mode (`--perf-model splitwisesim`): SplitwiseSim instances (compat.py) on
the shared event loop, its schedulers (splitbench.splitwisesim_policies), KV transfers, and the live RequestRecords.

Request flow as in SplitwiseSim's executor.py / flow.py / interconnect.py (zero overheads): the scheduler picks the
instances; co-located, the prompt and decode tasks arrive together at one instance; split, the prompt task arrives at
the prompt instance and, once it completes (first token = end of the prefill), the prompt's KV goes over a link of
its own (bytes / bandwidth, no contention; it starts once the destination's memory holds it, else it retries every
second), then the decode task arrives at the token instance. E2E ends at the decode task's last iteration.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from splitbench.errors import InputError
from splitbench.policies import POOLS, Decision, NoHealthyInstance
from splitbench.schema.records import ERROR, OK, RequestRecord, placement
from splitbench.sim.compat import Instance, Task
from splitbench.sim.compat_perf import GIB, compat_machine, compat_model, transfer_time_s
from splitbench.sim.config import SimPool, SimResult
from splitbench.sim.engine import Simulator
from splitbench.splitwisesim_policies import KVRequest, SchedLedger, compat_policy_params, make_compat_policy


@dataclass
class CompatConfig:
    """SplitwiseSim's knobs, its names (start_state/*.yaml, orchestrator_repo/schedulers/*.yaml) and defaults."""
    pools: list[SimPool]
    model: str = "bloom-176b"
    policy: str = "jsq"                       # jsq = its token_jsq, mixed-pool = its mixed_pool
    policy_params: dict = field(default_factory=dict)
    seed: int = 0
    max_batch_size: int = 512
    max_batch_tokens: int = 2048
    max_preemptions: int = 4
    transfer_bandwidth_gib_per_s: float = 200.0
    tensor_parallel: int | None = None        # None: all GPUs of a machine (SplitwiseSim's start states: 8)
    flow_retry_s: float = 1.0                 # interconnect.py Link.retry_delay
    record_token_chunks: bool = True


def validate_compat(cfg: CompatConfig) -> None:
    """InputError (one line naming the field) for a configuration the compat mode cannot run."""
    if not cfg.pools or sum(p.count for p in cfg.pools) < 1:
        raise InputError("no machine pools configured", column="pools")
    for p in cfg.pools:
        if p.pool not in POOLS:
            raise InputError(f"pool must be one of {', '.join(POOLS)}, got {p.pool!r}", column="pools")
        compat_machine(p.machine, cfg.tensor_parallel)
    compat_model(cfg.model)
    for name in ("max_batch_size", "max_batch_tokens", "max_preemptions"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name} must be >= 1", column=name)
    if not cfg.transfer_bandwidth_gib_per_s > 0:
        raise InputError("transfer bandwidth must be > 0 GiB/s", column="transfer_bandwidth_gib_per_s")
    compat_policy_params(cfg.policy, cfg.policy_params)
    pools = {p.pool for p in cfg.pools if p.count}
    if cfg.policy.replace("_", "-") in ("mixed-pool", "mixed") and not ({"prompt", "token"} <= pools or "mixed" in pools):
        raise InputError("policy mixed-pool needs prompt and token pools (SplitwiseSim's Splitwise start states)",
                         column="policy")


class _Req:
    __slots__ = ("arrival", "d", "decode", "error", "first", "i", "kv", "last", "n_in", "n_out", "pdone", "prompt",
                 "sent")

    def __init__(self, i: int, arrival: float, n_in: int, n_out: int, kv: KVRequest):
        self.i, self.arrival, self.n_in, self.n_out, self.kv = i, arrival, n_in, n_out, kv
        self.d = self.decode = self.prompt = self.error = None
        self.first = self.last = self.pdone = self.sent = None


class CompatCluster:
    """One compat-mode simulation: build with the workload, config and per-machine-type SplitwiseSimPerf, run()."""

    def __init__(self, workload, cfg: CompatConfig, perf: Mapping[str, object]):
        validate_compat(cfg)
        self.w, self.cfg, self.model = workload, cfg, compat_model(cfg.model)
        self.sim = Simulator()
        self.instances: list[Instance] = []
        counts: dict[str, int] = {}
        caps = dict(max_batch_size=cfg.max_batch_size, max_batch_tokens=cfg.max_batch_tokens,
                    max_preemptions=cfg.max_preemptions)
        self.mtype: dict[str, str] = {}
        for p in cfg.pools:
            if p.machine not in perf:
                raise InputError(f"machine type {p.machine!r} has no performance model", column="pools")
            _, _, per_machine, mem_bytes = compat_machine(p.machine, cfg.tensor_parallel)
            for _ in range(p.count * per_machine):
                k = counts.get(p.pool, 0)
                counts[p.pool] = k + 1
                m = Instance(f"{p.pool}-{k}", p.pool, perf[p.machine], self.model.weight_bytes, mem_bytes, self.sim,
                             self, **caps)
                self.instances.append(m)
                self.mtype[m.id] = p.machine
        self.by_id = {m.id: m for m in self.instances}
        self.ledger = SchedLedger((m.id, m.pool, m.memory, m.max_memory) for m in self.instances)
        self.policy = make_compat_policy(cfg.policy, seed=cfg.seed, **(cfg.policy_params or {}))
        self.bw = cfg.transfer_bandwidth_gib_per_s * GIB   # scheduler.py: transfer_bandwidth * 1024**3 B/s
        self.reqs: list[_Req] = []
        self.n = {"transfers": 0, "transfer_retries": 0, "errors": 0}
        self._arr = workload.arrival_s.tolist()
        self._in, self._out = workload.input_tokens.tolist(), workload.output_tokens.tolist()
        self._ti = workload.trace_index.tolist()

    # ---------------------------------------------------------------- cluster level
    def run(self) -> SimResult:
        if self._arr:
            self.sim.schedule(self._arr[0], self._arrival, 0)
        end_s = self.sim.run()
        stats = {"events": self.sim.events, **self.n, "sim_end_s": end_s, "instances": len(self.instances)}
        for k in ("iterations", "preemptions", "pauses"):
            stats[k] = sum(m.n[k] for m in self.instances)
        for k in ("borrow_count", "return_count"):
            if hasattr(self.policy, k):
                stats[k] = getattr(self.policy, k)
        records = [self._record(r) for r in self.reqs]
        return SimResult(records, [{"id": m.id, "pool": m.pool, "machine": self.mtype[m.id]}
                                   for m in self.instances], stats)

    def _arrival(self, i: int) -> None:
        if i + 1 < len(self._arr):
            self.sim.schedule(self._arr[i + 1], self._arrival, i + 1)
        n_in, n_out = self._in[i], self._out[i]
        kv = KVRequest(f"r{self._ti[i]}", n_in, n_out, self.model.kv_bytes(n_in + 1), self.model.kv_bytes(n_out - 1))
        r = _Req(i, self.sim.now_s, n_in, n_out, kv)
        self.reqs.append(r)
        try:
            d = self.policy.choose(kv, self.ledger.views())
        except NoHealthyInstance as e:
            r.d, r.error = Decision("-", None, "-"), str(e)
            self.n["errors"] += 1
            return
        r.d = d
        self.ledger.dispatch(d, kv)
        pm = self.by_id[d.prompt_instance]
        r.prompt = Task(r, True, 1, n_in, kv.prompt_kv_bytes)
        r.decode = Task(r, False, n_out - 1, 1, kv.decode_kv_bytes)
        pm.arrive(r.prompt)
        if d.token_instance is None:
            pm.arrive(r.decode)   # executor.py: the chained decode task is submitted right after the prompt

    # ---------------------------------------------------------------- host callbacks (compat.Instance)
    def task_done(self, m: Instance, t: Task) -> None:
        r, now = t.req, self.sim.now_s
        if t.prompt:
            r.first = r.pdone = now   # task.py PromptTask.complete: TTFT at the end of the prompt's iteration
            self.ledger.prompt_done(r.d, r.kv)
            if r.d.token_instance is not None:
                self._flow(r)
            return
        m.memory -= r.kv.prompt_kv_bytes + r.kv.decode_kv_bytes   # task.py TokenTask.complete frees the request
        self.ledger.finish(r.d, r.kv)
        r.last = now

    def queue_changed(self, m: Instance) -> None:
        self.ledger.set_queued(m.id, len(m.pending))

    def idle(self, m: Instance, has_work: bool) -> None:
        if not has_work:
            self.policy.notify_free(m.id)

    def _flow(self, r: _Req) -> None:
        """interconnect.py Link.flow_arrival / retry_flow: start once the destination's memory holds the KV."""
        tm = self.by_id[r.d.token_instance]
        if tm.memory + r.kv.prompt_kv_bytes > tm.max_memory:
            self.n["transfer_retries"] += 1
            self.sim.schedule(self.sim.now_s + self.cfg.flow_retry_s, self._flow, r)
            return
        tm.memory += r.kv.prompt_kv_bytes
        self.n["transfers"] += 1
        self.sim.schedule(self.sim.now_s + transfer_time_s(r.n_in, self.model, self.bw), self._flow_done, r)

    def _flow_done(self, r: _Req) -> None:
        pm, tm = self.by_id[r.d.prompt_instance], self.by_id[r.d.token_instance]
        pm.memory -= r.kv.prompt_kv_bytes
        self.ledger.transfer_done(r.d, r.kv)
        r.sent = self.sim.now_s
        tm.arrive(r.decode)
        pm.flow_sent()

    # ---------------------------------------------------------------- records
    def _pools(self, d: Decision) -> dict:
        eff = getattr(self.policy, "effective_pool", None)
        pool = (lambda i: eff(i)) if eff else (lambda i: self.by_id[i].pool)
        if d.token_instance is None:
            return placement(d.prompt_instance, d.pool)
        return placement(d.prompt_instance, pool(d.prompt_instance), d.token_instance, pool(d.token_instance))

    def _record(self, r: _Req) -> RequestRecord:
        arr, d = r.arrival, r.d
        rec = RequestRecord(request_id=r.kv.id, trace_index=self._ti[r.i], intended_send_s=arr,
                            planned_input_tokens=r.n_in, planned_output_tokens=r.n_out, actual_send_s=arr,
                            **(self._pools(d) if d.prompt_instance != "-" else {}))
        if r.error is not None or r.last is None:
            rec.status, rec.end_s = ERROR, arr
            rec.error = r.error or "simulation ended before the request finished (SplitwiseSim would leave it out)"
            rec.phases_s = {"router_recv": arr, "done": arr}
            return rec
        offs, toks = [r.first - arr], [1]
        t = r.decode
        if self.cfg.record_token_chunks:
            offs += [x - arr for x in t.chunk_t]
            toks += t.chunk_n
        elif r.n_out > 1:
            offs.append(r.last - arr)
            toks.append(r.n_out - 1)
        rec.first_token_s, rec.last_token_s, rec.end_s = r.first, r.last, r.last
        rec.chunk_offsets_s, rec.chunk_tokens = offs, toks
        rec.actual_input_tokens, rec.actual_output_tokens, rec.status = r.n_in, r.n_out, OK
        if d.token_instance is None:
            rec.phases_s = {"router_recv": arr, "sent": arr, "first_token": r.first, "done": r.last}
        else:
            rec.phases_s = {"router_recv": arr, "prefill_sent": arr, "prefill_done": r.pdone,
                            "decode_sent": r.sent, "first_token": r.first, "done": r.last}
        return rec


def simulate_compat(workload, cfg: CompatConfig, perf: Mapping[str, object]) -> SimResult:
    """Replay `workload` in the SplitwiseSim-compatible mode; perf: machine type -> compat_perf.SplitwiseSimPerf."""
    return CompatCluster(workload, cfg, perf).run()
