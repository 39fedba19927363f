"""Start checks of instances a user started (their topology: byo.py), before anything is sent: each answers /health
and /v1/models with a model, all serve the same one, and the prompt/token instances move KV through a connector
(their /metrics, else a probe)."""
from __future__ import annotations

import json
import random

from splitbench.client.probe import http_get, http_post_json
from splitbench.errors import InputError
from splitbench.servers.byo import ExternalInstance
from splitbench.servers.scrape import parse_prometheus

# /metrics series whose presence shows a KV connector (vLLM 0.32 registers them at start, zero-valued):
# vllm:nixl_* for NixlConnector (any role), vllm:num_requests_kv_fetch_by_stage for a consumer role (kv_consumer,
# kv_both) of any connector.
NIXL_PREFIX = "vllm:nixl_"
CONSUMER_SERIES = "vllm:num_requests_kv_fetch_by_stage"
# counters that grow when a decode instance gets prompt KV from a connector instead of computing it
EXTERNAL_SERIES = ("vllm:prompt_tokens_by_source_total", "vllm:external_prefix_cache_hits_total")
PROBE_PROMPT_TOKENS = 520   # > 4 CPU KV blocks (128 tokens): whole blocks are what a connector moves


# ----------------------------------------------------------------------------- start checks

def _who(inst: ExternalInstance) -> str:
    return f"{inst.pool} instance {inst.id} ({inst.url})"


def served_model_id(inst: ExternalInstance, timeout_s: float = 5.0) -> str:
    """The instance's model from /v1/models after /health answered 200; else an InputError naming it."""
    status, body = http_get(f"{inst.url}/health", timeout_s=timeout_s)
    if status == 0:
        raise InputError(f"{_who(inst)}: nothing answers (is it running and reachable from here?)")
    if status != 200:
        raise InputError(f"{_who(inst)}: GET /health answered HTTP {status}: not a vLLM OpenAI server")
    status, body = http_get(f"{inst.url}/v1/models", timeout_s=timeout_s)
    if status != 200:
        raise InputError(f"{_who(inst)}: GET /v1/models answered HTTP {status or 'nothing'}: "
                         "not an OpenAI-compatible server")
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        head = body[:40].decode("utf-8", "replace").replace("\n", " ")
        raise InputError(f"{_who(inst)}: GET /v1/models is not JSON listing a model ({head!r}...): "
                         "not an OpenAI-compatible server") from None


def check_served(instances: list[ExternalInstance], timeout_s: float = 5.0) -> str:
    """Every instance answers and all serve one model (its id, which instances record); else an InputError."""
    for inst in instances:
        inst.model = served_model_id(inst, timeout_s)
    models = {i.model for i in instances}
    if len(models) > 1:
        served = ", ".join(f"{i.id} serves {i.model!r}" for i in instances)
        raise InputError(f"the instances serve different models ({served}): give instances of one model")
    return instances[0].model


def metrics_series(url: str, timeout_s: float = 5.0) -> dict[str, float] | None:
    """{series name with labels: value} of GET url/metrics, None when it does not answer Prometheus text."""
    status, body = http_get(f"{url}/metrics", timeout_s=timeout_s)
    if status != 200:
        return None
    out: dict[str, float] = {}
    for name, labels, value in parse_prometheus(body.decode("utf-8", "replace")):
        key = name + ("{source=%s}" % labels["source"] if "source" in labels else "")
        out[key] = out.get(key, 0.0) + value
    return out or None


def connector_in_metrics(series: dict[str, float] | None, pool: str) -> str | None:
    """'metrics:nixl' / 'metrics:consumer' where the series show a connector for this pool's role, else None."""
    names = {k.split("{", 1)[0] for k in series or {}}
    if any(n.startswith(NIXL_PREFIX) for n in names):
        return "metrics:nixl"
    if pool == "token" and CONSUMER_SERIES in names:
        return "metrics:consumer"
    return None


def external_tokens(series: dict[str, float] | None) -> float | None:
    """Prompt tokens a decode instance took from its connector so far; None when it exports neither counter."""
    if not series:
        return None
    keys = [k for k in series if k == "vllm:prompt_tokens_by_source_total{source=external_kv_transfer}"
            or k == EXTERNAL_SERIES[1]]
    return sum(series[k] for k in keys) if keys else None


def probe_pair(prompt: ExternalInstance, token: ExternalInstance, model: str, timeout_s: float = 120.0) -> dict:
    """One prefill (max_tokens 1, do_remote_decode) on `prompt`, its kv_transfer_params to `token` for one token:
    {"kv": did the prefill answer carry kv_transfer_params, "moved": did the token instance's connector counters
    grow (None: it exports none)}. A fresh random token-id prompt each time, so no prefix cache hides the move."""
    rng = random.Random()
    ids = [rng.randrange(10, 300) for _ in range(PROBE_PROMPT_TOKENS)]
    body = {"model": model, "prompt": ids, "max_tokens": 1, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                                   "remote_block_ids": None, "remote_host": None, "remote_port": None}}
    status, answer = http_post_json(f"{prompt.url}/v1/completions", body, timeout_s=timeout_s)
    if status != 200:
        raise InputError(f"{_who(prompt)}: the connector check's prefill answered HTTP {status or 'nothing'}: "
                         f"{answer[:160].decode('utf-8', 'replace')!r}")
    try:
        kv = json.loads(answer).get("kv_transfer_params")
    except (ValueError, AttributeError):
        raise InputError(f"{_who(prompt)}: the connector check's prefill answer is not JSON") from None
    before = external_tokens(metrics_series(token.url))
    decode = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    if kv:
        decode["kv_transfer_params"] = kv
    status, answer = http_post_json(f"{token.url}/v1/completions", decode, timeout_s=timeout_s)
    if status != 200:
        raise InputError(f"{_who(token)}: the connector check's decode answered HTTP {status or 'nothing'}: "
                         f"{answer[:160].decode('utf-8', 'replace')!r}")
    after = external_tokens(metrics_series(token.url))
    return {"kv": bool(kv), "moved": None if before is None or after is None else after > before}


def _judge_token(token: ExternalInstance, prompt: ExternalInstance, res: dict) -> None:
    if res["moved"] is None:
        token.connector = "unverified"   # no metrics to tell by: the run's phase records will show it
    elif res["moved"]:
        token.connector = "probe"
    elif not res["kv"]:
        raise InputError(f"{_who(prompt)} answered a prefill without kv_transfer_params and {_who(token)} got no "
                         "KV: start both with a matching --kv-transfer-config (e.g. NixlConnector, kv_role kv_both)")
    else:
        raise InputError(f"{_who(token)} did not take the prefill's KV through a connector: start it with a "
                         "--kv-transfer-config matching the prompt instances' (kv_role kv_consumer or kv_both)")


def check_connectors(instances: list[ExternalInstance], model: str, timeout_s: float = 120.0) -> None:
    """Every token instance must take KV from a connector and every prompt instance give it: shown by /metrics
    (vllm:nixl_*, vllm:num_requests_kv_fetch_by_stage) or, where those are silent, by probe_pair; else an
    InputError naming the instance. Sets each instance's `connector` (how it was shown)."""
    prompts = [i for i in instances if i.pool == "prompt"]
    tokens = [i for i in instances if i.pool == "token"]
    for inst in prompts + tokens:
        inst.connector = connector_in_metrics(metrics_series(inst.url), inst.pool)
    for token in tokens:
        if token.connector is None:
            _judge_token(token, prompts[0], probe_pair(prompts[0], token, model, timeout_s))
    for prompt in prompts:
        if prompt.connector is None:
            res = probe_pair(prompt, tokens[0], model, timeout_s)
            if res["kv"] or res["moved"]:
                prompt.connector = "probe"
            elif res["moved"] is None:
                prompt.connector = "unverified"
            else:
                raise InputError(f"{_who(prompt)} answered a prefill without kv_transfer_params and its KV did not "
                                 f"reach {tokens[0].id}: start it with a matching --kv-transfer-config (kv_role "
                                 "kv_producer or kv_both)")
