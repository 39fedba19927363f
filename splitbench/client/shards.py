"""Shards of one workload for several senders (--workers, Locust workers): round-robin in arrival order, so every
shard follows the trace's burst shape at 1/n of its rate and together the shards send each request once."""
from __future__ import annotations

import numpy as np

from splitbench.workload.types import Workload

SHARDING = "round-robin by arrival order: shard k of n sends requests k, k+n, k+2n, ... at their trace times"


def shard_positions(n_requests: int, shard: int, shards: int) -> np.ndarray:
    """Positions (in arrival order) of the requests shard `shard` of `shards` sends: every shards-th one."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    return np.arange(shard, n_requests, shards, dtype=np.int64)


def shard(workload: Workload, k: int, n: int) -> Workload:
    """Shard k of n; arrival times stay absolute (run clock), so all shards share one t0."""
    pos = shard_positions(len(workload), k, n)
    return Workload(name=f"{workload.name}#shard{k}of{n}", arrival_s=workload.arrival_s[pos],
                    input_tokens=workload.input_tokens[pos], output_tokens=workload.output_tokens[pos],
                    trace_index=workload.trace_index[pos], source=workload.source, transforms=workload.transforms)
