"""Start and stop one vLLM OpenAI server as a child process group (CPU-pinned or on given GPUs).

Later grows into the multi-instance launcher; for now one VllmServer is one `api_server` process tree.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

# Args that start the tiny model fastest on a small CPU box (measured: ~40 s to /health on 2 cores;
# without --enforce-eager torch.compile adds ~13 s). 16384 covers the Azure traces (max 14,050 + 1,000).
TINY_CPU_ARGS = ["--dtype", "bfloat16", "--max-model-len", "16384", "--enforce-eager",
                 "--disable-log-stats", "--uvicorn-log-level", "warning"]
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}


class ServerStartError(RuntimeError):
    """The server process died or did not become healthy in time; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return "(no log)"


class VllmServer:
    """One `python -m vllm.entrypoints.openai.api_server` in its own process group."""

    def __init__(self, model_dir: str | os.PathLike, *, port: int, host: str = "127.0.0.1",
                 cpu_cores: list[int] | None = None, gpu_ids: list[int] | None = None,
                 tensor_parallel: int = 1, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                 served_model_name: str | None = None, python: str = sys.executable):
        self.model_dir = str(model_dir)
        self.port, self.host = int(port), host
        self.cpu_cores = list(cpu_cores) if cpu_cores else None
        self.gpu_ids = list(gpu_ids) if gpu_ids is not None else None
        self.tensor_parallel = int(tensor_parallel)
        self.extra_args = list(extra_args or [])
        self.env = dict(env or {})
        self.served_model_name = served_model_name
        self.python = python
        if log_path is None:
            log_path = Path(tempfile.gettempdir()) / f"splitbench-vllm-{self.port}.log"
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.start_s: float | None = None   # seconds from spawn to first healthy /health
        if self.cpu_cores and len(self.cpu_cores) % self.tensor_parallel:
            raise ValueError(f"{len(self.cpu_cores)} cpu cores do not split into {self.tensor_parallel} ranks")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def model_name(self) -> str:
        """The `model` field requests must carry."""
        return self.served_model_name or self.model_dir

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--host", self.host, "--port", str(self.port)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        if self.tensor_parallel > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel)]
        cmd += self.extra_args
        if self.cpu_cores and shutil.which("taskset"):
            cmd = ["taskset", "-c", ",".join(map(str, self.cpu_cores))] + cmd
        return cmd

    def environment(self) -> dict[str, str]:
        env = {**os.environ, **DEFAULT_ENV}
        if self.cpu_cores:
            per = len(self.cpu_cores) // self.tensor_parallel
            groups = [self.cpu_cores[i * per:(i + 1) * per] for i in range(self.tensor_parallel)]
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        if self.gpu_ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpu_ids))
        env.update(self.env)   # caller's env wins
        return env

    def health(self, timeout_s: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 180) -> None:
        """Spawn the server and block until /health answers 200; on failure stop it and raise with its log tail."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        t0 = time.monotonic()
        try:
            pin = None
            if self.cpu_cores and not shutil.which("taskset"):
                cores = set(self.cpu_cores)
                pin = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.environment(),
                                         start_new_session=True, preexec_fn=pin)
        finally:
            log.close()
        atexit.register(self.stop)
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerStartError(f"vLLM exited with code {code} while starting; "
                                       f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}")
            if self.health():
                self.start_s = time.monotonic() - t0
                return
            if time.monotonic() - t0 > timeout_s:
                self.stop()
                raise ServerStartError(f"vLLM not healthy after {timeout_s:.0f} s; "
                                       f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after grace_s. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        pgid = proc.pid  # start_new_session: the child leads its own group
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            # Wait for the whole group (workers may outlive the leader); orphans go once init reaps them.
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if proc.poll() is not None and not _group_alive(pgid):
                    break
                time.sleep(0.05)
            else:
                continue
            break
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "vllm", "url": self.url, "model_dir": self.model_dir, "model_name": self.model_name,
                "cpu_cores": self.cpu_cores, "gpu_ids": self.gpu_ids,
                "tensor_parallel": self.tensor_parallel, "args": self.extra_args,
                "env": {k: ("<redacted>" if any(w in k.upper() for w in _SECRET_WORDS) else v)
                        for k, v in {**DEFAULT_ENV, **self.env}.items()},
                "log_path": str(self.log_path), "start_s": self.start_s}

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
