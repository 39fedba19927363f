"""SplitwiseSim's machine-level scheduling for the compat mode (`--perf-model splitwisesim`): one instance's
iteration-level batching as SplitwiseSim's instance.py SplitwiseInstance (on ORCAInstance) does it.

Re-implemented from its semantics (no code copied): every iteration boundary re-selects the batch in five passes —
tasks passed over `max_preemptions` times or more (from the head of the pending queue), then waiting prompts
(FCFS), then preempted decodes, then the running batch, then every other request of the instance by arrival —
under a batch-size cap and a batch-token cap (a prompt counts its size, a decode 1; the first task always fits) and
KV memory (a task reserves its KV when it first runs). Running decodes left out are preempted (they keep their
memory). A batch with a prompt runs one iteration; a decode-only batch runs up to its first finish in one event,
cut at the next iteration boundary when a task arrives that could join (pause). The iteration time comes from
compat_perf (it does not grow with the context). The first token is made by the prompt's iteration.
"""
from __future__ import annotations

import bisect

QUEUED, RUNNING, BLOCKED, DONE = 1, 2, 3, 4


class Task:
    """A prompt task (generates 1 token) or a decode task (generates output - 1) of one request on one instance."""
    __slots__ = ("chunk_t", "chunk_n", "done", "mark", "mem", "preemptions", "prompt", "req", "size", "state",
                 "step", "tpi")

    def __init__(self, req, prompt: bool, size: int, tokens_per_iteration: int, mem_bytes: int):
        self.req, self.prompt, self.size, self.tpi, self.mem = req, prompt, size, tokens_per_iteration, mem_bytes
        self.state = self.done = self.step = self.preemptions = self.mark = 0
        self.chunk_t: list[float] = []   # decode tasks: end time of each run ...
        self.chunk_n: list[int] = []     # ... and the tokens it made


def _key(t: Task) -> tuple:
    return (t.preemptions, t.req.arrival)   # the pending queue's order when a task is inserted


class _Pick:
    """The batch being selected: tasks, their requests, batch tokens and the memory they would reserve."""
    __slots__ = ("cap_n", "cap_tokens", "max_mem", "mem", "new", "reqs", "tokens")

    def __init__(self, m: "Instance"):
        self.new: list[Task] = []
        self.reqs: set[int] = set()
        self.tokens, self.mem, self.max_mem = 0, m.memory, m.max_memory
        self.cap_n, self.cap_tokens = m.max_batch_size, m.max_batch_tokens

    def full(self) -> bool:
        return len(self.new) == self.cap_n

    def over(self, t: Task) -> bool:
        return bool(self.new) and self.tokens + t.tpi > self.cap_tokens

    def fits(self, t: Task) -> bool:
        return t.mem + self.mem <= self.max_mem

    def add(self, t: Task, reserve: bool) -> None:
        self.new.append(t)
        self.reqs.add(t.req.i)
        self.tokens += t.tpi
        if reserve:
            self.mem += t.mem


class Instance:
    """One SplitwiseSim instance on the shared event loop. `host` is told when a task finishes
    (task_done(instance, task)), when its queue of waiting tasks changed (queue_changed(instance)) and when it has
    nothing running (idle(instance, has_work))."""

    def __init__(self, iid: str, pool: str, perf, weight_bytes: int, max_memory_bytes: int, sim, host, *,
                 max_batch_size: int, max_batch_tokens: int, max_preemptions: int):
        self.id, self.pool, self.perf, self.sim, self.host = iid, pool, perf, sim, host
        self.memory, self.max_memory = int(weight_bytes), int(max_memory_bytes)
        self.max_batch_size, self.max_batch_tokens, self.max_preemptions = (max_batch_size, max_batch_tokens,
                                                                            max_preemptions)
        self.pending: list[Task] = []    # waiting tasks by (preemptions, arrival) at insertion
        self.prompts: list[Task] = []    # waiting prompt tasks, FCFS
        self.blocked: list[Task] = []    # preempted decode tasks, in preemption order
        self.batch: list[Task] = []
        self.reqs: list = []             # requests with a task here, by arrival
        self.tasks: dict[int, list[Task]] = {}
        self.batch_prompts = self.batch_tokens = 0
        self.it_s, self.n_iter, self.run_t0 = 0.0, 0, 0.0
        self.paused, self.version, self._stamp = False, 0, 0
        self.n = {"iterations": 0, "preemptions": 0, "pauses": 0}

    # ---------------------------------------------------------------- arrivals
    def arrive(self, t: Task) -> None:
        """instance.py SplitwiseInstance.task_arrival."""
        t.state = QUEUED
        r = t.req
        if r.i in self.tasks:
            self.tasks[r.i].append(t)
        else:
            bisect.insort(self.reqs, r, key=lambda x: x.arrival)
            self.tasks[r.i] = [t]
        bisect.insort(self.pending, t, key=_key)
        if t.prompt:
            self.prompts.append(t)
        self.host.queue_changed(self)
        if not self.batch:
            if self.memory + t.mem <= self.max_memory:
                self.start()
            return
        if len(self.batch) < self.max_batch_size and self.batch_tokens + t.tpi <= self.max_batch_tokens:
            self.pause()
        elif t.prompt:
            prompt_tokens = self.batch_tokens - (len(self.batch) - self.batch_prompts)
            if self.batch_prompts < len(self.batch) and prompt_tokens + t.tpi <= self.max_batch_tokens:
                self.pause()

    def flow_sent(self) -> None:
        """instance.py notify_flow_completion: a KV transfer from here finished (its memory is free now)."""
        if not self.pending:
            return
        if not self.batch:
            if self.memory + self.pending[0].mem <= self.max_memory:
                self.start()
        elif len(self.batch) < self.max_batch_size and self.batch_tokens < self.max_batch_tokens:
            self.pause()

    # ---------------------------------------------------------------- batch selection
    def _select(self) -> _Pick:
        """instance.py SplitwiseInstance.select_batch: the five passes (module docstring)."""
        pk = _Pick(self)
        for t in self.pending:
            if t.preemptions < self.max_preemptions:
                break
            if pk.full() or pk.over(t):
                break
            if t.req.i in pk.reqs:
                continue
            if t.state == BLOCKED or pk.fits(t):
                pk.add(t, t.state != BLOCKED)
        for t in self.prompts:
            if pk.full() or pk.over(t):
                break
            if t.req.i in pk.reqs:
                continue
            if not pk.fits(t):
                break
            pk.add(t, True)
        for group in (self.blocked, self.batch):
            for t in group:
                if pk.full() or pk.over(t):
                    break
                if t.req.i not in pk.reqs:
                    pk.add(t, False)
        for r in self.reqs:
            if pk.full():
                break
            t = self.tasks[r.i][0]
            if r.i in pk.reqs:
                continue
            if pk.over(t):
                break
            if t.state != BLOCKED and not pk.fits(t):
                break
            pk.add(t, t.state != BLOCKED)
        return pk

    def _apply(self, pk: _Pick) -> None:
        """Preempt the running tasks left out, move the new ones into the batch (instance.py start_iteration)."""
        self._stamp += 1
        stamp = self._stamp
        for t in pk.new:
            t.mark = stamp
        for t in [t for t in self.batch if t.mark != stamp]:
            self.batch.remove(t)
            t.state = BLOCKED
            bisect.insort(self.pending, t, key=_key)
            self.blocked.append(t)
            self.n["preemptions"] += 1
        inside = {id(t) for t in self.batch}
        for t in pk.new:
            if id(t) in inside:
                continue
            self.pending.remove(t)
            if t.state == BLOCKED:
                self.blocked.remove(t)
            if t.prompt:
                self.prompts.remove(t)
            self.batch.append(t)
        self.batch_tokens = pk.tokens
        self.batch_prompts = sum(1 for t in self.batch if t.prompt)
        self.host.queue_changed(self)

    def start(self) -> None:
        """Start the next iteration (or go idle): select, preempt, count the passed-over, run."""
        self._apply(self._select())
        stamp = self._stamp
        for r in self.reqs:
            t = self.tasks[r.i][0]
            if t.mark != stamp:
                t.preemptions += 1
        if not self.batch:
            self.host.idle(self, bool(self.reqs))
            return
        self.it_s = self.perf.iteration_s(self.batch_tokens, self.batch_prompts, len(self.batch) - self.batch_prompts)
        self.n_iter = 1 if self.batch_prompts else min(t.size - t.done for t in self.batch)
        for t in self.batch:
            t.step = self.n_iter
            if t.state == QUEUED:
                self.memory += t.mem
            t.state = RUNNING
        self.n["iterations"] += 1
        self.run_t0 = self.sim.now_s
        self.version += 1
        if self.n_iter == 0:   # only decode tasks with nothing to make: SplitwiseSim runs a 0-delay event at once
            self.complete(self.version)
        else:
            self.sim.schedule(self.run_t0 + self.it_s * self.n_iter, self.complete, self.version)

    def pause(self) -> None:
        """instance.py pause_iteration: a decode-only run ends at the end of the iteration in progress."""
        if self.paused or self.batch_prompts:
            return
        self.paused = True
        self.n["pauses"] += 1
        self.n_iter = int((self.sim.now_s - self.run_t0) // self.it_s) + 1
        for t in self.batch:
            t.step = self.n_iter
        self.version += 1
        self.sim.schedule(self.run_t0 + self.it_s * self.n_iter, self.complete, self.version)

    def complete(self, version: int) -> None:
        """instance.py complete_iteration: count the tokens, finish the complete tasks, start the next iteration."""
        if version != self.version:
            return   # a paused run's first completion event
        now = self.sim.now_s
        finished = []
        for t in self.batch:
            t.done += t.step
            if not t.prompt:
                t.chunk_t.append(now)
                t.chunk_n.append(t.step)
            t.step = 0
            if t.done >= t.size:
                finished.append(t)
        for t in finished:
            t.state = DONE
            self.batch.remove(t)
            if t.prompt:
                self.batch_prompts -= 1
            tasks = self.tasks[t.req.i]
            tasks.remove(t)
            if not tasks:
                del self.tasks[t.req.i]
                self.reqs.remove(t.req)
            self.host.task_done(self, t)
        self.paused = False
        self.start()
