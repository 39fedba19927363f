"""The simulator's hot path as one mypyc-compiled group (setup.py builds it; about 2x faster simulations), used only
while it matches the sources: a stale or partial build, or SPLITBENCH_PURE_PYTHON=1, imports them from the .py files.
Imports nothing of splitbench (setup.py loads this file on its own).
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

PURE_ENV = "SPLITBENCH_PURE_PYTHON"
RECORD = "splitbench/native-build.json"   # relative to the project root: {"sources": {path: sha256}}
SOURCES = (   # compiled together (mypyc calls between them natively); relative to the project root
    "splitbench/ranks.py", "splitbench/ledger.py", "splitbench/policies.py", "splitbench/prefix_policy.py",
    "splitbench/sim/engine.py", "splitbench/sim/state.py", "splitbench/sim/cluster.py", "splitbench/sim/batching.py",
    "splitbench/sim/perfmodel.py", "splitbench/sim/recorder.py",
)
STATUS = {"compiled": False, "why": "not checked"}   # what activate() found; run.json and sim_speed.py report it


def _module(path: str) -> str:
    return path[:-3].replace("/", ".")


def _digests(root: Path) -> dict[str, str]:
    return {p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in SOURCES}


def write_record(root: Path, libraries: list[str]) -> None:
    """After a successful build: the sources' digests and mypyc's shared library (a top-level module), next to them."""
    (root / RECORD).write_text(json.dumps({"sources": _digests(root), "libraries": libraries}, indent=1) + "\n")


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Finds the group's modules as their .py files, ahead of the compiled extension beside them."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def find_spec(self, name, path=None, target=None):
        f = self.files.get(name)
        return None if f is None else importlib.util.spec_from_file_location(name, f)


def _why_not(root: Path) -> str | None:
    """None when the compiled group may be used, else the reason it may not."""
    if os.environ.get(PURE_ENV):
        return f"{PURE_ENV} is set"
    try:
        record = json.loads((root / RECORD).read_text())
        built, libraries = record["sources"], record["libraries"]
    except (OSError, ValueError, KeyError):
        return "not compiled (no build record)"
    if built != _digests(root):
        return "the compiled build is older than the sources: reinstall (pip install -e .) to rebuild it"
    compiled = importlib.machinery.EXTENSION_SUFFIXES
    if not all(any((root / (p[:-3] + s)).exists() for s in compiled) for p in SOURCES) or \
            not all(importlib.util.find_spec(lib) for lib in libraries):
        return "the compiled build is incomplete"
    return None


def activate() -> None:
    """Called once by splitbench/__init__.py, before any module of the group is imported."""
    root = Path(__file__).resolve().parent.parent
    why = _why_not(root)
    STATUS.update(compiled=why is None, why=why or "compiled with mypyc")
    if why is not None:
        sys.meta_path.insert(0, _SourcesFirst({_module(p): root / p for p in SOURCES}))
