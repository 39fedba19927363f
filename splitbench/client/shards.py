"""Shards of one workload for several senders (--workers, Locust workers): round-robin in arrival order, so every
shard follows the trace's burst shape at 1/n of its rate and together the shards send each request once; for
multi-turn replays whole sessions are dealt, so a session's turns stay in one sender."""
from __future__ import annotations

import numpy as np

from splitbench.workload.types import Workload

SHARDING = "round-robin by arrival order: shard k of n sends requests k, k+n, k+2n, ... at their trace times"
SHARDING_SESSIONS = ("round-robin by session in order of first arrival: shard k of n sends sessions k, k+n, ... "
                     "(every turn of each; a request outside sessions counts as a session of its own)")


def shard_positions(n_requests: int, shard: int, shards: int) -> np.ndarray:
    """Positions (in arrival order) of the requests shard `shard` of `shards` sends: every shards-th one."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    return np.arange(shard, n_requests, shards, dtype=np.int64)


def session_shard_positions(session_id: np.ndarray, shard: int, shards: int) -> np.ndarray:
    """Positions of shard `shard`'s requests when whole sessions are dealt round-robin in order of their first
    arrival (session_id -1: a request of its own)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    sid = np.asarray(session_id, dtype=np.int64)
    n = sid.shape[0]
    key = np.where(sid >= 0, sid, -1 - np.arange(n, dtype=np.int64))   # unique keys for requests outside sessions
    _, first, group = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)     # group rank by first arrival
    return np.flatnonzero(rank[group.reshape(-1)] % shards == shard).astype(np.int64)


def shard(workload: Workload, k: int, n: int, *, by_session: bool = False) -> Workload:
    """Shard k of n; arrival times stay absolute (run clock), so all shards share one t0. by_session: deal whole
    sessions (multi-turn replay). Per-request session and prefix-hash fields go with their requests."""
    w = workload
    if by_session and w.session_id is not None:
        pos = session_shard_positions(w.session_id, k, n)
    else:
        pos = shard_positions(len(w), k, n)
    return Workload(name=f"{w.name}#shard{k}of{n}", arrival_s=w.arrival_s[pos], input_tokens=w.input_tokens[pos],
                    output_tokens=w.output_tokens[pos], trace_index=w.trace_index[pos], source=w.source,
                    transforms=w.transforms, block_tokens=w.block_tokens,
                    prefix_hashes=[w.prefix_hashes[i] for i in pos] if w.prefix_hashes is not None else None,
                    session_id=w.session_id[pos] if w.session_id is not None else None,
                    turn=w.turn[pos] if w.turn is not None else None)
