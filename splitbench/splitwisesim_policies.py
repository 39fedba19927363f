"""SplitwiseSim's cluster schedulers as pure policies for the simulator's compat mode (`--perf-model splitwisesim`):
token-JSQ (its Baseline runs) and its mixed pool (its Splitwise runs), plus the scheduler-side bookkeeping they read.

Semantics follow SplitwiseSim's scheduler.py (TokenJSQScheduler, MixedPoolScheduler) and task.py/flow.py (where the
counts go down); ties go to the first instance in list order as Python's min() does there, so the injected rng is
accepted for the common policy interface but never drawn from.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from splitbench.errors import InputError
from splitbench.policies import MIXED, PROMPT, TOKEN, Decision, NoHealthyInstance, Param


class SchedView(NamedTuple):
    """What SplitwiseSim's schedulers read of an instance (a tuple: one is built per instance per request)."""
    id: str
    pool: str               # its own pool: prompt | token | mixed | baseline
    pending_tokens: int     # sched_pending_tokens: prompt tokens not yet prefilled + 1 per unfinished decode
    memory_bytes: int       # sched_memory: weights + the KV promised to requests scheduled here
    max_memory_bytes: int   # max_memory
    queued_tasks: int       # len(pending_queue): tasks waiting (not in the running batch)


@dataclass(frozen=True, slots=True)
class KVRequest:
    """A request as SplitwiseSim's schedulers see it: sizes and the KV bytes its two tasks will hold."""
    id: str
    prompt_tokens: int
    output_tokens: int
    prompt_kv_bytes: int   # PromptTask.max_memory: KV of prompt + 1 tokens
    decode_kv_bytes: int   # TokenTask.max_memory: KV of output - 1 tokens


class SchedLedger:
    """sched_pending_tokens and sched_memory per instance: raised when a request is scheduled (scheduler.py),
    lowered when its prompt completes, its KV transfer completes (flow.py frees the source) and it finishes."""

    def __init__(self, instances: Iterable[tuple[str, str, int, int]]):
        self.order: list[str] = []
        self.pool: dict[str, str] = {}
        self.pending: dict[str, int] = {}
        self.memory: dict[str, int] = {}
        self.max_memory: dict[str, int] = {}
        for iid, pool, weight_bytes, max_memory_bytes in instances:
            if iid in self.pool:
                raise ValueError(f"duplicate instance id {iid!r}")
            self.order.append(iid)
            self.pool[iid], self.pending[iid] = pool, 0
            self.memory[iid], self.max_memory[iid] = int(weight_bytes), int(max_memory_bytes)
        self.queued = dict.fromkeys(self.order, 0)   # len(pending_queue), set by the caller through set_queued
        # views() rebuilds only what changed since the last call (one call per request, 100+ instances)
        self._index = {iid: k for k, iid in enumerate(self.order)}
        self._cache: list[SchedView | None] = [None] * len(self.order)
        self._dirty: set[str] = set(self.order)

    def set_queued(self, iid: str, queued_tasks: int) -> None:
        if self.queued[iid] != queued_tasks:
            self.queued[iid] = queued_tasks
            self._dirty.add(iid)

    def views(self) -> tuple[SchedView, ...]:
        if self._dirty:
            for i in self._dirty:
                self._cache[self._index[i]] = SchedView(i, self.pool[i], self.pending[i], self.memory[i],
                                                        self.max_memory[i], self.queued[i])
            self._dirty.clear()
        return tuple(self._cache)

    def dispatch(self, d: Decision, r: KVRequest) -> None:
        tok = d.token_instance or d.prompt_instance
        self.pending[d.prompt_instance] += r.prompt_tokens
        self.pending[tok] += 1
        if d.token_instance:
            self.memory[d.prompt_instance] += r.prompt_kv_bytes
        self.memory[tok] += r.prompt_kv_bytes + r.decode_kv_bytes
        self._dirty.update((d.prompt_instance, tok))

    def prompt_done(self, d: Decision, r: KVRequest) -> None:
        self.pending[d.prompt_instance] -= r.prompt_tokens
        self._dirty.add(d.prompt_instance)

    def transfer_done(self, d: Decision, r: KVRequest) -> None:
        self.memory[d.prompt_instance] -= r.prompt_kv_bytes
        self._dirty.add(d.prompt_instance)

    def finish(self, d: Decision, r: KVRequest) -> None:
        tok = d.token_instance or d.prompt_instance
        self.pending[tok] -= 1
        self.memory[tok] -= r.prompt_kv_bytes + r.decode_kv_bytes
        self._dirty.add(tok)


class TokenJSQ:
    """scheduler.py TokenJSQScheduler: the whole request on the instance with the fewest pending tokens (any
    pool; the first of equals). SplitwiseSim's Baseline runs use it."""
    name = "jsq"
    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng

    def choose(self, request: KVRequest, instances: Sequence[SchedView]) -> Decision:
        if not instances:
            raise NoHealthyInstance("no instances configured")
        c = min(instances, key=lambda v: v.pending_tokens)
        return Decision(c.id, None, c.pool)

    def notify_free(self, instance_id: str) -> None:
        """An instance ran out of work (nothing to do for this policy)."""


class MixedPool:
    """scheduler.py MixedPoolScheduler. Prompt instance: the prompt pool's (then the mixed pool's) instance with the
    fewest pending tokens, unless its queue is long (tasks waiting and pending + this prompt > the threshold).
    Token instance: the token pool's (then the mixed pool's) instance with the least scheduled memory, unless this
    request's KV would fill it. No prompt instance: the token instance with the fewest pending tokens moves to the
    mixed pool and takes it; no token instance: the prompt instance with the least memory moves. Still none: the
    instance with the fewest pending tokens of all runs the whole request. A mixed instance goes back (to the end
    of its own pool's list) when it runs out of work (notify_free)."""
    name = "mixed-pool"
    PARAMS: ClassVar[dict[str, Param]] = {
        "prompt_max_pending_batch_tokens": Param(int, 1, 8192, "pending tokens above which a prompt queue is long"),
    }

    def __init__(self, rng: random.Random | None = None, prompt_max_pending_batch_tokens: int = 8192):
        self.rng = rng
        self.threshold = prompt_max_pending_batch_tokens
        self.lists: dict[str, list[str]] | None = None
        self.home: dict[str, str] = {}   # instance in the mixed pool -> its own pool (prompt or token)
        self.borrow_count = self.return_count = 0

    def effective_pool(self, instance_id: str) -> str:
        return MIXED if instance_id in self.home else self._own.get(instance_id, MIXED)

    def _setup(self, instances: Sequence[SchedView]) -> None:
        self._own = {v.id: v.pool for v in instances}
        self.lists = {p: [v.id for v in instances if v.pool == p] for p in (PROMPT, TOKEN, MIXED)}
        if not (self.lists[PROMPT] and self.lists[TOKEN]) and not self.lists[MIXED]:
            raise NoHealthyInstance("mixed-pool needs prompt and token instances (or mixed ones)")

    def _best(self, ids: list[str], by: dict[str, SchedView], key, loaded) -> str | None:
        if not ids:
            return None
        best = min(ids, key=lambda i: key(by[i]))
        return None if loaded(by[best]) else best

    def _borrow(self, source: str, by: dict[str, SchedView], key) -> str | None:
        ids = self.lists[source]
        if not ids:
            return None
        iid = min(ids, key=lambda i: key(by[i]))
        ids.remove(iid)
        self.lists[MIXED].append(iid)
        self.home[iid] = source
        self.borrow_count += 1
        return iid

    def choose(self, request: KVRequest, instances: Sequence[SchedView]) -> Decision:
        if self.lists is None:
            self._setup(instances)
        lists, by, r = self.lists, {v.id: v for v in instances}, request
        kv = r.prompt_kv_bytes + r.decode_kv_bytes
        pend, mem = (lambda v: v.pending_tokens), (lambda v: v.memory_bytes)
        long_queue = lambda v: v.queued_tasks > 0 and v.pending_tokens + r.prompt_tokens > self.threshold  # noqa: E731
        full = lambda v: v.memory_bytes + kv >= v.max_memory_bytes  # noqa: E731
        p = self._best(lists[PROMPT], by, pend, long_queue) or self._best(lists[MIXED], by, pend, long_queue)
        t = self._best(lists[TOKEN], by, mem, full) or self._best(lists[MIXED], by, mem, full)
        if p is None:
            p = self._borrow(TOKEN, by, pend)
        if t is None:
            t = self._borrow(PROMPT, by, mem)
        if p is None or t is None:
            everyone = lists[PROMPT] + lists[MIXED] + lists[TOKEN]
            p = t = min(everyone, key=lambda i: by[i].pending_tokens)
        if p == t:
            return Decision(p, None, self.effective_pool(p))
        return Decision(p, t, self.effective_pool(p))

    def notify_free(self, instance_id: str) -> None:
        """scheduler.py notify_free_instance: a mixed instance with no work returns to its own pool."""
        own = self.home.pop(instance_id, None)
        if own is not None and self.lists is not None:
            self.lists[MIXED].remove(instance_id)
            self.lists[own].append(instance_id)
            self.return_count += 1


COMPAT_POLICIES: dict[str, type] = {"jsq": TokenJSQ, "token-jsq": TokenJSQ, "mixed-pool": MixedPool,
                                    "mixed": MixedPool}


def compat_policy_class(name: str) -> type:
    """The compat policy of `name` (SplitwiseSim's config names with underscores work too)."""
    cls = COMPAT_POLICIES.get(str(name).replace("_", "-"))
    if cls is None:
        raise InputError(f"--perf-model splitwisesim: unknown policy {name!r} (known: jsq = SplitwiseSim's "
                         "token_jsq, mixed-pool = its mixed_pool)")
    return cls


def compat_policy_params(name: str, params: Mapping[str, Any] | None = None) -> dict:
    """`params` checked and typed against the compat policy's PARAMS; InputError naming a bad key or value."""
    table = compat_policy_class(name).PARAMS
    out = {}
    for key, value in (params or {}).items():
        p = table.get(key)
        if p is None:
            raise InputError(f"policy {name!r} (splitwisesim) has no parameter {key!r} "
                             f"(known: {', '.join(table) or 'none'})")
        try:
            out[key] = p.parse(value)
        except (TypeError, ValueError):
            raise InputError(f"policy {name!r} parameter {key!r}: must be {p.describe()}, got {value!r}") from None
    return out


def make_compat_policy(name: str, seed: int = 0, **params):
    """The compat policy `name` with its own rng seeded `seed` and checked parameters."""
    return compat_policy_class(name)(random.Random(seed), **compat_policy_params(name, params))
