"""Scrape each vLLM instance's Prometheus /metrics about once a second into run_dir/metrics/<id>.jsonl.

Server-side numbers are per instance and per phase: on a decode (token) instance vLLM's TTFT histogram starts when
*that* instance got the request, so it excludes the prefill done on the prompt instance and the KV transfer.
The client's TTFT in records.parquet stays the truth; these series explain it (queues, KV usage, transfers).
Series renamed across vLLM versions are stored under their current name (METRIC_ALIASES), whichever the server has.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from splitbench.errors import ServerStartError
from splitbench.procs import log_tail, spawn, stop_group
from splitbench.schema.files import atomic_write_json

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
          "vllm:num_requests_kv_fetch_by_stage")
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
            "vllm:prompt_tokens_by_source_total", "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total",
            "vllm:external_prefix_cache_hits_total", "vllm:prompt_tokens_cached_total")
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
              "vllm:request_time_per_output_token_seconds",
              "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
              "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds")
# old name -> current name (vLLM deprecated the gpu_ names in 0.10 and removed them in 0.12; 0.26 and 0.32 have
# only the current ones). A server that still sends both (the deprecation releases) is read by the current name.
METRIC_ALIASES = {"vllm:gpu_cache_usage_perc": "vllm:kv_cache_usage_perc",
                  "vllm:gpu_prefix_cache_queries_total": "vllm:prefix_cache_queries_total",
                  "vllm:gpu_prefix_cache_hits_total": "vllm:prefix_cache_hits_total",
                  "vllm:time_per_output_token_seconds": "vllm:inter_token_latency_seconds"}
_BUCKETS_KEPT = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds")
_DROP_LABELS = ("engine", "model_name")
_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> [(name, labels, value)]; comments and malformed lines are skipped."""
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def _key(name: str, labels: dict[str, str], drop: tuple[str, ...] = _DROP_LABELS) -> str:
    kept = sorted((k, v) for k, v in labels.items() if k not in drop)
    return name + ("{" + ",".join(f"{k}={v}" for k, v in kept) + "}" if kept else "")


def _le(v: str) -> float:
    return math.inf if v in ("+Inf", "Inf") else float(v)


def canonical(samples: list[tuple[str, dict[str, str], float]]) -> list[tuple[str, dict[str, str], float]]:
    """Samples with old series names (METRIC_ALIASES, histogram parts included) renamed to the current ones; an old
    series is dropped where the current one is also there (a deprecation release sends both)."""
    names = {n for n, _, _ in samples}
    out = []
    for name, labels, value in samples:
        base, part = name, ""
        if name not in METRIC_ALIASES:
            head, _, tail = name.rpartition("_")
            if head in METRIC_ALIASES and tail in ("sum", "count", "bucket", "created"):
                base, part = head, "_" + tail
        new = METRIC_ALIASES.get(base)
        if new is None:
            out.append((name, labels, value))
        elif new + part not in names:
            out.append((new + part, labels, value))
    return out


def select(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, Any]:
    """Keep the relevant vLLM series (summed over engines), by their current names: gauges, counters, histograms
    (sum/count[/buckets]), and every vllm:nixl_* series. Returns {"gauges", "counters", "histograms", "nixl"}."""
    samples = canonical(samples)
    gauges: dict[str, float] = {}
    counters: dict[str, float] = {}
    nixl: dict[str, float] = {}
    hist: dict[str, dict[str, Any]] = {}
    for name, labels, value in samples:
        if name.endswith("_created"):
            continue
        if name.startswith("vllm:nixl_"):
            if name.endswith("_bucket"):
                continue
            k = _key(name, labels)
            nixl[k] = nixl.get(k, 0.0) + value
            continue
        if name in GAUGES:
            k = _key(name, labels)
            gauges[k] = gauges.get(k, 0.0) + value
        elif name in COUNTERS:
            k = _key(name, labels)
            counters[k] = counters.get(k, 0.0) + value
        else:
            base, _, part = name.rpartition("_")
            if base not in HISTOGRAMS or part not in ("sum", "count", "bucket"):
                continue
            h = hist.setdefault(_key(base, {k: v for k, v in labels.items() if k != "le"}), {"sum": 0.0, "count": 0.0})
            if part == "bucket":
                if base in _BUCKETS_KEPT and "le" in labels:
                    b = h.setdefault("_b", {})
                    le = _le(labels["le"])
                    b[le] = b.get(le, 0.0) + value
            else:
                h[part] += value
    for h in hist.values():
        b = h.pop("_b", None)
        if b:
            h["buckets"] = [["+Inf" if math.isinf(le) else le, c] for le, c in sorted(b.items())]
    return {"gauges": gauges, "counters": counters, "histograms": hist, "nixl": nixl}


def snapshot(url: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """GET url/metrics once and select() it; raises OSError when nothing answers."""
    with _OPENER.open(url.rstrip("/") + "/metrics", timeout=timeout_s) as r:
        return select(parse_prometheus(r.read().decode("utf-8", "replace")))


class MetricsScraper:
    """Background thread: every interval_s, one GET /metrics per instance, one JSON line per instance and tick.

    Each line: {"t_unix_s", "instance", "ok", "scrape_s", "gauges", "counters", "histograms", "nixl"} (or "error").
    stop() takes a last scrape and writes metrics/summary.json (counter deltas and histogram means per instance).
    """

    def __init__(self, targets: dict[str, str], out_dir: str | Path, interval_s: float = 1.0,
                 timeout_s: float = 1.0):
        self.targets = dict(targets)
        self.out_dir = Path(out_dir)
        self.interval_s, self.timeout_s = float(interval_s), float(timeout_s)
        self.first: dict[str, dict] = {}
        self.last: dict[str, dict] = {}
        self.n_scrapes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._files: dict[str, Any] = {}

    def start(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._files = {i: open(self.out_dir / f"{i}.jsonl", "a", buffering=1) for i in self.targets}
        self.scrape_once()
        self._thread = threading.Thread(target=self._loop, name="splitbench-scrape", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_t = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            self.scrape_once()
            next_t += self.interval_s
            if next_t < time.monotonic():   # fell behind (slow instance): skip ticks, don't burst
                next_t = time.monotonic() + self.interval_s

    def scrape_once(self) -> None:
        for iid, url in self.targets.items():
            t_unix, t0 = time.time(), time.perf_counter()
            try:
                row: dict[str, Any] = {"t_unix_s": t_unix, "instance": iid, "ok": True,
                                       **snapshot(url, self.timeout_s)}
                self.first.setdefault(iid, row)
                self.last[iid] = row
            except (OSError, ValueError, urllib.error.URLError) as e:
                row = {"t_unix_s": t_unix, "instance": iid, "ok": False, "error": f"{type(e).__name__}: {e}"}
            row["scrape_s"] = round(time.perf_counter() - t0, 6)
            f = self._files.get(iid)
            if f is not None and not f.closed:
                f.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.n_scrapes += 1

    def stop(self) -> dict[str, Any]:
        """Stop the thread (after one last scrape), close files, write metrics/summary.json; returns that summary."""
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join(self.timeout_s * len(self.targets) + 5)
        self._thread = None
        self.scrape_once()
        for f in self._files.values():
            f.close()
        summary = self.summary()
        atomic_write_json(self.out_dir / "summary.json", summary)
        return summary

    def summary(self) -> dict[str, Any]:
        return {iid: delta(self.first.get(iid), self.last.get(iid)) for iid in self.targets}


def delta(first: dict | None, last: dict | None) -> dict[str, Any]:
    """Counter increases and histogram (count, mean) between two scrapes of one instance."""
    if not first or not last:
        return {"scraped": False}
    out: dict[str, Any] = {"scraped": True, "span_s": last["t_unix_s"] - first["t_unix_s"], "counters": {},
                           "histograms": {}, "nixl": {}}
    for k, v in last["counters"].items():
        out["counters"][k] = v - first["counters"].get(k, 0.0)
    for k, v in last.get("nixl", {}).items():
        if k.endswith(("_sum", "_count", "_total")):
            out["nixl"][k] = v - first.get("nixl", {}).get(k, 0.0)
    for k, h in last["histograms"].items():
        h0 = first["histograms"].get(k, {"sum": 0.0, "count": 0.0})
        n = h["count"] - h0["count"]
        out["histograms"][k] = {"count": n, "mean": (h["sum"] - h0["sum"]) / n if n else None}
    return out


def server_times_ms(pairs: list[tuple[dict | None, dict | None]]) -> dict | None:
    """Iteration times from vLLM's own /metrics, scraped before and after some requests on each instance (count-
    weighted over instances), or None without them: mean inter-token latency (engine-core timestamps, immune to a
    starved frontend) and mean prefill time, in ms."""
    sums = {"vllm:inter_token_latency_seconds": [0.0, 0.0], "vllm:request_prefill_time_seconds": [0.0, 0.0]}
    for first, last in pairs:
        h = delta(first, last).get("histograms", {})
        for name, acc in sums.items():
            x = h.get(name, {})
            if x.get("count") and x.get("mean") is not None:
                acc[0] += x["mean"] * x["count"]
                acc[1] += x["count"]
    (itl, n_itl), (prefill, n_prefill) = sums.values()
    if not n_itl or not n_prefill:
        return None
    return {"token_time": itl / n_itl * 1e3, "prompt_time": prefill / n_prefill * 1e3}


def snapshots(urls: list[str]) -> list[dict | None]:
    """One snapshot() per URL, stamped; None where nothing (or no Prometheus text) answered."""
    out = []
    for url in urls:
        try:
            out.append({**snapshot(url), "t_unix_s": time.time()})
        except (OSError, ValueError):
            out.append(None)
    return out


def read_series(path: str | Path) -> list[dict]:
    """All rows of one metrics/<id>.jsonl (a torn last line is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class ScraperProcess:
    """MetricsScraper in its own process, so parsing /metrics never takes the client's GIL (measured: a
    scraper thread in the client process stalled open-loop sends by up to 0.7 s). Same start()/stop()."""

    def __init__(self, targets: dict[str, str], out_dir: str | Path, interval_s: float = 1.0):
        self.targets, self.out_dir, self.interval_s = dict(targets), Path(out_dir), float(interval_s)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Spawn the scraper; return once every target's first scrape is on disk (ServerStartError if not)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "splitbench.servers.scrape", "--out", str(self.out_dir),
               "--interval", str(self.interval_s)]
        for iid, url in self.targets.items():
            cmd += ["--target", f"{iid}={url}"]
        log_path = self.out_dir / "scraper.log"
        self.proc = spawn(cmd, log_path=log_path)
        # counters are reported as deltas from the first scrape: it must happen before any request is sent
        files = [self.out_dir / f"{i}.jsonl" for i in self.targets]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if all(f.exists() and f.stat().st_size > 0 for f in files):
                return
            time.sleep(0.02)
        proc, self.proc = self.proc, None
        rc = proc.poll()
        stop_group(proc)
        why = f"exited with code {rc}" if rc is not None else f"took no first scrape within {timeout_s:g} s"
        raise ServerStartError(f"metrics scraper {why}: {log_tail(log_path)}")

    def stop(self) -> dict[str, Any]:
        """SIGTERM: the child takes a last scrape and writes metrics/summary.json, which is returned."""
        proc, self.proc = self.proc, None
        stop_group(proc, grace_s=10.0)
        try:
            return json.loads((self.out_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return {}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Scrape vLLM /metrics of each target into DIR/<id>.jsonl")
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--target", action="append", default=[], help="ID=URL (repeatable)")
    a = ap.parse_args(argv)
    targets = dict(t.split("=", 1) for t in a.target)
    os.nice(10)  # an observer: never compete with the client, the router or the servers for a core
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scraper = MetricsScraper(targets, a.out, a.interval)
    scraper.start()
    stop.wait()
    scraper.stop()


if __name__ == "__main__":
    main()
