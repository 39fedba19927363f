"""Start and stop vLLM OpenAI servers as child process groups: one `VllmServer`, or a `Cluster` of them in parallel.

No orphans: every group is stopped on stop()/atexit, SIGTERM becomes SystemExit while a cluster runs, and
procs.spawn's reaper kills the groups if this process dies any other way (even SIGKILL).
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from typing import Any

from splitbench.errors import ServerStartError
from splitbench.procs import spawn, stop_group
from splitbench.servers import vllm_plugin
from splitbench.servers.logcause import log_failure_cause, start_hang_cause
from splitbench.servers.ports import ephemeral_range, free_port  # noqa: F401  (the launcher's API)

# Args that start the tiny model fastest on a small CPU box (measured: ~40 s to /health on 2 cores;
# without --enforce-eager torch.compile adds ~13 s). 16384 covers the Azure traces (max 14,050 + 1,000).
TINY_CPU_ARGS = ["--dtype", "bfloat16", "--max-model-len", "16384", "--enforce-eager",
                 "--disable-log-stats", "--uvicorn-log-level", "warning"]
_SECRET_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
# --prefix-caching on|off as vLLM's flags; with either, usage.prompt_tokens_details.cached_tokens is reported
PREFIX_CACHING_FLAGS = {True: "--enable-prefix-caching", False: "--no-enable-prefix-caching"}
PROMPT_DETAILS_FLAG = "--enable-prompt-tokens-details"


def cache_args(args: list[str], prefix_caching: bool) -> list[str]:
    """The flags that set prefix caching and report cached prompt tokens, for those of `args` (the user's
    --vllm-args or splitbench's defaults) that do not set them already: the user's own flags win."""
    have = {a.split("=", 1)[0] for a in args}
    out = [] if have & set(PREFIX_CACHING_FLAGS.values()) else [PREFIX_CACHING_FLAGS[prefix_caching]]
    return out + ([] if have & {PROMPT_DETAILS_FLAG, "--no-enable-prompt-tokens-details"} else [PROMPT_DETAILS_FLAG])


def prefix_caching_of(args: list[str]) -> str:
    """"on"/"off" as an argv sets it (the last of vLLM's two flags wins), "default" when it sets neither."""
    state = "default"
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in PREFIX_CACHING_FLAGS.values():
            state = "on" if flag == PREFIX_CACHING_FLAGS[True] else "off"
    return state
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy
# vLLM's default load format looks for these; a model dir without any is served with random weights
# (`--load-format dummy`: vLLM initialises them from config.json alone)
WEIGHT_FILE_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def weightless_model_dir(model_dir: str | os.PathLike) -> bool:
    """A local model directory with a config.json and no weight files (e.g. `splitbench model random`)."""
    d = Path(model_dir)
    return (d / "config.json").is_file() and not any(next(d.glob(g), None) for g in WEIGHT_FILE_GLOBS)


def _arg_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` in an argv list (`--flag V` or `--flag=V`); None when absent."""
    for k, a in enumerate(args):
        if a == flag and k + 1 < len(args):
            return args[k + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _cause(path: Path) -> str:
    """": <the real cause>" from a server log (servers/logcause.py), or "" when it names none."""
    cause = log_failure_cause(path)
    return f": {cause}" if cause else ""


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
        self.start_unix_s: float | None = None
        self.last_exit_code: int | None = None   # set when the process was found dead while starting
        self._t_spawn = 0.0
        self._log_pos = 0
        # --load-format dummy is added for a weightless model dir unless the args name a load format
        self.dummy_weights = _arg_value(self.extra_args, "--load-format") is None and \
            weightless_model_dir(self.model_dir)
        if self.cpu_cores and len(self.cpu_cores) % self.tensor_parallel:
            raise ValueError(f"{len(self.cpu_cores)} cpu cores do not split into {self.tensor_parallel} ranks")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def load_format(self) -> str:
        """The vLLM load format this server starts with: from the args, "dummy" (added), else vLLM's "auto"."""
        return "dummy" if self.dummy_weights else _arg_value(self.extra_args, "--load-format") or "auto"

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
        if self.dummy_weights:
            cmd += ["--load-format", "dummy"]
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
            env[vllm_plugin.CORES_ENV] = ",".join(map(str, self.cpu_cores))   # NIXL kept on these (the plugin)
        env[vllm_plugin.ENV] = "1"   # AMX permission up front: a decode-only CPU instance dies without it
        if self.gpu_ids is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpu_ids))
        env.update(self.env)   # caller's env wins
        return env

    def health(self, timeout_s: float = 2.0) -> bool:
        try:
            with _OPENER.open(self.url + "/health", timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        """Start the process (own session/process group, registered with the reaper); returns at once."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._t_spawn = time.monotonic()
        self._log_pos = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.start_unix_s, self.start_s = time.time(), None
        pin = None
        if self.cpu_cores and not shutil.which("taskset"):
            cores = set(self.cpu_cores)
            pin = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
        self.proc = spawn(self.command(), log_path=self.log_path, env=self.environment(), preexec_fn=pin)
        atexit.register(self.stop)

    def poll_ready(self) -> bool:
        """True once /health answers 200 (start_s is set then); raises ServerStartError if the process died."""
        if self.start_s is not None and self.running:
            return True
        if self.proc is None:
            raise ServerStartError(f"{self.url}: not started")
        if self.proc.poll() is not None:
            code = self.last_exit_code = self.proc.returncode
            self.stop()
            raise ServerStartError(f"vLLM exited with code {code} while starting{_cause(self.log_path)}; "
                                   f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}")
        if self.health(timeout_s=1.0):
            self.start_s = time.monotonic() - self._t_spawn
            return True
        hang = start_hang_cause(self._new_log_text())
        if hang:
            self.stop()
            raise ServerStartError(f"vLLM cannot become healthy: {hang}; last lines of {self.log_path}:\n"
                                   f"{_log_tail(self.log_path)}")
        return False

    def _new_log_text(self) -> str:
        """The log's lines written since the last call (whole lines only)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_pos)
                data = f.read()
        except OSError:
            return ""
        end = data.rfind(b"\n") + 1
        self._log_pos += end
        return data[:end].decode("utf-8", "replace")

    def start(self, timeout_s: float = 180) -> None:
        """Spawn the server and block until /health answers 200; on failure stop it and raise with its log tail."""
        if self.running:
            return
        self.spawn()
        try:
            while not self.poll_ready():
                if time.monotonic() - self._t_spawn > timeout_s:
                    raise ServerStartError(f"vLLM not healthy after {timeout_s:.0f} s{_cause(self.log_path)}; "
                                           f"last lines of {self.log_path}:\n{_log_tail(self.log_path)}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 8.0) -> None:
        """SIGTERM the whole process group, SIGKILL it after grace_s. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        stop_group(proc, grace_s)

    def describe(self) -> dict[str, Any]:
        return {"kind": "vllm", "url": self.url, "model_dir": self.model_dir, "model_name": self.model_name,
                "cpu_cores": self.cpu_cores, "gpu_ids": self.gpu_ids,
                "tensor_parallel": self.tensor_parallel, "args": self.extra_args, "load_format": self.load_format,
                "env": {k: ("<redacted>" if any(w in k.upper() for w in _SECRET_WORDS) else v)
                        for k, v in {**DEFAULT_ENV, **self.env}.items()},
                "log_path": str(self.log_path), "start_s": self.start_s, "start_unix_s": self.start_unix_s,
                "pid": self.proc.pid if self.proc is not None else None}

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- clusters

def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class SigtermGuard:
    """While armed (main thread only), SIGTERM raises SystemExit so finally blocks and stop() run; the local and
    the Ray cluster share it. arm() takes over only the default action; reassert() takes SIGTERM back from a
    library that installed its own meanwhile (ray.init does); disarm() restores what arm() found."""

    def __init__(self):
        self._old = None

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._old is not None:
            return
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._old = signal.signal(signal.SIGTERM, _raise_on_sigterm)

    def reassert(self) -> None:
        if self._old is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _raise_on_sigterm)

    def disarm(self) -> None:
        if self._old is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is _raise_on_sigterm:
                signal.signal(signal.SIGTERM, self._old)
            self._old = None


def server_for(inst, model_dir: str, log_path: Path, *, python: str = sys.executable,
               env: dict[str, str] | None = None) -> VllmServer:
    """The VllmServer of one planned instance (topology.InstanceSpec): the same command line wherever it runs."""
    return VllmServer(model_dir, port=inst.port, host=inst.host, cpu_cores=inst.cpu_cores, gpu_ids=inst.gpu_ids,
                      tensor_parallel=inst.tensor_parallel, extra_args=inst.vllm_args(),
                      env={**(env or {}), **inst.environment()}, python=python, log_path=log_path)


class Cluster:
    """N VllmServers from a ClusterSpec: started in parallel, logs in run_dir/instances/<id>.log, stopped together."""

    def __init__(self, spec, run_dir: str | os.PathLike, *, python: str = sys.executable,
                 env: dict[str, str] | None = None, grace_s: float = 8.0):
        self.spec = spec
        self.grace_s = grace_s   # SIGTERM -> SIGKILL wait of stop()
        self.run_dir = Path(run_dir)
        self.servers: dict[str, VllmServer] = {}
        for inst in spec.instances:
            self.servers[inst.id] = server_for(inst, spec.model_dir, self.run_dir / "instances" / f"{inst.id}.log",
                                               python=python, env=env)
        self._sigterm = SigtermGuard()

    def urls(self) -> dict[str, str]:
        return {i: s.url for i, s in self.servers.items()}

    def start(self, timeout_s: float = 300.0) -> None:
        """Spawn all, poll /health until all answer; if one dies or time runs out, stop all and raise."""
        self._sigterm.arm()   # while the cluster runs, SIGTERM raises SystemExit so finally/stop() run
        t0 = time.monotonic()
        try:
            for s in self.servers.values():
                s.spawn()
            atexit.register(self.stop)   # after the servers' own: runs first, stops them all in parallel
            pending = dict(self.servers)
            while pending:
                for iid, s in list(pending.items()):
                    try:
                        ready = s.poll_ready()
                    except ServerStartError:
                        self.stop()
                        raise ServerStartError(
                            f"instance {iid} ({s.url}) exited with code {s.last_exit_code} while starting"
                            f"{_cause(s.log_path)}; "
                            f"all {len(self.servers)} instances stopped; last lines of {s.log_path}:\n"
                            f"{_log_tail(s.log_path, 20)}") from None
                    if ready:
                        del pending[iid]
                if pending and time.monotonic() - t0 > timeout_s:
                    iid, s = next(iter(pending.items()))
                    raise ServerStartError(
                        f"instance(s) {', '.join(pending)} not healthy after {timeout_s:.0f} s{_cause(s.log_path)}; "
                        f"all stopped; "
                        f"last lines of {s.log_path}:\n{_log_tail(s.log_path, 20)}")
                if pending:
                    time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def dead(self) -> list[str]:
        """Ids of instances whose process has exited."""
        return [i for i, s in self.servers.items() if s.proc is not None and s.proc.poll() is not None]

    def stop(self, grace_s: float | None = None) -> None:
        """Stop every process group at once (threads); idempotent."""
        grace_s = self.grace_s if grace_s is None else grace_s
        threads = [threading.Thread(target=s.stop, args=(grace_s,), daemon=True)
                   for s in self.servers.values() if s.proc is not None]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        atexit.unregister(self.stop)
        self._sigterm.disarm()

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for inst in self.spec.instances:
            s = self.servers[inst.id]
            out.append({**inst.describe(), "hardware": self.spec.hardware, "connector": self.spec.connector,
                        "model_dir": self.spec.model_dir, "log_path": str(s.log_path), "args": s.extra_args,
                        "load_format": s.load_format,
                        "start_s": s.start_s, "start_unix_s": s.start_unix_s,
                        "pid": s.proc.pid if s.proc is not None else None})
        return out

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
