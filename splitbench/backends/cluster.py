"""ClusterBackend, the base of the vLLM cluster backends (vllm, splitwise, mixed): plan the instances, launch them,
the router (when more than one) and the /metrics scraper; stop() tears all of it down (also at exit and on
SIGTERM) and leaves no process behind.
"""
from __future__ import annotations

import atexit
import importlib
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from splitbench.backends.base import int_option, on_off_option
from splitbench.errors import InputError
from splitbench.servers.launcher import TINY_CPU_ARGS, Cluster, cache_args, prefix_caching_of
from splitbench.servers.router_process import RouterProcess
from splitbench.servers.scrape import ScraperProcess
from splitbench.servers.tiny_model import ensure_tiny_model
from splitbench.servers.topology import ClusterSpec, detect_hardware, parse_id_list, plan_cluster
from splitbench.servers.vllm_features import adapt_args
from splitbench.servers.vllm_features import detect as detect_vllm

# CPU defaults for clusters: TINY_CPU_ARGS without --disable-log-stats (it would blank the /metrics series).
_CPU_DROP = ("--disable-log-stats",)
GPU_DEFAULT_ARGS = ["--uvicorn-log-level", "warning"]
LAUNCHERS = ("local", "ray")


def make_cluster(launcher: str, spec: ClusterSpec, run_dir: Path, *, ray_address: str | None, cores_given: bool):
    """The launcher's cluster: local process groups, or Ray actors (servers/ray_launcher.py, the only module that
    imports ray: imported here, for --launcher ray only)."""
    if launcher == "ray":
        ray_launcher = importlib.import_module("splitbench.servers.ray_launcher")
        return ray_launcher.RayCluster(spec, run_dir, address=ray_address, cores_given=cores_given)
    return Cluster(spec, run_dir)


class ClusterBackend:
    """Base of the vLLM cluster backends; subclasses set the instance counts and the router policy."""
    name = "cluster"

    def __init__(self, *, model_dir: str | None = None, connector: str | None = None,
                 kv_transfer_config: str | dict | None = None, gpus: str | list[int] | None = None,
                 cores: str | list[int] | None = None, tensor_parallel: int = 1, layout: str | None = None,
                 vllm_args: str | list[str] | None = None, hardware: str | None = None, policy: str = "jsq",
                 policy_params: dict | None = None, router_cpu: int | None = None,
                 startup_timeout_s: float = 300.0, scrape_interval_s: float = 1.0, seed: int = 0,
                 counts: dict[str, int] | None = None, prefix_caching: str | bool = "on", launcher: str = "local",
                 ray_address: str | None = None, **_: Any):
        self.model_dir = model_dir
        self.connector, self.kv_transfer_config = connector, kv_transfer_config
        self.gpus, self.cores, self.layout, self.hardware = gpus, cores, layout, hardware
        self.tensor_parallel = int_option(tensor_parallel or 1, "tensor-parallel", 1)
        self.vllm_args = shlex.split(vllm_args) if isinstance(vllm_args, str) else vllm_args
        self.policy, self.policy_params, self.router_cpu, self.seed = policy, dict(policy_params or {}), router_cpu, seed or 0
        # None (a CLI flag left out) means the default
        self.startup_timeout_s = float(startup_timeout_s if startup_timeout_s is not None else 300.0)
        self.scrape_interval_s = float(scrape_interval_s if scrape_interval_s is not None else 1.0)
        self.counts = dict(counts or {})
        # vLLM V1 caches prefixes by default; splitbench says so explicitly (on), and always asks for the cached
        # counts (--enable-prompt-tokens-details). Unique prompts (no prefix hashes) hit nothing either way.
        self.prefix_caching = on_off_option(prefix_caching, "prefix-caching")
        if launcher not in LAUNCHERS:
            raise InputError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
        if ray_address is not None and launcher != "ray":
            raise InputError("--ray-address is for --launcher ray")
        if launcher == "ray":   # no cluster to join: a one-line error now, before any run directory exists
            ray_address = importlib.import_module("splitbench.servers.ray_launcher").resolve_address(ray_address)
        self.launcher, self.ray_address = launcher, ray_address
        self.spec: ClusterSpec | None = None
        self.cluster: Cluster | None = None
        self.router: RouterProcess | None = None
        self.scraper: ScraperProcess | None = None
        self.run_dir: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.started_unix_s: float | None = None
        self.metrics_summary: dict | None = None   # metrics/summary.json after stop()
        self._last_describe: dict | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def needs_router(self) -> bool:
        return sum(self.counts.values()) > 1

    def plan(self, run_dir: Path) -> ClusterSpec:
        model_dir = self.model_dir
        if model_dir is None:
            model_dir = ensure_tiny_model()
        elif not Path(model_dir).exists():
            raise InputError(f"--model-dir {model_dir}: no such directory")
        hardware = self.hardware or ("gpu-host" if parse_id_list(self.gpus, "gpus") else detect_hardware())
        args = self.vllm_args
        if args is None:
            args = [a for a in TINY_CPU_ARGS if a not in _CPU_DROP] if hardware == "cpu-host" else GPU_DEFAULT_ARGS
        features = detect_vllm()
        # splitbench's cache flags, not the user's: dropped with a note where the host's vLLM lacks them
        extra, notes = adapt_args(cache_args(list(args), self.prefix_caching), features, strict=False)
        # flags and connector names as the host's vLLM spells them (probed once per vLLM install, then cached);
        # a flag of the user's --vllm-args that it lacks fails here, before anything starts
        spec = plan_cluster(model_dir, **self.counts, connector=self.connector,
                            kv_transfer_config=self.kv_transfer_config, hardware=hardware, gpus=self.gpus,
                            cores=self.cores, tensor_parallel=self.tensor_parallel, layout=self.layout,
                            base_args=list(args) + extra, shared_dir=run_dir / "kv-shared", features=features,
                            strict_args=self.vllm_args is not None)
        spec.arg_notes += notes
        return spec

    def start(self, run_dir: Path | None = None) -> None:
        if self.cluster is not None:
            return
        if run_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"splitbench-{self.name}-")
            run_dir = Path(self._tmp.name)
        self.run_dir = Path(run_dir) if self.launcher == "local" else Path(run_dir).absolute()   # Ray: node cwds
        self.spec = self.plan(self.run_dir)
        if self.spec.connector == "example":
            (self.run_dir / "kv-shared").mkdir(parents=True, exist_ok=True)
        self.started_unix_s = time.time()
        atexit.register(self.stop)
        try:
            self.cluster = make_cluster(self.launcher, self.spec, self.run_dir, ray_address=self.ray_address,
                                        cores_given=self.cores is not None)
            self.cluster.start(timeout_s=self.startup_timeout_s)
            if self.needs_router:
                rdir = self.run_dir / "router"
                self.router = RouterProcess(
                    [{"id": i.id, "url": i.url, "pool": i.pool} for i in self.spec.instances], self.policy,
                    phase_log=rdir / "phases.jsonl", log_path=rdir / "router.log", seed=self.seed,
                    policy_params=self.policy_params, cpu=self.router_cpu)
                self.router.start(timeout_s=30)
            self.scraper = ScraperProcess(self.cluster.urls(), self.run_dir / "metrics", self.scrape_interval_s)
            self.scraper.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Last metrics scrape, then router, then all instances (process groups). Idempotent."""
        atexit.unregister(self.stop)
        scraper, self.scraper = self.scraper, None
        router, self.router = self.router, None
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            self._last_describe = self._describe(cluster, router)
        try:
            if scraper is not None:
                self.metrics_summary = scraper.stop()
        finally:
            try:
                if router is not None:
                    router.stop()
            finally:
                if cluster is not None:
                    cluster.stop()
                if self._tmp is not None:
                    self._tmp.cleanup()
                    self._tmp = None

    # ------------------------------------------------------------------ queries
    def endpoint(self) -> str:
        if self.router is not None:
            return self.router.url
        if self.cluster is not None:
            return next(iter(self.cluster.servers.values())).url
        raise RuntimeError(f"{self.name} backend has no endpoint until start()")

    def headers(self) -> dict[str, str]:
        return {}

    def health(self) -> bool:
        if self.router is not None:
            return self.router.health()
        return self.cluster is not None and all(s.health() for s in self.cluster.servers.values())

    def instance_urls(self) -> dict[str, str]:
        return self.cluster.urls() if self.cluster is not None else {}

    @property
    def phase_log(self) -> Path | None:
        return self.run_dir / "router" / "phases.jsonl" if self.run_dir and self.needs_router else None

    def _describe(self, cluster, router) -> dict[str, Any]:
        spec = self.spec
        return {"backend": self.name, "launcher": self.launcher, "hardware": spec.hardware, "layout": spec.layout, "connector": spec.connector,
                "model_dir": spec.model_dir, "tensor_parallel": self.tensor_parallel,
                "policy": self.policy if router is not None else None, "started_unix_s": self.started_unix_s,
                "instances": cluster.describe(), "router": router.describe() if router is not None else None,
                "url": router.url if router is not None and router.port else cluster.describe()[0]["url"],
                "metrics_dir": str(self.run_dir / "metrics"), "phase_log": str(self.phase_log or "") or None,
                "vllm": spec.features.describe(), "arg_notes": list(spec.arg_notes),
                "prefix_caching": prefix_caching_of(spec.instances[0].base_args) if spec.instances else None}

    def describe(self) -> dict[str, Any]:
        if self.cluster is None:
            return self._last_describe or {"backend": self.name, "counts": self.counts,
                                           "connector": self.connector, "started": False}
        return self._describe(self.cluster, self.router)
