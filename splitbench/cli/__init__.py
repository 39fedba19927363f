"""The typer CLI: parse flags, call one library function, render, set the exit code. Each module registers its
commands on the one `app`; option groups shared by several commands are declared once in groups.py."""
from __future__ import annotations

import typer

from splitbench.cli import gates, run, sim, traces

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="splitbench: replay LLM traces against serving backends and measure TTFT/TBT/E2E.")
for module in (run, traces, sim, gates):
    module.register(app)
