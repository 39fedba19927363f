"""Prefix-cache-aware routing, pure like the other policies and shared by the live router and the simulator: send a
prompt where its prefix is most likely cached, unless the queue there costs more than the cache saves.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from typing import ClassVar

from splitbench.ledger import (
    COLOCATED_POOLS,
    PROMPT,
    TOKEN,
    Decision,
    InstanceView,
    NoHealthyInstance,
    Param,
    Request,
    _interpreted,
)


def break_tie(ties: list, rng: random.Random):
    """The one candidate, or the rng's pick among equals (every policy breaks ties this way): rng.choice(ties).
    For a plain random.Random, its draw is made here, as Random.choice makes it (getrandbits of n's bit length
    until below n), without choice's two interpreted frames: about 1,200 instructions of each tied choice
    (callgrind)."""
    n = len(ties)
    if n == 1:
        return ties[0]
    if type(rng) is not random.Random:
        return rng.choice(ties)
    k = n.bit_length()
    r = rng.getrandbits(k)
    while r >= n:
        r = rng.getrandbits(k)
    return ties[r]


def chained_block_hashes(units: Sequence, block: int) -> tuple[int, ...]:
    """Hashes of the whole blocks of `units` (token ids, or a text's characters), chained: hash i covers blocks 0..i,
    so equal hashes at a position mean an equal prefix through that block. A partial last block is left out."""
    out, h = [], 0
    text = isinstance(units, str)
    for k in range(0, len(units) - block + 1, block):
        h = hash((h, units[k:k + block] if text else tuple(units[k:k + block])))
        out.append(h)
    return tuple(out)


class BlockIndex:
    """One instance's approximate prefix cache: the chained block hashes routed there, least recently used first,
    at most `capacity_blocks` (the real cache may hold fewer; the index never sees its evictions)."""

    __slots__ = ("blocks", "capacity")

    def __init__(self, capacity_blocks: int):
        self.capacity = int(capacity_blocks)
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def matched(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` present (chained hashes: the first miss ends the shared prefix)."""
        n = 0
        for h in hashes:
            if h not in self.blocks:
                break
            n += 1
        return n

    def add(self, hashes: Sequence[int]) -> None:
        """Mark every block of the request as most recently used; evict the least recently used past capacity."""
        blocks = self.blocks
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


@_interpreted   # mypyc: a regular class, so that choose() can be wrapped on an instance (see policies.MixedPool)
class PrefixAware:
    """Prefix-aware routing, after llm-d's prefix-cache and load scorers combined into one cost in prompt tokens:
    the prompt (or co-located) instance with the least `pending tokens + input tokens - cache_weight x expected
    cached tokens`, where the expected cache is this policy's BlockIndex of what it routed there (cached tokens =
    matched leading blocks / request blocks x input tokens). The pending tokens are the load guard: a hot prefix
    moves to another instance once the queue on its instance costs more than the prefill it saves. Token instance
    by pending decode tokens (JSQ); rng breaks ties. Requests without prefix hashes are routed as JSQ routes them."""
    name = "prefix"
    wants_prefix_hashes = True
    PARAMS: ClassVar[dict[str, Param]] = {
        "capacity_blocks": Param(int, 1, 262144, "blocks the index remembers per instance (LRU)"),
        "cache_weight": Param(float, 0.0, 1.0, "weight of an expected cached prompt token against a pending one"),
        "block_tokens": Param(int, 1, 16, "the live router's hash block: tokens of a token-id prompt per hash "
                                          "(vLLM caches whole blocks; set it to the servers' --block-size)"),
    }

    def __init__(self, rng: random.Random | None = None, capacity_blocks: int = 262144, cache_weight: float = 1.0,
                 block_tokens: int = 16):
        self.rng = rng or random.Random(0)
        self.capacity_blocks, self.cache_weight, self.block_tokens = capacity_blocks, cache_weight, block_tokens
        self.index: dict[str, BlockIndex] = {}

    def _expected_cached(self, iid: str, request: Request) -> float:
        idx = self.index.get(iid)
        if idx is None or not request.prefix_hashes:
            return 0.0
        return idx.matched(request.prefix_hashes) / len(request.prefix_hashes) * request.input_tokens

    def _best(self, cands: list[InstanceView], request: Request, load) -> InstanceView:
        costs = [load(c) + request.input_tokens - self.cache_weight * self._expected_cached(c.id, request)
                 for c in cands]
        low = min(costs)
        return break_tie([c for c, v in zip(cands, costs) if v == low], self.rng)

    def _remember(self, iid: str, request: Request) -> None:
        if request.prefix_hashes:
            idx = self.index.get(iid)
            if idx is None:
                idx = self.index[iid] = BlockIndex(self.capacity_blocks)
            idx.add(request.prefix_hashes)

    def choose(self, request: Request, instances: Sequence[InstanceView]) -> Decision:
        healthy = [i for i in instances if i.healthy]
        prompts = [i for i in healthy if i.pool == PROMPT]
        tokens = [i for i in healthy if i.pool == TOKEN]
        if prompts and tokens:
            p = self._best(prompts, request, lambda i: i.pending_prompt_tokens)
            low = min(i.pending_decode_tokens for i in tokens)
            t = break_tie([i for i in tokens if i.pending_decode_tokens == low], self.rng)
            self._remember(p.id, request)
            return Decision(p.id, t.id, PROMPT)
        colocated = [i for i in healthy if i.pool in COLOCATED_POOLS]
        if not colocated:
            raise NoHealthyInstance(f"no healthy instance among {[i.id for i in instances]}")
        c = self._best(colocated, request, lambda i: i.pending_tokens)
        self._remember(c.id, request)
        return Decision(c.id, None, c.pool)


def prompt_block_hashes(body: dict, block_tokens: int) -> tuple[int, ...]:
    """Chained hashes of a request body's whole prompt blocks, as the live router gives them to the policy: a
    token-id prompt in blocks of `block_tokens` ids (vLLM caches whole blocks, so a partial last block is left out);
    a text prompt or chat messages in blocks of 4 x block_tokens characters (about as many tokens)."""
    p = body.get("prompt")
    if p is None:
        p = "\n".join(str(m.get("content")) for m in body.get("messages") or () if isinstance(m, dict))
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (list, str)):
        p = p[0]
    step = block_tokens if isinstance(p, list) else 4 * block_tokens
    if not isinstance(p, (list, str)) or step <= 0:
        return ()
    return chained_block_hashes(p, step)


def request_hashes(policy, body: dict) -> tuple[int, ...]:
    """The prefix hashes the live router passes to `policy` for `body`: none unless the policy reads them."""
    return prompt_block_hashes(body, policy.block_tokens) if getattr(policy, "wants_prefix_hashes", False) else ()
