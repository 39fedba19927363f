"""What every command shares: the consoles, the error-to-exit-code wrapper, and option groups declared once
(flag, type, help) whose defaults are read from the library's option dataclasses."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable

import typer

from splitbench.errors import InputError, SplitbenchError, exit_code


class LazyConsole:
    """A rich Console made on first use: commands that print nothing through it (`simulate --json`) never import
    rich.console (20 ms of a 0.6 s simulate, -X importtime)."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs, self._console = kwargs, None

    def real(self) -> Any:
        if self._console is None:
            from rich.console import Console   # noqa: PLC0415
            self._console = Console(**self._kwargs)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    def __enter__(self) -> Any:   # rich's Live enters its console (dunders bypass __getattr__)
        return self.real().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.real().__exit__(*exc)


console = LazyConsole()
err_console = LazyConsole(stderr=True, log_path=False)
LIBRARY = object()   # Opt.default: take the target dataclass's default for this field


def say_error(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)


def user_errors(fn):
    """A splitbench error ends the command with one line on stderr and its exit code (errors.exit_code: bad input
    2, a server that could not start 1, an incomplete run 3), never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SplitbenchError as e:
            say_error(str(e))
            raise typer.Exit(exit_code(e))
    return wrapper


@dataclass(frozen=True)
class Opt:
    """One command-line option: `name` is the library field it fills, `flags` its spellings on the command line."""
    name: str
    type: Any
    help: str
    flags: tuple[str, ...] = ()
    default: Any = LIBRARY

    def option(self, target: type | None, overrides: dict) -> Any:
        default = overrides.get(self.name, self.default)
        if default is LIBRARY:
            default = _library_default(target, self.name)
        flags = self.flags or ("--" + self.name.replace("_", "-"),)
        return typer.Option(default, *flags, help=self.help)


def _library_default(target: type | None, name: str) -> Any:
    for f in dataclasses.fields(target) if target is not None else ():
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return None


def with_options(*groups: tuple[Opt, ...], target: type | None = None, overrides: dict | None = None):
    """Add the groups' options to a command. The command takes `opts: dict` (field name -> value) plus its own
    parameters; defaults are `target`'s (a library dataclass) unless `overrides` or the Opt say otherwise."""
    opts = [o for g in groups for o in g]

    def deco(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values() if p.name != "opts"]
        added = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.type,
                                   default=o.option(target, overrides or {})) for o in opts]

        @functools.wraps(fn)
        def wrapper(**kw):
            return fn(opts={o.name: kw.pop(o.name) for o in opts}, **kw)
        params = own + added
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__
        return wrapper
    return deco


def int_list(spec: str, flag: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; anything else a one-line InputError naming the flag."""
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated whole numbers, got {spec!r}") from None


def seconds_list(spec: str, flag: str) -> tuple[float, ...]:
    """'0.5,1,2' -> (0.5, 1.0, 2.0), increasing, each > 0; '' -> (); anything else a one-line InputError naming the
    flag."""
    try:
        out = tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{flag}: expected comma-separated seconds, got {spec!r}") from None
    if any(not 0 < x < float("inf") for x in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise InputError(f"{flag}: expected increasing seconds > 0, got {spec!r}")
    return out


def pick(values: dict, names: typing.Iterable[str]) -> dict:
    return {k: values[k] for k in names if k in values}
