"""The typer CLI: parse flags, call one library function, render, set the exit code. Each module registers its
commands on the one `app`; option groups shared by several commands are declared once in groups.py.

`main()` (the `splitbench` command) builds the whole app, except for the simulator's commands (sim.py) and `router`,
which get an app of their module alone: importing every command module (aiohttp, matplotlib, the run session) costs
about a second of CPU, as long as the whole `splitbench simulate` of the 19k-request conv trace is meant to take (measured
with `python -X importtime`); `app` (tests, `typer.main.get_command`) is the whole app, built on first use.
"""
from __future__ import annotations

import gc
import os
import sys

# Before numpy loads: its OpenBLAS starts a thread per core that spins after each call. splitbench's fits are a few
# points; on a 2-core host the spinning took 0.10-0.15 s of CPU from a simulate of about a second (measured).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import typer  # noqa: E402

from splitbench.cli import sim  # noqa: E402

SIM_COMMANDS = ("simulate", "design", "profile", "profiles")
_HELP = "splitbench: replay LLM traces against serving backends and measure TTFT/TBT/E2E."


def build(modules=None) -> typer.Typer:
    """The app of `modules` (default: every command module)."""
    if modules is None:
        from splitbench.cli import gates, router, run, search, traces   # noqa: PLC0415  (lazy: see the docstring)
        modules = (run, traces, sim, gates, router, search)
    app = typer.Typer(no_args_is_help=True, add_completion=False, help=_HELP)
    for module in modules:
        module.register(app)
    return app


def main() -> None:
    try:
        _dispatch(sys.argv[1:])
    finally:
        # The command is done and the exit frees what is alive. Frozen, it is left out of the interpreter's final
        # garbage collection, which took 0.08-0.11 s of a 1 s simulate (measured); atexit handlers still run.
        gc.freeze()


def _dispatch(argv: list[str]) -> None:
    if argv and argv[0] == "router":   # the router alone: a quick start, none of the run's imports
        from splitbench.cli import router   # noqa: PLC0415
        app = build((router,))
        app.callback()(lambda: None)   # a group of one command, so that `router` stays its name
        return app()
    (build((sim,)) if argv and argv[0] in SIM_COMMANDS else build())()


def __getattr__(name: str):
    if name == "app":
        globals()["app"] = build()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
