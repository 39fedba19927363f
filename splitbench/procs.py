"""Every child process splitbench starts (stub, vLLM, router, scraper, power sampler) goes through spawn(): its own
session, registered with one reaper process that kills what is still registered when this process dies, however
it dies (even SIGKILL); stop_group() stops a group and unregisters it; wait_ready() polls a child's readiness.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from splitbench.errors import ServerStartError

REAPER_GRACE_ENV = "SPLITBENCH_REAPER_GRACE_S"   # SIGTERM -> SIGKILL wait of the reaper (default 8 s)

# The reaper: a tiny process in its own session that reads "+PGID"/"-PGID" lines on stdin. When stdin closes or
# its parent is gone (this process exited, however it died; a forked child may still hold the pipe) it SIGTERMs
# the groups still registered, then SIGKILLs them after $SPLITBENCH_REAPER_GRACE_S seconds.
_REAPER_CODE = r"""
import os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
parent, fd, groups, buf = int(sys.argv[1]), sys.stdin.fileno(), set(), b""
while os.getppid() == parent:
    if not select.select([fd], [], [], 0.25)[0]:
        continue
    data = os.read(fd, 65536)
    if not data:
        break
    *lines, buf = (buf + data).split(b"\n")
    for line in lines:
        if line[:1] == b"+": groups.add(int(line[1:]))
        elif line[:1] == b"-": groups.discard(int(line[1:]))
def alive(g):
    try: os.killpg(g, 0)
    except ProcessLookupError: return False
    except PermissionError: return True
    return True
for sig, wait_s in ((signal.SIGTERM, float(os.environ.get("SPLITBENCH_REAPER_GRACE_S", "8"))), (signal.SIGKILL, 0.0)):
    for g in list(groups):
        try: os.killpg(g, sig)
        except OSError: groups.discard(g)
    end = time.monotonic() + wait_s
    while groups and time.monotonic() < end and any(alive(g) for g in groups):
        time.sleep(0.1)
"""


class Reaper:
    """One reaper per process, started on first use; add()/remove() never raise. A forked child that spawns
    processes gets its own reaper (the parent's one watches the parent)."""

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._owner = 0
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._proc, self._owner, self._lock = None, 0, threading.Lock()

    def _ensure(self) -> None:
        if self._proc is None or self._owner != os.getpid() or self._proc.poll() is not None:
            self._proc = subprocess.Popen([sys.executable, "-c", _REAPER_CODE, str(os.getpid())],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
            self._owner = os.getpid()

    def _send(self, line: str | None) -> None:
        with self._lock:
            try:
                self._ensure()
                if line:
                    self._proc.stdin.write(line.encode())
                    self._proc.stdin.flush()
            except OSError:
                pass

    def start(self) -> None:
        """Start the reaper now (spawn() does, before its child exists, so no child is ever unwatched)."""
        self._send(None)

    def add(self, pgid: int) -> None:
        self._send(f"+{pgid}\n")

    def remove(self, pgid: int) -> None:
        if self._proc is not None and self._owner == os.getpid():
            self._send(f"-{pgid}\n")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


REAPER = Reaper()


def spawn(cmd: Sequence[str], *, log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
          preexec_fn: Callable[[], None] | None = None, cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session (its pid is its process group id) with stdin closed and stdout+stderr
    appended to log_path (discarded when None), registered with the reaper. Stop it with stop_group()."""
    REAPER.start()
    log = open(log_path, "ab") if log_path is not None else None
    try:
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log or subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True,
                                preexec_fn=preexec_fn)
    finally:
        if log is not None:
            log.close()
    REAPER.add(proc.pid)
    return proc


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send this process `sig` when its parent dies (PR_SET_PDEATHSIG); a no-op elsewhere. For
    children that must not outlive the CLI: forked --workers senders, Locust and its replayer bridges."""
    try:
        ctypes.CDLL(None).prctl(1, int(sig))
    except (OSError, AttributeError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _wait_group(proc: subprocess.Popen, pgid: int, wait_s: float) -> bool:
    """Poll until the leader has exited and no process of its group is left; False after wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        if proc.poll() is not None and not group_alive(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def stop_group(proc: subprocess.Popen | None, grace_s: float = 5.0) -> None:
    """SIGTERM the process group of `proc` (from spawn()), SIGKILL what is left after grace_s, wait for the whole
    group (workers may outlive the leader) and unregister it from the reaper. Safe on an exited process."""
    if proc is None:
        return
    pgid = proc.pid
    try:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            if _wait_group(proc, pgid, wait_s):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1)
    finally:
        REAPER.remove(pgid)


def wait_ready(proc: subprocess.Popen, port_file: str | Path, ready: Callable[[int], bool], timeout_s: float,
               what: str, log_path: Path, hint: str = "") -> int:
    """Poll until the child has written its port to `port_file` and `ready(port)` holds; return the port.

    Raises a one-line ServerStartError with the log tail (read now, before the caller cleans up) if the child
    exits first or is not ready in time; the caller then stops it."""
    port_file = Path(port_file)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"{what} exited with code {proc.returncode} before it was ready: "
                                   f"{log_tail(log_path)}")
        if port_file.exists():
            port = int(port_file.read_text())
            if ready(port):
                return port
        time.sleep(0.02)
    raise ServerStartError(f"{what} not healthy after {timeout_s:g} s{hint}: {log_tail(log_path)}")


def log_tail(path: Path, n: int = 5) -> str:
    """The last n non-blank lines of a log, joined on one line (for one-line start-failure errors)."""
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"
