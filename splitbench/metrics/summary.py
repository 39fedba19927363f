"""summarize(): one JSON-able dict of counts, latency, throughput, SLOs, Splitwise verdict and fidelity.

No I/O: splitbench.schema.summary writes and reads summary.json (write_summary / read_summary).
"""
from __future__ import annotations

from typing import Sequence

from splitbench.metrics import columnar as C
from splitbench.metrics.cache import cache_section
from splitbench.metrics.efficiency import efficiency_section
from splitbench.metrics.fidelity import fidelity_section
from splitbench.metrics.latency import counts_section, latency_section, pools_section, throughput_section
from splitbench.metrics.slo import SLO, Reference, evaluate_slos, parse_slos, splitwise_verdict
from splitbench.schema.columns import RecordColumns
from splitbench.schema.records import RequestRecord
from splitbench.schema.summary import SUMMARY_KIND, SUMMARY_VERSION


def summarize(records: Sequence[RequestRecord] | RecordColumns, *, run_meta: dict | None = None,
              slos: Sequence[SLO] | str | None = None, reference: Reference | None = None,
              fidelity_limits: dict | None = None, measured_energy: dict | None = None,
              server_metrics: dict | None = None) -> dict:
    """Every derived metric of a run; `slos` may be SLO objects or an "ttft_p99=2s,..." string.
    measured_energy: energy per pool from power samples (runner.measured_energy); None = estimated.
    server_metrics: the scraper's per instance counter increases (metrics/summary.json), for the cache section.
    RecordColumns (a simulated run's) are summarized with arrays (metrics/columnar.py), to the same dict."""
    if isinstance(slos, str):
        slos = parse_slos(slos)
    slos = list(slos or [])
    if isinstance(records, RecordColumns):
        f = C.Frame(records)
        return {
            "kind": SUMMARY_KIND, "version": SUMMARY_VERSION, "run": run_header(run_meta or {}),
            "counts": C.counts_section(f), "latency": C.latency_section(f), "throughput": C.throughput_section(f),
            "slos": C.evaluate_slos(f, slos),
            "splitwise": C.splitwise_verdict(f, reference) if reference is not None else None,
            "fidelity": C.fidelity_section(f, fidelity_limits), "pools": C.pools_section(f),
            "efficiency": C.efficiency_section(f, run_meta or {}, slos=slos, measured_energy=measured_energy),
            "cache": C.cache_section(f, server_metrics),
        }
    return {
        "kind": SUMMARY_KIND,
        "version": SUMMARY_VERSION,
        "run": run_header(run_meta or {}),
        "counts": counts_section(records),
        "latency": latency_section(records),
        "throughput": throughput_section(records),
        "slos": evaluate_slos(records, slos),
        "splitwise": splitwise_verdict(records, reference) if reference is not None else None,
        "fidelity": fidelity_section(records, fidelity_limits),
        "pools": pools_section(records),
        "efficiency": efficiency_section(records, run_meta or {}, slos=slos, measured_energy=measured_energy),
        "cache": cache_section(records, server_metrics),
    }


def run_header(meta: dict) -> dict:
    """The few run.json facts a summary needs to stand alone (the full config stays in run.json)."""
    backend = meta.get("backend") or {}
    workload = meta.get("workload") or {}
    source = workload.get("source") or {}
    return {
        "run_id": meta.get("run_id"), "status": meta.get("status"), "simulated": meta.get("simulated", False),
        "backend": backend.get("backend") or backend.get("name") if isinstance(backend, dict) else backend,
        "model": (meta.get("model") or {}).get("id"),
        "workload": workload.get("name"), "requests_planned": workload.get("requests"),
        "workload_sha256": source.get("workload_sha256") or source.get("sha256"),
        "t0_unix_s": meta.get("t0_unix_s"),
    }
