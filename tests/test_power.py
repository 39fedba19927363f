"""GPU power sampling: the real sampler subprocess against a fake NVML module, and the pure energy functions.

No wall-clock thresholds: sample counts are checked against the sampler's own schedule (tick k at t0 + k x interval,
missed ticks counted as skipped) and the elapsed time it measured; energy tolerances come from the clock jitter
visible in the same samples, so a busy or slow host passes as an idle one does."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splitbench.errors import InputError, ServerStartError
from splitbench.hardware import energy as E
from splitbench.hardware import power as P

FAKE_DIR = Path(__file__).resolve().parent / "fake_nvml"


def _env(gpus: str) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(FAKE_DIR), os.environ.get("PYTHONPATH", "")]), "FAKE_NVML_GPUS": gpus}


def _check_schedule(t: np.ndarray, skipped: int, interval_s: float, header_unix_s: float) -> None:
    """The absolute schedule, whatever the host's speed: the n samples of one GPU are ticks 0 .. n-1+skipped.
    Catching up: after the second-to-last sample the next tick is scheduled at or after that moment, so
    (n-1+skipped) x interval >= t[-2] - t[0] (a sleep(interval) loop with slow reads falls behind and fails this).
    Never early: sample j (all but the last, which SIGTERM triggers) comes at or after its tick j' >= j."""
    n, slack = t.size, 0.005   # slack: time.time() (the stamps) vs time.monotonic() (the schedule)
    assert n >= 3 and np.all(np.diff(t) > 0)
    assert (n - 1 + skipped) * interval_s >= t[-2] - t[0] - slack
    assert (n - 2) * interval_s <= t[-2] - header_unix_s + slack


def _counter_jitter_s(s: dict, watts: float) -> float:
    """Spread of (counter / power - stamp) over the samples of a constant-power GPU: how far the fake's counter
    read lags the sample's time stamp at most (a preemption between the two on a busy host); 0 without counter."""
    if s["energy_j"] is None:
        return 0.0
    d = s["energy_j"] / watts - s["t_unix_s"]
    return float(d.max() - d.min())


def _tol_j(data: dict, g: int, watts: float) -> float:
    """Energy tolerance of GPU g at constant power: its counter's jitter x power, plus the mJ resolution."""
    return watts * _counter_jitter_s(data["samples"][g], watts) + 0.01


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
    s.start(timeout_s=120)   # a generous wait for the subprocess to start, not a speed figure
    pgid = s.proc.pid
    time.sleep(2.4)
    summary = s.stop()
    return {"sampler": s, "summary": summary, "pgid": pgid, "out": out,
            "data": E.load_power_samples(out / P.SAMPLES_FILE)}


WATTS = {0: 300.0, 1: 150.0, 2: 50.0}


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
    summ = sampled["summary"]
    assert h["interval_s"] <= 0.1                       # the requirement: >= 10 Hz per GPU, as scheduled
    for g in (0, 1, 2):
        t = samples[g]["t_unix_s"]
        _check_schedule(t, summ["skipped_ticks"], h["interval_s"], h["unix_s"])
        # taken, not skipped: at least a quarter of the ticks of the elapsed time (an idle host takes all)
        assert t.size >= (t[-1] - t[0]) / h["interval_s"] / 4
        gs = summ["gpus"][str(g)]
        assert gs["samples"] == t.size and gs["span_s"] == pytest.approx(t[-1] - t[0], abs=1e-5)
        assert gs["rate_hz"] == pytest.approx((t.size - 1) / gs["span_s"], rel=1e-3)
    assert summ["gpus"]["0"]["method"] == "counter" and summ["gpus"]["1"]["method"] == "integrated"


class FakeTime:
    """A fake monotonic clock and stop event for sample_until(): wait(d) moves the clock by d, or only up to
    stop_at_s (where SIGTERM would set the event and wake the wait early); each tick takes read_s."""

    def __init__(self, read_s: float, stop_at_s: float):
        self.now, self.read_s, self.stop_at_s, self.ticks = 100.0, read_s, 100.0 + stop_at_s, []

    def clock(self) -> float:
        return self.now

    def tick(self) -> None:
        self.ticks.append(self.now)
        self.now += self.read_s

    def is_set(self) -> bool:
        return self.now >= self.stop_at_s

    def wait(self, timeout_s: float) -> bool:
        self.now = min(self.now + timeout_s, max(self.now, self.stop_at_s))
        return self.is_set()


def test_schedule_on_a_fake_clock_is_absolute_and_skips_when_behind():
    # reads of 20 ms, 50 ms interval: ticks exactly on t0 + k x 50 ms (a sleep(interval) loop: every 70 ms),
    # then the stop wakes the last wait and one final tick follows at once
    ft = FakeTime(read_s=0.02, stop_at_s=1.0)
    assert P.sample_until(ft.tick, 0.05, ft, clock=ft.clock) == 0
    assert np.allclose(ft.ticks, [100.0 + 0.05 * k for k in range(20)] + [101.0], atol=1e-9)
    # reads of 120 ms: ticks 1 and 2 of every 3 are missed and counted as skipped, none bursts to catch up
    ft = FakeTime(read_s=0.12, stop_at_s=1.0)
    skipped = P.sample_until(ft.tick, 0.05, ft, clock=ft.clock)
    grid = (np.array(ft.ticks) - 100.0) / 0.05
    assert np.allclose(grid, np.arange(0, 3 * len(grid), 3), atol=1e-6)   # ticks 0, 3, 6, ..., 18 on the grid
    assert len(grid) == 7 and skipped == 2 * (len(grid) - 1)   # tick 18 (0.90 s) ends after the stop: the last
    # stop already set: one tick, nothing skipped
    ft = FakeTime(read_s=0.01, stop_at_s=0.0)
    assert P.sample_until(ft.tick, 0.05, ft, clock=ft.clock) == 0 and ft.ticks == [100.0]


def test_absolute_schedule_no_drift(tmp_path):
    """Each power read takes 20 ms: on the absolute schedule ticks still come every 50 ms (or are counted as
    skipped when the host is busy); a sleep(interval) loop would tick every 70 ms and fail the catch-up bound."""
    s = P.PowerSamplerProcess(tmp_path, interval_s=0.05, nvml_module="pynvml_fake",
                              env={**_env("H100:300"), "FAKE_NVML_READ_DELAY_S": "0.02"})
    s.start(timeout_s=120)
    time.sleep(1.5)
    summary = s.stop()
    data = E.load_power_samples(tmp_path / P.SAMPLES_FILE)
    t = data["samples"][0]["t_unix_s"]
    assert summary["gpus"]["0"]["samples"] == t.size
    _check_schedule(t, summary["skipped_ticks"], 0.05, data["header"]["unix_s"])


def _window_inside(data: dict) -> float:
    """Start of a 2.0 s window inside every GPU's samples: the sampler ran >= 2.4 s after its first tick."""
    return max(s["t_unix_s"][0] for s in data["samples"].values()) + 0.13


def test_energy_matches_hand_computed(sampled):
    # 2.0 s window inside the samples: 300 W -> 600 J, 150 W -> 300 J, 50 W -> 100 J. Power is constant, so the
    # trapezoid is exact and the interpolated counter is off only by the gap between a sample's time.time() stamp
    # and the fake's time.monotonic() counter read: microseconds, or a preemption on a busy host, measured here.
    data = sampled["data"]
    t0 = _window_inside(data)
    e = E.energy_by_gpu(data, t0, t0 + 2.0)
    assert e[0]["method"] == "counter" and e[1]["method"] == "integrated" and e[2]["method"] == "counter"
    assert e[1]["energy_j"] == pytest.approx(300.0, rel=1e-9)
    for g, watts in WATTS.items():
        tol = _tol_j(data, g, watts)
        assert abs(e[g]["energy_j"] - 2.0 * watts) <= tol
        assert abs(e[g]["avg_power_w"] - watts) <= tol / 2.0
        assert e[g]["coverage"] == 1.0 and e[g]["extrapolated_s"] == 0.0
        t = data["samples"][g]["t_unix_s"]
        inside = t[(t >= t0) & (t <= t0 + 2.0)]
        assert e[g]["samples"] == inside.size >= 2.0 / 0.05 / 4   # a quarter of the ticks, at least
        assert e[g]["rate_hz"] == pytest.approx((inside.size - 1) / (inside[-1] - inside[0]))
    # the counter really is used for GPU 0: the same window integrated from power_w agrees
    integ = E.energy_by_gpu({0: {**data["samples"][0], "energy_j": None}}, t0, t0 + 2.0)
    assert integ[0]["method"] == "integrated" and integ[0]["energy_j"] == pytest.approx(600.0, rel=1e-9)
    # whole life in the summary: counter delta = P x span
    g0 = sampled["summary"]["gpus"]["0"]
    assert abs(g0["energy_j"] - 300.0 * g0["span_s"]) <= _tol_j(data, 0, 300.0)
    assert sampled["summary"]["total_energy_j"] == pytest.approx(
        sum(v["energy_j"] for v in sampled["summary"]["gpus"].values()))


def test_window_past_samples_reports_coverage(sampled):
    data = sampled["data"]
    t_last = max(s["t_unix_s"][-1] for s in data["samples"].values())
    e = E.energy_by_gpu(data, t_last - 1.0, t_last + 1.0)
    for g, watts in ((0, 300.0), (1, 150.0)):
        covered = data["samples"][g]["t_unix_s"][-1] - (t_last - 1.0)   # this GPU's samples end a little earlier
        assert 0.0 < covered <= 1.0
        assert e[g]["coverage"] == pytest.approx(covered / 2.0, abs=1e-9)
        assert e[g]["extrapolated_s"] == pytest.approx(2.0 - covered, abs=1e-9)
        # extrapolated at the last sample's power: the whole window at constant power
        assert abs(e[g]["energy_j"] - 2.0 * watts) <= _tol_j(data, g, watts)


def test_attribution_of_sampled_gpus(sampled):
    data = sampled["data"]
    t0 = _window_inside(data)
    per = E.energy_by_gpu(data, t0, t0 + 2.0)
    att = E.attribute_energy(per, [{"id": "prompt-0", "pool": "prompt", "gpu_ids": [0]},
                                   {"id": "token-0", "pool": "token", "gpu_ids": [1]}])
    tol = {g: _tol_j(data, g, w) for g, w in WATTS.items()}
    assert abs(att["instances"]["prompt-0"]["energy_j"] - 600.0) <= tol[0]
    assert att["instances"]["token-0"]["energy_j"] == pytest.approx(300.0, rel=1e-9)
    assert att["pools"]["prompt"]["gpus"] == [0] and att["pools"]["token"]["gpus"] == [1]
    assert att["unattributed"]["gpus"] == [2] and abs(att["unattributed"]["energy_j"] - 100.0) <= tol[2]
    assert att["total_energy_j"] == pytest.approx(sum(v["energy_j"] for v in per.values()))
    assert abs(att["total_energy_j"] - 1000.0) <= sum(tol.values())


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
    s.start(timeout_s=120)
    os.killpg(s.proc.pid, 2)   # SIGINT (Ctrl-C in a terminal) also ends it cleanly with a summary
    s.proc.wait(120)
    s.proc = None
    summary = s.stop()
    assert sorted(summary["gpus"]) == ["0", "2"]
    data = E.load_power_samples(tmp_path / P.SAMPLES_FILE)
    assert [g["index"] for g in data["header"]["gpus"]] == [2, 0] and sorted(data["samples"]) == [0, 2]
    assert np.all(data["samples"][2]["power_w"] == 3.0)


def test_nvml_missing(tmp_path):
    assert P.detect_gpus("no_such_nvml_module") == []
    r = subprocess.run([sys.executable, "-m", "splitbench.hardware.power", "--out", str(tmp_path),
                        "--nvml-module", "no_such_nvml_module"], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "no_such_nvml_module" in r.stderr and "nvidia-ml-py" in r.stderr
    s = P.PowerSamplerProcess(tmp_path / "x", nvml_module="pynvml_fake",
                              env={**_env("H100:300"), "FAKE_NVML_INIT_ERROR": "1"})
    with pytest.raises(ServerStartError, match="nvmlInit.*Library Not Found"):
        s.start(timeout_s=120)
    assert s.stop() == {}


def test_bad_gpu_index_is_one_line(tmp_path):
    env = {**os.environ, **_env("H100:300")}
    r = subprocess.run([sys.executable, "-m", "splitbench.hardware.power", "--out", str(tmp_path), "--nvml-module",
                        "pynvml_fake", "--gpus", "0,3"], check=False, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stderr.strip() == "power sampler: --gpus 0,3: this host has 1 GPU(s) (0..0)"


def test_detect_gpus(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    monkeypatch.setenv("FAKE_NVML_GPUS", "H200:500,H200:100")
    gpus = P.detect_gpus("pynvml_fake")
    assert gpus == [{"index": 0, "name": "NVIDIA H200 (fake)", "memory_total_bytes": 141 * 2**30},
                    {"index": 1, "name": "NVIDIA H200 (fake)", "memory_total_bytes": 141 * 2**30}]
    monkeypatch.setenv("SPLITBENCH_NVML_MODULE", "pynvml_fake")   # the default module, as the power sampler's
    assert P.detect_gpus() == gpus
    monkeypatch.setenv("FAKE_NVML_INIT_ERROR", "1")
    assert P.detect_gpus("pynvml_fake") == []


# ---- pure functions on hand-built samples ----

def _ramp() -> dict:
    """GPU 0: power ramps 100 -> 300 W over t = 10..12 s (samples every 0.5 s), no counter."""
    t = np.arange(10.0, 12.01, 0.5)
    return {0: {"t_unix_s": t, "power_w": 100.0 + 100.0 * (t - 10.0), "energy_j": None}}


def test_integrated_ramp_partial_window():
    # window [10.25, 11.75]: power 125 -> 275 W linearly, so energy = 1.5 s x mean 200 W = 300 J exactly
    e = E.energy_by_gpu(_ramp(), 10.25, 11.75)[0]
    assert e["method"] == "integrated" and e["energy_j"] == pytest.approx(300.0)
    assert e["avg_power_w"] == pytest.approx(200.0) and e["samples"] == 3 and e["rate_hz"] == pytest.approx(2.0)
    assert e["coverage"] == 1.0


def test_integrated_extrapolation_before_and_after():
    # [9, 13]: 1 s before the first sample at 100 W, 2 s ramp (400 J), 1 s after at 300 W -> 800 J, coverage 0.5
    e = E.energy_by_gpu(_ramp(), 9.0, 13.0)[0]
    assert e["energy_j"] == pytest.approx(100.0 + 400.0 + 300.0)
    assert e["coverage"] == pytest.approx(0.5) and e["extrapolated_s"] == pytest.approx(2.0)
    none = E.energy_by_gpu(_ramp(), 20.0, 21.0)[0]   # entirely after the samples
    assert none["coverage"] == 0.0 and none["energy_j"] == pytest.approx(300.0) and none["samples"] == 0


def test_counter_preferred_and_interpolated():
    # counter says 1000 J/s, power_w (a laggy average) says 10 W: the counter must win
    t = np.array([0.0, 1.0, 2.0, 3.0])
    s = {5: {"t_unix_s": t, "power_w": np.full(4, 10.0), "energy_j": 5000.0 + 1000.0 * t}}
    e = E.energy_by_gpu(s, 0.5, 2.25)[5]
    assert e["method"] == "counter" and e["energy_j"] == pytest.approx(1750.0)
    past = E.energy_by_gpu(s, 2.0, 4.0)[5]   # 1 s counted + 1 s extrapolated at the last sample's power (10 W)
    assert past["energy_j"] == pytest.approx(1010.0) and past["coverage"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        E.energy_by_gpu(s, 2.0, 1.0)


def test_shared_gpu_split_equally():
    per = {0: {"energy_j": 900.0}, 1: {"energy_j": 300.0}, 2: {"energy_j": 60.0}}
    inst = [{"id": "p0", "pool": "prompt", "gpu_ids": [0]},
            {"id": "t0", "pool": "token", "gpu_ids": [0, 1]},    # Splitwiser: shares GPU 0 with p0
            {"id": "t1", "pool": "token", "gpu_ids": [1, 7]}]    # GPU 7 was not sampled
    a = E.attribute_energy(per, inst)
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
    d = E.load_power_samples(p)
    assert d["header"]["driver"] == "d"
    np.testing.assert_allclose(d["samples"][0]["t_unix_s"], [1.0, 1.1, 1.2])
    np.testing.assert_allclose(d["samples"][0]["energy_j"], [0.0, 10.0, 20.0])
    p.write_text(text.replace('"power_w": 100.0', '"power_w": "x"', 1) + json.dumps(rows[0]) + "\n")
    with pytest.raises(InputError, match=r"s\.jsonl:2: bad power sample"):
        E.load_power_samples(p)
    p.write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    with pytest.raises(InputError, match=r"s\.jsonl:1: first line is not the sampler header"):
        E.load_power_samples(p)
