"""procs (spawn, stop_group, wait_ready) on real processes, and errors' one exit-code map."""
from __future__ import annotations

import sys
import time

import pytest

from splitbench.errors import (
    EXIT_FAILED,
    EXIT_INCOMPLETE,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    IncompleteRunError,
    InputError,
    ServerStartError,
    exit_code,
)
from splitbench.procs import REAPER, group_alive, spawn, stop_group, wait_ready

STUBBORN = r"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("up", flush=True)
time.sleep(600)
"""


def test_exit_codes_one_map():
    assert exit_code(InputError("bad flag")) == EXIT_INPUT == 2
    assert exit_code(ServerStartError("vLLM exited with code 3")) == EXIT_FAILED == 1   # not bad input
    assert exit_code(IncompleteRunError("worker 1 died")) == EXIT_INCOMPLETE == 3
    assert exit_code(KeyboardInterrupt()) == EXIT_INTERRUPTED == 130
    assert exit_code(SystemExit(0)) == EXIT_OK and exit_code(SystemExit(None)) == EXIT_OK
    assert exit_code(SystemExit(2)) == 2 and exit_code(ValueError("bug")) == EXIT_FAILED
    assert not isinstance(ServerStartError("x"), InputError)
    assert str(InputError("no such column", file="t.csv", line=3, column="ts")) == "t.csv:3: column 'ts' no such column"


def test_stop_group_kills_a_group_that_ignores_sigterm(tmp_path):
    log = tmp_path / "stubborn.log"
    proc = spawn([sys.executable, "-c", STUBBORN], log_path=log)
    end = time.monotonic() + 120
    while "up" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < end, log.read_text()
        time.sleep(0.02)
    assert REAPER.pid is not None and group_alive(proc.pid)
    stop_group(proc, grace_s=0.2)   # SIGTERM is ignored by both: SIGKILL after the grace, and the group waited for
    assert proc.returncode is not None and not group_alive(proc.pid)
    stop_group(proc)                # an exited process: nothing to do, no error


def test_wait_ready_raises_one_line_server_start_error_with_the_log_tail(tmp_path):
    log = tmp_path / "child.log"
    proc = spawn([sys.executable, "-c", "import sys; print('warming up'); print('OSError: port 1 is taken'); "
                  "sys.exit(4)"], log_path=log)
    with pytest.raises(ServerStartError) as ei:
        wait_ready(proc, tmp_path / "never", lambda port: True, 120, "toy server", log)
    msg = str(ei.value)
    assert "\n" not in msg and "toy server exited with code 4 before it was ready" in msg
    assert msg.endswith("warming up | OSError: port 1 is taken")
    stop_group(proc)
    slow = spawn([sys.executable, "-c", "import time; time.sleep(600)"], log_path=log)
    try:
        with pytest.raises(ServerStartError, match=r"toy server not healthy after 0.3 s \(hint\)"):
            wait_ready(slow, tmp_path / "never", lambda port: True, 0.3, "toy server", log, " (hint)")
    finally:
        stop_group(slow)
    assert slow.poll() is not None
