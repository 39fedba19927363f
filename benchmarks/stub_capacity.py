"""Capacity of the stub server: open-loop Poisson streaming load against one stub process pinned to one core.

Usage: python benchmarks/stub_capacity.py [--rate 3000] [--duration 20] [--warmup 3] [--repeats 3]
           [--servers lean:precise,lean:uvloop,aiohttp:uvloop] [--tick-ms 0.2] [--pass-rps 3000] [--json F]
The stub (`python -m splitbench.servers.stub_main`, TTFT 20 ms, 5 ms/token) is pinned to --stub-cpu (default: the last
core); this process, the load generator, pins itself to --client-cpu (default 0). The load generator is a raw
epoll loop over pre-opened keep-alive sockets that only counts SSE events (`data: `) and response ends, so it is far
cheaper than the stub; it reports its own send lag and CPU so it can be seen not to be the limit. Each request:
128 token ids in, max_tokens 32, stream with include_usage + continuous_usage_stats (what the replayer sends) ->
32 token chunks + a usage chunk + [DONE]. Measured over [warmup, duration]: offered and served req/s (responses
completed in the window), the stub's CPU (/proc/PID/stat; user share; its core's busy/softirq share from /proc/stat),
chunk lateness p50/p99/max from the stub's own /metrics (histogram reset at warmup), client TTFT/E2E medians, and
"others": cores used by anything else on the box (must be ~0 for a clean run). PASS: served >= 99% of --pass-rps
(Poisson noise) and lateness p99 <= 1 ms. Runs interleave the servers and repeat; medians per server at the end.

Measured 2026-11-21 (rate 3000, 20 s, 3 repeats; medians):
  this 2-core Firecracker VM (shared; "others" 0-0.5 cores during runs):
    lean:precise    served 2994/s  stub cpu 87%  lateness p50 0.20 p99 33 max 45 ms   FAIL (p99)
    lean:uvloop     served 2993/s  stub cpu 88%  lateness p50 0.28 p99 46 max 59 ms   FAIL (p99)
    aiohttp:uvloop  served 2121/s  stub cpu 99%  saturated (TTFT p50 ~300 ms)        FAIL
  On this VM a loopback TCP write costs ~5-6 us of kernel time (perf: write() 65% of the stub's CPU, a third of
  it the receiver's softirq, which loopback runs on the sender's core), so 3000 req/s x 33 writes leaves the stub
  ~13% idle and Poisson bursts build ms-long backlogs. At 2500 req/s: ~75% cpu, p50 0.17, p99 0.3 ms (idle box)
  to 7 ms (others busy).
  dedicated host core (16-core H200 host, Python 3.12, no orjson/uvloop: json + asyncio loops; 15 s runs):
    lean:precise    3000/s  cpu 60%  lateness p50 0.12 p99 0.22 max 0.7 ms  PASS (median of 3)
    lean:asyncio    3000/s  cpu 59%  lateness p50 0.11 p99 0.22 max 0.7 ms  PASS (median of 3)
    lean:precise    4000/s  cpu 69%  p99 0.73 ms  PASS;  5000/s  cpu 84%  p99 1.4 ms (client at 98% cpu)
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

_HZ = os.sysconf("SC_CLK_TCK")
EOF = b"\r\n0\r\n\r\n"
POISSON_SLACK = 0.99   # a 20 s Poisson sample at 3000/s offers 3000 +- ~0.5%: PASS needs served >= 99% of target


def proc_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) / _HZ, int(f[12]) / _HZ


def core_times(core: int | str) -> list[int]:
    """/proc/stat ticks of one core ("" = all): user nice system idle iowait irq softirq steal."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            return [int(x) for x in line.split()[1:9]]
    raise ValueError(core)


def core_split(t0: list[int], t1: list[int]) -> dict[str, float]:
    d = [b - a for a, b in zip(t0, t1)]
    tot = sum(d) or 1
    return {"busy": 1 - (d[3] + d[4]) / tot, "softirq": (d[5] + d[6]) / tot, "steal": d[7] / tot}


def start_stub(server: str, loop: str, cpu: int, ttft_ms: float, tpot_ms: float, tick_ms: float, tmp: Path):
    port_file, log = tmp / f"port-{server}-{loop}", tmp / f"stub-{server}-{loop}.log"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "splitbench.servers.stub_main", "--port", "0", "--port-file", str(port_file),
           "--ttft-ms", str(ttft_ms), "--tpot-ms", str(tpot_ms), "--cpu", str(cpu), "--loop", loop,
           "--server", server, "--tick-ms", str(tick_ms)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(400):
        if port_file.exists():
            return proc, int(port_file.read_text()), log
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"stub did not start: {log.read_text()[-2000:]}")


def fetch_metrics(port: int, reset: bool = False) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/metrics" + ("?reset=lateness" if reset else "")
    out = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


class Conn:
    __slots__ = ("events", "sock", "t_first", "t_send", "tail")

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.t_send = self.t_first = 0.0
        self.events, self.tail = 0, b""


def load(port: int, pid: int, core: int, rate_rps: float, duration_s: float, warmup_s: float, n_conns: int, seed: int) -> dict:
    """Open-loop Poisson sends for duration_s, then up to 2 s of drain. -> the run's numbers."""
    body = json.dumps({"model": "stub-model", "prompt": list(range(1000, 1128)), "max_tokens": 32,
                       "min_tokens": 32, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True, "continuous_usage_stats": True}}).encode()
    req = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    rng, offsets, t = random.Random(seed), [], 0.0
    while (t := t + rng.expovariate(rate_rps)) < duration_s:
        offsets.append(t)
    ep = select.epoll()
    conns: dict[int, Conn] = {}
    idle: list[Conn] = []

    def new_conn() -> Conn:
        c = Conn(port)
        conns[c.sock.fileno()] = c
        ep.register(c.sock.fileno(), select.EPOLLIN)
        return c
    for _ in range(n_conns):
        idle.append(new_conn())
    marks: dict[str, object] = {}

    def sampler(t0: float) -> None:  # stub metrics + CPU at warmup and at the end of the sending window
        time.sleep(max(0.0, t0 + warmup_s - time.perf_counter()))
        marks["cpu0"], marks["t_cpu0"], marks["core0"] = proc_cpu_s(pid), time.perf_counter(), core_times(core)
        marks["all0"], marks["me0"] = core_times(""), sum(os.times()[:2])
        with contextlib.suppress(OSError):   # an overloaded stub may not answer: its lateness is then unknown
            marks["m0"] = fetch_metrics(port, reset=True)
        time.sleep(max(0.0, t0 + duration_s - time.perf_counter()))
        marks["cpu1"], marks["t_cpu1"], marks["core1"] = proc_cpu_s(pid), time.perf_counter(), core_times(core)
        marks["all1"], marks["me1"] = core_times(""), sum(os.times()[:2])
        with contextlib.suppress(OSError):
            marks["m1"] = fetch_metrics(port)

    lags, ttfts, e2es, done_t, bad, skipped, max_conns = [], [], [], [], 0, 0, 4 * n_conns
    perf, n, i, inflight = time.perf_counter, len(offsets), 0, 0
    gc.collect()
    gc.disable()   # a full collection would stall this loop for tens of ms
    my_cpu0 = time.process_time()
    t0 = perf() + 0.2
    th = threading.Thread(target=sampler, args=(t0,), daemon=True)
    th.start()
    end = t0 + duration_s + 2.0
    while True:
        now = perf()
        while i < n and t0 + offsets[i] <= now:
            lags.append(now - t0 - offsets[i])
            if not idle and len(conns) >= max_conns:   # the stub is far behind: don't pile up sockets
                skipped += 1
                i += 1
                continue
            c = idle.pop() if idle else new_conn()
            c.sock.send(req)
            c.t_send, c.events, c.tail = now, 0, b""
            i += 1
            inflight += 1
        if (i >= n and inflight == 0) or now > end:
            break
        wait = t0 + offsets[i] - perf() if i < n else 0.01
        for fd, _ in ep.poll(max(wait, 0.0)):   # epoll rounds up to whole ms: sends up to ~1 ms late (lag)
            c = conns[fd]
            data = c.sock.recv(1 << 18)
            t = perf()
            if not data:
                bad += 1
                inflight -= 1
                ep.unregister(fd)
                del conns[fd]
                continue
            tail = c.tail + data
            k = tail.count(b"data: ")
            if k and not c.events:
                c.t_first = t
            c.events += k
            c.tail = tail[-8:]
            if tail.endswith(EOF):
                inflight -= 1
                if c.events != 34 or b" 200 OK" not in tail and c.events == 0:
                    bad += 1
                ttfts.append(c.t_first - c.t_send)
                e2es.append(t - c.t_send)
                done_t.append(t - t0)
                idle.append(c)
    my_cpu = time.process_time() - my_cpu0
    gc.enable()
    th.join(15)
    for c in conns.values():
        c.sock.close()
    ep.close()
    m0, m1 = marks.get("m0", {}), marks.get("m1", {})
    window = duration_s - warmup_s
    served = sum(1 for t in done_t if warmup_s <= t <= duration_s) / window
    lat = "splitbench_stub_chunk_lateness_seconds"
    lag = sorted(x * 1e3 for x in lags) or [0.0]
    return {
        "offered_rps": n / duration_s, "served_rps": served, "completed": len(done_t), "sent": i,
        "not_completed": inflight, "bad": bad, "skipped": skipped,
        "stub_cpu": (sum(marks["cpu1"]) - sum(marks["cpu0"])) / (marks["t_cpu1"] - marks["t_cpu0"]),
        "stub_core": core_split(marks["core0"], marks["core1"]),
        # CPU (in cores) used by anything but the stub and this load generator: other people's work on the box
        "others_cores": (sum(marks["all1"]) - sum(marks["all0"]) - (marks["all1"][3] - marks["all0"][3])
                         - (marks["all1"][4] - marks["all0"][4])) / _HZ / (marks["t_cpu1"] - marks["t_cpu0"])
        - (sum(marks["cpu1"]) - sum(marks["cpu0"]) + marks["me1"] - marks["me0"]) / (marks["t_cpu1"] - marks["t_cpu0"]),
        "stub_cpu_user": (marks["cpu1"][0] - marks["cpu0"][0]) / (marks["t_cpu1"] - marks["t_cpu0"]),
        "late_p50_ms": m1.get(f'{lat}{{quantile="0.5"}}', float("nan")) * 1e3,
        "late_p99_ms": m1.get(f'{lat}{{quantile="0.99"}}', float("nan")) * 1e3,
        "late_max_ms": m1.get(f'{lat}{{quantile="1"}}', float("nan")) * 1e3,
        "chunks_in_window": m1.get(f"{lat}_count", 0),
        "tokens_in_window": m1.get('vllm:generation_tokens_total{model_name="stub-model"}', 0)
        - m0.get('vllm:generation_tokens_total{model_name="stub-model"}', 0),
        "client_lag_p50_ms": lag[len(lag) // 2], "client_lag_p99_ms": lag[int(len(lag) * 0.99)],
        "client_lag_max_ms": lag[-1], "client_cpu": my_cpu / (perf() - t0),
        "ttft_p50_ms": statistics.median(ttfts) * 1e3 if ttfts else None,
        "e2e_p50_ms": statistics.median(e2es) * 1e3 if e2es else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=3000.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--servers", default="lean,aiohttp", help="comma-separated SERVER[:LOOP] (lean, aiohttp)")
    p.add_argument("--loop", default="uvloop", help="event loop where --servers names none")
    p.add_argument("--tick-ms", type=float, default=0.2)
    p.add_argument("--ttft-ms", type=float, default=20.0)
    p.add_argument("--tpot-ms", type=float, default=5.0)
    p.add_argument("--conns", type=int, default=800)
    p.add_argument("--stub-cpu", type=int, default=(os.cpu_count() or 1) - 1)
    p.add_argument("--client-cpu", type=int, default=0)
    p.add_argument("--pass-rps", type=float, default=3000.0,
                   help="PASS needs served >= 99%% of this (Poisson noise) and lateness p99 <= 1 ms")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    os.sched_setaffinity(0, {a.client_cpu})
    servers = a.servers.split(",")
    results: dict[str, list[dict]] = {s: [] for s in servers}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(a.repeats):
            for name in (servers if rep % 2 == 0 else servers[::-1]):
                server, _, loop = name.partition(":")
                proc, port, log = start_stub(server, loop or a.loop, a.stub_cpu, a.ttft_ms, a.tpot_ms, a.tick_ms,
                                             Path(tmp))
                try:
                    load_avg = os.getloadavg()[0]
                    r = load(port, proc.pid, a.stub_cpu, a.rate, a.duration, a.warmup, a.conns, seed=rep)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(20)
                r["load_avg_1m"] = load_avg
                r["stub_exit"] = log.read_text().strip().splitlines()[-1]
                r["pass"] = r["served_rps"] >= POISSON_SLACK * a.pass_rps and r["late_p99_ms"] <= 1.0
                results[name].append(r)
                print(f"{name:15s}run {rep + 1}: offered {r['offered_rps']:.0f}/s served {r['served_rps']:.0f}/s "
                      f"(bad {r['bad']}, unfinished {r['not_completed']}, not sent {r['skipped']})  stub cpu {r['stub_cpu']:.0%} (user {r['stub_cpu_user']:.0%}; core busy {r['stub_core']['busy']:.0%}, softirq {r['stub_core']['softirq']:.0%}, steal {r['stub_core']['steal']:.0%})  lateness "
                      f"p50 {r['late_p50_ms']:.2f} p99 {r['late_p99_ms']:.2f} max {r['late_max_ms']:.1f} ms  "
                      f"ttft p50 {r['ttft_p50_ms']:.1f} e2e p50 {r['e2e_p50_ms']:.1f} ms  client lag p99 "
                      f"{r['client_lag_p99_ms']:.2f} ms cpu {r['client_cpu']:.0%}  others {r['others_cores']:.2f} cores  load {load_avg:.2f}  "
                      f"{'PASS' if r['pass'] else 'FAIL'}", flush=True)
    summary = {}
    for server, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in
               ("offered_rps", "served_rps", "stub_cpu", "late_p50_ms", "late_p99_ms", "late_max_ms",
                "client_lag_p99_ms", "client_cpu", "ttft_p50_ms", "e2e_p50_ms")}
        med["pass"] = med["served_rps"] >= POISSON_SLACK * a.pass_rps and med["late_p99_ms"] <= 1.0
        summary[server] = med
        print(f"{server:15s}median of {len(runs)}: offered {med['offered_rps']:.0f}/s served {med['served_rps']:.0f}/s "
              f"stub cpu {med['stub_cpu']:.0%} lateness p50 {med['late_p50_ms']:.2f} p99 {med['late_p99_ms']:.2f} "
              f"max {med['late_max_ms']:.1f} ms  client lag p99 {med['client_lag_p99_ms']:.2f} ms  "
              f"{'PASS' if med['pass'] else 'FAIL'}")
    if a.json:
        from splitbench.schema.files import atomic_write_json
        atomic_write_json(a.json, {"args": vars(a), "runs": results, "median": summary})


if __name__ == "__main__":
    main()
