"""The `splitwise` (prompt pool + token pool, KV moved by a vLLM connector) and `mixed` (the same pools with
Splitwise's mixed-pool policy) backends, on top of ClusterBackend (cluster.py).
"""
from __future__ import annotations

from typing import Any

from splitbench.backends.base import int_option
from splitbench.backends.cluster import ClusterBackend


class SplitwiseBackend(ClusterBackend):
    """`prompt_instances` prefill-only and `token_instances` decode-only instances; the router splits each request
    (prefill on a prompt instance, KV transfer, decode on a token instance), JSQ within each pool."""
    name = "splitwise"
    default_policy = "jsq"

    def __init__(self, prompt_instances: int | None = 1, token_instances: int | None = 1,
                 connector: str | None = None, policy: str | None = None, **options: Any):
        p = int_option(prompt_instances if prompt_instances is not None else 1, "prompt-instances", 1)
        t = int_option(token_instances if token_instances is not None else 1, "token-instances", 1)
        if connector is None and options.get("kv_transfer_config") is None:
            connector = "nixl"
        options.pop("counts", None)
        options.pop("instances", None)
        super().__init__(counts={"prompt": p, "token": t}, connector=connector,
                         policy=policy or self.default_policy, **options)


class MixedBackend(SplitwiseBackend):
    """Splitwise pools with the router's mixed-pool policy: when a pool is overloaded, requests run co-located
    in a mixed pool (borrowing instances from the other pool). Thresholds: policy_params
    {"prompt_threshold_tokens": ..., "decode_threshold_tokens": ...}."""
    name = "mixed"
    default_policy = "mixed-pool"
