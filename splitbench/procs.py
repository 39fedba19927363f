"""Child-process helpers shared by the stub backend and the router process: group teardown, log tails."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def stop_group(proc: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session=True), SIGKILL after grace_s."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(grace_s)


def log_tail(path: Path, n: int = 5) -> str:
    """The last n non-blank lines of a log, joined on one line (for one-line start-failure errors)."""
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"
