"""Pure cluster-level scheduling policies (round robin, join-shortest-queue, Splitwise's mixed pool), their typed
user parameters, and the pending-token ledger. No I/O, no clock, no global random: router and simulator share them.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Protocol, Sequence

from splitbench.errors import InputError

PROMPT, TOKEN, MIXED, BASELINE = "prompt", "token", "mixed", "baseline"
POOLS = (PROMPT, TOKEN, MIXED, BASELINE)
COLOCATED_POOLS = (MIXED, BASELINE)  # instances configured to run whole requests themselves


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What a policy may know about one instance at decision time (pending counts kept by the caller)."""
    id: str
    pool: str                       # configured pool: prompt | token | mixed | baseline
    pending_prompt_tokens: int = 0  # input tokens dispatched here whose prefill has not finished
    pending_decode_tokens: int = 0  # output tokens dispatched here whose request has not finished
    running: int = 0                # requests dispatched here and not finished (for this instance's role)
    healthy: bool = True

    @property
    def pending_tokens(self) -> int:
        return self.pending_prompt_tokens + self.pending_decode_tokens


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request runs. token_instance None = co-located on prompt_instance (no KV transfer)."""
    prompt_instance: str
    token_instance: str | None
    pool: str   # "split" decisions say "prompt"; co-located ones the pool they ran in (mixed/baseline)

    @property
    def split(self) -> bool:
        return self.token_instance is not None

    @property
    def label(self) -> str:
        """The router phase log's instance label: "prompt-0>token-1" for a split request, else the instance id."""
        return f"{self.prompt_instance}>{self.token_instance}" if self.token_instance else self.prompt_instance


class NoHealthyInstance(RuntimeError):
    """No healthy instance (or pair of instances) can take the request."""


@dataclass(frozen=True, slots=True)
class Param:
    """One user-settable policy parameter: whole number or float, its lower bound, default and meaning."""
    kind: type      # int | float
    minimum: float
    default: int | float
    help: str

    def parse(self, value: Any) -> int | float:
        """The typed value of `value` (a number, or its text as given on a command line); ValueError if not."""
        if isinstance(value, bool):
            raise ValueError(value)
        v = float(value.strip() if isinstance(value, str) else value)
        if not math.isfinite(v) or v < self.minimum or (self.kind is int and v != int(v)):
            raise ValueError(value)
        return int(v) if self.kind is int else v

    def describe(self) -> str:
        kind = "a whole number" if self.kind is int else "a number"
        return f"{kind} >= {self.minimum:g}"


class Policy(Protocol):
    name: str

    def choose(self, request: Request, instances: Sequence[InstanceView]) -> Decision: ...


def _healthy(instances: Iterable[InstanceView], pools: tuple[str, ...]) -> list[InstanceView]:
    return [i for i in instances if i.healthy and i.pool in pools]


def routable(instances: Sequence[InstanceView]) -> bool:
    """True when some request could be placed: a healthy prompt+token pair or a healthy co-located instance."""
    return bool(_healthy(instances, COLOCATED_POOLS)) or (
        bool(_healthy(instances, (PROMPT,))) and bool(_healthy(instances, (TOKEN,))))


def _least(cands: Sequence[InstanceView], key, rng: random.Random) -> InstanceView:
    """The candidate with the smallest key; ties broken by the injected rng (deterministic given its seed)."""
    best = min(key(c) for c in cands)
    ties = [c for c in cands if key(c) == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)


def _pick_pair_or_colocated(instances: Sequence[InstanceView], pick_prompt, pick_token, pick_colocated,
                            ) -> Decision:
    prompts, tokens = _healthy(instances, (PROMPT,)), _healthy(instances, (TOKEN,))
    if prompts and tokens:
        return Decision(pick_prompt(prompts).id, pick_token(tokens).id, PROMPT)
    colocated = _healthy(instances, COLOCATED_POOLS)
    if colocated:
        c = pick_colocated(colocated)
        return Decision(c.id, None, c.pool)
    raise NoHealthyInstance(_why(instances))


def _why(instances: Sequence[InstanceView]) -> str:
    if not instances:
        return "no instances configured"
    down = [i.id for i in instances if not i.healthy]
    return f"no healthy route (unhealthy: {', '.join(down) or 'none'}; pools: " \
           f"{', '.join(sorted({i.pool for i in instances}))})"


class RoundRobin:
    """Cycles through healthy instances, one cursor per pool (prompt, token, co-located), in list order."""
    name = "round-robin"
    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, rng: random.Random | None = None):
        self.cursor: dict[str, int] = {}

    def _next(self, key: str, cands: list[InstanceView]) -> InstanceView:
        k = self.cursor.get(key, 0)
        self.cursor[key] = k + 1
        return cands[k % len(cands)]

    def choose(self, request: Request, instances: Sequence[InstanceView]) -> Decision:
        return _pick_pair_or_colocated(instances, lambda c: self._next(PROMPT, c), lambda c: self._next(TOKEN, c),
                                       lambda c: self._next(BASELINE, c))


class JSQ:
    """Join-shortest-queue as Splitwise's cluster scheduler: prompt instance by pending prompt tokens, token
    instance by pending decode tokens, co-located instances by all pending tokens; rng breaks ties."""
    name = "jsq"
    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random(0)

    def choose(self, request: Request, instances: Sequence[InstanceView]) -> Decision:
        rng = self.rng
        return _pick_pair_or_colocated(
            instances, lambda c: _least(c, lambda i: i.pending_prompt_tokens, rng),
            lambda c: _least(c, lambda i: i.pending_decode_tokens, rng),
            lambda c: _least(c, lambda i: i.pending_tokens, rng))


class MixedPool:
    """Splitwise's mixed pool on top of JSQ. When every instance of the prompt pool has at least
    `prompt_threshold_tokens` pending prompt tokens (or every token instance `decode_threshold_tokens` pending
    decode tokens), the request goes to the mixed pool and runs co-located there; if no mixed instance is below
    both thresholds, the least-loaded instance of the *other* pool is borrowed into the mixed pool (a pool is
    never emptied). A borrowed instance returns to its own pool once it is drained (nothing pending, nothing
    running), checked at the next choose()."""
    name = "mixed-pool"
    PARAMS: ClassVar[dict[str, Param]] = {
        "prompt_threshold_tokens": Param(int, 1, 8192, "pending prompt tokens at which the prompt pool is overloaded"),
        "decode_threshold_tokens": Param(int, 1, 4096, "pending decode tokens at which the token pool is overloaded"),
    }

    def __init__(self, rng: random.Random | None = None, prompt_threshold_tokens: int = 8192,
                 decode_threshold_tokens: int = 4096):
        if prompt_threshold_tokens < 1 or decode_threshold_tokens < 1:
            raise ValueError("mixed-pool thresholds must be >= 1 token")
        self.rng = rng or random.Random(0)
        self.prompt_threshold_tokens = prompt_threshold_tokens
        self.decode_threshold_tokens = decode_threshold_tokens
        self.borrowed: dict[str, str] = {}   # instance id -> its own pool, in borrowing order
        self.borrow_count = 0
        self.return_count = 0

    def effective_pool(self, instance: InstanceView) -> str:
        return MIXED if instance.id in self.borrowed else instance.pool

    def _return_drained(self, instances: Sequence[InstanceView]) -> None:
        by_id = {i.id: i for i in instances}
        for iid in list(self.borrowed):
            v = by_id.get(iid)
            if v is None or not v.healthy or (v.pending_tokens == 0 and v.running == 0):
                del self.borrowed[iid]
                self.return_count += 1

    def _fits(self, v: InstanceView) -> bool:
        return (v.pending_prompt_tokens < self.prompt_threshold_tokens
                and v.pending_decode_tokens < self.decode_threshold_tokens)

    def choose(self, request: Request, instances: Sequence[InstanceView]) -> Decision:
        rng = self.rng
        self._return_drained(instances)
        own = [i for i in instances if i.healthy and i.id not in self.borrowed]
        prompts, tokens = _healthy(own, (PROMPT,)), _healthy(own, (TOKEN,))
        mixed = [i for i in instances if i.healthy and (i.id in self.borrowed or i.pool == MIXED)]
        baseline = _healthy(own, (BASELINE,))
        if not (prompts and tokens):   # not a split cluster (or one pool is down): plain JSQ on what is left
            colocated = mixed + baseline
            if not colocated:
                raise NoHealthyInstance(_why(instances))
            c = _least(colocated, lambda i: i.pending_tokens, rng)
            return Decision(c.id, None, self.effective_pool(c))
        p = _least(prompts, lambda i: i.pending_prompt_tokens, rng)
        t = _least(tokens, lambda i: i.pending_decode_tokens, rng)
        p_over = p.pending_prompt_tokens >= self.prompt_threshold_tokens
        t_over = t.pending_decode_tokens >= self.decode_threshold_tokens
        if not (p_over or t_over):
            return Decision(p.id, t.id, PROMPT)
        room = [m for m in mixed if self._fits(m)]
        if room:
            m = _least(room, lambda i: i.pending_tokens, rng)
            return Decision(m.id, None, MIXED)
        # Borrow from the pool that is not overloaded (prompt overloaded -> take a token instance, and so on);
        # when both are, from the one further below its threshold. Never take a pool's last instance.
        if p_over and t_over:
            take_token = (t.pending_decode_tokens / self.decode_threshold_tokens
                          <= p.pending_prompt_tokens / self.prompt_threshold_tokens)
        else:
            take_token = p_over
        donors = tokens if take_token else prompts
        if len(donors) > 1:
            d = t if take_token else p
            self.borrowed[d.id] = d.pool
            self.borrow_count += 1
            return Decision(d.id, None, MIXED)
        return Decision(p.id, t.id, PROMPT)


POLICIES = {"round-robin": RoundRobin, "rr": RoundRobin, "jsq": JSQ, "mixed-pool": MixedPool, "mixed": MixedPool}


def policy_class(name: str) -> type:
    """The policy class of `name` (aliases rr, mixed); InputError naming the known ones."""
    cls = POLICIES.get(name)
    if cls is None:
        raise InputError(f"unknown policy {name!r} (known: round-robin, jsq, mixed-pool)")
    return cls


def policy_params(name: str, params: Mapping[str, Any] | None = None, *, defaults: bool = False) -> dict:
    """`params` checked against policy `name`'s PARAMS and typed (text such as "8192" is accepted); with
    `defaults`, every parameter the call did not set is filled in. InputError (one line naming the key) for an
    unknown key or a bad value."""
    table = policy_class(name).PARAMS
    out = {k: p.default for k, p in table.items()} if defaults else {}
    for key, value in (params or {}).items():
        p = table.get(key)
        if p is None:
            known = ", ".join(table) or "none"
            raise InputError(f"policy {name!r} has no parameter {key!r} (known: {known})")
        try:
            out[key] = p.parse(value)
        except (TypeError, ValueError):
            raise InputError(f"policy {name!r} parameter {key!r}: must be {p.describe()}, got {value!r}") from None
    return out


def parse_policy_params(items: Iterable[str], policy: str | None = None) -> dict:
    """`--policy-param KEY=VALUE` items -> {key: value} (dashes in a key read as underscores); checked and typed
    for `policy` when it is given, else the values stay text. InputError for a malformed or repeated item."""
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key or not value.strip():
            raise InputError(f"--policy-param {item!r}: expected KEY=VALUE, e.g. prompt_threshold_tokens=4096")
        if key in out:
            raise InputError(f"--policy-param {key!r} is given twice")
        out[key] = value.strip()
    return policy_params(policy, out) if policy is not None else out


def make_policy(name: str, seed: int = 0, **params) -> Policy:
    """Policy by name with its own rng seeded `seed` and its parameters checked (policy_params);
    InputError for an unknown name, parameter or value."""
    return policy_class(name)(random.Random(seed), **policy_params(name, params))


class Ledger:
    """Pending-token accounting the caller keeps and turns into InstanceViews: tokens are added on dispatch,
    prompt tokens leave the prompt instance when its prefill is done, decode tokens leave on finish."""

    def __init__(self, instances: Iterable[tuple[str, str]]):
        self.order: list[str] = []
        self.pool: dict[str, str] = {}
        for iid, pool in instances:
            if pool not in POOLS:
                raise ValueError(f"instance {iid!r}: pool must be one of {', '.join(POOLS)}, got {pool!r}")
            if iid in self.pool:
                raise ValueError(f"duplicate instance id {iid!r}")
            self.order.append(iid)
            self.pool[iid] = pool
        self.prompt = dict.fromkeys(self.order, 0)
        self.decode = dict.fromkeys(self.order, 0)
        self.running = dict.fromkeys(self.order, 0)
        self.healthy = dict.fromkeys(self.order, True)
        # views() rebuilds only the instances whose counts changed since the last call (the simulator calls it
        # once per request on clusters of 100+ instances)
        self._index = {iid: k for k, iid in enumerate(self.order)}
        self._cache: list[InstanceView | None] = [None] * len(self.order)
        self._dirty: set[str] = set(self.order)

    def _view(self, i: str) -> InstanceView:
        return InstanceView(i, self.pool[i], self.prompt[i], self.decode[i], self.running[i], self.healthy[i])

    def views(self) -> tuple[InstanceView, ...]:
        if self._dirty:
            for i in self._dirty:
                self._cache[self._index[i]] = self._view(i)
            self._dirty.clear()
        return tuple(self._cache)

    def set_healthy(self, iid: str, healthy: bool) -> None:
        self.healthy[iid] = healthy
        self._dirty.add(iid)

    def dispatch(self, d: Decision, r: Request) -> None:
        self.prompt[d.prompt_instance] += r.input_tokens
        self.running[d.prompt_instance] += 1
        tok = d.token_instance or d.prompt_instance
        self.decode[tok] += r.output_tokens
        if d.token_instance:
            self.running[tok] += 1
        self._dirty.add(d.prompt_instance)
        self._dirty.add(tok)

    def prefill_done(self, d: Decision, r: Request) -> None:
        """Call once per request, also when the prefill failed."""
        self.prompt[d.prompt_instance] -= r.input_tokens
        if d.token_instance:
            self.running[d.prompt_instance] -= 1
        self._dirty.add(d.prompt_instance)

    def finish(self, d: Decision, r: Request) -> None:
        """Call once per request after prefill_done(), whether it succeeded or not."""
        tok = d.token_instance or d.prompt_instance
        self.decode[tok] -= r.output_tokens
        self.running[tok] -= 1
        self._dirty.add(tok)

