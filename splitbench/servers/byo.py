"""Instances a user started (bring your own): their topology from --prompt-url/--token-url/--url or a TOML/JSON file
of [[instance]] tables, named and validated. No network and no heavy imports: the start checks are in external.py."""
from __future__ import annotations

import json
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitbench.errors import InputError

BYO_POOLS = ("prompt", "token", "baseline")
DEFAULT_POLICY = {"vllm": "jsq", "splitwise": "jsq", "mixed": "mixed-pool"}   # the cluster backends' own defaults
TOPOLOGY_KEYS = ("url", "pool", "machine", "machines", "id")


@dataclass
class ExternalInstance:
    """One user-started server: its router id (prompt-0, token-0, baseline-0, ...), pool, URL and hardware."""
    id: str
    pool: str
    url: str
    machine: str | None = None
    machines: float | None = None
    model: str | None = None        # /v1/models' first id (start checks)
    connector: str | None = None    # how the KV connector was shown: metrics:nixl, metrics:consumer, probe, ...

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.pool, "pool": self.pool, "url": self.url, "external": True,
                "machine": self.machine, "machines": self.machines, "model": self.model,
                "connector": self.connector, "gpu_ids": None, "cpu_cores": None}


def instance_url(url: Any, where: str, file: str | None = None) -> str:
    """'http://h:8000/v1/' -> 'http://h:8000'; no http(s) scheme or host -> InputError naming `where` (and file)."""
    parsed = urllib.parse.urlsplit(str(url).strip())
    try:
        parsed.port   # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        raise InputError(f"{where}: {url!r} has a port that is not a number", file=file) from None
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InputError(f"{where}: {url!r} needs a scheme and host, e.g. http://10.0.0.5:8000", file=file)
    path = parsed.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def name_instances(rows: list[dict], source: str, file: str | None = None,
                   pools: tuple[str, ...] = BYO_POOLS) -> list[ExternalInstance]:
    """Instances from rows {url, pool[, machine, machines, id]}: ids prompt-0.., token-0.., baseline-0.. in order
    unless given; unknown keys, bad pools, duplicate ids or URLs are one-line InputErrors naming `source`."""
    out, seen = [], {p: 0 for p in pools}
    for k, row in enumerate(rows):
        where = f"{source} instance {k + 1}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a table with url= and pool=", file=file)
        bad = [key for key in row if key not in TOPOLOGY_KEYS]
        if bad:
            raise InputError(f"{where}: unknown key {bad[0]!r} (known: {', '.join(TOPOLOGY_KEYS)})", file=file)
        pool = row.get("pool")
        if pool not in pools:
            raise InputError(f"{where}: pool must be one of {', '.join(pools)}, got {pool!r}", file=file)
        if "url" not in row:
            raise InputError(f"{where}: needs url=", file=file)
        machines = row.get("machines")
        if machines is not None and (isinstance(machines, bool) or not isinstance(machines, (int, float))
                                     or machines <= 0):
            raise InputError(f"{where}: machines must be a number > 0, got {machines!r}", file=file)
        if row.get("machine") is not None and not isinstance(row["machine"], str):
            raise InputError(f"{where}: machine must be a machine type name, got {row['machine']!r}", file=file)
        iid = str(row.get("id") or f"{pool}-{seen[pool]}")
        seen[pool] += 1
        out.append(ExternalInstance(iid, pool, instance_url(row["url"], where, file), row.get("machine"),
                                    float(machines) if machines is not None else None))
    for attr in ("id", "url"):
        values = [getattr(i, attr) for i in out]
        dup = next((v for v in values if values.count(v) > 1), None)
        if dup is not None:
            raise InputError(f"{source}: {attr} {dup!r} is given twice", file=file)
    return out


def from_urls(prompt_urls: list[str] | None, token_urls: list[str] | None,
              urls: list[str] | None) -> list[ExternalInstance]:
    """--prompt-url/--token-url (P/D pools) or --url (co-located baseline instances) as instances."""
    rows = [{"url": u, "pool": "prompt"} for u in prompt_urls or ()] + \
           [{"url": u, "pool": "token"} for u in token_urls or ()] + [{"url": u, "pool": "baseline"} for u in urls or ()]
    return name_instances(rows, "--prompt-url/--token-url/--url")


def load_topology(path: str) -> list[ExternalInstance]:
    """A topology file: TOML ([[instance]] tables) or JSON ({"instance": [...]} or a list), by its suffix."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InputError(f"cannot read topology: {e.strerror or e}", file=path) from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise InputError(f"not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'}: {e}", file=path) from None
    rows = data if isinstance(data, list) else data.get("instance") if isinstance(data, dict) else None
    if isinstance(data, dict) and [k for k in data if k != "instance"]:
        raise InputError(f"unknown key {next(k for k in data if k != 'instance')!r} (only [[instance]] tables)",
                         file=path)
    if not isinstance(rows, list) or not rows:
        raise InputError("no [[instance]] tables (each: url=, pool=\"prompt\"|\"token\"|\"baseline\")", file=path)
    return name_instances(rows, "topology", file=path)
