"""summary.json: the declared, versioned summary (Summary, computed by metrics.summary.summarize), its one writer
and its one loader. Version 2: the `pools` section is keyed by RequestRecord.pool of records schema 2 ("split")."""

import os
from pathlib import Path
from typing import Any, Required, TypedDict

from splitbench.errors import InputError
from splitbench.schema.files import atomic_write_json, check_version, read_json_object
from splitbench.schema.records import SPLIT, SUMMARY_FILE
from splitbench.schema.typed import field_types, first_problem

SUMMARY_KIND = "splitbench.summary"
SUMMARY_VERSION = 2   # 1: pools keyed by records schema 1 pools (split requests under "prompt")


class Summary(TypedDict, total=False):
    """Every top-level key of summary.json; README "Outputs" and METRIC_DEFINITIONS say what is inside."""
    kind: Required[str]                    # SUMMARY_KIND
    version: Required[int]                 # SUMMARY_VERSION; stamped by write_summary
    run: Required[dict[str, Any]]          # run_id, status, simulated, backend, model, workload, sha256, t0_unix_s
    counts: Required[dict[str, Any]]       # total, attempted, sent, ok, failed, not_sent, by_status, error_rate
    latency: Required[dict[str, Any]]      # ttft_s, tbt_s, mean_tbt_s, e2e_s, norm_s, tbt_splitwisesim_s: sets
    throughput: Required[dict[str, Any]]   # window, ok requests, tokens, rates
    slos: dict[str, Any]                   # items, all_met, goodput_rps, attainment
    splitwise: dict[str, Any]              # the nine slowdown checks and verdict (null without a reference)
    fidelity: dict[str, Any]               # schedule lag, send rates, token mismatches, verdict
    pools: dict[str, Any]                  # RequestRecord.pool -> count, ok and latency percentile sets
    efficiency: dict[str, Any]             # cost/energy per machine pool and total (null without hardware)
    cache: dict[str, Any]                  # cached prompt tokens, fraction per pool/instance, TTFT vs uncached,
                                           # per instance /metrics prefix-cache hit rates (null: nothing reported)


FIELD_TYPES = field_types(Summary)
REQUIRED = tuple(sorted(Summary.__required_keys__))


def _path(where: str | os.PathLike) -> Path:
    """A run directory's summary.json, or `where` itself when it names a .json file."""
    p = Path(where)
    return p if p.suffix == ".json" else p / SUMMARY_FILE


def write_summary(where: str | os.PathLike, summary: Summary | dict) -> Path:
    """Write RUN_DIR/summary.json (or the .json path given) atomically, stamped with kind and SUMMARY_VERSION.
    ValueError when a section is missing or of the wrong type (the writer is code, not user input)."""
    out = {**summary, "kind": SUMMARY_KIND, "version": SUMMARY_VERSION}
    bad = first_problem(out, FIELD_TYPES, REQUIRED)
    if bad:
        raise ValueError(f"summary field {bad[0]!r}: {bad[1]}")
    path = _path(where)
    atomic_write_json(path, out)
    return path


def _migrate_v1(summary: dict) -> dict:
    """Version 1 -> 2: split requests' pool was "prompt" (records schema 1); now "split"."""
    pools = summary.get("pools")
    if isinstance(pools, dict) and "prompt" in pools and SPLIT not in pools:
        pools = {(SPLIT if k == "prompt" else k): v for k, v in pools.items()}
    return {**summary, "pools": pools, "version": SUMMARY_VERSION}


def read_summary(where: str | os.PathLike) -> Summary:
    """RUN_DIR/summary.json (or the .json path given), validated (version 1 is migrated). One-line InputError
    naming the file, and the field when one is wrong, for a missing, corrupt, newer or invalid file."""
    path = _path(where)
    data = read_json_object(path, "summary")
    if data.get("kind") != SUMMARY_KIND:
        raise InputError(f"not a splitbench summary (kind {data.get('kind')!r})", file=str(path), column="kind")
    version = check_version(data.get("version"), SUMMARY_VERSION, "summary version", "summary version", path)
    if version < 2:
        data = _migrate_v1(data)
    bad = first_problem(data, FIELD_TYPES, REQUIRED)
    if bad:
        raise InputError(f"invalid summary: {bad[1]}", file=str(path), column=bad[0])
    return data  # type: ignore[return-value]
