"""No orphans: when a splitbench process is SIGKILLed, the processes it started (stub server, router, metrics
scraper) go too; procs.spawn's reaper kills them. Real processes, polled with generous bounds, no fixed sleeps."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from splitbench.client.probe import http_get

START_BOUND_S = 300.0   # a cold `splitbench run` on a busy 2-core host takes seconds; this only bounds a hang
GONE_BOUND_S = 60.0     # the reaper notices within ~0.25 s, SIGTERMs, SIGKILLs after its grace (8 s)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for init, which may be slow to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_until(cond, bound_s: float, what: str, diag=lambda: "") -> None:
    end = time.monotonic() + bound_s
    while not cond():
        assert time.monotonic() < end, f"{what} not reached within {bound_s:g} s {diag()}"
        time.sleep(0.05)


def kill_leftovers(pids) -> None:
    """Teardown: never leave what this test started running, whatever the assertions said."""
    for pid in pids:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def _stub_from_log(results: Path) -> tuple[str, int] | None:
    """(url, pid) from the stub's 'listening on URL (..., pid N, ...)' line in RESULTS/<run-id>/stub.log."""
    for log in results.glob("*/stub.log"):
        m = re.search(r"listening on (http://\S+) \(.*pid (\d+)", log.read_text(errors="replace"))
        if m:
            return m.group(1), int(m.group(2))
    return None


def test_sigkill_of_splitbench_run_with_the_stub_backend_leaves_no_stub(tmp_path):
    results = tmp_path / "results"
    err = open(tmp_path / "cli.err", "wb")
    cli = subprocess.Popen([sys.executable, "-m", "splitbench.cli", "run", "--backend", "stub", "--trace",
                            "synth:arrivals=poisson,rate=5,count=10000", "--results", str(results)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    found: list = []

    def serving() -> bool:
        assert cli.poll() is None, f"splitbench run exited ({cli.returncode}): {(tmp_path / 'cli.err').read_text()}"
        found[:] = [_stub_from_log(results)]
        return found[0] is not None and http_get(found[0][0] + "/health", timeout_s=2.0)[0] == 200
    stub_pid = None
    try:
        wait_until(serving, START_BOUND_S, "stub serving")
        url, stub_pid = found[0]
        assert alive(stub_pid)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(30)
        wait_until(lambda: not alive(stub_pid), GONE_BOUND_S, "stub gone after SIGKILL of splitbench run",
                   lambda: f"(stub pid {stub_pid} still alive)")
        assert http_get(url + "/health", timeout_s=2.0)[0] == 0   # nothing answers on its port any more
    finally:
        err.close()
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        kill_leftovers([stub_pid])


PARENT = r"""
import os, sys, time
from pathlib import Path
from splitbench.backends.stub import StubBackend
from splitbench.procs import REAPER
from splitbench.servers.router_process import RouterProcess
from splitbench.servers.scrape import ScraperProcess
out = Path(sys.argv[1])
stub = StubBackend(cpu=-1)
stub.start(run_dir=out)
router = RouterProcess([{"id": "b0", "url": stub.endpoint(), "pool": "baseline"}], log_path=out / "router.log")
router.start(timeout_s=120)
scraper = ScraperProcess({"b0": stub.endpoint()}, out / "metrics", interval_s=0.2)
scraper.start(timeout_s=120)
child = os.fork()   # a forked child inherits the reaper's pipe: the reaper must not wait for it to close
if child == 0:
    time.sleep(600)
    os._exit(0)
print(stub.pid, router.proc.pid, scraper.proc.pid, REAPER.pid, child, flush=True)
time.sleep(600)
"""


def test_sigkill_leaves_no_stub_router_or_scraper_even_with_a_forked_child(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "parent.err", "wb"), text=True, start_new_session=True)
    pids: list[int] = []
    try:
        line = parent.stdout.readline()   # blocks until all three are up (their own start timeouts bound it)
        assert line, f"parent died: {(tmp_path / 'parent.err').read_text()}"
        pids = [int(x) for x in line.split()]
        stub, router, scraper, reaper, child = pids
        assert all(alive(p) for p in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(30)
        wait_until(lambda: not any(alive(p) for p in (stub, router, scraper)), GONE_BOUND_S,
                   "stub, router and scraper gone after SIGKILL of their parent",
                   lambda: f"alive: {[p for p in (stub, router, scraper) if alive(p)]}")
        wait_until(lambda: not alive(reaper), GONE_BOUND_S, "the reaper itself exits")
        assert alive(child)   # the reaper kills what was registered, not the parent's other children
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        kill_leftovers(pids)
