"""Small blocking HTTP probes of a server: GET and a JSON POST without proxies, the served model from /v1/models."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

# Loopback and lab hosts must not go through whatever proxy the environment names (aiohttp ignores it too).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, *, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET url -> (status, body); status 0 when nothing answered (refused, timeout, DNS)."""
    return _open(urllib.request.Request(url, headers=headers or {}), timeout_s)


def http_post_json(url: str, body: dict, *, timeout_s: float = 60.0,
                   headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST a JSON body -> (status, body); status 0 when nothing answered (refused, timeout, DNS)."""
    return _open(urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                        headers={"Content-Type": "application/json", **(headers or {})}), timeout_s)


def _open(req: urllib.request.Request, timeout_s: float) -> tuple[int, bytes]:
    try:
        with _OPENER.open(req, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read() if e.fp else b""
    except (urllib.error.URLError, OSError, ValueError):
        return 0, b""


def served_model(base_url: str, headers: dict | None = None) -> dict:
    """First entry of GET /v1/models: id, root (vLLM: the model path) and max_model_len when given."""
    status, body = http_get(base_url.rstrip("/") + "/v1/models", timeout_s=5.0, headers=headers)
    try:
        return (json.loads(body).get("data") or [{}])[0] if status == 200 else {}
    except (ValueError, AttributeError, IndexError):
        return {}
