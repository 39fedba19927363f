"""The router's phase log (JSON lines: one anchor line per router start, one line per request) and its merge
into the client's RequestRecords (placement fields and phases_s on the client's run clock).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Iterable

import orjson

from splitbench.schema.records import RequestRecord, placement

PHASES = ("router_recv", "prefill_sent", "prefill_done", "decode_sent", "sent", "first_token", "done")
# split requests: router_recv, prefill_sent, prefill_done, decode_sent, first_token, done
# co-located requests: router_recv, sent, first_token, done   (first_token: first body bytes of a stream
# passed on to the client; absent for non-streaming requests and failures before any output)


class PhaseLog:
    """Append-only, buffered JSON-lines writer. Each line's phase times `t` are raw time.perf_counter()
    values; the anchor line written at open pairs one perf_counter reading with time.time()."""

    def __init__(self, path: str | os.PathLike, **header: Any):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab", buffering=1 << 16)
        perf0 = time.perf_counter()
        unix = time.time()
        perf1 = time.perf_counter()
        self.anchor = {"unix_s": unix, "perf_s": (perf0 + perf1) / 2}
        self._f.write(orjson.dumps({"kind": "anchor", **self.anchor, "pid": os.getpid(), **header}) + b"\n")
        self._f.flush()
        self.count = 0

    def write(self, entry: dict) -> None:
        if not self._f.closed:
            self._f.write(orjson.dumps(entry) + b"\n")
            self.count += 1

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def load_phase_log(path: str | os.PathLike) -> dict[str, dict]:
    """request_id -> its entry, with `phases_unix_s` {phase: wall-clock s} computed from the anchor line
    above it: unix_s = anchor.unix_s + (t[phase] - anchor.perf_s). A torn last line is skipped; a request id
    logged twice keeps its last entry."""
    out: dict[str, dict] = {}
    anchor: dict | None = None
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # torn line after a crash
            if d.get("kind") == "anchor":
                anchor = d
                continue
            if anchor is None:
                raise ValueError(f"{path}:{n}: request line before any anchor line")
            shift = anchor["unix_s"] - anchor["perf_s"]
            d["phases_unix_s"] = {k: v + shift for k, v in (d.pop("t", None) or {}).items()}
            out[d["request_id"]] = d
    return out


def merge_phases(records: Iterable[RequestRecord], phase_log: dict[str, dict],
                 t0_unix_s: float) -> list[RequestRecord]:
    """Copies of records with the placement fields (records.placement: prefill/decode instance and pool, instance,
    pool) and phases_s filled from the phase log. Conversion to the client's
    run clock (run.json t0_unix_s):  phases_s[p] = anchor.unix_s + (router_perf[p] - anchor.perf_s) - t0_unix_s.
    Both processes anchor perf_counter to time.time() at start, so the error is their two anchor readings'
    (µs) plus any wall-clock step between them. Records the router never saw are returned unchanged."""
    out = []
    for r in records:
        e = phase_log.get(r.request_id)
        if e is None:
            out.append(r)
            continue
        phases = {k: v - t0_unix_s for k, v in e["phases_unix_s"].items()}
        where = placement(e.get("prompt_instance"), e.get("prefill_pool"), e.get("token_instance"),
                          e.get("decode_pool")) if e.get("prompt_instance") else {}
        out.append(dataclasses.replace(r, **where, phases_s=phases))
    return out
