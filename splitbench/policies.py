"""Pure cluster-level scheduling policies (round robin, join-shortest-queue, Splitwise's mixed pool) and their typed
user parameters, over the pending-token ledger (ledger.py). No I/O, no clock, no global random: router and simulator
share them.
"""
from __future__ import annotations

import math
import random
from typing import Any, ClassVar, Iterable, Mapping, Protocol, Sequence, cast

from splitbench.errors import InputError
from splitbench.ledger import (  # noqa: F401  (Request .. Param are re-exported: their home is ledger.py)
    BASELINE,
    COLOCATED,
    COLOCATED_POOLS,
    MIXED,
    POOLS,
    PROMPT,
    TOKEN,
    Decision,
    InstanceView,
    Ledger,
    NoHealthyInstance,
    Param,
    Rank,
    Request,
    live_ledger,
)   # the ledger's names are re-exported: the router and the simulator import them from here
from splitbench.prefix_policy import PrefixAware, break_tie


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
    instance by pending decode tokens, co-located instances by all pending tokens; rng breaks ties. Given a
    Ledger's views it reads the ledger's ranks (same candidates in the same order, so the same rng draws)."""
    name = "jsq"
    PARAMS: ClassVar[dict[str, Param]] = {}

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random(0)

    def choose(self, request: Request, instances: Sequence[InstanceView]) -> Decision:
        rng, led = self.rng, live_ledger(instances)
        if led is not None:
            ranks = led.current_ranks()
            prompts, tokens = ranks[PROMPT].least(), ranks[TOKEN].least()
            if prompts and tokens:
                return Decision(led.order[break_tie(prompts, rng)], led.order[break_tie(tokens, rng)], PROMPT)
            colocated = ranks[COLOCATED].least()
            if colocated:
                iid = led.order[break_tie(colocated, rng)]   # no InstanceView built: the id and pool suffice
                return Decision(iid, None, led.pool[iid])
            raise NoHealthyInstance(_why(instances))
        return _jsq_scanned(instances, rng)


def _jsq_scanned(instances: Sequence[InstanceView], rng: random.Random) -> Decision:
    """JSQ by a scan of the views, for views that are not a Ledger's (no ranks to read)."""
    return _pick_pair_or_colocated(
        instances, lambda c: _least(c, lambda i: i.pending_prompt_tokens, rng),
        lambda c: _least(c, lambda i: i.pending_decode_tokens, rng),
        lambda c: _least(c, lambda i: i.pending_tokens, rng))


class _Pool:
    """One split pool's own (healthy, not borrowed) instances: the least loaded and its ties (views, or positions
    in the ledger's views), count, total load, and the healthy instances it has, borrowed ones included."""

    __slots__ = ("ties", "n", "total", "size")

    def __init__(self, ties: list, n: int, total: int, size: int) -> None:
        self.ties, self.n, self.total, self.size = ties, n, total, size

    def pick(self, rng: random.Random):
        """The least loaded (rng breaks ties): a position in the ledger's views, or an InstanceView."""
        return break_tie(self.ties, rng)


def _as_view(led: Ledger | None, c) -> InstanceView:
    """A _Pool's pick: a position in `led`'s order (ranked), or an InstanceView (scanned)."""
    return cast(Ledger, led).view_at(c) if isinstance(c, int) else c


def _id_of(led: Ledger | None, c) -> str:
    return cast(Ledger, led).order[c] if isinstance(c, int) else c.id


def _scanned_pool(instances: Sequence[InstanceView], pool: str, borrowed: dict, key) -> _Pool:
    size = [i for i in instances if i.healthy and i.pool == pool]
    own = [i for i in size if i.id not in borrowed]
    best = min((key(i) for i in own), default=None)
    return _Pool([i for i in own if key(i) == best], len(own), sum(key(i) for i in own), len(size))


def _ranked_pool(rank: Rank, borrowed_at: dict[str, int]) -> _Pool:
    if not borrowed_at:   # nothing lent (the common case): the rank as it is
        n = len(rank)
        return _Pool(rank.least(), n, rank.total, n)
    skip = {k for k in borrowed_at.values() if k in rank}
    lent = sum(rank.key(k) for k in skip)  # type: ignore[misc]
    return _Pool(rank.least(skip), len(rank) - len(skip), rank.total - lent, len(rank))


class MixedPool:
    """Splitwise's mixed pool on top of JSQ, with overload judged per instance on average so it scales with pool
    size. A pool is overloaded when its own instances hold on average at least `prompt_threshold_tokens` pending
    prompt tokens (prompt pool) or `decode_threshold_tokens` pending decode tokens (token pool); the request then
    runs co-located on the least-loaded mixed instance below both thresholds. If there is none, the least-loaded
    instance of the other pool is borrowed into the mixed pool, when that pool can lend: it stays under its own
    threshold on average without the instance, keeps one, and has lent fewer than `max_borrow_fraction` of its
    instances (at least one). Else the request stays split. A borrowed instance returns to its own pool once it is
    drained (nothing pending, nothing running), checked at the next choose()."""
    name = "mixed-pool"
    PARAMS: ClassVar[dict[str, Param]] = {
        "prompt_threshold_tokens": Param(int, 1, 8192, "pending prompt tokens per prompt instance (on average) at "
                                         "which the prompt pool is overloaded"),
        "decode_threshold_tokens": Param(int, 1, 65536, "pending decode tokens per token instance (on average) at "
                                         "which the token pool is overloaded (about a DGX's KV memory, in "
                                         "tokens of BLOOM-176B: requests beyond it wait for memory)"),
        "max_borrow_fraction": Param(float, 0, 0.25, "most of a pool's instances lent to the mixed pool at once "
                                     "(at least one; 0: never borrow)"),
    }

    def __init__(self, rng: random.Random | None = None, prompt_threshold_tokens: int = 8192,
                 decode_threshold_tokens: int = 65536, max_borrow_fraction: float = 0.25) -> None:
        if prompt_threshold_tokens < 1 or decode_threshold_tokens < 1:
            raise ValueError("mixed-pool thresholds must be >= 1 token")
        if not 0 <= max_borrow_fraction <= 1:
            raise ValueError("mixed-pool max_borrow_fraction must be in [0, 1]")
        self.rng = rng or random.Random(0)
        self.prompt_threshold_tokens = prompt_threshold_tokens
        self.decode_threshold_tokens = decode_threshold_tokens
        self.max_borrow_fraction = max_borrow_fraction
        self.borrowed: dict[str, str] = {}   # instance id -> its own pool, in borrowing order
        self.borrow_count = 0
        self.return_count = 0

    def effective_pool(self, instance: InstanceView) -> str:
        return MIXED if instance.id in self.borrowed else instance.pool

    def _drained(self, v) -> bool:
        return not v.healthy or (v.pending_tokens == 0 and v.running == 0)

    def _return(self, iid: str) -> None:
        del self.borrowed[iid]
        self.return_count += 1

    def _scanned(self, instances: Sequence[InstanceView]) -> tuple:
        """Borrowed instances returned when drained, then the pools and the mixed-pool candidates, by a scan."""
        by_id = {i.id: i for i in instances} if self.borrowed else {}
        for iid in list(self.borrowed):
            if by_id.get(iid) is None or self._drained(by_id[iid]):
                self._return(iid)
        mixed = [i for i in instances if i.healthy and (i.id in self.borrowed or i.pool == MIXED)]
        return (_scanned_pool(instances, PROMPT, self.borrowed, lambda i: i.pending_prompt_tokens),
                _scanned_pool(instances, TOKEN, self.borrowed, lambda i: i.pending_decode_tokens),
                [(i.id, i.pending_prompt_tokens, i.pending_decode_tokens) for i in mixed])

    def _ranked(self, led: Ledger) -> tuple[_Pool, _Pool, list[tuple[str, int, int]]]:
        """_scanned from the ledger's ranks and counts (the same result, without a pass over every instance)."""
        ranks = led.current_ranks()
        at: dict[str, int] = {}
        index, healthy, prompt, decode = led.index, led.healthy, led.prompt, led.decode
        for iid in list(self.borrowed):
            k = index.get(iid)
            if k is None or not healthy[iid] or (prompt[iid] + decode[iid] == 0 and led.running[iid] == 0):
                self._return(iid)
            else:
                at[iid] = k
        own = led.positions(MIXED)
        if own or at:
            ids = [led.order[k] for k in sorted({*own, *at.values()})] if own else sorted(at, key=at.__getitem__)
            cands = [(i, prompt[i], decode[i]) for i in ids if healthy[i]]
        else:
            cands = []
        return _ranked_pool(ranks[PROMPT], at), _ranked_pool(ranks[TOKEN], at), cands

    def _room(self, cands: list[tuple], rng: random.Random, busy: tuple[str, ...] = ()) -> str | None:
        """The least-loaded mixed instance below both thresholds (rng breaks ties), or None; instances borrowed
        from a pool in `busy` (overloaded itself) take nothing new, so they drain and go back."""
        room = [(i, p + d) for i, p, d in cands if p < self.prompt_threshold_tokens and d < self.decode_threshold_tokens
                and self.borrowed.get(i) not in busy]
        if not room:
            return None
        best = min(t for _, t in room)
        return break_tie([iid for iid, t in room if t == best], rng)

    def _can_lend(self, pool: _Pool, lent: InstanceView, threshold: int, key) -> bool:
        lent_now = pool.size - pool.n
        cap = max(1, int(self.max_borrow_fraction * pool.size)) if self.max_borrow_fraction > 0 else 0
        return pool.n > 1 and lent_now < cap and (pool.total - key(lent)) / (pool.n - 1) < threshold

    def choose(self, request: Request, instances: Sequence[InstanceView]) -> Decision:
        rng, led = self.rng, live_ledger(instances)
        prompts, tokens, cands = self._scanned(instances) if led is None else self._ranked(led)
        if not (prompts.n and tokens.n):   # not a split cluster (or one pool is down): plain JSQ on what is left
            mixed = [i for i in instances if i.healthy and (i.id in self.borrowed or i.pool == MIXED)]
            colocated = mixed + _healthy([i for i in instances if i.id not in self.borrowed], (BASELINE,))
            if not colocated:
                raise NoHealthyInstance(_why(instances))
            c = _least(colocated, lambda i: i.pending_tokens, rng)
            return Decision(c.id, None, self.effective_pool(c))
        pc, tc = prompts.pick(rng), tokens.pick(rng)
        p_over = prompts.total >= self.prompt_threshold_tokens * prompts.n
        t_over = tokens.total >= self.decode_threshold_tokens * tokens.n
        if not (p_over or t_over):   # no InstanceView built: the ids suffice
            return Decision(_id_of(led, pc), _id_of(led, tc), PROMPT)
        m = self._room(cands, rng, (PROMPT,) * p_over + (TOKEN,) * t_over)
        if m is not None:
            return Decision(m, None, MIXED)
        p, t = _as_view(led, pc), _as_view(led, tc)
        # Borrow from the pool that is not overloaded (prompt overloaded -> take a token instance, and so on)
        d, ok = (t, self._can_lend(tokens, t, self.decode_threshold_tokens, lambda i: i.pending_decode_tokens)) \
            if p_over else (p, self._can_lend(prompts, p, self.prompt_threshold_tokens,
                                              lambda i: i.pending_prompt_tokens))
        if ok:
            self.borrowed[d.id] = d.pool
            self.borrow_count += 1
            return Decision(d.id, None, MIXED)
        return Decision(p.id, t.id, PROMPT)


POLICIES = {"round-robin": RoundRobin, "rr": RoundRobin, "jsq": JSQ, "mixed-pool": MixedPool, "mixed": MixedPool,
            "prefix": PrefixAware, "prefix-aware": PrefixAware}


def policy_class(name: str) -> type:
    """The policy class of `name` (aliases rr, mixed); InputError naming the known ones."""
    cls = POLICIES.get(name)
    if cls is None:
        raise InputError(f"unknown policy {name!r} (known: round-robin, jsq, mixed-pool, prefix)")
    return cls


def policy_params(name: str, params: Mapping[str, Any] | None = None, *, defaults: bool = False) -> dict:
    """`params` checked against policy `name`'s PARAMS and typed (text such as "8192" is accepted); with
    `defaults`, every parameter the call did not set is filled in. InputError (one line naming the key) for an
    unknown key or a bad value."""
    table = cast(Any, policy_class(name)).PARAMS
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
