"""What the host's vLLM accepts (version, CLI flags, KV connectors), read from vLLM's own argparse in a child
process once per vLLM install and cached; vLLM command lines are adapted to it (renamed flags, flags it lacks).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitbench.errors import InputError
from splitbench.schema.files import atomic_write_json

# One flag's names across vLLM versions: the one splitbench writes first, then the others. A flag the host's vLLM
# lacks is replaced by the first alias it has (0.32 added --device-memory-utilization; older vLLM had
# --disable-log-requests where newer ones have --enable-log-requests, off by default).
FLAG_ALIASES: tuple[tuple[str, ...], ...] = (
    ("--gpu-memory-utilization", "--device-memory-utilization"),
    ("--disable-log-requests", "--no-enable-log-requests"),
)
# splitbench's own defaults that a vLLM without them runs fine without: dropped (with a note); value: takes a value
OPTIONAL_FLAGS = {"--uvicorn-log-level": True, "--disable-log-stats": False, "--enforce-eager": False,
                  "--enable-prompt-tokens-details": False}
# KV connector names across versions (vLLM < 0.11 called the example connector SharedStorageConnector)
CONNECTOR_ALIASES = {"ExampleConnector": ("ExampleConnector", "SharedStorageConnector")}
PROBE_TIMEOUT_S = 180.0
DISABLE_ENV = "SPLITBENCH_VLLM_PROBE"   # "0": never probe (every flag is taken as given)

# Runs in the vLLM python: builds `vllm serve`'s parser as the server does (where make_arg_parser lives moved
# between 0.26 and 0.32) and prints one JSON line: version, every option string, registered KV connectors.
PROBE = r"""
import importlib, json
out = {"version": None, "flags": None, "connectors": None, "errors": []}
try:
    import vllm
    out["version"] = getattr(vllm, "__version__", None)
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
    for name in ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"):
        try:
            make = importlib.import_module(name).make_arg_parser
            break
        except (ImportError, AttributeError) as e:
            out["errors"].append(f"{name}: {type(e).__name__}: {e}")
    p = make(FlexibleArgumentParser())
    out["flags"] = sorted({s for a in p._actions for s in a.option_strings})
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    out["connectors"] = sorted(KVConnectorFactory._registry)
except Exception as e:
    out["errors"].append(f"{type(e).__name__}: {e}")
print("SPLITBENCH_PROBE " + json.dumps(out))
"""
INSTALL_ID = r"""
import importlib.metadata as m, importlib.util as u, json, os
s = u.find_spec("vllm")
o = s.origin if s else None
try:
    v = m.version("vllm") if s else None
except m.PackageNotFoundError:
    v = None
print(json.dumps([o, v, os.path.getmtime(o) if o else None]))
"""


@dataclass(frozen=True)
class VllmFeatures:
    """The host's vLLM: version, its CLI option strings and KV connectors (None: not known, taken as given)."""
    version: str | None = None
    flags: frozenset[str] | None = None
    connectors: frozenset[str] | None = None
    source: str = "unknown"                # "probe", "cache", "unknown" (no probe: nothing is checked)

    def has(self, flag: str) -> bool:
        """Whether vLLM accepts `flag` (exactly or as argparse's unique-prefix abbreviation); True when unknown."""
        if self.flags is None:
            return True
        return flag in self.flags or sum(f.startswith(flag) for f in self.flags) == 1

    def flag(self, name: str) -> str | None:
        """The host's spelling of a flag: `name` itself, or an alias it has; None when it has neither."""
        if self.has(name):
            return name
        for group in FLAG_ALIASES:
            if name in group:
                return next((a for a in group if self.flags and a in self.flags), None)
        return None

    def connector(self, name: str) -> str:
        """The host's name for a KV connector (ExampleConnector was SharedStorageConnector before vLLM 0.11)."""
        if self.connectors is None or name in self.connectors:
            return name
        return next((a for a in CONNECTOR_ALIASES.get(name, ()) if a in self.connectors), name)

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source,
                "flags": len(self.flags) if self.flags is not None else None,
                "connectors": sorted(self.connectors) if self.connectors is not None else None}


UNKNOWN = VllmFeatures()


def _split(token: str) -> tuple[str, str | None]:
    """'--max_model_len=4' -> ('--max-model-len', '=4'); '--a.b=1' -> ('--a', '.b=1') (vLLM's parser forms)."""
    head, sep, value = token.partition("=")
    head, dot, sub = head.partition(".")
    rest = (dot + sub if dot else "") + (sep + value if sep else "")
    return head.replace("_", "-"), rest or None


def adapt_args(args: list[str], features: VllmFeatures, *, strict: bool) -> tuple[list[str], list[str]]:
    """`args` in the host vLLM's spelling -> (args, notes). A flag it lacks is renamed to an alias it has; else
    dropped when it is one of splitbench's OPTIONAL_FLAGS and strict is False, else an InputError (strict: args
    the user gave, which vLLM would refuse after a long start)."""
    out: list[str] = []
    notes: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        # only long flags are checked: vLLM's parser rewrites short ones (-O3, -tp 2) itself
        if not tok.startswith("--") or tok == "--" or features.flags is None:
            out.append(tok)
            continue
        name, rest = _split(tok)
        if features.has(name):
            out.append(tok)
            continue
        alias = features.flag(name)
        if alias is not None:
            out.append(alias + (rest or ""))
            notes.append(f"{name} -> {alias} (vLLM {features.version})")
            continue
        if not strict and name in OPTIONAL_FLAGS:
            if OPTIONAL_FLAGS[name] and rest is None and i < len(args) and not args[i].startswith("-"):
                i += 1   # its value
            notes.append(f"dropped {name} (vLLM {features.version} has no such flag)")
            continue
        raise InputError(f"vLLM {features.version} has no flag {name} (from --vllm-args {' '.join(args)!r}); "
                         f"`python -m vllm.entrypoints.openai.api_server --help` lists the ones it has")
    return out, notes


# ----------------------------------------------------------------------------- probing (once per install)

def cache_dir() -> Path:
    """$SPLITBENCH_CACHE/vllm, else $XDG_CACHE_HOME (or ~/.cache)/splitbench/vllm."""
    base = os.environ.get("SPLITBENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "splitbench")
    return Path(base) / "vllm"


def _run_json(python: str, code: str, env: dict[str, str] | None, timeout_s: float, marker: str = "") -> Any:
    """Run `code` in `python`; its last stdout line (after `marker`) as JSON; None when it fails."""
    try:
        p = subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, timeout=timeout_s,
                           env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln[len(marker):] for ln in p.stdout.splitlines() if ln.startswith(marker)]
    try:
        return json.loads(lines[-1]) if lines else None
    except ValueError:
        return None


def from_probe(d: dict, source: str) -> VllmFeatures:
    """VllmFeatures from the PROBE's JSON (flags/connectors None where the probe could not read them)."""
    flags, conns = d.get("flags"), d.get("connectors")
    return VllmFeatures(version=d.get("version"), flags=frozenset(flags) if flags else None,
                        connectors=frozenset(conns) if conns else None, source=source)


def detect(python: str = sys.executable, env: dict[str, str] | None = None,
           timeout_s: float = PROBE_TIMEOUT_S) -> VllmFeatures:
    """The features of the vLLM that `python` imports: cached per install (path, version, mtime), else probed
    (~20 s: it imports vLLM). UNKNOWN when there is no vLLM, the probe fails, or $SPLITBENCH_VLLM_PROBE=0."""
    if os.environ.get(DISABLE_ENV) == "0":
        return UNKNOWN
    ident = _run_json(python, INSTALL_ID, env, 30.0)
    if not ident or not ident[0]:
        return UNKNOWN
    key = hashlib.sha256(json.dumps([os.path.realpath(python), *ident]).encode()).hexdigest()[:16]
    path = cache_dir() / f"features-{key}.json"
    try:
        return from_probe(json.loads(path.read_text()), "cache")
    except (OSError, ValueError, AttributeError):
        pass
    d = _run_json(python, PROBE, env, timeout_s, marker="SPLITBENCH_PROBE ")
    if not isinstance(d, dict) or not d.get("flags"):
        return VllmFeatures(version=(d or {}).get("version") or ident[1], source="unknown")
    try:
        atomic_write_json(path, {**d, "python": python, "install": ident})
    except OSError:
        pass   # a read-only cache costs the next run another probe, nothing else
    return from_probe(d, "probe")
