"""What Locust's processes and the shard replayer exchange, free of any event loop (the locustfile imports it
under gevent): a shard's workload as JSON, records as Locust samples, the live LLM-tab numbers, the record pipe."""
from __future__ import annotations

import asyncio
import os
import time

import numpy as np

from splitbench.metrics.latency import e2e_s, output_tokens, tbt_gaps_s, ttft_s
from splitbench.schema.records import RequestRecord
from splitbench.workload.types import Workload

HEADERS_ENV = "SPLITBENCH_LOCUST_HEADERS"   # request headers (API keys) travel by environment, never by file


# ----------------------------------------------------------------------------- a shard's workload as JSON

def workload_to_json(w: Workload, positions: np.ndarray | None = None) -> dict:
    """The arrays a replayer needs (optionally only some positions), as JSON-able lists."""
    pos = slice(None) if positions is None else positions
    return {"name": w.name, "arrival_s": w.arrival_s[pos].tolist(), "input_tokens": w.input_tokens[pos].tolist(),
            "output_tokens": w.output_tokens[pos].tolist(), "trace_index": w.trace_index[pos].tolist()}


def workload_from_json(d: dict) -> Workload:
    """Inverse of workload_to_json. A shard keeps the trace's absolute arrival times (not re-based to 0)."""
    return Workload(name=d["name"], arrival_s=np.asarray(d["arrival_s"], dtype=np.float64),
                    input_tokens=np.asarray(d["input_tokens"], dtype=np.int64),
                    output_tokens=np.asarray(d["output_tokens"], dtype=np.int64),
                    trace_index=np.asarray(d["trace_index"], dtype=np.int64))


# ----------------------------------------------------------------------------- record -> Locust samples

def llm_samples(rec: RequestRecord) -> dict:
    """What one finished record contributes to Locust: the HTTP request (response time = end - send), and for ok
    records TTFT, E2E and per-token TBT gaps in ms (splitbench's own definitions), schedule lag and tokens."""
    sent = rec.actual_send_s is not None
    http_ms = (rec.end_s - rec.actual_send_s) * 1e3 if sent and rec.end_s is not None else None
    t, e = ttft_s(rec), e2e_s(rec)
    return {"sent": sent, "ok": rec.ok, "error": None if rec.ok else f"{rec.status}: {rec.error or ''}"[:200],
            "http_ms": http_ms, "ttft_ms": None if t is None else t * 1e3, "e2e_ms": None if e is None else e * 1e3,
            "tbt_ms": [g * 1e3 for g in tbt_gaps_s(rec)],
            "lag_ms": (rec.actual_send_s - rec.intended_send_s) * 1e3 if sent else None,
            "output_tokens": output_tokens(rec) if rec.ok else 0,
            "end_s": rec.end_s, "send_s": rec.actual_send_s}


LLM_COLUMNS = [("metric", "Metric"), ("count", "Count"), ("mean", "Mean"), ("p50", "p50"), ("p90", "p90"),
               ("p99", "p99"), ("max", "Max")]


class Samples:
    """Values for live percentiles in bounded memory: every value up to `cap` (8 bytes each), then a uniform
    reservoir sample of `cap` (Algorithm R); count, mean and max stay exact."""

    def __init__(self, cap: int = 2_000_000, seed: int = 0):
        self.cap, self.buf, self.n = cap, np.empty(1024), 0
        self.count, self.total, self.max = 0, 0.0, float("-inf")
        self.rng = np.random.default_rng(seed)

    def extend(self, values) -> None:
        a = np.asarray(values, dtype=np.float64).ravel()
        if not a.size:
            return
        self.total += float(a.sum())
        self.max = max(self.max, float(a.max()))
        take, rest = a[:self.cap - self.n], a[self.cap - self.n:]
        if take.size:
            if self.n + take.size > self.buf.size:
                self.buf = np.resize(self.buf, min(self.cap, max(2 * self.buf.size, self.n + take.size)))
            self.buf[self.n:self.n + take.size] = take
            self.n += take.size
        if rest.size:   # value number i (0-based, over all values) replaces a random slot with probability cap/(i+1)
            i = self.count + take.size + np.arange(rest.size)
            j = (self.rng.random(rest.size) * (i + 1)).astype(np.int64)
            keep = j < self.cap
            self.buf[j[keep]] = rest[keep]   # repeated slots: the later value wins, as one at a time would
        self.count += a.size

    def percentiles(self, qs) -> list[float]:
        return [float(v) for v in np.percentile(self.buf[:self.n], qs)]


class LiveLLM:
    """Running LLM numbers for the web UI's LLM tab (master side): percentiles over every sample (a uniform
    sample of 2 million beyond that), tokens/s."""

    def __init__(self, planned: int = 0):
        self.planned = planned
        self.vals = {k: Samples() for k in ("ttft", "tbt", "e2e", "lag")}
        self.ok = self.failed = self.output_tokens = 0
        self.first_send_s: float | None = None
        self.last_end_s: float | None = None
        self._cache: tuple[float, list[dict]] | None = None

    def add(self, s: dict) -> None:
        self.ok += s["ok"]
        self.failed += not s["ok"]
        self.output_tokens += s["output_tokens"]
        for k in ("ttft", "e2e", "lag"):
            if s[f"{k}_ms"] is not None:
                self.vals[k].extend([s[f"{k}_ms"]])
        self.vals["tbt"].extend(s["tbt_ms"])
        if s["send_s"] is not None:
            self.first_send_s = s["send_s"] if self.first_send_s is None else min(self.first_send_s, s["send_s"])
        if s["end_s"] is not None:
            self.last_end_s = s["end_s"] if self.last_end_s is None else max(self.last_end_s, s["end_s"])
        self._cache = None

    def rows(self, max_age_s: float = 1.0) -> list[dict]:
        """Table rows (strings) for the LLM tab; recomputed at most once per max_age_s."""
        now = time.monotonic()
        if self._cache is not None and now - self._cache[0] < max_age_s:
            return self._cache[1]
        out = []
        for key, label in (("ttft", "TTFT (ms)"), ("tbt", "TBT per token (ms)"), ("e2e", "E2E (ms)"),
                           ("lag", "Schedule lag (ms)")):
            v = self.vals[key]
            row = {"metric": label, "count": str(v.count)}
            if v.count:
                p50, p90, p99 = v.percentiles([50, 90, 99])
                row.update(mean=f"{v.total / v.count:.2f}", p50=f"{p50:.2f}", p90=f"{p90:.2f}", p99=f"{p99:.2f}",
                           max=f"{v.max:.2f}")
            out.append({k: row.get(k, "-") for k, _ in LLM_COLUMNS})
        span = (self.last_end_s - self.first_send_s) if self.first_send_s is not None and self.last_end_s else None
        rate = lambda x: f"{x / span:.1f}" if span and span > 0 else "-"
        out.append({"metric": "Output tokens/s", "count": str(self.output_tokens), "mean": rate(self.output_tokens),
                    "p50": "-", "p90": "-", "p99": "-", "max": "-"})
        out.append({"metric": "Requests ok/failed/planned", "count": f"{self.ok}/{self.failed}/{self.planned}",
                    "mean": rate(self.ok), "p50": "-", "p90": "-", "p99": "-", "max": "-"})
        self._cache = (now, out)
        return out


# ----------------------------------------------------------------------------- the child process

class PipeWriter:
    """Non-blocking writes to a pipe from inside the replayer's event loop: a slow reader never stalls the
    schedule (bytes wait in a buffer and leave when the pipe is writable); close() flushes the rest, blocking."""

    def __init__(self, fd: int):
        self.fd, self.buf, self._loop, self.broken = fd, bytearray(), None, False
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self.broken:        # the reader is gone (Locust worker died): the shard's journal still has everything
            return
        if not self.buf:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except BrokenPipeError:
                self.broken = True
                return
            data = data[n:]
            if not data:
                return
            self.buf += data
            try:
                self._loop = asyncio.get_running_loop()
                self._loop.add_writer(self.fd, self._drain)
            except RuntimeError:   # no loop (after the replay): close() writes it
                self._loop = None
        else:
            self.buf += data

    def _drain(self) -> None:
        try:
            n = os.write(self.fd, self.buf)
        except BlockingIOError:
            return
        except BrokenPipeError:
            self.broken, n = True, len(self.buf)
        del self.buf[:n]
        if not self.buf and self._loop is not None:
            self._loop.remove_writer(self.fd)
            self._loop = None

    def close(self) -> None:
        os.set_blocking(self.fd, True)
        try:
            while self.buf and not self.broken:
                del self.buf[:os.write(self.fd, self.buf)]
        except BrokenPipeError:
            self.broken = True
