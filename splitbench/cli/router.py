"""`splitbench router`: the P/D router in the foreground over instances that are already running, for any client."""
from __future__ import annotations

import os
from typing import Optional

import typer

from splitbench.cli.common import console, user_errors
from splitbench.errors import InputError
from splitbench.policies import parse_policy_params, policy_class
from splitbench.servers.router import Router
from splitbench.servers.router_process import name_instances, serve_router

DEFAULT_PORT = 8100


def _pooled(prompt_urls: list[str], token_urls: list[str], urls: list[str], specs: list[str]) -> list[tuple]:
    """The flags' (pool, url) pairs: --prompt-url, --token-url, --url (baseline), then --instance POOL=URL."""
    out = [("prompt", u) for u in prompt_urls] + [("token", u) for u in token_urls] + [("baseline", u) for u in urls]
    for spec in specs:
        pool, eq, url = spec.partition("=")
        if not eq or not pool.strip() or not url.strip():
            raise InputError(f"--instance {spec!r}: expected POOL=URL, e.g. prompt=http://127.0.0.1:8001")
        out.append((pool.strip(), url.strip()))
    return out


def _listening(router: Router) -> None:
    pools = list(router.ledger.pool.values())
    colocated = len(pools) - pools.count("prompt") - pools.count("token")
    extra = f", {colocated} co-located" if colocated else ""
    console.print(f"router on {router.url} ({pools.count('prompt')} prompt, {pools.count('token')} token"
                  f"{extra} instances, policy {router.policy.name})", markup=False, highlight=False, soft_wrap=True)


@user_errors
def router(
    prompt_url: list[str] = typer.Option([], "--prompt-url", help="A prompt (prefill) instance's base URL "
                                         "(repeatable; named prompt-0, prompt-1, ...)."),
    token_url: list[str] = typer.Option([], "--token-url", help="A token (decode) instance's base URL (repeatable; "
                                        "token-0, ...)."),
    url: list[str] = typer.Option([], "--url", help="A co-located instance's base URL (repeatable; baseline-0, ...): "
                                  "prefill and decode on one server, no P/D."),
    instance: list[str] = typer.Option([], "--instance", help="POOL=URL with POOL prompt, token, mixed or baseline "
                                       "(repeatable; named POOL-k after the flags above)."),
    policy: str = typer.Option("jsq", help="Scheduling policy: jsq, round-robin, mixed-pool, prefix."),
    policy_param: list[str] = typer.Option([], "--policy-param", help="Policy parameter KEY=VALUE (repeatable), "
                                           "e.g. prompt_threshold_tokens=4096."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0: every interface)."),
    port: int = typer.Option(DEFAULT_PORT, help="Port to listen on (0 picks a free one; the line printed at start "
                             "names it)."),
    phase_log: Optional[str] = typer.Option(None, help="Append each request's phases (placement, router "
                                            "timestamps) here as JSON lines, as a run's router/phases.jsonl."),
    connect_timeout_s: float = typer.Option(5.0, "--connect-timeout-s", help="Connecting to an instance (and "
                                            "each start check request) times out after this many seconds."),
    seed: int = typer.Option(0, help="Seed of the policy's tie-breaking."),
    cpu: Optional[int] = typer.Option(None, help="Pin the router to this core."),
) -> None:
    """Serve the P/D router over running OpenAI-compatible instances (vLLM, the stub, ...) until Ctrl-C/SIGTERM
    (exit 0). Every instance is checked first (GET /health, GET /v1/models); one that is down is a one-line error
    naming its URL (exit 2), before anything is served."""
    instances = name_instances(_pooled(prompt_url, token_url, url, instance))
    policy_class(policy)
    params = parse_policy_params(policy_param, policy)
    if cpu is not None:
        if cpu not in os.sched_getaffinity(0):
            raise InputError(f"--cpu {cpu} is not one of this process's cores {sorted(os.sched_getaffinity(0))}")
        os.sched_setaffinity(0, {cpu})
    r = Router(instances, policy, host, port, phase_log, seed=seed, policy_params=params,
               connect_timeout_s=connect_timeout_s)
    serve_router(r, on_ready=_listening, check_s=connect_timeout_s)


def register(app: typer.Typer) -> None:
    app.command("router")(router)
