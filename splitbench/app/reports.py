"""Reading finished runs: `report()` recomputes a run's summary from its records, `compare()` builds the
comparison of several runs (live or simulated alike) that every renderer draws."""
from __future__ import annotations

from pathlib import Path

from splitbench.app.session import summarize_run
from splitbench.errors import InputError
from splitbench.metrics.compare import build_comparison
from splitbench.metrics.series import run_series
from splitbench.metrics.slo import Reference, load_reference, parse_slos
from splitbench.schema import records as R
from splitbench.schema.runmeta import read_run_meta
from splitbench.servers.scrape import read_series


def report(run_dir: str | Path, slos: str | None = None, reference: str | None = None,
           write: bool = True) -> dict:
    """Recompute the summary of a run directory from its records (works on live and simulated runs)."""
    run_dir = Path(run_dir)
    meta = read_run_meta(run_dir)
    options = meta.get("options") or {}
    slos = options.get("slos") if slos is None else slos
    reference = options.get("reference") if reference is None else reference
    ref = load_reference(reference) if reference else None
    if ref is None and isinstance(meta.get("reference"), dict):   # simulated and sized runs carry their own
        ref = Reference(**meta["reference"])
    return summarize_run(run_dir, meta, parse_slos(slos) if slos else None, ref, write=write)


def _series(run_dir: Path, meta: dict) -> dict:
    rows = {}
    for inst in (meta.get("backend") or {}).get("instances") or []:
        path = run_dir / "metrics" / f"{inst['id']}.jsonl"
        if path.exists():
            rows[inst["id"]] = read_series(path)
    return run_series(R.read_records(run_dir), meta, rows)


def compare(run_dirs: list[str | Path], slos: str | None = None, labels: list[str] | None = None,
            with_series: bool = True) -> dict:
    """Load runs, recompute their summaries and plot series, and build the comparison; the first run is the
    reference for ratios and iso views."""
    if not run_dirs:
        raise InputError("compare needs at least one run directory")
    runs, seen = [], set()
    for k, d in enumerate(run_dirs):
        d = Path(d)
        meta = read_run_meta(d)
        label = (labels[k] if labels and k < len(labels) else None) or d.name
        while label in seen:
            label += "'"
        seen.add(label)
        runs.append({"label": label, "run_dir": str(d), "summary": report(d, slos=slos, write=False),
                     "series": _series(d, meta) if with_series else None})
    return build_comparison(runs)
