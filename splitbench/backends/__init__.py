"""Backends: one small protocol, registered by name (openai, stub, later vllm/splitwise/mixed)."""
from splitbench.backends.base import Backend, BACKENDS, get_backend, register  # noqa: F401
