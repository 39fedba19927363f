"""Real vLLM clusters (CPU build, tiny model), at most 2 instances at a time, through runner.run():
splitwise with NIXL and with the example connector (prefill on prompt-0, decode on token-0, proven by the router's
phase log and the instances' /metrics), baseline `vllm` with 2 instances behind JSQ, and a token instance killed
mid-run (the run finishes, failures are recorded, nothing is left running)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from splitbench.app.options import RunOptions
from splitbench.app.runner import run
from splitbench.procs import group_alive
from splitbench.schema import records as R

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                                   reason="vllm is not installed")]
N_REQ = 6
TRACE = (f"synth:arrivals=poisson,rate=2,count={N_REQ},lengths=uniform,input=300-2500,output=4-24,seed=3")


def phases(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "router" / "phases.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("kind") != "anchor"]


def assert_nothing_left(meta: dict) -> None:
    b = meta["backend"]
    pgids = [i["pid"] for i in b["instances"]] + ([b["router"]["pid"]] if b.get("router") else [])
    end = time.monotonic() + 10
    while any(group_alive(g) for g in pgids) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [g for g in pgids if group_alive(g)], "process groups left behind"
    ports = [i["url"].rsplit(":", 1)[1] for i in b["instances"]]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    left = [ln for ln in ps.splitlines() if "vllm.entrypoints" in ln and any(f"--port {p}" in ln for p in ports)]
    assert not left, left


def run_cluster(tmp_path, run_id: str, backend: str, trace: str = TRACE, **options):
    opts = RunOptions(trace=trace, duration_s=None, rate_scale=1.0, backend=backend, backend_options=options,
                      results_dir=str(tmp_path), run_id=run_id, timeout_s=120, grace_s=5)
    res = run(opts)
    meta = json.loads((res.run_dir / "run.json").read_text())
    return res, meta, R.read_records(res.run_dir)


def check_split(meta, res, recs, connector: str, token_killed: bool = False):
    """Every request went through the router: prefill on prompt-0 (1 token each), decode on token-0."""
    b = meta["backend"]
    assert b["backend"] == "splitwise" and b["connector"] == connector and b["hardware"] == "cpu-host"
    inst = {i["id"]: i for i in b["instances"]}
    assert inst["prompt-0"]["role"] == "prompt" and inst["token-0"]["role"] == "token"
    if len(os.sched_getaffinity(0)) >= 2:
        assert inst["prompt-0"]["cpu_cores"] == [0] and inst["token-0"]["cpu_cores"] == [1]
    assert all(i["start_unix_s"] and i["start_s"] > 0 and i["model_dir"] for i in inst.values())
    assert (res.run_dir / "instances" / "prompt-0.log").stat().st_size > 0
    ok = [r for r in recs if r.ok]
    entries = phases(res.run_dir)
    good = [e for e in entries if e["status"] == "ok"]
    assert len(good) == len(ok)
    for e in good:
        assert e["flow"] == "split" and e["prompt_instance"] == "prompt-0" and e["token_instance"] == "token-0"
        t = e["t"]
        assert t["router_recv"] <= t["prefill_sent"] < t["prefill_done"] <= t["decode_sent"] < t["first_token"] <= t["done"]
    assert sorted(e["input_tokens"] for e in good) == sorted(r.planned_input_tokens for r in ok)
    m = json.loads((res.run_dir / "metrics" / "summary.json").read_text())
    p, d = m["prompt-0"]["counters"], m["token-0"]["counters"]
    prefilled = [e for e in entries if "prefill_done" in e["t"]]
    # the prompt instance ran each prompt once and produced exactly one token per request
    assert p["vllm:generation_tokens_total"] == len(prefilled)
    assert p["vllm:prompt_tokens_total"] == sum(e["input_tokens"] for e in prefilled)
    # the token instance generated all output tokens; the prompt KV came from the connector, not recomputed
    n_in = sum(r.planned_input_tokens for r in ok)
    n_out = sum(r.planned_output_tokens for r in ok)
    if token_killed:   # its last scrape predates the kill: counters are lower bounds
        assert 0 < d["vllm:generation_tokens_total"] <= n_out and 0 < d["vllm:prompt_tokens_total"] <= n_in
        n_in = d["vllm:prompt_tokens_total"]
    else:
        assert d["vllm:generation_tokens_total"] == n_out
        assert d["vllm:prompt_tokens_total"] == n_in
    # KV of whole blocks arrives through the connector; at most the last partial block (< 128 tokens, vLLM's
    # CPU block size) per request is computed locally
    external = d["vllm:prompt_tokens_by_source_total{source=external_kv_transfer}"]
    local = d["vllm:prompt_tokens_by_source_total{source=local_compute}"]
    served = d["vllm:request_success_total{finished_reason=length}"]
    # a killed token instance's last scrape can predate its first finished request: bound by what was sent to it
    admitted = served if not token_killed else max(served, sum(1 for e in entries if "decode_sent" in e["t"]))
    assert external + local == n_in and local < 128 * admitted and external > 0, d
    if not token_killed:
        assert served == len(ok)
    return m


class ThreadAffinity:
    """Samples every thread's allowed CPUs, by process group, while a run goes on (vLLM's threads start at
    different times: the NIXL worker sets its model thread's affinity only once the connector starts)."""

    def __init__(self):
        self.by_pgid: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    pgid = int(stat[stat.rfind(")") + 2:].split()[2])
                    for task in os.listdir(f"/proc/{pid}/task"):
                        status = Path(f"/proc/{pid}/task/{task}/status").read_text()
                        cpus = next(x.split()[1] for x in status.splitlines() if x.startswith("Cpus_allowed_list"))
                        self.by_pgid.setdefault(pgid, set()).add(cpus)
                except (OSError, StopIteration, IndexError, ValueError):
                    continue

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def nixl_run(tmp_path_factory):
    with ThreadAffinity() as affinity:
        res, meta, recs = run_cluster(tmp_path_factory.mktemp("nixl"), "nixl", "splitwise", connector="nixl")
    meta["_thread_cpus"] = {i["id"]: affinity.by_pgid.get(i["pid"], set()) for i in meta["backend"]["instances"]}
    return res, meta, recs


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return run_cluster(tmp_path_factory.mktemp("base"), "base", "vllm", instances=2)


@pytest.mark.timeout(300)
def test_splitwise_nixl_prefill_on_prompt_decode_on_token(nixl_run):
    res, meta, recs = nixl_run
    assert meta["status"] == "complete" and len(recs) == N_REQ
    assert all(r.ok for r in recs), [(r.status, r.error) for r in recs if not r.ok]
    for r in recs:
        assert r.actual_output_tokens == r.planned_output_tokens and r.actual_input_tokens == r.planned_input_tokens
    m = check_split(meta, res, recs, "nixl")
    assert meta["backend"]["instances"][0]["kv_transfer_config"]["kv_buffer_device"] == "cpu"
    # one NIXL read per request, on the token instance only
    assert m["token-0"]["nixl"]["vllm:nixl_xfer_time_seconds_count"] == N_REQ
    assert m["prompt-0"]["nixl"]["vllm:nixl_xfer_time_seconds_count"] == 0
    # unique prompts: the prompt instance's cache hit nothing, and the token instance reports the prompt
    # instance's count (vLLM 0.32: kv_transfer_params.remote_prefill_cached_tokens), not its transferred KV
    assert [r.cached_input_tokens for r in recs] == [0] * N_REQ
    server = json.loads((res.run_dir / "summary.json").read_text())["cache"]["server"]
    assert server["prompt-0"]["hits_tokens"] == 0 and server["token-0"]["external_hits_tokens"] > 0
    rows = [json.loads(x) for x in (res.run_dir / "metrics" / "token-0.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and all(r["ok"] for r in rows)
    assert meta["created_unix_s"] < rows[0]["t_unix_s"] < rows[-1]["t_unix_s"] < time.time()
    assert_nothing_left(meta)


@pytest.mark.timeout(300)
def test_every_thread_of_a_pinned_nixl_instance_stays_on_its_own_cores(nixl_run):
    """vLLM's CPU NIXL worker moves its model thread to the host's last core; splitbench's plugin keeps it on the
    instance's own cores, so a prompt instance on core 0 does not prefill on the token instance's core 1."""
    res, meta, recs = nixl_run
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: both instances share it")
    cpus = meta["_thread_cpus"]
    assert cpus["prompt-0"] == {"0"} and cpus["token-0"] == {"1"}, cpus


@pytest.mark.timeout(300)
def test_splitwise_example_connector_then_token_instance_killed(tmp_path):
    """KV through files in run_dir/kv-shared; token-0 is SIGKILLed after 3 decodes: the rest fail, the run ends."""
    n = 10
    trace = f"synth:arrivals=poisson,rate=1,count={n},lengths=uniform,input=300-2500,output=4-24,seed=4"
    killed: dict = {}

    def killer():
        from splitbench.servers.scrape import snapshot
        run_dir = tmp_path / "example"
        end = time.monotonic() + 240
        while time.monotonic() < end and "pgid" not in killed:
            try:
                b = json.loads((run_dir / "run.json").read_text()).get("backend") or {}
                tok = next(i for i in b.get("instances", []) if i["id"] == "token-0")
                done = snapshot(tok["url"])["counters"].get("vllm:request_success_total{finished_reason=length}", 0)
                if done >= 3:
                    os.killpg(tok["pid"], signal.SIGKILL)
                    killed.update(pgid=tok["pid"], at=time.time())
            except (OSError, ValueError, StopIteration, KeyError):
                pass
            time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    t0 = time.monotonic()
    res, meta, recs = run_cluster(tmp_path, "example", "splitwise", trace=trace, connector="example")
    th.join(5)
    assert "pgid" in killed, "the token instance was never killed"
    assert meta["status"] == "complete" and time.monotonic() - t0 < 240
    assert len(recs) == n
    ok, bad = [r for r in recs if r.ok], [r for r in recs if not r.ok]
    assert len(ok) >= 3 and bad, [(r.status, r.error) for r in recs]
    assert all(r.error for r in bad)                 # failures are recorded with a reason
    assert all(r.actual_output_tokens == r.planned_output_tokens for r in ok)
    check_split(meta, res, recs, "example", token_killed=True)
    assert meta["backend"]["instances"][1]["kv_transfer_config"]["kv_connector_extra_config"] == \
        {"shared_storage_path": str(res.run_dir / "kv-shared")}
    assert any((res.run_dir / "kv-shared").rglob("*.safetensors")), "no KV files in the shared directory"
    failed = [e for e in phases(res.run_dir) if e["status"] != "ok"]
    assert len(failed) == len(bad)
    dead_rows = [json.loads(x) for x in (res.run_dir / "metrics" / "token-0.jsonl").read_text().splitlines()]
    assert not dead_rows[-1]["ok"]                   # the scraper saw it die and kept going
    assert_nothing_left(meta)


@pytest.mark.timeout(300)
def test_vllm_baseline_two_instances_behind_jsq(base_run):
    res, meta, recs = base_run
    assert meta["status"] == "complete" and all(r.ok for r in recs) and len(recs) == N_REQ
    b = meta["backend"]
    assert b["backend"] == "vllm" and b["policy"] == "jsq" and b["connector"] is None
    assert [i["role"] for i in b["instances"]] == ["baseline", "baseline"]
    assert all(i["kv_transfer_config"] is None for i in b["instances"])
    entries = phases(res.run_dir)
    assert {e["flow"] for e in entries} == {"colocated"} and len(entries) == N_REQ
    used = {e["instance"] for e in entries}
    m = json.loads((res.run_dir / "metrics" / "summary.json").read_text())
    gen = {i: m[i]["counters"]["vllm:generation_tokens_total"] for i in ("baseline-0", "baseline-1")}
    assert sum(gen.values()) == sum(r.planned_output_tokens for r in recs)
    assert {i for i, g in gen.items() if g > 0} == used
    assert [r.cached_input_tokens for r in recs] == [0] * N_REQ   # unique prompts share no block
    server = json.loads((res.run_dir / "summary.json").read_text())["cache"]["server"]
    assert sum(d["queries_tokens"] for d in server.values()) == sum(r.actual_input_tokens for r in recs)
    assert_nothing_left(meta)


@pytest.mark.timeout(300)
def test_compare_baseline_and_splitwise_per_pool_cost_energy_and_html(base_run, nixl_run, tmp_path):
    """Acceptance of the cost/power issue: `splitbench compare` over a baseline and a splitwise run prints per-pool
    cost and (estimated) energy and writes an HTML report that headless Chromium renders, TTFT breakdown included."""
    from browser_check import check_rendered, launch
    from playwright.sync_api import sync_playwright
    base, split = base_run[0].run_dir, nixl_run[0].run_dir
    html, js = tmp_path / "cmp.html", tmp_path / "cmp.json"
    out = subprocess.run([sys.executable, "-m", "splitbench.cli", "compare", str(base), str(split),
                          "--html", str(html), "--json", str(js)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    for line in ("baseline cost of window", "prompt cost of window", "token cost of window",
                 "prompt energy", "token energy", "iso-cost output tok/s", "energy ESTIMATED"):
        assert line in out.stdout, line
    comp = json.loads(js.read_text())
    e_base, e_split = (r["summary"]["efficiency"] for r in comp["runs"])
    # both clusters hold the same 2-core host: one core per instance -> half a cpu-host each, nothing idle
    assert e_base["pools"]["baseline"]["machines"] == pytest.approx(1.0)
    assert e_split["pools"]["prompt"]["machines"] == pytest.approx(0.5) == e_split["pools"]["token"]["machines"]
    for e in (e_base, e_split):
        t = e["pools"]["total"]
        assert e["estimated"] and t["energy_estimated"]
        assert t["cost_usd"] == pytest.approx(0.1 * e["window_s"] / 3600)   # cpu-host: $0.1/h x 1 machine
        assert t["energy_j"] == pytest.approx(100 * e["window_s"])           # 100 W provisioned x window
    split_recs = nixl_run[2]
    assert e_split["pools"]["prompt"]["input_tokens"] == sum(r.actual_input_tokens for r in split_recs if r.ok)
    assert e_split["pools"]["token"]["output_tokens"] == sum(r.actual_output_tokens for r in split_recs if r.ok)
    with sync_playwright() as pw:
        browser = launch(pw)
        try:
            seen = check_rendered(browser, html, labels=[base.name, split.name],
                                  figures={"plot-latency-cdf": 20, "plot-efficiency": 10, "plot-timeline": 20,
                                           "plot-ttft-breakdown": 10}, shot=tmp_path / "cmp.png")
        finally:
            browser.close()
    assert "estimated" in seen["text"]
