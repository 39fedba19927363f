"""The pending-token Ledger the router and the simulator keep and the InstanceViews policies see, with the ledger's
ranks (ranks.py) that give a least-loaded choice and its ties without a policy scanning every instance per request.
No policy logic: that is policies.py.
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

from splitbench.ranks import Rank

_T = TypeVar("_T")


def _interpreted(cls: _T) -> _T:
    """No-op class decorator: under mypyc, a decorated class stays a regular Python class (native classes cannot
    subclass RuntimeError or collections.abc.Sequence, nor be weakly referenced, nor have methods reassigned)."""
    return cls


def _with_abc(base: type) -> Callable[[_T], _T]:
    """Class decorator for an _interpreted class that subclasses the collections.abc class `base`: a no-op in pure
    Python. mypyc builds such a class with typing's aliases (typing.Sequence ...) as bases, which fails, so the
    class is written with a base mypy cannot see (Any) and this adds `base` back: a subclass of (cls, base) that
    takes cls's name, with base's mixin methods and isinstance/issubclass against it as before."""
    def add(cls: Any) -> Any:
        if issubclass(cls, base):
            return cls
        return type(cls)(cls.__name__, (cls, base), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                                    "__doc__": cls.__doc__, "__slots__": ()})
    return add

PROMPT, TOKEN, MIXED, BASELINE = "prompt", "token", "mixed", "baseline"
POOLS = (PROMPT, TOKEN, MIXED, BASELINE)
COLOCATED_POOLS = (MIXED, BASELINE)  # instances configured to run whole requests themselves
COLOCATED = "colocated"              # the Ledger's rank of co-located instances (by all pending tokens)
_GROUP = {PROMPT: PROMPT, TOKEN: TOKEN, MIXED: COLOCATED, BASELINE: COLOCATED}


class Request:
    """What a policy sees of a request. prefix_hashes: the prompt's KV block hashes in order (equal hash at the same
    position = a reusable prefix block; the live router hashes the prompt's token blocks, the simulator takes the
    trace's hash ids), empty when unknown. Policies that ignore prefixes never read it. Immutable by contract
    (Final): a plain class rather than a frozen dataclass, whose __init__ costs 20x more (one per request)."""

    __slots__ = ("id", "input_tokens", "output_tokens", "prefix_hashes")
    id: Final[str]
    input_tokens: Final[int]
    output_tokens: Final[int]
    prefix_hashes: Final[tuple[int, ...]]

    def __init__(self, id: str, input_tokens: int, output_tokens: int, prefix_hashes: tuple[int, ...] = ()) -> None:
        self.id = id
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.prefix_hashes = prefix_hashes

    def _key(self) -> tuple[str, int, int, tuple[int, ...]]:
        return (self.id, self.input_tokens, self.output_tokens, self.prefix_hashes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Request(id={self.id!r}, input_tokens={self.input_tokens!r}, output_tokens={self.output_tokens!r}, "
                f"prefix_hashes={self.prefix_hashes!r})")


class Decision:
    """Where a request runs. token_instance None = co-located on prompt_instance (no KV transfer). Immutable by
    contract, as Request."""

    __slots__ = ("prompt_instance", "token_instance", "pool")
    prompt_instance: Final[str]
    token_instance: Final[str | None]
    pool: Final[str]   # "split" decisions say "prompt"; co-located ones the pool they ran in (mixed/baseline)

    def __init__(self, prompt_instance: str, token_instance: str | None, pool: str) -> None:
        self.prompt_instance = prompt_instance
        self.token_instance = token_instance
        self.pool = pool

    def _key(self) -> tuple[str, str | None, str]:
        return (self.prompt_instance, self.token_instance, self.pool)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Decision(prompt_instance={self.prompt_instance!r}, token_instance={self.token_instance!r}, "
                f"pool={self.pool!r})")

    @property
    def split(self) -> bool:
        return self.token_instance is not None

    @property
    def label(self) -> str:
        """The router phase log's instance label: "prompt-0>token-1" for a split request, else the instance id."""
        return f"{self.prompt_instance}>{self.token_instance}" if self.token_instance else self.prompt_instance


@_interpreted   # mypyc: RuntimeError cannot be a native class's base
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


# mypyc would give the class typing.Sequence's MRO as bases (alias objects, not classes): the base through a name mypy
# does not resolve (Any; mypyc then builds the class on object), and _with_abc puts collections.abc.Sequence back
_SequenceBase: Any = Sequence


@_with_abc(Sequence)
@_interpreted
class Views(_SequenceBase):
    """A ledger's instance views in its order. Reading it as a sequence gives the snapshot of the moment views()
    was called (materialized on first read, or by the ledger before it next changes while this object is alive);
    `ranks()`, `view()` and `position()` answer from the live ledger and are None/unusable once it changed."""

    __slots__ = ("__weakref__", "_items", "_ledger", "_version")

    def __init__(self, ledger: Ledger) -> None:
        self._items: tuple[InstanceView, ...] | None
        self._ledger, self._version, self._items = ledger, ledger.version, None

    def _snapshot(self) -> tuple[InstanceView, ...]:
        if self._items is None:
            self._items = self._ledger.snapshot()
        return self._items

    def __getitem__(self, i):
        return self._snapshot()[i]

    def __len__(self) -> int:
        return len(self._ledger.order)

    def __iter__(self):
        return iter(self._snapshot())

    def __eq__(self, other) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, Sequence) else other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Views({self._snapshot()!r})"

    def ranks(self) -> dict[str, Rank] | None:
        """The ledger's ranks by pool group, while the ledger is as it was at views(); else None (scan instead)."""
        led = live_ledger(self)
        return None if led is None else led.current_ranks()

    def view(self, pos: int):
        """The InstanceView at `pos`, from the ledger (use only while ranks() is not None)."""
        return self._ledger.view_at(pos)

    def position(self, iid: str) -> int | None:
        return self._ledger.position(iid)

    def id(self, pos: int) -> str:
        return self._ledger.order[pos]

    @property
    def ledger(self) -> Ledger:
        """The ledger itself (its counts are current: read them only while ranks() is not None)."""
        return self._ledger

    def positions(self, pool: str) -> list[int]:
        """Positions of the instances configured in `pool`, in ledger order."""
        return self._ledger.positions(pool)


def live_ledger(instances: object) -> Ledger | None:
    """The Ledger behind `instances` while they are its current Views, else None (the caller scans the views). The
    policies then read its ranks and counts themselves: compiled, those are native calls, where each method of
    Views (a regular Python class) is a call through Python's protocol (13% of a simulation's JSQ time)."""
    if isinstance(instances, Views):
        led: Ledger = instances._ledger
        if led.version == instances._version:
            return led
    return None


class Ledger:
    """Pending-token accounting the caller keeps and turns into InstanceViews: tokens are added on dispatch,
    prompt tokens leave the prompt instance when its prefill is done, decode tokens leave on finish. It also keeps
    each pool group ranked by the count its policies sort by (ranks.Rank), which views() hands to policies."""

    order: list[str]
    pool: dict[str, str]
    prompt: dict[str, int]
    decode: dict[str, int]
    running: dict[str, int]
    healthy: dict[str, bool]
    _index: dict[str, int]
    index: dict[str, int]
    _cache: list[InstanceView | None]
    _dirty: set[str]
    _stale: set[str]
    version: int
    _ranks: dict[str, Rank]
    _slot: dict[str, tuple[int, Rank, int]]
    _watched: weakref.ref[Views] | None
    _positions: dict[str, list[int]]

    def __init__(self, instances: Iterable[tuple[str, str]]) -> None:
        self.order = []
        self.pool = {}
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
        self._index = self.index = {iid: k for k, iid in enumerate(self.order)}   # id -> position
        # changed since the last snapshot (their cached views are rebuilt) / since the ranks were last brought
        # up to date (done when a policy reads them: many changes between two decisions cost one update)
        self._cache = [None] * len(self.order)
        self._dirty = set(self.order)
        self._stale = set(self.order)
        self.version = 0                   # bumped by every change; Views answer from the ranks only while equal
        self._ranks = {g: Rank() for g in (PROMPT, TOKEN, COLOCATED)}
        # per instance: its position, its rank and which count ranks it (0 prompt, 1 decode, 2 both)
        self._slot = {iid: (k, self._ranks[_GROUP[p]], 0 if p == PROMPT else 1 if p == TOKEN else 2)
                      for k, (iid, p) in enumerate(self.pool.items())}
        self._watched = None               # weak reference to the last Views handed out
        self._positions = {}
        for k, iid in enumerate(self.order):
            self._positions.setdefault(self.pool[iid], []).append(k)

    def _view(self, i: str) -> InstanceView:
        return InstanceView(i, self.pool[i], self.prompt[i], self.decode[i], self.running[i], self.healthy[i])

    def snapshot(self) -> tuple[InstanceView, ...]:
        if self._dirty:
            for i in self._dirty:
                self._cache[self._index[i]] = self._view(i)
            self._dirty.clear()
        return tuple(self._cache)  # type: ignore[arg-type]

    def current_ranks(self) -> dict[str, Rank]:
        """The ranks, brought up to date with every change so far."""
        if self._stale:
            for iid in self._stale:
                pos, rank, kind = self._slot[iid]
                if self.healthy[iid]:
                    rank.set(pos, self.prompt[iid] if kind == 0 else self.decode[iid] if kind == 1
                             else self.prompt[iid] + self.decode[iid])
                else:
                    rank.discard(pos)
            self._stale.clear()
        return self._ranks

    def views(self) -> Views:
        """The instances as InstanceViews in ledger order (a snapshot of now), with the ranks for policies."""
        v = Views(self)
        self._watched = weakref.ref(v)
        return v

    def view_at(self, pos: int) -> InstanceView:
        return self._view(self.order[pos])

    def position(self, iid: str) -> int | None:
        return self._index.get(iid)

    def positions(self, pool: str) -> list[int]:
        return self._positions.get(pool, [])

    def _touch(self, iid: str) -> None:
        self._dirty.add(iid)
        self._stale.add(iid)

    def _freeze(self) -> None:
        """Before a change: views still alive and not yet read are frozen as they were."""
        v = cast("weakref.ref[Views]", self._watched)()
        self._watched = None
        if v is not None:
            v._snapshot()

    def set_healthy(self, iid: str, healthy: bool) -> None:
        if self._watched is not None:
            self._freeze()
        self.version += 1
        self.healthy[iid] = healthy
        self._touch(iid)

    def dispatch(self, d: Decision, r: Request) -> None:
        if self._watched is not None:
            self._freeze()
        self.version += 1
        p, t = d.prompt_instance, d.token_instance
        self.prompt[p] += r.input_tokens
        self.running[p] += 1
        if t:
            self.decode[t] += r.output_tokens
            self.running[t] += 1
            self._touch(t)
        else:
            self.decode[p] += r.output_tokens
        self._touch(p)

    def prefill_done(self, d: Decision, r: Request) -> None:
        """Call once per request, also when the prefill failed."""
        if self._watched is not None:
            self._freeze()
        self.version += 1
        p = d.prompt_instance
        self.prompt[p] -= r.input_tokens
        if d.token_instance:
            self.running[p] -= 1
        self._touch(p)

    def finish(self, d: Decision, r: Request) -> None:
        """Call once per request after prefill_done(), whether it succeeded or not."""
        if self._watched is not None:
            self._freeze()
        self.version += 1
        tok = d.token_instance or d.prompt_instance
        self.decode[tok] -= r.output_tokens
        self.running[tok] -= 1
        self._touch(tok)
