"""ExternalBackend: the vllm/splitwise/mixed backends over vLLM servers a user started (bring your own instances):
start checks (servers/external.py), then splitbench's router in front of them (when more than one) and the /metrics
scraper; stop() stops only what splitbench started, never the user's servers."""
from __future__ import annotations

import atexit
import tempfile
import time
from pathlib import Path
from typing import Any

from splitbench.client.probe import http_get
from splitbench.errors import InputError
from splitbench.servers.byo import DEFAULT_POLICY, ExternalInstance
from splitbench.servers.external import check_connectors, check_served
from splitbench.servers.router_process import RouterProcess
from splitbench.servers.scrape import ScraperProcess

POOLS_OF = {"vllm": ("baseline",), "splitwise": ("prompt", "token"), "mixed": ("prompt", "token")}


class ExternalBackend:
    """`kind` (vllm, splitwise, mixed) over `instances` (ExternalInstance). check() runs the start checks (the
    session calls it while planning, so a bad URL fails before a run directory exists); start() runs it if not."""

    def __init__(self, kind: str, instances: list[ExternalInstance], *, policy: str | None = None,
                 policy_params: dict | None = None, router_cpu: int | None = None, seed: int = 0,
                 scrape_interval_s: float | None = None, check_timeout_s: float = 120.0, **_: Any):
        if kind not in POOLS_OF:
            raise InputError(f"instances you started are for --backend vllm, splitwise or mixed, not {kind!r}")
        pools = {i.pool for i in instances}
        wanted = set(POOLS_OF[kind])
        if not instances or not pools <= wanted or (kind != "vllm" and pools != wanted):
            have = ", ".join(sorted(pools)) or "none"
            raise InputError(f"--backend {kind} needs {' and '.join(POOLS_OF[kind])} instances, got {have} "
                             f"(--backend vllm: --url or pool=\"baseline\"; splitwise/mixed: --prompt-url and "
                             f"--token-url or pool=\"prompt\"/\"token\")")
        self.name, self.instances = kind, list(instances)
        self.policy = policy or DEFAULT_POLICY[kind]
        self.policy_params, self.router_cpu, self.seed = dict(policy_params or {}), router_cpu, seed or 0
        self.scrape_interval_s = float(scrape_interval_s if scrape_interval_s is not None else 1.0)
        self.check_timeout_s = check_timeout_s
        self.model: str | None = None
        self.checked_s: float | None = None
        self.router: RouterProcess | None = None
        self.scraper: ScraperProcess | None = None
        self.run_dir: Path | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.started_unix_s: float | None = None
        self._router_desc: dict | None = None

    @property
    def needs_router(self) -> bool:
        return len(self.instances) > 1

    def check(self) -> None:
        """Each instance answers /health and /v1/models, all serve one model, P/D instances have a KV connector;
        one-line InputError naming the instance otherwise. Sends at most two one-token probes per P/D instance."""
        if self.model is not None:
            return
        t0 = time.monotonic()
        model = check_served(self.instances)
        if self.name != "vllm":
            check_connectors(self.instances, model, self.check_timeout_s)
        self.model, self.checked_s = model, time.monotonic() - t0

    def start(self, run_dir: Path | None = None) -> None:
        if self.scraper is not None:
            return
        self.check()
        if run_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"splitbench-byo-{self.name}-")
            run_dir = Path(self._tmp.name)
        self.run_dir = Path(run_dir)
        self.started_unix_s = time.time()
        atexit.register(self.stop)
        try:
            if self.needs_router:
                rdir = self.run_dir / "router"
                self.router = RouterProcess([{"id": i.id, "url": i.url, "pool": i.pool} for i in self.instances],
                                            self.policy, phase_log=rdir / "phases.jsonl",
                                            log_path=rdir / "router.log", seed=self.seed,
                                            policy_params=self.policy_params, cpu=self.router_cpu)
                self.router.start(timeout_s=30)
            self.scraper = ScraperProcess(self.instance_urls(), self.run_dir / "metrics", self.scrape_interval_s)
            self.scraper.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Last metrics scrape, then the router; the user's instances keep running. Idempotent."""
        atexit.unregister(self.stop)
        scraper, self.scraper = self.scraper, None
        router, self.router = self.router, None
        if router is not None:
            self._router_desc = router.describe()
        try:
            if scraper is not None:
                scraper.stop()
        finally:
            if router is not None:
                router.stop()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def endpoint(self) -> str:
        if self.router is not None:
            return self.router.url
        return self.instances[0].url

    def headers(self) -> dict[str, str]:
        return {}

    def health(self) -> bool:
        if self.router is not None:
            return self.router.health()
        return http_get(f"{self.instances[0].url}/health", timeout_s=1.0)[0] == 200

    def instance_urls(self) -> dict[str, str]:
        return {i.id: i.url for i in self.instances}

    @property
    def phase_log(self) -> Path | None:
        return self.run_dir / "router" / "phases.jsonl" if self.run_dir and self.needs_router else None

    def describe(self) -> dict[str, Any]:
        router = self.router.describe() if self.router is not None else self._router_desc
        return {"backend": self.name, "external": True, "model": self.model, "checked_s": self.checked_s,
                "connector": _connector(self.instances) if self.name != "vllm" else None,
                "policy": self.policy if self.needs_router else None, "started_unix_s": self.started_unix_s,
                "instances": [i.describe() for i in self.instances], "router": router,
                "url": (router or {}).get("url") or self.instances[0].url,
                "metrics_dir": str(self.run_dir / "metrics") if self.run_dir else None,
                "phase_log": str(self.phase_log) if self.phase_log else None}


def _connector(instances: list[ExternalInstance]) -> str | None:
    """The connector the checks saw: nixl where every P/D instance's /metrics shows NIXL, else 'external'."""
    seen = {i.connector for i in instances if i.pool in ("prompt", "token")}
    return "nixl" if seen == {"metrics:nixl"} else "external" if seen else None
