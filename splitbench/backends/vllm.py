"""The `vllm` backend: N co-located vLLM instances behind the splitbench router (JSQ), or one instance directly."""
from __future__ import annotations

from typing import Any

from splitbench.backends.base import int_option
from splitbench.backends.cluster import ClusterBackend


class VllmBackend(ClusterBackend):
    """Baseline: `instances` co-located vLLM servers (JSQ through the router), one server directly when 1.

    The default, 2, matches splitwise's default 1 prompt + 1 token instance: the same hardware either way."""
    name = "vllm"

    def __init__(self, instances: int | None = 2, policy: str | None = None, **options: Any):
        n = int_option(instances if instances is not None else 2, "instances", 1)
        super().__init__(counts={"baseline": n}, policy=policy or "jsq",
                         **{k: v for k, v in options.items() if k not in ("counts", "connector")},
                         connector=None)
