"""Cost/energy efficiency: machine-share allocation, per-pool cost and energy, iso views, compare CLI.

Every expected figure below is computed by hand from the catalog numbers in the comments, not from the code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from splitbench.errors import InputError
from splitbench.hardware.catalog import load_catalog, plan_allocation
from splitbench.metrics.compare import build_comparison, iso_views
from splitbench.metrics.efficiency import efficiency_section
from splitbench.metrics.slo import parse_slos
from splitbench.schema.records import RequestRecord, placement

CAT = load_catalog()


def rec(i, *, where=None, n_in=100, n_out=10, send=0.0, end=36.0, status="ok", ttft=0.5):
    return RequestRecord(request_id=f"r{i}", trace_index=i, intended_send_s=send, planned_input_tokens=n_in,
                         planned_output_tokens=n_out, actual_send_s=send, first_token_s=send + ttft,
                         last_token_s=end, end_s=end, chunk_offsets_s=[ttft], chunk_tokens=[n_out],
                         actual_input_tokens=n_in, actual_output_tokens=n_out, status=status, **(where or {}))


# ----------------------------------------------------------------------------- allocation

def test_cpu_instances_share_the_host_by_cores():
    hw = plan_allocation([{"id": "prompt-0", "pool": "prompt", "cpu_cores": [0]},
                          {"id": "token-0", "pool": "token", "cpu_cores": [1]}], catalog=CAT, host_cpus=2)
    assert hw["machine"] == "cpu-host" and hw["unit"] == "core"
    assert [a["machines"] for a in hw["allocations"]] == [0.5, 0.5]
    assert hw["unallocated_machines"] == 0


def test_gpu_instances_hold_gpu_shares_and_the_rest_is_unallocated():
    inst = [{"id": "p", "pool": "prompt", "gpu_ids": [0, 1]}, {"id": "t", "pool": "token", "gpu_ids": [2, 3]}]
    hw = plan_allocation(inst, catalog=CAT, machine="dgx-h100")
    assert [a["machines"] for a in hw["allocations"]] == [0.25, 0.25]  # 2 of 8 GPUs each
    assert hw["unallocated_machines"] == pytest.approx(0.5)
    # Splitwiser layout: prompt and token instance share GPU 0 -> half a GPU each = 1/16 machine
    hw = plan_allocation([{"id": "p", "pool": "prompt", "gpu_ids": [0]}, {"id": "t", "pool": "token", "gpu_ids": [0]}],
                         catalog=CAT, machine="dgx-a100")
    assert [a["machines"] for a in hw["allocations"]] == [1 / 16, 1 / 16]
    # detected machine type is used when none is given; no type at all is an error for GPUs
    assert plan_allocation(inst, catalog=CAT, detected_machine="dgx-a100")["machine"] == "dgx-a100"
    with pytest.raises(InputError, match="--machine"):
        plan_allocation(inst, catalog=CAT)
    with pytest.raises(InputError, match="no accelerators"):
        plan_allocation(inst, catalog=CAT, machine="cpu-host")


def test_remote_url_needs_a_machine_and_over_allocation_is_refused():
    remote = [{"id": "remote", "pool": "remote"}]
    assert plan_allocation(remote, catalog=CAT) is None
    hw = plan_allocation(remote, catalog=CAT, machine="dgx-a100", machines=3)
    assert hw["allocations"][0]["machines"] == 3 and hw["unallocated_machines"] == 0
    with pytest.raises(InputError, match="unknown machine type"):
        plan_allocation(remote, catalog=CAT, machine="dgx-z9")
    with pytest.raises(InputError, match="only 0.5"):
        plan_allocation([{"id": "p", "pool": "prompt", "gpu_ids": list(range(8))}], catalog=CAT,
                        machine="dgx-h100", machines=0.5)


# ----------------------------------------------------------------------------- efficiency

def split_meta():
    # DGX-H100: $38/h, 10,200 W provisioned. prompt holds 4 GPUs (0.5 machine), token 2 GPUs (0.25), 0.25 idle.
    inst = [{"id": "prompt-0", "pool": "prompt", "gpu_ids": [0, 1, 2, 3]},
            {"id": "token-0", "pool": "token", "gpu_ids": [4, 5]}]
    return {"hardware": plan_allocation(inst, catalog=CAT, machine="dgx-h100")}


def split_records():
    split = placement("prompt-0", "prompt", "token-0", "token")
    return [rec(0, where=split, n_in=100, n_out=10),           # window 0..36 s
            rec(1, where=split, n_in=300, n_out=30, send=6.0, end=20.0, ttft=3.0),
            rec(2, where=split, n_in=999, n_out=99, status="http_error")]


def test_per_pool_cost_and_estimated_energy_by_hand():
    eff = efficiency_section(split_records(), split_meta())
    assert eff["window_s"] == pytest.approx(36.0) and eff["estimated"] and eff["energy_method"] == "estimated-provisioned"
    p, t, idle, tot = (eff["pools"][k] for k in ("prompt", "token", "unallocated", "total"))
    # cost = $/h x machines x 36 s / 3600 s
    assert p["cost_usd"] == pytest.approx(38 * 0.5 * 0.01)      # $0.19
    assert t["cost_usd"] == pytest.approx(38 * 0.25 * 0.01)     # $0.095
    assert idle["cost_usd"] == pytest.approx(38 * 0.25 * 0.01)  # idle capacity is paid for
    assert tot["cost_usd"] == pytest.approx(0.38)
    # the prompt pool prefilled 100 + 300 input tokens, the token pool generated 10 + 30 (failed request excluded)
    assert (p["input_tokens"], p["output_tokens"], t["input_tokens"], t["output_tokens"]) == (400, 0, 0, 40)
    assert p["input_tokens_per_usd"] == pytest.approx(400 / 0.19)
    assert t["output_tokens_per_usd"] == pytest.approx(40 / 0.095)
    assert tot["usd_per_million_tokens"] == pytest.approx(0.38 / 440 * 1e6)
    # estimated energy = 10,200 W x machines x 36 s
    assert p["energy_j"] == pytest.approx(10200 * 0.5 * 36) and p["energy_estimated"]
    assert tot["energy_j"] == pytest.approx(10200 * 36) and tot["avg_power_w"] == pytest.approx(10200)
    assert tot["tokens_per_j"] == pytest.approx(440 / (10200 * 36))
    assert tot["output_tokens_per_s_per_provisioned_kw"] == pytest.approx((40 / 36) / 10.2)


def test_measured_energy_replaces_the_estimate_and_goodput_per_dollar():
    measured = {"method": "measured-nvml", "pools": {"prompt": 1000.0, "token": 500.0, "unallocated": 100.0},
                "total_energy_j": 1600.0, "coverage": 1.0, "note": "MEASURED"}
    slos = parse_slos("ttft_p99=1s")  # request 0 (TTFT 0.5 s) is good, request 1 (3 s) is not
    eff = efficiency_section(split_records(), split_meta(), slos=slos, measured_energy=measured)
    assert not eff["estimated"] and eff["energy_method"] == "measured-nvml"
    assert eff["pools"]["prompt"]["energy_j"] == 1000.0 and not eff["pools"]["prompt"]["energy_estimated"]
    assert eff["pools"]["total"]["tokens_per_j"] == pytest.approx(440 / 1600)
    assert eff["pools"]["total"]["avg_power_w"] == pytest.approx(1600 / 36)
    assert eff["pools"]["total"]["good_requests"] == 1
    assert eff["pools"]["total"]["good_requests_per_usd"] == pytest.approx(1 / 0.38)
    assert eff["pools"]["prompt"]["good_requests_per_usd"] == pytest.approx(1 / 0.19)


def test_colocated_records_without_instance_go_to_the_only_pool():
    hw = plan_allocation([{"id": "stub", "pool": "baseline", "cpu_cores": [1]}], catalog=CAT, host_cpus=4)
    eff = efficiency_section([rec(0, n_in=50, n_out=5, end=3600.0)], {"hardware": hw})
    b = eff["pools"]["baseline"]
    assert (b["input_tokens"], b["output_tokens"]) == (50, 5)
    assert b["cost_usd"] == pytest.approx(0.1 / 4)                  # cpu-host $0.1/h, 1 of 4 cores, 1 h
    assert eff["pools"]["unallocated"]["cost_usd"] == pytest.approx(0.1 * 3 / 4)
    assert eff["cost_estimated"]                                      # cpu-host figures are catalog estimates
    assert efficiency_section([rec(0)], {}) is None                   # no hardware: no efficiency


def test_iso_cost_and_iso_power_scale_to_the_first_run():
    def summ(tok_s, usd_h, watts):
        return {"throughput": {"output_tokens_per_s": tok_s},
                "efficiency": {"estimated": True, "cost_estimated": False,
                               "pools": {"total": {"usd_per_hour": usd_h, "provisioned_power_w": watts,
                                                   "avg_power_w": watts}}}}
    rows = {r["metric"]: r for r in iso_views([summ(100, 10, 1000), summ(150, 20, 500)])}
    assert rows["iso_usd_per_hour"]["values"] == [100, pytest.approx(75)]        # 150 x 10 / 20
    assert rows["iso_provisioned_power_w"]["values"] == [100, pytest.approx(300)]  # 150 x 1000 / 500
    assert rows["iso_usd_per_hour"]["ratios"][1] == pytest.approx(0.75)
    comp = build_comparison([{"label": "a", "summary": summ(100, 10, 1000)},
                             {"label": "b", "summary": summ(150, 20, 500)}])
    assert comp["kind"] == "splitbench.compare" and [r["label"] for r in comp["runs"]] == ["a", "b"]


# ----------------------------------------------------------------------------- real runs through the CLI

def _stub_run(results, run_id, ttft_ms):
    cmd = [sys.executable, "-m", "splitbench.cli", "run", "--backend", "stub", "--trace",
           "synth:arrivals=poisson,rate=40,count=80,seed=3", "--results", str(results), "--run-id", run_id,
           "--stub-ttft-ms", str(ttft_ms), "--slo", "ttft_p99=250ms"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return results / run_id


def test_compare_cli_on_two_real_stub_runs(tmp_path):
    # the slow stub's TTFT (300 ms) is a floor above the SLO (250 ms); the fast one's 10 ms leaves a busy host 240 ms
    a, b = _stub_run(tmp_path, "fast", 10), _stub_run(tmp_path, "slow", 300)
    out = subprocess.run([sys.executable, "-m", "splitbench.cli", "compare", str(a), str(b), "--no-html",
                          "--json", str(tmp_path / "cmp.json")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "160"})
    assert out.returncode == 0, out.stderr
    assert "baseline cost of window" in out.stdout and "total energy" in out.stdout
    assert "energy ESTIMATED" in out.stdout
    comp = json.loads((tmp_path / "cmp.json").read_text())
    rows = {r["metric"]: r for r in comp["rows"]}
    fast, slow = rows["ttft_p50_s"]["values"]
    assert 0.010 <= fast < 0.300 <= slow       # the stubs' configured TTFTs (10 and 300 ms) are floors
    assert rows["slo_ttft_p99_met"]["values"] == ["met", "MISSED"]
    # same hardware share and the same trace: per-$ figures differ only by the window length
    assert rows["total_usd_per_hour"]["values"] == [pytest.approx(0.1)] * 2
    assert all(rows["total_energy_j"]["estimated"])
    bad = subprocess.run([sys.executable, "-m", "splitbench.cli", "compare", str(tmp_path / "nope"), "--no-html"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_run_with_nvml_power_measures_energy_instead_of_estimating(tmp_path, monkeypatch):
    """The whole runner path with the fake NVML (2 GPUs at 300 W and 100 W, one without an energy counter):
    samples land in the run dir and the summary's energy is measured, ~400 W x the throughput window."""
    from pathlib import Path

    from splitbench.app.options import RunOptions
    from splitbench.app.runner import run
    fake = Path(__file__).resolve().parent / "fake_nvml"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_NVML_GPUS", "H100:300,H100:100:noenergy")
    monkeypatch.setenv("SPLITBENCH_NVML_MODULE", "pynvml_fake")
    res = run(RunOptions(trace="synth:arrivals=poisson,rate=40,count=60,seed=4", backend="stub", power="nvml",
                         results_dir=str(tmp_path), run_id="nvml"))
    assert (res.run_dir / "power" / "power_samples.jsonl").stat().st_size > 0
    eff = res.summary["efficiency"]
    assert eff["energy_method"] == "measured-nvml" and not eff["estimated"]
    w = eff["window_s"]
    tot = eff["pools"]["total"]
    assert tot["energy_j"] == pytest.approx(400 * w, rel=0.01) and not tot["energy_estimated"]
    # the stub holds no GPU: all measured GPU energy is idle capacity
    assert eff["pools"]["unallocated"]["energy_j"] == pytest.approx(400 * w, rel=0.01)
    assert eff["pools"]["baseline"]["energy_j"] == 0
    assert json.loads((res.run_dir / "run.json").read_text())["power"]["summary"]["gpus"]["0"]["method"] == "counter"
