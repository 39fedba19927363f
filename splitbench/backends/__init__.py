"""Backends: one small protocol, registered by name (openai, stub, later vllm/splitwise/mixed)."""
from splitbench.backends.base import BACKENDS, Backend, get_backend, register  # noqa: F401
