"""The router's process: serve_router() (the foreground server of `splitbench router` and of the child), the
instances' names and start check, its command line (`python -m splitbench.servers.router_process ...`) and
RouterProcess, which runs it as a child (procs.spawn; start waits for /health; stop kills the group; atexit)."""
from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import uvloop

from splitbench.client.probe import http_get
from splitbench.errors import InputError
from splitbench.policies import POOLS, parse_policy_params
from splitbench.procs import spawn, stop_group, wait_ready
from splitbench.servers.router import Router
from splitbench.servers.byo import ExternalInstance
from splitbench.servers.byo import name_instances as name_external
from splitbench.servers.external import check_served

def parse_instance_spec(text: str) -> dict:
    """'id=p0,url=http://127.0.0.1:8100,pool=prompt' -> {"id": ..., "url": ..., "pool": ...}."""
    out: dict[str, str] = {}
    for part in text.split(","):
        k, sep, v = part.partition("=")
        if not sep or k.strip() not in ("id", "url", "pool") or not v.strip():
            raise InputError(f"--instance {text!r}: expected id=ID,url=URL,pool=POOL (bad part {part!r})")
        out[k.strip()] = v.strip()
    if set(out) != {"id", "url", "pool"}:
        raise InputError(f"--instance {text!r}: needs id=, url= and pool=")
    if out["pool"] not in POOLS:
        raise InputError(f"--instance {text!r}: pool must be one of {', '.join(POOLS)}")
    if not out["url"].startswith(("http://", "https://")):
        raise InputError(f"--instance {text!r}: url needs http:// or https://")
    return out


def name_instances(pooled: Sequence[tuple[str, str]]) -> list[dict]:
    """(pool, url) pairs in command-line order -> instance dicts named pool-k (prompt-0, prompt-1, token-0, ...,
    baseline-0 for co-located ones), as servers/external.py names a run's user-started instances. InputError for
    a bad URL or pool, a URL given twice, no instance, or prompt instances without token instances (or the reverse)."""
    rows = [{"url": url, "pool": pool} for pool, url in pooled]
    out = [{"id": i.id, "url": i.url, "pool": i.pool}
           for i in name_external(rows, "--prompt-url/--token-url/--url/--instance", pools=POOLS)]
    if not out:
        raise InputError("no instances: give --prompt-url and --token-url (P/D), or --url (co-located)")
    pools = [i["pool"] for i in out]
    if ("prompt" in pools) != ("token" in pools):
        have, need = ("--prompt-url", "--token-url") if "prompt" in pools else ("--token-url", "--prompt-url")
        raise InputError(f"{have} needs at least one {need} (a P/D pair: prefill on one, decode on the other)")
    return out


def check_instances(instances: Sequence[dict], timeout_s: float = 5.0) -> str:
    """Every instance answers /health and /v1/models with one model (servers/external.py check_served): its id;
    else an InputError naming the first failing instance and its URL."""
    return check_served([ExternalInstance(i["id"], i["pool"], i["url"]) for i in instances], timeout_s)


async def _serve(router: Router, port_file: str | None, on_ready: Callable[[Router], None] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await router.start()
    except OSError as e:
        await router.stop()
        raise InputError(f"router cannot listen on {router.host}:{router.port}: {e.strerror or e}") from None
    try:
        if port_file:
            Path(f"{port_file}.tmp").write_text(str(router.port))
            os.replace(f"{port_file}.tmp", port_file)
        if on_ready is not None:
            on_ready(router)
        await stop.wait()
    finally:
        await router.stop()


def serve_router(router: Router, *, loop: str = "uvloop", port_file: str | None = None,
                 on_ready: Callable[[Router], None] | None = None, check_s: float | None = None) -> None:
    """Serve `router` in the foreground until SIGINT/SIGTERM, then stop it (the phase log is flushed) and return.
    check_s: first check every instance (check_instances, that timeout), serving nothing when one fails.
    Once listening: the bound port to port_file, then on_ready(router). InputError when it cannot listen."""
    gc.collect()
    gc.freeze()   # the objects of startup are never collected again: shorter GC pauses while serving
    run = uvloop.run if loop == "uvloop" else asyncio.run
    if check_s is not None:
        check_instances([{"id": i, "url": router.urls[i], "pool": router.ledger.pool[i]}
                         for i in router.ledger.order], check_s)
    run(_serve(router, port_file, on_ready))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m splitbench.servers.router_process",
                                description="The splitbench P/D router: places each request with a policy, "
                                            "streams the answer back, logs phases.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (see --port-file)")
    p.add_argument("--instance", action="append", default=[], help="id=ID,url=URL,pool=prompt|token|mixed|baseline")
    p.add_argument("--policy", default="jsq", help="round-robin | jsq | mixed-pool | prefix")
    p.add_argument("--policy-param", action="append", default=[], help="KEY=VALUE of the policy (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy's tie-breaking rng")
    p.add_argument("--prompt-threshold-tokens", type=int, default=None, help="mixed-pool: prompt pool overload")
    p.add_argument("--decode-threshold-tokens", type=int, default=None, help="mixed-pool: token pool overload")
    p.add_argument("--phase-log", default=None, help="append per-request phase timestamps here (JSON lines)")
    p.add_argument("--health-interval-s", type=float, default=1.0)
    p.add_argument("--idle-timeout-s", type=float, default=120.0, help="no bytes from an instance for this long")
    p.add_argument("--prefill-timeout-s", type=float, default=600.0)
    p.add_argument("--cpu", type=int, default=None, help="pin the router to this core")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    a = p.parse_args(argv)
    try:
        params = {k: v for k, v in (("prompt_threshold_tokens", a.prompt_threshold_tokens),
                                    ("decode_threshold_tokens", a.decode_threshold_tokens)) if v is not None}
        params.update(parse_policy_params(a.policy_param, a.policy))
        router = Router([parse_instance_spec(s) for s in a.instance], a.policy, a.host, a.port, a.phase_log,
                        seed=a.seed, policy_params=params, health_interval_s=a.health_interval_s,
                        idle_timeout_s=a.idle_timeout_s, prefill_timeout_s=a.prefill_timeout_s)
        if a.cpu is not None:
            if a.cpu not in os.sched_getaffinity(0):
                raise InputError(f"--cpu {a.cpu} is not one of this process's cores {sorted(os.sched_getaffinity(0))}")
            os.sched_setaffinity(0, {a.cpu})
        serve_router(router, loop=a.loop, port_file=a.port_file, on_ready=_say_listening)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _say_listening(router: Router) -> None:
    print(f"splitbench router listening on {router.url} (policy {getattr(router.policy, 'name', '?')}, "
          f"{len(router.urls)} instances, pid {os.getpid()})", flush=True)


class RouterProcess:
    """`python -m splitbench.servers.router` as a child process. instances: dicts with id, url, pool."""

    def __init__(self, instances: Sequence[dict], policy: str = "jsq", *, host: str = "127.0.0.1", port: int = 0,
                 phase_log: str | os.PathLike | None = None, seed: int = 0, policy_params: dict | None = None,
                 cpu: int | None = None, loop: str = "uvloop", health_interval_s: float = 1.0,
                 idle_timeout_s: float = 120.0, log_path: str | os.PathLike | None = None,
                 python: str = sys.executable):
        self.instances = [dict(i) for i in instances]
        for i in self.instances:  # fail here, not in the child
            parse_instance_spec(f"id={i.get('id')},url={i.get('url')},pool={i.get('pool')}")
        self.policy, self.host, self.requested_port, self.port = policy, host, port, (port or None)
        self.phase_log = Path(phase_log) if phase_log else None
        self.seed, self.policy_params, self.cpu, self.loop = seed, dict(policy_params or {}), cpu, loop
        self.health_interval_s, self.idle_timeout_s = health_interval_s, idle_timeout_s
        self.log_path, self.python = Path(log_path) if log_path else None, python
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("router has no port until start()")
        return f"http://{self.host}:{self.port}"

    def command(self, port_file: str | None = None) -> list[str]:
        cmd = [self.python, "-m", "splitbench.servers.router_process", "--host", self.host,
               "--port", str(self.requested_port or 0), "--policy", self.policy, "--seed", str(self.seed),
               "--loop", self.loop, "--health-interval-s", repr(self.health_interval_s),
               "--idle-timeout-s", repr(self.idle_timeout_s)]
        for i in self.instances:
            cmd += ["--instance", f"id={i['id']},url={i['url']},pool={i['pool']}"]
        for k, v in self.policy_params.items():
            cmd += ["--policy-param", f"{k}={v}"]
        if self.phase_log:
            cmd += ["--phase-log", str(self.phase_log)]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        if port_file:
            cmd += ["--port-file", port_file]
        return cmd

    def start(self, timeout_s: float = 30.0, require_instances: bool = True, check_s: float | None = None) -> None:
        """Spawn and wait until /health answers 200 (require_instances) or answers at all. check_s: first check
        the instances (check_instances: InputError naming the URL of one that is down, nothing spawned)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if check_s is not None:
            check_instances(self.instances, check_s)
        self._tmp = tempfile.TemporaryDirectory(prefix="splitbench-router-")
        port_file = str(Path(self._tmp.name) / "port")
        log_path = self.log_path or Path(self._tmp.name) / "router.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(self.command(port_file), log_path=log_path)
        atexit.register(self.stop)

        def ready(port: int) -> bool:
            status = http_get(f"http://{self.host}:{port}/health", timeout_s=1.0)[0]
            return status == 200 or bool(status and not require_instances)
        try:
            self.port = wait_ready(self.proc, port_file, ready, timeout_s, "router", log_path,
                                   " (are its instances up?)")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM the process group (the router flushes its phase log), SIGKILL after 5 s. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            atexit.unregister(self.stop)
            stop_group(proc)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def health(self) -> bool:
        return self.port is not None and http_get(f"{self.url}/health", timeout_s=1.0)[0] == 200

    def describe(self) -> dict:
        return {"router": "splitbench", "policy": self.policy, "policy_params": self.policy_params,
                "seed": self.seed, "url": self.url if self.port else None, "instances": self.instances,
                "pid": self.proc.pid if self.proc else None, "cpu": self.cpu, "loop": self.loop,
                "phase_log": str(self.phase_log) if self.phase_log else None}


if __name__ == "__main__":
    main()
