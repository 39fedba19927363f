"""The `stub` backend: the built-in stub server (splitbench.servers.stub_main) as a pinned child process, started
through procs.spawn (own session; reaped if this process dies, even by SIGKILL)."""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from splitbench.client.probe import http_get
from splitbench.errors import InputError
from splitbench.procs import spawn, stop_group, wait_ready
from splitbench.servers.stub import DEFAULT_MODEL, LOOPS, StubConfig


def _default_cpu() -> int | None:
    """The machine's last core (not this process's: a client pinned to core 0 must not drag the stub there)."""
    n = os.cpu_count() or 1
    return n - 1 if n >= 2 else None


class StubBackend:
    """Runs the stub server as a child process (its own session, pinned to one core) for live runs."""
    name = "stub"

    def __init__(self, ttft_s: float = 0.02, tpot_s: float = 0.005, tokens_per_chunk: int = 1,
                 port: int | None = None, cpu: int | None = None, host: str = "127.0.0.1",
                 model: str = DEFAULT_MODEL, loop: str = "precise", fail_rate: float = 0.0, seed: int = 0,
                 startup_timeout_s: float = 20.0, **_: Any):
        self.cfg = StubConfig(ttft_s, tpot_s, tokens_per_chunk, model, fail_rate, seed)
        if loop not in LOOPS:
            raise InputError(f"stub loop must be one of {', '.join(LOOPS)}, got {loop!r}")
        self.host, self.port, self.loop, self.startup_timeout_s = host, port, loop, startup_timeout_s
        self.requested_port = port  # None/0: the child picks a free port and reports it
        self.cpu = _default_cpu() if cpu is None else (None if cpu < 0 else cpu)  # cpu < 0: don't pin
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def start(self, run_dir: Path | None = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="splitbench-stub-")
        port_file = Path(self._tmp.name) / "port"
        log_dir = Path(self._tmp.name) if run_dir is None else Path(run_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / "stub.log"
        c = self.cfg
        cmd = [sys.executable, "-m", "splitbench.servers.stub_main", "--host", self.host,
               "--port", str(self.requested_port or 0), "--ttft-ms", repr(c.ttft_s * 1e3), "--tpot-ms", repr(c.tpot_s * 1e3),
               "--tokens-per-chunk", str(c.tokens_per_chunk), "--model", c.model, "--fail-rate", repr(c.fail_rate),
               "--seed", str(c.seed), "--loop", self.loop, "--port-file", str(port_file)]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        self.proc = spawn(cmd, log_path=log_path)
        atexit.register(self.stop)
        try:
            self.port = wait_ready(self.proc, port_file,
                                   lambda port: http_get(f"http://{self.host}:{port}/health", timeout_s=1.0)[0] == 200,
                                   self.startup_timeout_s, "stub server", log_path)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            stop_group(proc)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def health(self) -> bool:
        return self.port is not None and http_get(f"{self.endpoint()}/health", timeout_s=1.0)[0] == 200

    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("stub backend has no port until start()")
        return f"http://{self.host}:{self.port}"

    def headers(self) -> dict[str, str]:
        return {}

    def discover_model(self) -> str:
        return self.cfg.model

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def describe(self) -> dict[str, Any]:
        return {"backend": "stub", "ttft_s": self.cfg.ttft_s, "tpot_s": self.cfg.tpot_s,
                "tokens_per_chunk": self.cfg.tokens_per_chunk, "pid": self.pid, "cpu": self.cpu,
                "url": self.endpoint() if self.port is not None else None, "model": self.cfg.model,
                "loop": self.loop, "fail_rate": self.cfg.fail_rate}
