"""Prefix structure of hash-id workloads: expected prefix-cache hits (infinite cache, whole server blocks), block
reuse figures, session inference from hash chains, and the block-size rescaling transform (--prefix-block-tokens).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import numpy as np

from splitbench.errors import InputError
from splitbench.workload.types import Workload

VLLM_CPU_BLOCK_TOKENS = 128   # vLLM 0.32 CpuPlatform.check_and_update_config: block_size 128 unless the user sets one


def _tokens_in_block(input_tokens: int, j: int, block_tokens: int) -> int:
    return max(0, min(block_tokens, input_tokens - j * block_tokens))


def _paths(w: Workload) -> Iterator[tuple[int, list[int], int]]:
    """(i, trie nodes of request i's hash chain, depth of the first node request i created; len = none) in order.
    Nodes are keyed (parent node, hash id): a position counts as shared only when the whole prefix before it is."""
    trie: dict[tuple[int, int], int] = {}
    for i, h in enumerate(w.prefix_hashes or []):
        parent, nodes, first_new = 0, [], None
        for x in h.tolist():
            node = trie.get((parent, x))
            if node is None:
                node = trie[(parent, x)] = len(trie) + 1
                first_new = len(nodes) if first_new is None else first_new
            nodes.append(node)
            parent = node
        yield i, nodes, len(nodes) if first_new is None else first_new


def expected_cached_tokens(w: Workload, server_block_tokens: int = VLLM_CPU_BLOCK_TOKENS) -> np.ndarray:
    """Per request: prompt tokens a prefix cache that never evicts would serve, as vLLM counts them.

    The longest prefix of the request's prompt already sent by an earlier request of the workload (block by block,
    a partial block matching only the tokens both prompts have), capped at input-1 (vLLM recomputes the last
    prompt token) and rounded down to whole server blocks. Zeros for a workload without prefix hashes.
    """
    if server_block_tokens < 1:
        raise InputError(f"server block size must be >= 1 token, got {server_block_tokens}")
    out = np.zeros(len(w), dtype=np.int64)
    if w.prefix_hashes is None:
        return out
    bt, seen = w.block_tokens, {}   # node -> most tokens of that block any earlier prompt held
    for i, nodes, _ in _paths(w):
        inp = int(w.input_tokens[i])
        matched = 0
        for j, node in enumerate(nodes):
            have = min(seen.get(node, 0), _tokens_in_block(inp, j, bt))
            matched += have
            if have < bt:
                break
        out[i] = (min(matched, inp - 1) // server_block_tokens) * server_block_tokens
        for j, node in enumerate(nodes):
            seen[node] = max(seen.get(node, 0), _tokens_in_block(inp, j, bt))
    return out


def expected_hit_fraction(w: Workload, server_block_tokens: int = VLLM_CPU_BLOCK_TOKENS) -> float:
    """Expected cached prompt tokens / all prompt tokens of the workload (expected_cached_tokens)."""
    total = int(w.input_tokens.sum())
    return float(expected_cached_tokens(w, server_block_tokens).sum()) / total if total else 0.0


def infer_sessions(w: Workload) -> tuple[np.ndarray, np.ndarray]:
    """(session_id, turn) from hash chains, for traces without session ids (Mooncake).

    Request B continues request A when (1) A is earlier and shorter (input tokens), (2) A's chain through its last
    *full* block (the partial last block changes hash when the next turn appends to it) is a prefix of B's chain,
    (3) A created at least one of those full blocks (a request made only of a shared system prompt starts no
    session) and (4) A has no successor yet (sessions are linear). Among such A, B takes the one with the longest
    chain, the latest on ties. Sessions of >= 2 requests are numbered 0, 1, ... by first request; others -1, turn 0.
    """
    n = len(w)
    pred = np.full(n, -1, dtype=np.int64)
    if w.prefix_hashes is None:
        return pred.copy(), np.zeros(n, dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    ends: dict[int, list[int]] = {}   # node -> requests whose full-block chain ends there
    inputs = w.input_tokens
    for i, nodes, first_new in _paths(w):
        inp = int(inputs[i])
        for node in reversed(nodes):
            a = next((a for a in reversed(ends.get(node, ())) if not taken[a] and inputs[a] < inp), None)
            if a is not None:
                pred[i], taken[a] = a, True
                break
        full = min(len(nodes), inp // w.block_tokens)
        if full and first_new < full:
            ends.setdefault(nodes[full - 1], []).append(i)
    return _number_sessions(pred)


def _number_sessions(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(pred)
    root, turn = np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    for i in np.flatnonzero(pred >= 0).tolist():   # pred[i] < i: its root and turn are final
        root[i], turn[i] = root[pred[i]], turn[pred[i]] + 1
    size = np.bincount(root, minlength=n)
    multi = size[root] >= 2
    ids = np.full(n, -1, dtype=np.int64)
    roots = np.unique(root[multi])
    ids[multi] = np.searchsorted(roots, root[multi])
    return ids, np.where(multi, turn, 0)


def session_stats(w: Workload) -> dict | None:
    """Sessions, requests in them, singletons and the distribution of requests per session; None without ids."""
    if w.session_id is None:
        return None
    sid = w.session_id[w.session_id >= 0]
    lengths = np.bincount(sid)[np.unique(sid)] if sid.size else np.zeros(0, dtype=np.int64)
    hist = {str(k): int((lengths == k).sum()) for k in range(2, 10) if (lengths == k).any()}
    if (lengths >= 10).any():
        hist["10+"] = int((lengths >= 10).sum())
    return {"sessions": int(lengths.size), "requests_in_sessions": int(sid.size),
            "singletons": int(len(w) - sid.size), "max_turns": int(lengths.max()) if lengths.size else 0,
            "mean_turns": float(lengths.mean()) if lengths.size else 0.0, "sessions_by_turns": hist}


def prefix_stats(w: Workload, server_block_tokens: int = VLLM_CPU_BLOCK_TOKENS) -> dict | None:
    """Hash blocks, distinct ids, reused fraction (1 - distinct/blocks, as the trace MANIFEST counts it) and the
    expected prefix-cache hit fraction at the server's block size; None for a workload without hashes."""
    if w.prefix_hashes is None:
        return None
    blocks = int(sum(h.size for h in w.prefix_hashes))
    distinct = int(np.unique(np.concatenate(w.prefix_hashes)).size) if blocks else 0
    return {"block_tokens": w.block_tokens, "blocks": blocks, "distinct_blocks": distinct,
            "reused_fraction": 1 - distinct / blocks if blocks else 0.0, "server_block_tokens": server_block_tokens,
            "expected_hit_fraction": expected_hit_fraction(w, server_block_tokens)}


def rescale_blocks(w: Workload, block_tokens: int) -> Workload:
    """Keep the hash structure but make every block `block_tokens` tokens: input scaled by new/old block size,
    rounded and kept within the same block count (ceil(input/block)), so reuse fractions carry over."""
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise InputError(f"--prefix-block-tokens must be a whole number >= 1, got {block_tokens!r}")
    if w.prefix_hashes is None:
        raise InputError(f"--prefix-block-tokens rescales prefix-hash traces; {w.name} has no hash ids")
    old = w.block_tokens
    nblocks = -(-w.input_tokens // old)
    scaled = np.rint(w.input_tokens * (block_tokens / old)).astype(np.int64)
    new_in = np.clip(scaled, (nblocks - 1) * block_tokens + 1, nblocks * block_tokens)
    out = replace(w, input_tokens=new_in, block_tokens=block_tokens, source=dict(w.source),
                  transforms=dict(w.transforms))
    out.transforms["prefix_block_tokens"] = {"from_block_tokens": old, "block_tokens": block_tokens,
                                             "input_tokens_before": int(w.input_tokens.sum()),
                                             "input_tokens_after": int(new_in.sum())}
    return out
