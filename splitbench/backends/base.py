"""The Backend protocol (start/stop/health/endpoint/describe) and the by-name registry."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

from splitbench.errors import InputError


@runtime_checkable
class Backend(Protocol):
    """Something that serves the OpenAI API. start() blocks until it is ready; stop() leaves nothing running."""
    name: str

    def start(self, run_dir: Path | None = None) -> None: ...
    def stop(self) -> None: ...
    def health(self) -> bool: ...
    def endpoint(self) -> str: ...   # base URL, e.g. "http://127.0.0.1:8000"
    def describe(self) -> dict[str, Any]: ...  # JSON-able, no secrets; goes into run.json


BACKENDS: dict[str, Callable[..., Backend]] = {}


def register(name: str):
    def deco(factory):
        BACKENDS[name] = factory
        factory.name = name
        return factory
    return deco


def get_backend(name: str, **options: Any) -> Backend:
    # Import built-ins lazily so that registering them has no import-time cost for other commands.
    from splitbench.backends import openai, splitwise, vllm  # noqa: F401
    from splitbench.backends import stub as stub_backend  # noqa: F401
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    return BACKENDS[name](**options)
