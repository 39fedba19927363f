"""The `stub` backend: the built-in stub server (splitbench.servers.stub_main) as a pinned child process, or several
sharing one port (SO_REUSEPORT, one core each), started through procs.spawn (own session; reaped if this process
dies, even by SIGKILL)."""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from splitbench.backends.base import on_off_option
from splitbench.client.probe import http_get
from splitbench.errors import InputError
from splitbench.procs import spawn, stop_group, wait_ready
from splitbench.servers.stub import DEFAULT_MODEL, LOOPS, StubConfig


def _default_cpu() -> int | None:
    """The machine's last core (not this process's: a client pinned to core 0 must not drag the stub there)."""
    n = os.cpu_count() or 1
    return n - 1 if n >= 2 else None


def _default_cpus(n: int) -> list[int | None]:
    """n stubs on the machine's last n cores (unpinned where it has fewer than n + 1)."""
    ncpu = os.cpu_count() or 1
    return list(range(ncpu - n, ncpu)) if ncpu > n else [None] * n


class StubBackend:
    """Runs the stub server as a child process (its own session, pinned to one core) for live runs; `processes` > 1
    starts that many on one port (the kernel spreads connections), on `cpus` (default: the last cores)."""
    name = "stub"

    def __init__(self, ttft_s: float = 0.02, tpot_s: float = 0.005, tokens_per_chunk: int = 1,
                 port: int | None = None, cpu: int | None = None, host: str = "127.0.0.1",
                 model: str = DEFAULT_MODEL, loop: str = "precise", fail_rate: float = 0.0, seed: int = 0,
                 startup_timeout_s: float = 20.0, processes: int = 1, cpus: list[int] | None = None,
                 prefix_caching: str | bool = "on", kv_connector: str | None = None,
                 max_concurrency: int | None = None, **_: Any):
        self.cfg = StubConfig(ttft_s, tpot_s, tokens_per_chunk, model, fail_rate, seed,
                              prefix_block_tokens=StubConfig.prefix_block_tokens
                              if on_off_option(prefix_caching, "prefix-caching") else 0, kv_connector=kv_connector,
                              max_concurrency=int(max_concurrency or 0))
        if loop not in LOOPS:
            raise InputError(f"stub loop must be one of {', '.join(LOOPS)}, got {loop!r}")
        self.host, self.port, self.loop, self.startup_timeout_s = host, port, loop, startup_timeout_s
        self.requested_port = port  # None/0: the child picks a free port and reports it
        self.cpu = _default_cpu() if cpu is None else (None if cpu < 0 else cpu)  # cpu < 0: don't pin
        self.processes = int(processes or 1)
        if self.processes < 1 or (cpus is not None and len(cpus) != self.processes):
            raise InputError(f"stub processes must be >= 1 with one core each, got {processes} and cpus {cpus}")
        self.cpus = ([self.cpu] if self.processes == 1 else _default_cpus(self.processes)) if cpus is None \
            else [None if c < 0 else c for c in cpus]
        self.proc: subprocess.Popen | None = None    # the first stub (it picked the port)
        self.procs: list[subprocess.Popen] = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _command(self, port: int, cpu: int | None, port_file: Path) -> list[str]:
        c = self.cfg
        cmd = [sys.executable, "-m", "splitbench.servers.stub_main", "--host", self.host,
               "--port", str(port), "--ttft-ms", repr(c.ttft_s * 1e3), "--tpot-ms", repr(c.tpot_s * 1e3),
               "--tokens-per-chunk", str(c.tokens_per_chunk), "--model", c.model, "--fail-rate", repr(c.fail_rate),
               "--seed", str(c.seed), "--loop", self.loop, "--port-file", str(port_file),
               "--prefix-block-tokens", str(c.prefix_block_tokens), "--max-concurrency", str(c.max_concurrency)]
        if self.processes > 1:
            cmd.append("--reuse-port")
        if c.kv_connector:
            cmd += ["--kv-connector", c.kv_connector]
        return cmd + (["--cpu", str(cpu)] if cpu is not None else [])

    def start(self, run_dir: Path | None = None) -> None:
        """Start the stub(s): the first picks the port (unless one was given), the others join it."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self._tmp = tempfile.TemporaryDirectory(prefix="splitbench-stub-")
        log_dir = Path(self._tmp.name) if run_dir is None else Path(run_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            port = self.requested_port or 0
            for k, cpu in enumerate(self.cpus):
                port_file = Path(self._tmp.name) / f"port-{k}"
                log_path = log_dir / ("stub.log" if k == 0 else f"stub-{k}.log")
                proc = spawn(self._command(port, cpu, port_file), log_path=log_path)
                self.procs.append(proc)
                self.proc = self.proc or proc
                port = wait_ready(proc, port_file, lambda p: http_get(f"http://{self.host}:{p}/health",
                                                                      timeout_s=1.0)[0] == 200,
                                  self.startup_timeout_s, "stub server", log_path)
            self.port = port
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        procs, self.procs, self.proc = self.procs, [], None
        if procs:
            atexit.unregister(self.stop)
        for proc in procs:
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
                "tokens_per_chunk": self.cfg.tokens_per_chunk, "pid": self.pid, "cpu": self.cpus[0],
                "processes": self.processes, "cpus": self.cpus, "pids": [p.pid for p in self.procs],
                "url": self.endpoint() if self.port is not None else None, "model": self.cfg.model,
                "loop": self.loop, "fail_rate": self.cfg.fail_rate,
                "prefix_caching": "on" if self.cfg.prefix_block_tokens else "off",
                "prefix_block_tokens": self.cfg.prefix_block_tokens, "max_concurrency": self.cfg.max_concurrency}
