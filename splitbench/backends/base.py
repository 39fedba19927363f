"""The Backend protocol (start/stop/health/endpoint/describe) and the option helpers the adapters share."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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


def int_option(value: Any, flag: str, minimum: int) -> int:
    """A whole-number option (`flag` is its CLI name without --) that is at least `minimum`; else InputError."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"--{flag} must be a whole number, got {value!r}") from None
    if n < minimum or n != float(value):
        raise InputError(f"--{flag} must be a whole number >= {minimum}, got {value!r}")
    return n


def on_off_option(value: Any, flag: str) -> bool:
    """An on|off option (`flag` is its CLI name without --): True for on; else InputError."""
    if isinstance(value, bool):
        return value
    if value in ("on", "off"):
        return value == "on"
    raise InputError(f"--{flag} must be on or off, got {value!r}")
