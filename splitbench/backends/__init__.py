"""Backends: adapters that start (or find) an OpenAI-compatible server; get_backend(name) picks one by name."""
from splitbench.backends.registry import BACKENDS, get_backend  # noqa: F401
