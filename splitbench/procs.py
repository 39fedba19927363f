"""Child-process helpers shared by the stub backend, the router process and the launcher: readiness, teardown."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from splitbench.errors import InputError


def wait_ready(proc: subprocess.Popen, port_file: str | Path, ready: Callable[[int], bool], timeout_s: float,
               what: str, log_path: Path, hint: str = "") -> int:
    """Poll until the child has written its port to `port_file` and `ready(port)` holds; return the port.

    Raises a one-line InputError with the log tail (read now, before the caller cleans up) if the child exits
    first or is not ready in time; the caller then stops it."""
    port_file = Path(port_file)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InputError(f"{what} exited with code {proc.returncode} before it was ready: {log_tail(log_path)}")
        if port_file.exists():
            port = int(port_file.read_text())
            if ready(port):
                return port
        time.sleep(0.02)
    raise InputError(f"{what} not healthy after {timeout_s:g} s{hint}: {log_tail(log_path)}")


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


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
