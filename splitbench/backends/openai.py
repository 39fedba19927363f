"""The `openai` backend: an already-running OpenAI-compatible server at a URL (vLLM, a proxy, a hosted API).

start/stop launch nothing; the API key is read from an environment variable and never stored or described.
"""
from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from splitbench.client.probe import http_get
from splitbench.errors import InputError


def normalize_url(url: str) -> str:
    """'http://h:8000/v1/' -> 'http://h:8000'; no scheme or host -> InputError."""
    parsed = urllib.parse.urlsplit(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InputError(f"backend url {url!r} needs a scheme and host, e.g. http://127.0.0.1:8000")
    path = parsed.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def first_model_id(base_url: str, headers: dict[str, str] | None = None, timeout_s: float = 5.0) -> str:
    """The first model id listed by GET /v1/models; InputError when there is none."""
    status, body = http_get(f"{base_url}/v1/models", timeout_s=timeout_s, headers=headers)
    if status != 200:
        raise InputError(f"GET {base_url}/v1/models answered {status or 'nothing'}; pass the model name")
    try:
        return str(json.loads(body)["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise InputError(f"GET {base_url}/v1/models listed no model; pass the model name") from None


class OpenAIBackend:
    """A server someone else runs. health() tries /health, then /v1/models."""
    name = "openai"

    def __init__(self, url: str, api_key_env: str = "OPENAI_API_KEY", model: str | None = None,
                 health_timeout_s: float = 5.0, **_: Any):
        self.url = normalize_url(url)
        self.api_key_env = api_key_env
        self.model = model
        self.health_timeout_s = health_timeout_s

    def start(self, run_dir: Path | None = None) -> None:
        if not self.health():
            raise InputError(f"backend {self.url} is not reachable (no 200 from /health or /v1/models)")

    def stop(self) -> None:
        pass

    def health(self) -> bool:
        h = self.headers()
        if http_get(f"{self.url}/health", timeout_s=self.health_timeout_s, headers=h)[0] == 200:
            return True
        return http_get(f"{self.url}/v1/models", timeout_s=self.health_timeout_s, headers=h)[0] == 200

    def endpoint(self) -> str:
        return self.url

    def headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def discover_model(self) -> str:
        return self.model or first_model_id(self.url, self.headers())

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai", "url": self.url, "api_key_env": self.api_key_env,
                "api_key_set": bool(self.api_key_env and os.environ.get(self.api_key_env)),
                "model": self.model}

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIBackend(url={self.url!r}, api_key_env={self.api_key_env!r})"
