"""The name -> backend class table and get_backend(name, **options); importing it starts nothing heavy."""
from __future__ import annotations

from typing import Any

from splitbench.backends.base import Backend
from splitbench.backends.external import ExternalBackend
from splitbench.backends.openai import OpenAIBackend
from splitbench.backends.splitwise import MixedBackend, SplitwiseBackend
from splitbench.backends.stub import StubBackend
from splitbench.backends.vllm import VllmBackend
from splitbench.errors import InputError
from splitbench.servers.byo import ExternalInstance

BACKENDS: dict[str, type] = {
    "openai": OpenAIBackend,
    "stub": StubBackend,
    "vllm": VllmBackend,
    "splitwise": SplitwiseBackend,
    "mixed": MixedBackend,
}


def get_backend(name: str, **options: Any) -> Backend:
    """A backend by name, built with its options (not started); InputError naming the known ones."""
    cls = BACKENDS.get(name)
    if cls is None:
        raise InputError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    if options.get("external"):   # instances the user started (app.options.backend_options)
        rows = options.pop("external")
        return ExternalBackend(name, [r if isinstance(r, ExternalInstance) else ExternalInstance(**r) for r in rows],
                               **options)
    return cls(**options)
