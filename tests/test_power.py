"""GPU power sampling: the real sampler subprocess against a fake NVML module, and the pure energy functions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splitbench.hardware import power as P
from splitbench.errors import InputError

FAKE_DIR = Path(__file__).resolve().parent / "fake_nvml"


def _env(gpus: str) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(FAKE_DIR), os.environ.get("PYTHONPATH", "")]), "FAKE_NVML_GPUS": gpus}


def _gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return False
    except ProcessLookupError:
        return True


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    """One real sampler run: 3 fake GPUs (300 W with counter, 150 W without, 50 W with counter) for ~2.4 s at 20 Hz."""
    out = tmp_path_factory.mktemp("power")
    s = P.PowerSamplerProcess(out, interval_s=0.05, nvml_module="pynvml_fake",
                              env=_env("H100:300,H100:150:noenergy,H100:50"))
    s.start(timeout_s=20)
    pgid = s.proc.pid
    time.sleep(2.4)
    summary = s.stop()
    return {"sampler": s, "summary": summary, "pgid": pgid, "out": out,
            "data": P.load_power_samples(out / P.SAMPLES_FILE)}


def test_header_and_rate(sampled):
    h = sampled["data"]["header"]
    assert h["kind"] == "header" and h["interval_s"] == 0.05 and h["nvml_module"] == "pynvml_fake"
    assert h["driver"] == "555.55.fake"
    assert [g["index"] for g in h["gpus"]] == [0, 1, 2]
    assert [g["energy_counter"] for g in h["gpus"]] == [True, False, True]
    assert h["gpus"][0]["name"] == "NVIDIA H100 (fake)" and h["gpus"][0]["power_limit_w"] == 700.0
    assert h["gpus"][2]["uuid"] == "GPU-fake-00000002"
    samples = sampled["data"]["samples"]
    assert samples[1]["energy_j"] is None and samples[0]["energy_j"] is not None
    assert np.all(samples[0]["power_w"] == 300.0) and np.all(samples[1]["power_w"] == 150.0)  # mW -> W
    for g in (0, 1, 2):
        t = samples[g]["t_unix_s"]
        assert t.size >= 30 and np.all(np.diff(t) > 0)
        assert t.size / (t[-1] - t[0]) >= 10.0          # the requirement: >= 10 Hz per GPU
    summ = sampled["summary"]
    for g in ("0", "1", "2"):
        assert summ["gpus"][g]["rate_hz"] >= 10.0
        assert summ["gpus"][g]["samples"] == samples[int(g)]["t_unix_s"].size
    assert summ["gpus"]["0"]["method"] == "counter" and summ["gpus"]["1"]["method"] == "integrated"


def test_absolute_schedule_no_drift(tmp_path):
    """Each power read takes 20 ms: on the absolute schedule ticks still come every 50 ms (20 Hz); a
    sleep(interval) loop would tick every 70 ms (14 Hz)."""
    s = P.PowerSamplerProcess(tmp_path, interval_s=0.05, nvml_module="pynvml_fake",
                              env={**_env("H100:300"), "FAKE_NVML_READ_DELAY_S": "0.02"})
    s.start()
    time.sleep(1.5)
    summary = s.stop()
    assert summary["gpus"]["0"]["samples"] >= 25
    assert 18.0 <= summary["gpus"]["0"]["rate_hz"] <= 21.5   # 18: room for a skipped tick on a busy box


def test_energy_matches_hand_computed(sampled):
    # 2.0 s window inside the samples: 300 W -> 600 J, 150 W -> 300 J, 50 W -> 100 J.
    # Tolerance 0.5 %: power is constant, so linear interpolation of the counter and the trapezoid are exact; the
    # only error is the gap between a sample's time.time() stamp and the fake's time.monotonic() counter read
    # (microseconds, up to a scheduler preemption of a few ms on a busy 2-core box: 300 W x 5 ms = 1.5 J = 0.25 %).
    t0 = sampled["data"]["samples"][0]["t_unix_s"][0] + 0.13
    e = P.energy_by_gpu(sampled["data"], t0, t0 + 2.0)
    assert e[0]["method"] == "counter" and e[1]["method"] == "integrated" and e[2]["method"] == "counter"
    for g, watts in ((0, 300.0), (1, 150.0), (2, 50.0)):
        assert e[g]["energy_j"] == pytest.approx(2.0 * watts, rel=5e-3)
        assert e[g]["avg_power_w"] == pytest.approx(watts, rel=5e-3)
        assert e[g]["coverage"] == 1.0 and e[g]["extrapolated_s"] == 0.0
        assert 38 <= e[g]["samples"] <= 41 and e[g]["rate_hz"] >= 10.0
    # the counter really is used for GPU 0: the same window integrated from power_w agrees
    integ = P.energy_by_gpu({0: {**sampled["data"]["samples"][0], "energy_j": None}}, t0, t0 + 2.0)
    assert integ[0]["method"] == "integrated" and integ[0]["energy_j"] == pytest.approx(600.0, rel=1e-9)
    # whole life in the summary: counter delta = P x span
    g0 = sampled["summary"]["gpus"]["0"]
    assert g0["energy_j"] == pytest.approx(300.0 * g0["span_s"], rel=5e-3)
    assert sampled["summary"]["total_energy_j"] == pytest.approx(
        sum(v["energy_j"] for v in sampled["summary"]["gpus"].values()))


def test_window_past_samples_reports_coverage(sampled):
    t_last = max(s["t_unix_s"][-1] for s in sampled["data"]["samples"].values())
    e = P.energy_by_gpu(sampled["data"], t_last - 1.0, t_last + 1.0)
    for g, watts in ((0, 300.0), (1, 150.0)):
        assert e[g]["coverage"] == pytest.approx(0.5, abs=0.01)
        assert e[g]["extrapolated_s"] == pytest.approx(1.0, abs=0.02)
        assert e[g]["energy_j"] == pytest.approx(2.0 * watts, rel=5e-3)   # extrapolated at the last sample's power


def test_attribution_of_sampled_gpus(sampled):
    t0 = sampled["data"]["samples"][0]["t_unix_s"][0] + 0.1
    per = P.energy_by_gpu(sampled["data"], t0, t0 + 2.0)
    att = P.attribute_energy(per, [{"id": "prompt-0", "pool": "prompt", "gpu_ids": [0]},
                                   {"id": "token-0", "pool": "token", "gpu_ids": [1]}])
    assert att["instances"]["prompt-0"]["energy_j"] == pytest.approx(600.0, rel=5e-3)
    assert att["instances"]["token-0"]["energy_j"] == pytest.approx(300.0, rel=5e-3)
    assert att["pools"]["prompt"]["gpus"] == [0] and att["pools"]["token"]["gpus"] == [1]
    assert att["unattributed"] == {"energy_j": pytest.approx(100.0, rel=5e-3), "gpus": [2]}
    assert att["total_energy_j"] == pytest.approx(1000.0, rel=5e-3)


def test_stop_idempotent_and_no_process_left(sampled):
    s = sampled["sampler"]
    assert _gone(sampled["pgid"])
    assert s.proc is None and s.stop() == sampled["summary"] and s.stop() is s.stop()
    on_disk = json.loads((sampled["out"] / P.SUMMARY_FILE).read_text())
    assert on_disk == sampled["summary"]
    d = s.describe()
    assert d["samples_path"] == str(sampled["out"] / P.SAMPLES_FILE) and d["interval_s"] == 0.05 and d["gpus"] is None


def test_gpu_subset_and_sigint(tmp_path):
    s = P.PowerSamplerProcess(tmp_path, gpus=[2, 0], nvml_module="pynvml_fake", env=_env("H100:1,H100:2,H100:3"))
    s.start()
    os.killpg(s.proc.pid, 2)   # SIGINT (Ctrl-C in a terminal) also ends it cleanly with a summary
    s.proc.wait(10)
    s.proc = None
    summary = s.stop()
    assert sorted(summary["gpus"]) == ["0", "2"]
    data = P.load_power_samples(tmp_path / P.SAMPLES_FILE)
    assert [g["index"] for g in data["header"]["gpus"]] == [2, 0] and sorted(data["samples"]) == [0, 2]
    assert np.all(data["samples"][2]["power_w"] == 3.0)


def test_nvml_missing(tmp_path):
    assert P.detect_gpus("no_such_nvml_module") == []
    r = subprocess.run([sys.executable, "-m", "splitbench.hardware.power", "--out", str(tmp_path),
                        "--nvml-module", "no_such_nvml_module"], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "no_such_nvml_module" in r.stderr and "nvidia-ml-py" in r.stderr
    s = P.PowerSamplerProcess(tmp_path / "x", nvml_module="pynvml_fake",
                              env={**_env("H100:300"), "FAKE_NVML_INIT_ERROR": "1"})
    with pytest.raises(RuntimeError, match="nvmlInit.*Library Not Found"):
        s.start()
    assert s.stop() == {}


def test_bad_gpu_index_is_one_line(tmp_path):
    env = {**os.environ, **_env("H100:300")}
    r = subprocess.run([sys.executable, "-m", "splitbench.hardware.power", "--out", str(tmp_path), "--nvml-module",
                        "pynvml_fake", "--gpus", "0,3"], check=False, capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2 and r.stderr.strip() == "power sampler: --gpus 0,3: this host has 1 GPU(s) (0..0)"


def test_detect_gpus_and_machine_type(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    monkeypatch.setenv("FAKE_NVML_GPUS", "H200:500,H200:100")
    gpus = P.detect_gpus("pynvml_fake")
    assert gpus == [{"index": 0, "name": "NVIDIA H200 (fake)", "memory_total_bytes": 141 * 2**30},
                    {"index": 1, "name": "NVIDIA H200 (fake)", "memory_total_bytes": 141 * 2**30}]
    assert P.machine_type_for_gpus(gpus) == "dgx-h200"
    monkeypatch.setenv("FAKE_NVML_INIT_ERROR", "1")
    assert P.detect_gpus("pynvml_fake") == []
    a100 = {"name": "NVIDIA A100-SXM4-80GB", "memory_total_bytes": 80 * 2**30}
    assert P.machine_type_for_gpus([a100]) == "dgx-a100"
    assert P.machine_type_for_gpus([{"name": "NVIDIA A100-SXM4-40GB", "memory_total_bytes": 40 * 2**30}]) is None
    assert P.machine_type_for_gpus([{"name": "NVIDIA H100 80GB HBM3"}] * 8) == "dgx-h100"
    assert P.machine_type_for_gpus([{"name": "NVIDIA GH200 480GB"}]) is None
    assert P.machine_type_for_gpus([a100, {"name": "NVIDIA H100 80GB HBM3"}]) is None
    assert P.machine_type_for_gpus([]) is None


# ---- pure functions on hand-built samples ----

def _ramp() -> dict:
    """GPU 0: power ramps 100 -> 300 W over t = 10..12 s (samples every 0.5 s), no counter."""
    t = np.arange(10.0, 12.01, 0.5)
    return {0: {"t_unix_s": t, "power_w": 100.0 + 100.0 * (t - 10.0), "energy_j": None}}


def test_integrated_ramp_partial_window():
    # window [10.25, 11.75]: power 125 -> 275 W linearly, so energy = 1.5 s x mean 200 W = 300 J exactly
    e = P.energy_by_gpu(_ramp(), 10.25, 11.75)[0]
    assert e["method"] == "integrated" and e["energy_j"] == pytest.approx(300.0)
    assert e["avg_power_w"] == pytest.approx(200.0) and e["samples"] == 3 and e["rate_hz"] == pytest.approx(2.0)
    assert e["coverage"] == 1.0


def test_integrated_extrapolation_before_and_after():
    # [9, 13]: 1 s before the first sample at 100 W, 2 s ramp (400 J), 1 s after at 300 W -> 800 J, coverage 0.5
    e = P.energy_by_gpu(_ramp(), 9.0, 13.0)[0]
    assert e["energy_j"] == pytest.approx(100.0 + 400.0 + 300.0)
    assert e["coverage"] == pytest.approx(0.5) and e["extrapolated_s"] == pytest.approx(2.0)
    none = P.energy_by_gpu(_ramp(), 20.0, 21.0)[0]   # entirely after the samples
    assert none["coverage"] == 0.0 and none["energy_j"] == pytest.approx(300.0) and none["samples"] == 0


def test_counter_preferred_and_interpolated():
    # counter says 1000 J/s, power_w (a laggy average) says 10 W: the counter must win
    t = np.array([0.0, 1.0, 2.0, 3.0])
    s = {5: {"t_unix_s": t, "power_w": np.full(4, 10.0), "energy_j": 5000.0 + 1000.0 * t}}
    e = P.energy_by_gpu(s, 0.5, 2.25)[5]
    assert e["method"] == "counter" and e["energy_j"] == pytest.approx(1750.0)
    past = P.energy_by_gpu(s, 2.0, 4.0)[5]   # 1 s counted + 1 s extrapolated at the last sample's power (10 W)
    assert past["energy_j"] == pytest.approx(1010.0) and past["coverage"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        P.energy_by_gpu(s, 2.0, 1.0)


def test_shared_gpu_split_equally():
    per = {0: {"energy_j": 900.0}, 1: {"energy_j": 300.0}, 2: {"energy_j": 60.0}}
    inst = [{"id": "p0", "pool": "prompt", "gpu_ids": [0]},
            {"id": "t0", "pool": "token", "gpu_ids": [0, 1]},    # Splitwiser: shares GPU 0 with p0
            {"id": "t1", "pool": "token", "gpu_ids": [1, 7]}]    # GPU 7 was not sampled
    a = P.attribute_energy(per, inst)
    assert a["instances"]["p0"]["energy_j"] == pytest.approx(450.0)
    assert a["instances"]["t0"]["energy_j"] == pytest.approx(450.0 + 150.0)
    assert a["instances"]["t1"] == {"energy_j": pytest.approx(150.0), "gpus": [1, 7], "unsampled_gpus": [7]}
    assert a["pools"]["prompt"] == {"energy_j": pytest.approx(450.0), "gpus": [0]}
    assert a["pools"]["token"] == {"energy_j": pytest.approx(750.0), "gpus": [0, 1]}
    assert a["unattributed"] == {"energy_j": 60.0, "gpus": [2]}
    assert a["total_energy_j"] == pytest.approx(1260.0)
    assert sum(v["energy_j"] for v in a["pools"].values()) + a["unattributed"]["energy_j"] == \
        pytest.approx(a["total_energy_j"])


def test_loader_torn_line_and_bad_lines(tmp_path):
    hdr = {"kind": "header", "unix_s": 0, "interval_s": 0.1, "nvml_module": "x", "driver": "d",
           "gpus": [{"index": 0, "name": "n", "uuid": "u", "power_limit_w": None, "energy_counter": True}]}
    rows = [{"t_unix_s": 1.0 + 0.1 * i, "gpu": 0, "power_w": 100.0, "energy_j": 10.0 * i} for i in range(3)]
    text = "\n".join(json.dumps(x) for x in [hdr, *rows]) + "\n"
    p = tmp_path / "s.jsonl"
    p.write_text(text + '{"t_unix_s": 1.3, "gpu": 0, "pow')
    d = P.load_power_samples(p)
    assert d["header"]["driver"] == "d"
    np.testing.assert_allclose(d["samples"][0]["t_unix_s"], [1.0, 1.1, 1.2])
    np.testing.assert_allclose(d["samples"][0]["energy_j"], [0.0, 10.0, 20.0])
    p.write_text(text.replace('"power_w": 100.0', '"power_w": "x"', 1) + json.dumps(rows[0]) + "\n")
    with pytest.raises(InputError, match=r"s\.jsonl:2: bad power sample"):
        P.load_power_samples(p)
    p.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    with pytest.raises(InputError, match=r"s\.jsonl:1: first line is not the sampler header"):
        P.load_power_samples(p)
