"""The machine type follows the host: NVML GPU names and count -> catalog type and count (fake NVML end to end),
a 1-GPU host is a 1x machine (not 1/8 of a DGX), other counts are N 1x machines with a note, --machine wins."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from splitbench.app.accounting import hardware_for
from splitbench.app.profile import _host_hardware
from splitbench.hardware.catalog import cost_usd, load_catalog
from splitbench.hardware.detect import accelerator_of, host_machine

FAKE_DIR = Path(__file__).resolve().parent / "fake_nvml"
CAT = load_catalog()
SPLITWISER = [{"id": "prompt-0", "pool": "prompt", "gpu_ids": [0]}, {"id": "token-0", "pool": "token", "gpu_ids": [0]}]


@pytest.fixture
def fake_nvml(monkeypatch):
    """set_gpus("H200:100,...") makes the host's NVML (the default detect_gpus() module) report those GPUs."""
    monkeypatch.delenv("SPLITBENCH_HARDWARE", raising=False)
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    monkeypatch.setenv("SPLITBENCH_NVML_MODULE", "pynvml_fake")
    return lambda gpus: monkeypatch.setenv("FAKE_NVML_GPUS", gpus)


def _opts(machine=None, machines=None):
    return SimpleNamespace(hardware_file=None, machine=machine, machines=machines)


def _gpus(name: str, n: int, memory_gib: int = 80) -> list[dict]:
    return [{"index": i, "name": name, "memory_total_bytes": memory_gib * 2**30} for i in range(n)]


def test_nvml_names_map_to_sxm_accelerators():
    assert accelerator_of({"name": "NVIDIA H200", "memory_total_bytes": 141 * 2**30}) == "h200-141gb"
    assert accelerator_of({"name": "NVIDIA H100 80GB HBM3"}) == "h100-80gb"
    assert accelerator_of({"name": "NVIDIA A100-SXM4-80GB"}) == "a100-80gb"
    assert accelerator_of({"name": "NVIDIA A100-SXM4-40GB", "memory_total_bytes": 40 * 2**30}) is None
    for other in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA L40S"):
        assert accelerator_of({"name": other, "memory_total_bytes": 96 * 2**30}) is None, other


def test_gpu_count_picks_the_machine_type():
    one = host_machine(_gpus("NVIDIA H200", 1, 141), CAT)
    assert (one.machine, one.machines, one.gpus, one.note) == ("1x-h200", 1.0, 1, None)
    dgx = host_machine(_gpus("NVIDIA H100 80GB HBM3", 8), CAT)
    assert (dgx.machine, dgx.machines, dgx.note) == ("dgx-h100", 1.0, None)   # not the power-capped variant
    assert host_machine(_gpus("NVIDIA A100-SXM4-80GB", 8), CAT).machine == "dgx-a100"
    two = host_machine(_gpus("NVIDIA H100 80GB HBM3", 2), CAT)
    assert (two.machine, two.machines) == ("1x-h100", 2.0) and "costed as 2 x 1x-h100" in two.note
    sixteen = host_machine(_gpus("NVIDIA H200", 16, 141), CAT)
    assert (sixteen.machine, sixteen.machines) == ("dgx-h200", 2.0) and sixteen.note
    assert host_machine([], CAT) is None
    assert host_machine(_gpus("NVIDIA H100 80GB HBM3", 1) + _gpus("NVIDIA A100-SXM4-80GB", 1), CAT) is None
    assert host_machine(_gpus("NVIDIA L40S", 1, 48), CAT) is None
    # a catalog without 1-GPU types: an 8-GPU type cannot cover 1 GPU
    assert host_machine(_gpus("NVIDIA H200", 1, 141), {k: v for k, v in CAT.items() if k != "1x-h200"}) is None


def test_one_gpu_h200_host_is_one_1x_h200_not_an_eighth_of_a_dgx(fake_nvml):
    fake_nvml("H200:300")
    hw = hardware_for(_opts(), SPLITWISER)
    assert (hw["machine"], hw["machines"], hw["units_per_machine"]) == ("1x-h200", 1.0, 1)
    assert [a["machines"] for a in hw["allocations"]] == [0.5, 0.5] and hw["unallocated_machines"] == 0
    assert hw["detected"] == {"machine": "1x-h200", "machines": 1.0, "gpus": 1, "gpu_name": "NVIDIA H200 (fake)",
                              "note": None}
    assert cost_usd(CAT[hw["machine"]], hw["machines"], 3600) == pytest.approx(63.296 / 8)
    assert _host_hardware(None, None) == "h200-141gb"   # profiles: the accelerator, as for the DGX


def test_eight_gpu_host_is_a_dgx_with_idle_gpus_unallocated(fake_nvml):
    fake_nvml(",".join(["H200:100"] * 8))
    hw = hardware_for(_opts(), SPLITWISER)
    assert (hw["machine"], hw["machines"]) == ("dgx-h200", 1.0)
    assert [a["machines"] for a in hw["allocations"]] == [1 / 16, 1 / 16]
    assert hw["unallocated_machines"] == pytest.approx(7 / 8)


def test_two_gpu_host_is_two_1x_machines_with_a_note(fake_nvml):
    fake_nvml("H100:100,H100:100")
    hw = hardware_for(_opts(), [{"id": "baseline-0", "pool": "baseline", "gpu_ids": [0]}])
    assert (hw["machine"], hw["machines"]) == ("1x-h100", 2.0)
    assert hw["allocations"][0]["machines"] == 1.0 and hw["unallocated_machines"] == 1.0
    assert "2 x 1x-h100" in hw["detected"]["note"]


def test_explicit_machine_wins_over_detection(fake_nvml):
    fake_nvml("H200:300")
    hw = hardware_for(_opts(machine="dgx-h200"), SPLITWISER)
    assert (hw["machine"], hw["machines"]) == ("dgx-h200", 1.0) and "detected" not in hw
    assert hw["unallocated_machines"] == pytest.approx(7 / 8)
    hw = hardware_for(_opts(machines=3), SPLITWISER)           # --machines alone keeps the detected type
    assert (hw["machine"], hw["machines"]) == ("1x-h200", 3.0) and hw["unallocated_machines"] == 2.0
