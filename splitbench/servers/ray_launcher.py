"""`--launcher ray`: each vLLM instance runs in an `InstanceActor` on the Ray node `ray_placement.place()` picks,
with the local launcher's command line; `RayCluster` has the local `Cluster`'s interface. The only module that
imports ray (splitbench imports it only for --launcher ray and `design --ray`).
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable

import ray
from ray._private import services   # canonicalize_bootstrap_address_or_die: what ray.init(auto) resolves
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from splitbench.errors import InputError, ServerStartError
from splitbench.procs import log_tail
from splitbench.servers.launcher import SigtermGuard, free_port, server_for
from splitbench.servers.ray_placement import ROLE_RESOURCES, Need, node_resources, place
from splitbench.servers.topology import assign_cores

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# Ray kills a dead worker's *direct* children (RAY_kill_child_processes_on_worker_exit), procs' reaper and the vLLM
# leader among them, but not vLLM's EngineCore (a grandchild; it outlives its leader). So each actor also starts
# this watchdog, detached (double fork: no child of the worker), that stops the vLLM group once the actor is gone.
_WATCHDOG = r"""
import os, signal, sys, time
if os.fork():
    os._exit(0)
owner, born, pgid, grace_s = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
def owner_alive():
    try:
        f = open(f"/proc/{owner}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return f[0] not in ("Z", "X") and f[19] == born
def group_alive():
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
while group_alive() and owner_alive():
    time.sleep(0.25)
for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 0.0)):
    try:
        os.killpg(pgid, sig)
    except OSError:
        break
    end = time.monotonic() + wait_s
    while group_alive() and time.monotonic() < end:
        time.sleep(0.1)
"""


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks (/proc/PID/stat field 22): with the pid, names it uniquely."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def watch(pgid: int, grace_s: float = 8.0) -> None:
    """Detach a watchdog that SIGTERMs (then SIGKILLs) process group `pgid` when this process is gone."""
    proc = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), _start_time(os.getpid()), str(pgid),
                             str(grace_s)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    proc.wait()   # the intermediate exits at once; the watchdog lives on, reparented
STOP_WAIT_S = 30.0   # beyond the grace: how long stop() waits for the actors' own stop before killing them


def _no_cluster(address: str | None, why: str) -> InputError:
    return InputError(f"--launcher ray: no Ray cluster at {address or 'auto'} ({why}); splitbench starts none: "
                      "start one with `ray start --head` or pass --ray-address HOST:PORT")


def resolve_address(address: str | None) -> str:
    """HOST:PORT of the Ray cluster to join (`auto`/None: $RAY_ADDRESS or the latest `ray start` here), checked to
    answer on TCP, so a missing cluster is a one-line InputError at once rather than ray.init's long retries."""
    try:
        addr = services.canonicalize_bootstrap_address_or_die(address or "auto")
    except (ConnectionError, ValueError) as e:
        raise _no_cluster(address, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    host, _, port = addr.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise _no_cluster(address, f"{addr}: {getattr(e, 'strerror', None) or e}") from None
    return addr


def connect(address: str | None) -> bool:
    """Connect this process to a running Ray cluster (starts none). True when this call connected (the caller
    disconnects); no cluster is a one-line InputError."""
    if ray.is_initialized():
        return False
    addr = resolve_address(address)
    try:
        with warnings.catch_warnings():   # Ray's FutureWarning on accelerator env vars: not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(address=addr, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise _no_cluster(address, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
    return True


@ray.remote(max_restarts=0, max_concurrency=4)
class InstanceActor:
    """One vLLM instance on this actor's node: ports free on the node, its cores (or GPUs Ray assigned), its log."""

    def __init__(self, inst, model_dir: str, log_path: str, slot: tuple[int, int] | None, env: dict[str, str],
                 python: str | None = None):
        self.inst, self.server = inst, None
        host = ray.util.get_node_ip_address()
        inst.host, inst.port = host, free_port(host)
        if inst.side_channel_port is not None:
            inst.side_channel_port = free_port(host)
        if slot is not None:   # no --cores: the instances on this node split its cores
            inst.cpu_cores = assign_cores(slot[1], sorted(os.sched_getaffinity(0)))[slot[0]]
        if inst.gpu_ids is not None:
            inst.gpu_ids = [int(g) for g in ray.get_gpu_ids()]
        path = Path(log_path)
        if not path.parent.parent.is_dir():   # the run dir is not visible here: a node-local log, copied back
            path = Path(tempfile.gettempdir()) / "splitbench-ray" / f"{os.getpid()}-{path.name}"
        self.server = server_for(inst, model_dir, path, env=env, python=python or sys.executable)

    def start(self, timeout_s: float) -> dict[str, Any]:
        """Spawn (watched), block until /health answers; a failure comes back as {"error": one line + log tail}."""
        deadline = time.monotonic() + timeout_s
        try:
            self.server.spawn()
            watch(self.server.proc.pid)
            while not self.server.poll_ready():
                if time.monotonic() > deadline:
                    raise ServerStartError(f"vLLM not healthy after {timeout_s:.0f} s; last lines of "
                                           f"{self.server.log_path}: {log_tail(self.server.log_path)}")
                time.sleep(0.5)
        except ServerStartError as e:
            self.server.stop()
            return {"error": str(e)}
        return self.info()

    def info(self) -> dict[str, Any]:
        s, i = self.server, self.inst
        return {"host": i.host, "port": i.port, "side_channel_port": i.side_channel_port, "cpu_cores": i.cpu_cores,
                "gpu_ids": i.gpu_ids, "log_path": str(s.log_path), "pid": s.proc.pid if s.proc else None,
                "start_s": s.start_s, "start_unix_s": s.start_unix_s, "args": s.extra_args,
                "load_format": s.load_format, "node_ip": i.host, "hostname": socket.gethostname()}

    def exited(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is not None

    def stop(self, grace_s: float) -> None:
        self.server.stop(grace_s)

    def log_text(self) -> str:
        try:
            return self.server.log_path.read_text(errors="replace")
        except OSError:
            return ""


class RemoteServer:
    """What the backend asks of a server (url, health) for one that runs on a Ray node."""

    def __init__(self, url: str):
        self.url = url

    def health(self, timeout_s: float = 2.0) -> bool:
        try:
            with _OPENER.open(self.url + "/health", timeout=timeout_s) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False


def needs(spec, cores_given: bool) -> list[Need]:
    """The CPUs and GPUs each planned instance takes on its node."""
    out = []
    for i in spec.instances:
        gpus = float(len(i.gpu_ids)) if i.gpu_ids is not None else 0.0
        cpus = float(len(i.cpu_cores)) if cores_given and i.cpu_cores else 1.0
        out.append(Need(i.id, i.role, cpus=cpus, gpus=gpus))
    return out


def _wait(refs: dict, deadline: float, what: str) -> dict:
    """id -> result of every ref; TimeoutError naming the ids still pending at the deadline. Polled without
    blocking in Ray (a signal handled inside a blocking ray.wait comes out as SystemExit(1)), sleeping in Python,
    so SIGINT and SIGTERM reach this thread as KeyboardInterrupt and the guard's SystemExit."""
    out, pending = {}, dict(refs)
    while pending:
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=0)
        for ref in ready:
            iid = next(k for k, v in pending.items() if v == ref)
            out[iid] = ray.get(pending.pop(iid))
        if pending and time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {', '.join(pending)}")
        if pending:
            time.sleep(0.2)
    return out


class RayCluster:
    """The local Cluster's interface (start/stop/urls/logs/dead/describe) over InstanceActors on Ray nodes."""

    def __init__(self, spec, run_dir: str | os.PathLike, *, address: str | None = None, cores_given: bool = False,
                 env: dict[str, str] | None = None, grace_s: float = 8.0, python: str | None = None):
        if spec.layout == "splitwiser":
            raise InputError("--layout splitwiser shares one GPU between two instances: not with --launcher ray")
        self.spec, self.run_dir, self.address = spec, Path(run_dir).absolute(), address
        self.cores_given, self.env, self.grace_s = cores_given, dict(env or {}), grace_s
        self.python = python   # the nodes' python for vLLM (None: each actor's own)
        self.actors: dict[str, Any] = {}
        self.info: dict[str, dict] = {}
        self.nodes: dict[str, str] = {}   # instance id -> node id
        self.node_res: dict[str, dict[str, float]] = {}   # node id -> its resources when placed
        self.servers: dict[str, RemoteServer] = {}
        self._connected = False
        self._lock = threading.Lock()
        self._sigterm = SigtermGuard()

    def urls(self) -> dict[str, str]:
        return {i.id: i.url for i in self.spec.instances}

    def logs(self) -> dict[str, Path]:
        return {i.id: self.run_dir / "instances" / f"{i.id}.log" for i in self.spec.instances}

    def start(self, timeout_s: float = 300.0) -> None:
        """Place, create the actors, wait until every instance is healthy; on any failure stop all and raise."""
        self._sigterm.arm()
        deadline = time.monotonic() + timeout_s
        try:
            self._connected = connect(self.address)
            self._sigterm.reassert()   # ray.init installs its own SIGTERM handler
            atexit.register(self.stop)
            self.node_res = node_resources(ray.nodes())
            self.nodes = place(needs(self.spec, self.cores_given), self.node_res)
            self._create_actors()
            try:
                results = _wait({iid: a.start.remote(timeout_s) for iid, a in self.actors.items()}, deadline,
                                f"instance(s) not healthy after {timeout_s:.0f} s; all stopped")
            except TimeoutError as e:
                raise ServerStartError(str(e)) from None
            except ray.exceptions.RayError as e:   # an actor died (its node, a failed constructor)
                raise ServerStartError(f"a Ray actor died while starting: {str(e).strip().splitlines()[0]}; "
                                       f"all {len(self.actors)} instances stopped") from None
            for iid, res in results.items():
                if "error" in res:
                    raise ServerStartError(f"instance {iid} on Ray node {self.nodes[iid][:12]}: {res['error']}; "
                                           f"all {len(self.actors)} instances stopped")
                self._record(iid, res)
        except BaseException:
            self.stop()
            raise

    def _create_actors(self) -> None:
        on_node: dict[str, list[str]] = {}
        for iid, node in self.nodes.items():
            on_node.setdefault(node, []).append(iid)
        for inst, need in zip(self.spec.instances, needs(self.spec, self.cores_given)):
            node = self.nodes[inst.id]
            slot = None if self.cores_given or inst.gpu_ids is not None else \
                (on_node[node].index(inst.id), len(on_node[node]))
            self.actors[inst.id] = InstanceActor.options(
                num_cpus=need.cpus, num_gpus=need.gpus, name=None,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            ).remote(inst, os.path.abspath(self.spec.model_dir), str(self.logs()[inst.id]), slot, self.env,
                     self.python)

    def _record(self, iid: str, res: dict) -> None:
        """The instance as it runs on its node: address, ports and cores written back into the spec."""
        inst = next(i for i in self.spec.instances if i.id == iid)
        inst.host, inst.port = res["host"], res["port"]
        inst.side_channel_port, inst.cpu_cores, inst.gpu_ids = res["side_channel_port"], res["cpu_cores"], \
            res["gpu_ids"]
        self.info[iid] = {**res, "node_id": self.nodes[iid]}
        self.servers[iid] = RemoteServer(inst.url)

    def dead(self) -> list[str]:
        """Ids of instances whose vLLM process (or actor) has exited."""
        out = []
        for iid, a in list(self.actors.items()):
            try:
                if ray.get(a.exited.remote(), timeout=10):
                    out.append(iid)
            except (ray.exceptions.RayError, TimeoutError):
                out.append(iid)
        return out

    def stop(self, grace_s: float | None = None) -> None:
        """Stop every vLLM process group (the actors' own stop), copy node-local logs back, kill the actors,
        disconnect. Idempotent; a dead actor's vLLM goes with it (procs' reaper in the actor's process)."""
        with self._lock:
            actors, self.actors = self.actors, {}
        grace_s = self.grace_s if grace_s is None else grace_s
        try:
            if actors and ray.is_initialized():
                refs = {iid: a.stop.remote(grace_s) for iid, a in actors.items()}
                try:
                    _wait(refs, time.monotonic() + grace_s + STOP_WAIT_S, "stop")
                except (ray.exceptions.RayError, TimeoutError):
                    pass
                self._copy_logs(actors)
                for a in actors.values():
                    ray.kill(a, no_restart=True)
        finally:
            atexit.unregister(self.stop)
            if self._connected and ray.is_initialized():
                ray.shutdown()
            self._connected = False
            self._sigterm.disarm()

    def _copy_logs(self, actors: dict) -> None:
        """Logs written on a node that does not see the run directory, into run_dir/instances/<id>.log."""
        for iid, a in actors.items():
            target = self.logs()[iid]
            if self.info.get(iid, {}).get("log_path") == str(target) and target.exists():
                continue
            try:
                text = ray.get(a.log_text.remote(), timeout=30)
            except (ray.exceptions.RayError, TimeoutError):
                continue
            if text and (not target.exists() or target.stat().st_size == 0):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)

    def describe(self) -> list[dict[str, Any]]:
        out = []
        for inst in self.spec.instances:
            info = self.info.get(inst.id, {})
            out.append({**inst.describe(), "hardware": self.spec.hardware, "connector": self.spec.connector,
                        "model_dir": self.spec.model_dir, "launcher": "ray",
                        "log_path": str(self.logs()[inst.id]), "args": info.get("args", inst.vllm_args()),
                        "load_format": info.get("load_format"), "start_s": info.get("start_s"),
                        "start_unix_s": info.get("start_unix_s"), "pid": info.get("pid"),
                        "node_id": self.nodes.get(inst.id), "node_ip": info.get("node_ip"),
                        "node_resources": {k: v for k, v in self.node_res.get(self.nodes.get(inst.id), {}).items()
                                           if k in ("CPU", "GPU") or k in ROLE_RESOURCES},
                        "hostname": info.get("hostname")})
        return out

    def __enter__(self) -> "RayCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ray_map(fn: Callable, jobs: list, address: str | None = None) -> list:
    """[fn(j) for j in jobs] as Ray tasks (one CPU each) on the cluster at `address`, results in job order."""
    connected = connect(address)
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(fn)
        return ray.get([task.remote(j) for j in jobs])
    finally:
        if connected:
            ray.shutdown()

