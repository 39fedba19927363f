"""Baselines for regression gates: a directory of named run copies (records, run.json, summary.json), and
`gate()`: load baseline and candidate runs (live or simulated) and evaluate the rules (metrics.gate).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from splitbench.app.reports import report
from splitbench.errors import InputError
from splitbench.metrics.gate import evaluate
from splitbench.metrics.gate_rules import load_rules
from splitbench.schema import records as R
from splitbench.schema.runmeta import read_run_meta

ENV_VAR = "SPLITBENCH_BASELINES"
FILES = (R.RECORDS_FILE, R.RUN_FILE, R.SUMMARY_FILE)


def store_dir(path: str | Path | None = None) -> Path:
    """--baseline-dir, else $SPLITBENCH_BASELINES, else ./baselines."""
    return Path(path or os.environ.get(ENV_VAR) or "baselines")


def _check_name(name: str) -> None:
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise InputError(f"baseline name {name!r}: use letters, digits, '-', '_' or '.' (no slashes)")


def save(name: str, run_dir: str | Path, store: str | Path | None = None, force: bool = False) -> Path:
    """Copy a run's records, run.json and summary.json into STORE/NAME atomically (a temp dir renamed in place)."""
    _check_name(name)
    run_dir = Path(run_dir)
    read_run_meta(run_dir)  # one-line error if it is not a run
    R.read_table(run_dir)
    dest = store_dir(store) / name
    if dest.exists() and not force:
        raise InputError(f"baseline {name!r} exists in {dest.parent} (use --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        for f in FILES:
            if (run_dir / f).exists():
                shutil.copy2(run_dir / f, tmp / f)
        meta = {"name": name, "source": str(run_dir.resolve()), "run_id": read_run_meta(run_dir).get("run_id")}
        (tmp / "baseline.json").write_text(json.dumps(meta, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def list_baselines(store: str | Path | None = None) -> list[dict]:
    root = store_dir(store)
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and (d / R.RUN_FILE).exists():
            meta = read_run_meta(d)
            out.append({"name": d.name, "path": str(d), "run_id": meta.get("run_id"),
                        "simulated": meta.get("simulated", False),
                        "workload": (meta.get("workload") or {}).get("name"),
                        "requests": (meta.get("workload") or {}).get("requests"),
                        "backend": (meta.get("backend") or {}).get("backend")})
    return out


def resolve(ref: str | Path, store: str | Path | None = None) -> Path:
    """A run directory, or the name of a saved baseline."""
    p = Path(ref)
    if (p / R.RUN_FILE).exists():
        return p
    named = store_dir(store) / str(ref)
    if (named / R.RUN_FILE).exists():
        return named
    known = ", ".join(b["name"] for b in list_baselines(store)) or "none"
    raise InputError(f"{ref}: neither a run directory nor a saved baseline in {store_dir(store)} (known: {known})")


def _load(ref, store) -> dict:
    d = resolve(ref, store)
    meta = read_run_meta(d)
    return {"label": d.name, "dir": str(d), "records": R.read_records(d), "summary": report(d, write=False),
            "hardware": meta.get("hardware")}


def gate(baselines: list, candidates: list, rules_path: str | Path, store: str | Path | None = None) -> dict:
    """Evaluate gates.toml on baseline run(s) vs candidate run(s); see metrics.gate.evaluate for the verdict."""
    rules = load_rules(rules_path)
    base = [_load(b, store) for b in baselines]
    cand = [_load(c, store) for c in candidates]
    result = evaluate(rules, base, cand)
    result["baseline_dirs"] = [b["dir"] for b in base]
    result["candidate_dirs"] = [c["dir"] for c in cand]
    return result
